// Tokens/s over the last minutes, from the rate of a counter, drawn on a <canvas>.

export const WINDOW_S = 300;
const PAD = { left: 40, right: 8, top: 10, bottom: 20 };

const LINES = 4;

// The smallest round grid step that lets LINES steps reach `peak`.
function gridStep(peak) {
  const raw = Math.max(peak, 1) / LINES;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].find((m) => m * power >= raw) * power;
}

export class RateChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];
    this.last = null;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // A new reading of the counter at time `t` (ms).
  add(t, counter) {
    if (this.last && counter >= this.last.counter && t > this.last.t) {
      this.points.push({ t, rate: ((counter - this.last.counter) * 1000) / (t - this.last.t) });
    }
    this.last = { t, counter }; // a counter that went down (a restart) starts again from here
    while (this.points.length && this.points[0].t < t - WINDOW_S * 1000) this.points.shift();
    this.draw();
  }

  get now() {
    return this.points.length ? this.points[this.points.length - 1].rate : 0;
  }

  get peak() {
    return this.points.reduce((max, p) => Math.max(max, p.rate), 0);
  }

  draw() {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const style = getComputedStyle(canvas);
    const color = (name) => style.getPropertyValue(name).trim();
    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const step = gridStep(this.peak);
    const top = step * LINES;
    const end = this.last ? this.last.t : Date.now();
    const x = (t) => PAD.left + plotW * (1 - (end - t) / (WINDOW_S * 1000));
    const y = (rate) => PAD.top + plotH * (1 - rate / top);

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = color("--muted");
    ctx.strokeStyle = color("--grid");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= LINES; i += 1) {
      const value = step * i;
      const gy = Math.round(y(value)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, gy);
      ctx.lineTo(width - PAD.right, gy);
      ctx.stroke();
      ctx.fillText(String(Number(value.toFixed(2))), PAD.left - 6, gy);
    }
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(`${WINDOW_S / 60} min ago`, PAD.left, height - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", width - PAD.right, height - 4);

    if (!this.points.length) {
      ctx.textAlign = "center";
      ctx.fillText("waiting for data…", PAD.left + plotW / 2, PAD.top + plotH / 2);
      return;
    }
    const accent = color("--accent");
    const first = this.points[0];
    const last = this.points[this.points.length - 1];
    ctx.beginPath();
    for (const p of this.points) ctx.lineTo(x(p.t), y(p.rate));
    ctx.strokeStyle = accent;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.stroke();
    ctx.lineTo(x(last.t), y(0));
    ctx.lineTo(x(first.t), y(0));
    ctx.closePath();
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = accent;
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.beginPath();
    ctx.arc(x(last.t), y(last.rate), 3.5, 0, 2 * Math.PI);
    ctx.fill();
  }
}
