"""Benchmark data: records of one image (side x side px) and an answer of about N text tokens.

    python benchmarks/make_bench_data.py --model DIR --n 256 --image-side 448 --text-tokens 512 --out DIR

The answer is built from the model's own tokenizer vocabulary and cut so the encoded sample (chat template
included) has the image's tokens + N text tokens, so a batch shape in RESULTS.md means what it says.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.processing import encode
    from vlmtune.data.records import parse_line
    from vlmtune.families import family_for_model

    rng = random.Random(args.seed)
    family = family_for_model(args.model)
    data_cfg = DataConfig(max_length=1_000_000, image_size=args.image_side)
    processor = family.load_processor(args.model, data_cfg)
    tok = processor.tokenizer
    words = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2][:400]
    (args.out / "images").mkdir(parents=True, exist_ok=True)

    def image(i: int) -> None:
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (args.image_side, args.image_side), colour).save(args.out / "images" / f"{i}.png")

    def n_tokens(i: int, answer: str) -> int:
        record = parse_line(json.dumps(_record(i, answer)), 1, args.out)[0]
        return len(encode(record, processor, family, data_cfg))

    n_img = family.image_token_count(args.image_side, args.image_side, processor)
    image(0)
    overhead = n_tokens(0, "x") - n_img - len(tok("x", add_special_tokens=False).input_ids)
    budget = args.text_tokens - overhead
    path = args.out / "train.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(args.n):
            image(i)
            ids: list[int] = []
            while len(ids) < budget:
                ids += tok(" " + " ".join(rng.choice(words) for _ in range(64)), add_special_tokens=False).input_ids
            answer = tok.decode(ids[:budget]).strip()
            f.write(json.dumps(_record(i, answer)) + "\n")
    total = n_tokens(args.n - 1, answer)
    print(f"wrote {args.n} records to {path}; last sample {total} tokens = {n_img} image + {total - n_img} text")


def _record(i: int, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": f"images/{i}.png"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": answer},
    ]}


if __name__ == "__main__":
    main()
