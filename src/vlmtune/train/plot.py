"""A loss-curve picture for the run folder (`loss_curve.png`), drawn with Pillow so it needs no plotting library."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 420, 60


def read_curves(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of train loss and eval loss from train_log.jsonl (a resumed run keeps the last value)."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}}
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        for key, series in curves.items():
            if key in row and "step" in row:
                series[int(row["step"])] = float(row[key])
    return {key: sorted(series.items()) for key, series in curves.items()}


def _scale(value: float, lo: float, hi: float, a: int, b: int) -> float:
    return a if hi == lo else a + (value - lo) / (hi - lo) * (b - a)


def render_loss_curve(log_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Draw train (blue) and eval (orange) loss against the step; None when fewer than two points were logged."""
    curves = read_curves(log_path)
    points = curves["loss"] + curves["eval_loss"]
    if len(curves["loss"]) < 2:
        return None
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    s_lo, s_hi, v_lo, v_hi = min(steps), max(steps), min(values), max(values)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = MARGIN, WIDTH - 20, 40, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):
        value = v_lo + (v_hi - v_lo) * i / 4
        y = _scale(value, v_lo, v_hi, bottom, top)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = round(s_lo + (s_hi - s_lo) * i / 4)
        x = _scale(step, s_lo, s_hi, left, right)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 8, bottom + 8), str(step), fill="black")
    for key, colour in (("loss", (31, 119, 180)), ("eval_loss", (255, 127, 14))):
        xy = [(_scale(s, s_lo, s_hi, left, right), _scale(v, v_lo, v_hi, bottom, top)) for s, v in curves[key]]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if key == "eval_loss" else []:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    draw.text((left, 12), title or "loss", fill="black")
    draw.text((right - 170, 12), "train loss", fill=(31, 119, 180))
    draw.text((right - 80, 12), "eval loss", fill=(255, 127, 14))
    draw.text(((left + right) // 2 - 12, HEIGHT - 24), "step", fill="black")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    return out_png
