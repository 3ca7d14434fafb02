"""A picture of a memory estimate (`vlmtune estimate --plot FILE.png`, `memory_estimate.png` in a GPU run's folder):
one bar per GPU cut into the breakdown's terms, in the order the table lists them, with the card's usable memory as
a line when a GPU was named. Drawn with Pillow, like the loss curve, so it needs no plotting library."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from vlmtune.memory.breakdown import WEIGHTS, Breakdown
from vlmtune.picture_axes import nice_ticks, tick_label

GIB = 1 << 30
WIDTH, HEIGHT = 900, 440
LEFT, RIGHT, BAR_TOP, BAR_BOTTOM = 30, 870, 100, 150
PEAK_ROW, CAPACITY_ROW = BAR_TOP - 18, BAR_TOP - 36
"""Rows of the two labels above the bar: the peak's and the card's limit never share a row, so never overlap."""
PALETTE = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
    (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
STATUS_COLOUR = {"fits": (0, 120, 0), "tight": (235, 120, 0), "does not fit": (190, 0, 0)}  # none in PALETTE


def segments(b: Breakdown) -> list[tuple[str, int]]:
    """(label, bytes) of every non-zero term, in table order; they add up to `peak_total` (what nvidia-smi shows)."""
    quant = " (4-bit)" if b.weights_quantized else ""
    rows = [(label + (quant if label == f"{WEIGHTS}language" else ""), value) for label, value in b.allocated_terms()]
    rows += [("allocator overhead", b.allocator_overhead), ("CUDA context", b.cuda_context)]
    return [(label, value) for label, value in rows if value > 0]


def label_layout(b: Breakdown, textlength, x) -> list[tuple[str, float, int, tuple[int, int, int]]]:
    """(text, left x, row y, colour) of the peak's label and the card limit's: each beside its line (to the left
    when it would run past the picture), the two in different rows."""
    out = []

    def place(text: str, at: float) -> float:
        width = textlength(text)
        return at + 4 if at + 4 + width <= WIDTH - 4 else max(4.0, at - 4 - width)

    peak = f"peak {b.peak_total / GIB:.2f} GiB (nvidia-smi)"
    out.append((peak, place(peak, x(b.peak_total)), PEAK_ROW, (0, 0, 0)))
    if b.verdict:
        v = b.verdict
        limit = f"{v.gpu}: {v.capacity / GIB:.1f} GiB usable"
        out.append((limit, place(limit, x(v.capacity)), CAPACITY_ROW, STATUS_COLOUR.get(v.status, (0, 0, 0))))
    return out


def render_breakdown(b: Breakdown, out_png: Path) -> Path:
    parts = segments(b)
    capacity = b.verdict.capacity if b.verdict else 0
    scale_max = max(b.peak_total, capacity) * 1.05 or 1
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 12), f"memory estimate per GPU: {b.model}", fill="black")
    draw.text((LEFT, 30), f"{b.setup()}, {b.seq_len} tokens per sample", fill="black")

    def x(value: float) -> float:
        return LEFT + value / scale_max * (RIGHT - LEFT)

    start = 0
    for n, (_, value) in enumerate(parts):
        draw.rectangle((x(start), BAR_TOP, x(start + value), BAR_BOTTOM), fill=PALETTE[n % len(PALETTE)])
        start += value
    draw.rectangle((LEFT, BAR_TOP, x(b.peak_total), BAR_BOTTOM), outline="black")
    ticks = nice_ticks(0, scale_max / GIB)
    for value in ticks:  # round GiB ticks
        draw.line((x(value * GIB), BAR_BOTTOM, x(value * GIB), BAR_BOTTOM + 5), fill="black")
        label = tick_label(value, ticks)
        draw.text((x(value * GIB) - draw.textlength(label) / 2, BAR_BOTTOM + 8), label, fill="black")
    draw.text(((LEFT + RIGHT) // 2 - 30, BAR_BOTTOM + 22), "GiB per GPU", fill="black")
    for text, at, row, colour in label_layout(b, draw.textlength, x):
        draw.text((at, row), text, fill=colour)
    draw.line((x(b.peak_total), PEAK_ROW + 12, x(b.peak_total), BAR_TOP), fill="black", width=1)
    if b.verdict:
        v = b.verdict
        colour = STATUS_COLOUR.get(v.status, (0, 0, 0))
        draw.line((x(capacity), CAPACITY_ROW + 12, x(capacity), BAR_BOTTOM + 4), fill=colour, width=3)
        draw.text((LEFT, 48), f"{v.status.upper()} on {v.gpu}: headroom {v.headroom / GIB:+.2f} GiB", fill=colour)
    for n, (label, value) in enumerate(parts):  # legend, two columns
        col, line = divmod(n, 8)
        lx, ly = LEFT + col * 430, 195 + line * 26
        draw.rectangle((lx, ly, lx + 14, ly + 14), fill=PALETTE[n % len(PALETTE)])
        draw.text((lx + 22, ly + 1), f"{label}  {value / GIB:.2f} GiB", fill="black")
    if b.offloaded:
        draw.text((LEFT, HEIGHT - 22), f"offloaded to CPU RAM: {b.offloaded / GIB:.2f} GiB per GPU; the node needs "
                  f"{b.cpu_ram / GIB:.1f} GiB of CPU RAM", fill="black")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    return out_png
