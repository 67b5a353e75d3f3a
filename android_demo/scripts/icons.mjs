// Render the app's icon (public/icon.svg) into the Android project's launcher icons and splash
// screens, at the size of each PNG Capacitor generated there, with headless Chromium.
//   node scripts/icons.mjs      (after `npx cap add android`; the PNGs are committed)
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const res = join(root, "android/app/src/main/res");
const icon = readFileSync(join(root, "public/icon.svg"), "utf8");
const ACCENT = "#12343b";
// the graph without its rounded square: the adaptive icon's foreground (safe zone: the middle 66 of 108)
const foreground = icon.replace(/<rect[^>]*\/>/, "").replace('viewBox="0 0 108 108"', 'viewBox="-21 -21 150 150"');

function html(kind, w, h) {
  const size = Math.round(Math.min(w, h) * (kind === "splash" ? 0.35 : 1));
  const svg = (kind === "foreground" ? foreground : icon).replace("<svg ", `<svg width="${size}" height="${size}" `);
  const clip = kind === "round" ? "border-radius:50%;overflow:hidden;" : "";
  const bg = kind === "splash" ? ACCENT : "transparent";
  return `<html><body style="margin:0;width:${w}px;height:${h}px;background:${bg};display:flex;align-items:center;`
    + `justify-content:center"><div style="${clip}width:${size}px;height:${size}px;line-height:0">${svg}</div></body></html>`;
}

const browser = await chromium.launch({ executablePath: process.env.NMOE_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage();
  for (const dir of readdirSync(res).filter((d) => d.startsWith("mipmap-") || d.startsWith("drawable"))) {
    for (const file of readdirSync(join(res, dir)).filter((f) => f.endsWith(".png"))) {
      const path = join(res, dir, file);
      const png = readFileSync(path);
      const [w, h] = [png.readUInt32BE(16), png.readUInt32BE(20)];
      const kind = file.startsWith("splash") ? "splash" : file.includes("foreground") ? "foreground"
        : file.includes("round") ? "round" : "square";
      await page.setViewportSize({ width: w, height: h });
      await page.setContent(html(kind, w, h));
      writeFileSync(path, await page.screenshot({ omitBackground: kind !== "splash" }));
      console.log(`${path.slice(root.length + 1)} ${w}x${h} ${kind}`);
    }
  }
} finally {
  await browser.close();
}
