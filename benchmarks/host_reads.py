"""Where one training step reads device values on the host (`.tolist()`, `.item()`: on a GPU each is a blocking sync),
counted on the CPU with a family's tiny model, the varlen attention the GPU runs (a CPU stand-in for the kernel) and
the frozen vision tower without grad, as vlmtune's engine sets them up.

    python -m benchmarks.host_reads --family qwen2_5_vl [--vision-positions-on-cpu]

Prints each call site with its count (the first step warms up; the second is counted). Reads of CPU tensors count
too (they are no sync on a GPU); the site says which is which.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--vision-positions-on-cpu", action="store_true")
    args = parser.parse_args(argv)
    sites = host_reads(args.family, args.vision_positions_on_cpu)
    for site, count in sites.most_common():
        print(f"{count:3d}  {site}")
    print(f"{sum(sites.values()):3d}  in all")
    return 0


def host_reads(family_name: str, vision_positions: bool) -> collections.Counter[str]:
    """The second training step's host reads by call site (the first warms up); every patch and hook is undone."""
    sys.path.insert(0, str(REPO / "tests" / "speed"))
    from speed_helpers import cpu_varlen, lora_model

    from vlmtune.config.schema import DataConfig
    from vlmtune.data.collate import Collator
    from vlmtune.data.packing import rope_index_of
    from vlmtune.data.processing import encode
    from vlmtune.data.records import read_records
    from vlmtune.data.synthetic import make_shapes_vqa
    from vlmtune.families import get_family
    from vlmtune.speed import varlen_attention as varlen
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.vision_positions import vision_positions_on_cpu

    family = get_family(family_name)
    root = Path(tempfile.mkdtemp(prefix="host-reads-"))
    model_dir = family.build_tiny(root / "model")
    make_shapes_vqa(root, 4, seed=0, file_name="shapes.jsonl")
    processor = family.load_processor(model_dir, DataConfig())
    samples = [encode(r, processor, family, DataConfig()) for r in read_records(root / "shapes.jsonl")]
    model = lora_model(model_dir, family_name)
    inner = unwrap_peft(model)
    batch = {**Collator(processor.tokenizer.pad_token_id, rope_index=rope_index_of(model))(samples), "use_cache": False}
    saved = varlen._usable, varlen._varlen_fn
    varlen._usable = lambda query, dropout: dropout == 0.0  # type: ignore[assignment]
    varlen._varlen_fn = lambda: cpu_varlen  # type: ignore[assignment]
    handles = [varlen.varlen_attention(inner, family, "cpu", packed=False, require_kernel=False),
               vision_without_grad(inner, family.vision_prefixes)]
    if vision_positions:
        handles.append(vision_positions_on_cpu(inner, family.vision_prefixes))
    try:
        for handle in handles:
            if isinstance(handle, str):
                raise SystemExit(f"{family_name}: {handle}")
        model(**batch).loss.backward()  # warm-up: a grid's first step computes and caches
        return counted_step(lambda: model(**batch).loss.backward())
    finally:
        for handle in reversed(handles):
            if not isinstance(handle, str):
                handle.remove()
        varlen._usable, varlen._varlen_fn = saved  # type: ignore[assignment]


def counted_step(step) -> collections.Counter[str]:
    """`step()` with every `.tolist()` / `.item()` counted by call site (torch.Tensor restored afterwards)."""
    sites: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item")}

    def counting(name: str):
        def counted(t, *a, **k):
            frame = traceback.extract_stack()[-2]
            sites[f"{name} {Path(frame.filename).name}:{frame.lineno} {frame.name}"] += 1
            return originals[name](t, *a, **k)

        return counted

    try:
        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return sites


if __name__ == "__main__":
    raise SystemExit(main())
