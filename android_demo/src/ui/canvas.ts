/** The input pad: draw with a finger or mouse on an H x W canvas (white on black, like the datasets). */

export class DrawPad {
  private readonly ctx: CanvasRenderingContext2D;
  private last: [number, number] | null = null;

  constructor(readonly canvas: HTMLCanvasElement, readonly height: number, readonly width: number) {
    canvas.width = width;
    canvas.height = height;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true })!;
    this.clear();
    canvas.addEventListener("pointerdown", (e) => {
      canvas.setPointerCapture(e.pointerId);
      this.last = this.point(e);
      this.stroke(this.last, this.last);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (this.last === null) return;
      const p = this.point(e);
      this.stroke(this.last, p);
      this.last = p;
    });
    const end = (): void => {
      this.last = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
  }

  clear(): void {
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, this.width, this.height);
  }

  /** Show `pixels` (uint8 [C, H, W]; the first channel as gray). */
  show(pixels: Uint8Array): void {
    const img = this.ctx.createImageData(this.width, this.height);
    for (let i = 0; i < this.width * this.height; i++) {
      img.data.set([pixels[i]!, pixels[i]!, pixels[i]!, 255], 4 * i);
    }
    this.ctx.putImageData(img, 0, 0);
  }

  /** The drawing as uint8 [channels, H, W] (gray replicated per channel). */
  pixels(channels: number): Uint8Array {
    const rgba = this.ctx.getImageData(0, 0, this.width, this.height).data;
    const plane = this.width * this.height;
    const out = new Uint8Array(channels * plane);
    for (let i = 0; i < plane; i++) {
      const gray = Math.round((rgba[4 * i]! + rgba[4 * i + 1]! + rgba[4 * i + 2]!) / 3);
      for (let c = 0; c < channels; c++) out[c * plane + i] = gray;
    }
    return out;
  }

  private point(e: PointerEvent): [number, number] {
    const r = this.canvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * this.width, ((e.clientY - r.top) / r.height) * this.height];
  }

  private stroke(a: [number, number], b: [number, number]): void {
    const ctx = this.ctx;
    ctx.strokeStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineWidth = Math.max(1.5, this.width / 12);
    ctx.beginPath();
    ctx.moveTo(...a);
    ctx.lineTo(...b);
    ctx.stroke();
  }
}
