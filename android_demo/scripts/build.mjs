// Build the web device with esbuild: the app into dist/ (with onnxruntime-web's wasm beside it), or
// with --tests the Node tests into build/tests/, the browser checks into build/browser/ and the trainer's
// parity tool into build/tools/.
import { build } from "esbuild";
import { cpSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const tests = process.argv.includes("--tests");
const common = { bundle: true, format: "esm", target: "es2022", sourcemap: true, logLevel: "warning" };

async function app() {
  const out = join(root, "dist");
  rmSync(out, { recursive: true, force: true });
  mkdirSync(join(out, "ort"), { recursive: true });
  await build({ ...common, entryPoints: [join(root, "src/ui/main.ts")], outfile: join(out, "app.js"),
    platform: "browser", minify: true });
  cpSync(join(root, "public"), out, { recursive: true });
  for (const f of ["ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"]) {
    cpSync(join(root, "node_modules/onnxruntime-web/dist", f), join(out, "ort", f));
  }
}

async function testBundles() {
  rmSync(join(root, "build"), { recursive: true, force: true });
  await build({ ...common, entryPoints: readdirSync(join(root, "tests")).filter((f) => f.endsWith(".test.ts")).map((f) => join(root, "tests", f)), outdir: join(root, "build/tests"),
    outExtension: { ".js": ".mjs" }, platform: "node" });
  await build({ ...common, entryPoints: [join(root, "tests/train_parity.ts")], outfile: join(root, "build/tools/train_parity.mjs"),
    platform: "node" });
  await build({ ...common, entryPoints: [join(root, "tests/browser_entry.ts")], outfile: join(root, "build/browser/checks.js"),
    platform: "browser", format: "iife" });
}

await (tests ? testBundles() : app());
