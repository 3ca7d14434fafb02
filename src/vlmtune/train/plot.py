"""A loss-curve picture for the run folder (`loss_curve.png`), drawn with Pillow so it needs no plotting library."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from vlmtune.picture_axes import ema, nice_ticks, tick_label

WIDTH, HEIGHT, MARGIN = 720, 420, 60


def read_curves(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of train loss and eval loss from train_log.jsonl (a resumed run keeps the last value)."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}}
    lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            if n == len(lines) - 1:  # a run writing its log: the last line may be half there
                break
            raise
        for key, series in curves.items():
            if key in row and "step" in row:
                series[int(row["step"])] = float(row[key])
    return {key: sorted(series.items()) for key, series in curves.items()}


def _scale(value: float, lo: float, hi: float, a: int, b: int) -> float:
    return a if hi == lo else a + (value - lo) / (hi - lo) * (b - a)


TRAIN, TRAIN_RAW, EVAL = (31, 119, 180), (174, 199, 232), (255, 127, 14)
"""Smoothed train loss (dark blue) over the raw one (light blue), eval loss (orange, each evaluation a dot)."""


def render_loss_curve(log_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss raw and smoothed (TensorBoard's debiased EMA, 0.9; the raw values lie behind it) and eval loss
    against the step, on round-valued axes; None when fewer than two points were logged."""
    curves = read_curves(log_path)
    points = curves["loss"] + curves["eval_loss"]
    if len(curves["loss"]) < 2:
        return None
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    s_lo, s_hi = min(steps), max(steps)
    pad = (max(values) - min(values)) * 0.05 or abs(values[0]) * 0.05 or 0.5
    v_lo, v_hi = min(values) - pad, max(values) + pad
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = MARGIN, WIDTH - 20, 40, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    v_ticks = nice_ticks(v_lo, v_hi)
    for value in v_ticks:
        y = _scale(value, v_lo, v_hi, bottom, top)
        draw.line((left + 1, y, right - 1, y), fill=(235, 235, 235))
        draw.line((left - 4, y, left, y), fill="black")
        label = tick_label(value, v_ticks)
        draw.text((left - 8 - draw.textlength(label), y - 6), label, fill="black")
    s_ticks = nice_ticks(s_lo, s_hi) if s_hi > s_lo else [s_lo]
    for step in s_ticks:
        x = _scale(step, s_lo, s_hi, left, right)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        label = tick_label(step, s_ticks) if len(s_ticks) > 1 else str(step)
        draw.text((x - draw.textlength(label) / 2, bottom + 8), label, fill="black")

    def xy(series: list[tuple[int, float]]) -> list[tuple[float, float]]:
        return [(_scale(s, s_lo, s_hi, left, right), _scale(v, v_lo, v_hi, bottom, top)) for s, v in series]

    train = curves["loss"]
    draw.line(xy(train), fill=TRAIN_RAW, width=1)
    smooth = list(zip([s for s, _ in train], ema([v for _, v in train]), strict=True))
    draw.line(xy(smooth), fill=TRAIN, width=2)
    evals = xy(curves["eval_loss"])
    if len(evals) > 1:
        draw.line(evals, fill=EVAL, width=2)
    for x, y in evals:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=EVAL)
    draw.text((left, 12), title or "loss", fill="black")
    legend = [("train loss (raw)", TRAIN_RAW), ("train loss (smoothed)", TRAIN)]
    legend += [("eval loss", EVAL)] if evals else []
    x = right
    for label, colour in reversed(legend):
        x -= draw.textlength(label) + 30
        draw.line((x, 18, x + 14, 18), fill=colour, width=3)
        draw.text((x + 18, 12), label, fill=colour if colour != TRAIN_RAW else (90, 140, 200))
    draw.text(((left + right) // 2 - 12, HEIGHT - 24), "step", fill="black")
    draw.text((4, top - 20), "loss", fill="black")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    return out_png
