"""The speed harness's results as a picture: per workload, each variant's tokens/s at the median step over its
reference's in the same call (bars), and its peak reserved memory. Drawn with Pillow, like the run folder's loss
curve.

    python3 -m benchmarks.speed.chart out.png results.jsonl:W1,W4 other/results.jsonl:W3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from benchmarks.speed.workloads import WORKLOADS

ROW, HEAD, WIDTH, LABEL, BAR = 22, 30, 900, 250, 400
COLOURS = {
    "plain": (150, 150, 150),
    "liger": (255, 127, 14),
    "vlmtune": (31, 119, 180),
    "unsloth": (44, 160, 44),
}


@dataclass(frozen=True)
class Bar:
    variant: str
    path: str
    ratio: float
    reserved_gib: float | None


def bars(results: list[dict], workload: str) -> list[Bar]:
    """The workload's rows against its reference (tokens/s at the median step, else the mean); [] without one."""
    rows = {r["variant"]: r for r in results if r.get("workload") == workload and "tokens_per_second" in r}

    def speed(row: dict) -> float:
        return row.get("tokens_per_second_median_step") or row["tokens_per_second"]

    reference = rows.get(WORKLOADS[workload].reference)
    if reference is None:
        return []
    return [
        Bar(name, row.get("path", "vlmtune"), speed(row) / speed(reference), row.get("peak_reserved_gib"))
        for name, row in rows.items()
    ]


def render(blocks: list[tuple[str, list[Bar]]], out: Path) -> Path:
    """One block per (title, bars); the bar scale is shared so that blocks compare."""
    blocks = [(title, found) for title, found in blocks if found]
    if not blocks:
        raise ValueError("no workload with its reference in the results: nothing to draw")
    top = max(b.ratio for _, found in blocks for b in found)
    height = 40 + sum(HEAD + ROW * len(found) for _, found in blocks) + 30
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "tokens/s at the median step, x the reference of the same call (bar); peak reserved GiB",
              fill="black")
    y = 40
    for title, found in blocks:
        draw.text((10, y + 8), title, fill="black")
        y += HEAD
        one = LABEL + BAR / top  # where 1.0x falls
        for bar in found:
            draw.text((20, y + 4), bar.variant, fill="black")
            right = LABEL + BAR * bar.ratio / top
            draw.rectangle((LABEL, y + 3, right, y + ROW - 3), fill=COLOURS.get(bar.path, (31, 119, 180)))
            memory = f"{bar.reserved_gib:.1f} GiB" if bar.reserved_gib is not None else ""
            draw.text((right + 6, y + 4), f"{bar.ratio:.2f}x   {memory}", fill="black")
            y += ROW
        draw.line((one, y - ROW * len(found), one, y), fill=(200, 0, 0))
    draw.text((10, height - 22), "grey: plain transformers + PEFT, orange: the same with Liger kernels, blue: vlmtune, green: Unsloth; "
              "red line: 1.0x", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("results", nargs="+", help="results.jsonl, or results.jsonl:W1,W4 for some workloads")
    args = ap.parse_args(argv)
    blocks = []
    for item in args.results:
        path, _, names = item.partition(":")
        results = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        chosen = names.split(",") if names else sorted({r["workload"] for r in results if r.get("workload")})
        for name in chosen:
            work = WORKLOADS[name]
            title = f"{name}: {work.title} (reference {work.reference}; {Path(path).parent.name})"
            blocks.append((title, bars(results, name)))
    return render(blocks, args.out)


if __name__ == "__main__":
    print(main())
