"""A picture of `vlmtune estimate --sweep ... --plot FILE.png`: one bar per combination of the swept values, cut into
the breakdown's terms like `picture.render_breakdown`'s single bar, the card's usable memory as a line when a GPU was
named, the nvidia-smi peak written after each bar. Pillow only, like the other pictures."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from vlmtune.memory.breakdown import Breakdown
from vlmtune.memory.picture import PALETTE, STATUS_COLOUR, segments
from vlmtune.picture_axes import nice_ticks, tick_label

GIB = 1 << 30
WIDTH, LABEL_W, RIGHT_PAD, TOP, ROW, BAR = 1000, 300, 110, 70, 26, 18
LEGEND_COLUMNS = 4


def render_sweep(rows: list[tuple[str, Breakdown]], out_png: Path) -> Path:
    """rows: (the combination as text, its estimate), drawn top to bottom in that order."""
    if not rows:
        raise ValueError("no estimates to draw")
    capacity = next((b.verdict.capacity for _, b in rows if b.verdict), 0)
    scale_max = max(max(b.peak_total for _, b in rows), capacity) * 1.05 or 1
    names = list(dict.fromkeys(label for _, b in rows for label, _ in segments(b)))
    legend_rows = -(-len(names) // LEGEND_COLUMNS)
    height = TOP + ROW * len(rows) + 40 + 18 * legend_rows + 10
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    first = rows[0][1]
    draw.text((10, 10), f"memory estimate per GPU: {first.model}", fill="black")
    draw.text((10, 28), f"one bar per combination of the swept values; first row: {first.setup()}", fill="black")
    left, right = LABEL_W, WIDTH - RIGHT_PAD

    def x(value: float) -> float:
        return left + value / scale_max * (right - left)

    labels = {name: PALETTE[n % len(PALETTE)] for n, name in enumerate(names)}
    for n, (text, b) in enumerate(rows):
        top = TOP + n * ROW
        draw.text((10, top + 3), text, fill="black")
        start = 0
        for label, value in segments(b):
            colour = labels[label]
            draw.rectangle((x(start), top, x(start + value), top + BAR), fill=colour)
            start += value
        status = b.verdict.status if b.verdict else None
        draw.text((x(b.peak_total) + 4, top + 3), f"{b.peak_total / GIB:.2f} GiB",
                  fill=STATUS_COLOUR.get(status, (0, 0, 0)))
    bottom = TOP + ROW * len(rows)
    ticks = nice_ticks(0, scale_max / GIB)
    for value in ticks:
        draw.line((x(value * GIB), bottom, x(value * GIB), bottom + 5), fill="black")
        draw.text((x(value * GIB) - 8, bottom + 8), tick_label(value, ticks), fill="black")
    if capacity:
        status = "fits" if all(b.peak_total <= capacity for _, b in rows) else "does not fit"
        colour = STATUS_COLOUR[status]
        draw.line((x(capacity), TOP - 8, x(capacity), bottom), fill=colour, width=2)
        draw.text((min(x(capacity) + 4, WIDTH - 160), TOP - 22),
                  f"{first.verdict.gpu if first.verdict else ''}: {capacity / GIB:.1f} GiB", fill=colour)
    for n, (name, colour) in enumerate(labels.items()):  # the legend: one square per term, in table order
        lx = 10 + (n % LEGEND_COLUMNS) * (WIDTH // LEGEND_COLUMNS)
        ly = bottom + 32 + (n // LEGEND_COLUMNS) * 18
        draw.rectangle((lx, ly + 2, lx + 10, ly + 12), fill=colour)
        draw.text((lx + 16, ly), name, fill="black")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    return out_png
