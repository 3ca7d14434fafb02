"""How much packing can gain on a workload's data, before any GPU run: padding share and model FLOPs (CPU only).

    PYTHONPATH=src:. python -m benchmarks.speed.padding_ceiling W5 [--batch 4] [--shuffles 50]

Encodes the workload's records with its architecture's processor (the harness's data; no weights), then over random
batches (as the Trainer's shuffled sampler draws them) compares the tokens a padded batch processes with the useful
ones, and the model FLOPs (measure.py's convention) of the vision tower, which packing does not change, with those of
the language model padded and unpadded. The ratio is what packing gains if a step's time follows its matmul FLOPs.
Measured, it is exceeded (W5: 1.36x here, 1.62x on an H100, benchmarks/RESULTS.md); likely, not profiled: padded
batches also pay for masked attention and per-token elementwise work that the FLOP count leaves out. The module keeps
its first name.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

from benchmarks.speed.bench import prepare
from benchmarks.speed.data import data_config
from benchmarks.speed.measure import llm_flops_per_sample, vision_flops_per_image
from benchmarks.speed.workloads import MAX_LENGTH, WORKLOADS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("--batch", type=int, default=None, help="rows per padded batch (default: the workload's)")
    ap.add_argument("--shuffles", type=int, default=50)
    args = ap.parse_args()

    from transformers import AutoConfig

    from vlmtune.data.processing import encode
    from vlmtune.data.records import read_records
    from vlmtune.families import get_family

    work = WORKLOADS[args.workload]
    batch = args.batch or work.batch
    model, path = prepare(work)  # the harness's own model folder and data
    family = get_family(work.family)
    cfg = data_config(MAX_LENGTH[work.spread], work.image_side, work.spread, work.family)
    processor = family.load_processor(model, cfg)
    config = AutoConfig.from_pretrained(model)
    image_id = config.image_token_id
    samples = [s for s in (encode(r, processor, family, cfg) for r in read_records(path)) if s is not None]
    lengths = [len(s.input_ids) for s in samples]
    image_tokens = [int((s.input_ids == image_id).sum()) for s in samples]
    merge = config.vision_config.spatial_merge_size * config.vision_config.patch_size
    vision = sum(vision_flops_per_image(config, round(math.sqrt(t) * merge), work.method) for t in image_tokens if t)
    llm_useful = sum(llm_flops_per_sample(config, n, work.method) for n in lengths)
    rng = random.Random(0)
    useful = processed = 0
    llm_padded = 0.0
    for _ in range(args.shuffles):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            rows = [lengths[j] for j in order[i : i + batch]]
            useful += sum(rows)
            processed += batch * max(rows)
            llm_padded += batch * llm_flops_per_sample(config, max(rows), work.method) / args.shuffles
    print(f"{work.name}: {len(lengths)} records, tokens per sample mean {statistics.mean(lengths):.0f} "
          f"(image {statistics.mean(image_tokens):.0f}), longest {max(lengths)}")
    print(f"padded batches of {batch}: {useful / processed:.1%} of the processed tokens are useful "
          f"(language-model ceiling {processed / useful:.2f}x)")
    print(f"model FLOPs per pass: vision {vision / 1e12:.0f} T, language model {llm_useful / 1e12:.0f} T useful, "
          f"{llm_padded / 1e12:.0f} T padded")
    print(f"packing gain if the step followed its matmul FLOPs: {(vision + llm_padded) / (vision + llm_useful):.2f}x")


if __name__ == "__main__":
    main()
