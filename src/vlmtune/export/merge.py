"""Merge a LoRA/QLoRA adapter into its base model, loaded in 16-bit, and save a standalone model + processor.

A QLoRA adapter merges into the 16-bit base, not the 4-bit one it was trained against: the merged weights are
W + BA at full resolution, which is what an inference server loading the result expects.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from vlmtune.errors import VlmtuneError
from vlmtune.export.loading import (
    PROCESSOR_FILES,
    adapter_base,
    is_adapter_dir,
    load_model,
    read_meta,
    to_dtype,
)

log = logging.getLogger(__name__)


def merge_adapter(
    adapter_dir: Path | str,
    out_dir: Path | str,
    base: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
) -> Path:
    """Write the merged model and its processor to `out_dir` (appearing there in one rename) and return it.

    base: the base model folder or hub id; default: the one recorded in the adapter's adapter_config.json.
    dtype: the 16-bit (or float32) dtype to load the base in and save the merged weights in.
    """
    from peft import PeftModel

    from vlmtune.families import family_for_model

    adapter, out = Path(adapter_dir), Path(out_dir)
    if not is_adapter_dir(adapter):
        raise VlmtuneError(
            f"{adapter} is not an adapter folder (no adapter_config.json). Full fine-tuning results "
            "are standalone models already; nothing to merge."
        )
    meta = read_meta(adapter)
    if meta.get("random_init") and base is None:
        raise VlmtuneError(
            f"{adapter} was trained on a randomly initialised base (model.random_init), which was "
            "never saved; merging it into the weights on disk would give a different model."
        )
    base = base or adapter_base(adapter)
    family = family_for_model(base)
    model = load_model(base, to_dtype(dtype, torch.bfloat16), "cpu")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    source = adapter if any((adapter / f).is_file() for f in PROCESSOR_FILES) else base
    processor = family.load_processor(source)

    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging))
    processor.save_pretrained(str(staging))
    if out.exists():
        if any(out.iterdir()) and not (out / "config.json").is_file():
            shutil.rmtree(staging)
            raise VlmtuneError(
                f"{out} exists and does not look like a model folder; choose an empty or new folder."
            )
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
    log.info("merged %s into %s -> %s", adapter, base, out)
    return out
