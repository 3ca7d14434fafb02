"""The offline demo data set: Pillow-drawn coloured shapes and questions only the image can answer.

Each record is one user turn (the image, then a question) and a one-word assistant answer from a small set, so
exact-match accuracy is meaningful and chance level is known (1 / number of answers). Classes are balanced: every
(colour, shape, task) combination appears equally often (exactly when n is a multiple of their number), shuffled.

The colour question is the easiest for a tiny random-init model: the shape fills most of the image and the
background is a light grey, so the answer is in the mean colour of the image tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTIONS: dict[str, str] = {"color": "What colour is the shape?", "shape": "What shape is it?"}


def _draw(
    shape: str, rgb: tuple[int, int, int], size: int, fill: float, rng: random.Random, jitter: int
) -> Image.Image:
    shade = rng.randint(200, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    side = max(4, round(size * fill))
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    colour = tuple(min(255, max(0, c + rng.randint(-jitter, jitter))) for c in rgb)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon(
            [(x0 + (side - 1) / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=colour
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return image


def make_shapes_vqa(
    out_dir: Path | str,
    n: int,
    seed: int = 0,
    image_size: int = 56,
    tasks: Sequence[str] = ("color",),
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] = SHAPES,
    fill: tuple[float, float] = (0.75, 0.95),
    color_jitter: int = 20,
    file_name: str = "shapes_vqa.jsonl",
) -> Path:
    """Write `n` PNGs under `out_dir/images/` and `out_dir/<file_name>` (chat style); returns the JSONL path.

    tasks: which questions to ask, balanced over the records ("color": answer is a colour name, "shape": a shape name).
    fill: the shape's side as a fraction of the image side (uniform in the range).
    The same arguments always write the same bytes.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    unknown = [t for t in tasks if t not in QUESTIONS] + [c for c in colors or () if c not in COLORS]
    if unknown or not tasks:
        raise ValueError(
            f"unknown or missing tasks/colours {unknown}; tasks: {list(QUESTIONS)}, colours: {list(COLORS)}"
        )
    if not 0 < fill[0] <= fill[1] <= 1:
        raise ValueError(f"fill must be a range within (0, 1], got {fill}")
    colors = list(colors or COLORS)
    rng = random.Random(seed)
    combos = [(c, s, t) for t in tasks for s in shapes for c in colors]
    labels = [combos[i % len(combos)] for i in range(n)]
    rng.shuffle(labels)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / file_name
    with open(jsonl, "w", encoding="utf-8") as fh:
        for i, (color, shape, task) in enumerate(labels):
            image = _draw(shape, COLORS[color], image_size, rng.uniform(*fill), rng, color_jitter)
            rel = f"images/{i:05d}.png"
            image.save(out_dir / rel, format="PNG")
            answer = color if task == "color" else shape
            record = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": rel},
                            {"type": "text", "text": QUESTIONS[task]},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
            }
            fh.write(json.dumps(record) + "\n")
    return jsonl


def text_only_every_second(src: str | Path, dst: str | Path, answer: str | None = "there is no picture") -> Path:
    """A copy of a chat-format data set whose every second record has its images removed (and, with `answer`, that
    answer): mixed image / text-only batches, the case that hangs ZeRO-3 elsewhere. Write `dst` beside `src` so
    relative image paths stay valid."""
    lines = []
    for i, line in enumerate(Path(src).read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        if i % 2:
            user = record["messages"][0]
            user["content"] = [c for c in user["content"] if c["type"] != "image"]
            if answer is not None:
                record["messages"][1]["content"] = [{"type": "text", "text": answer}]
        lines.append(json.dumps(record))
    Path(dst).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(dst)
