"""Merge a LoRA/QLoRA adapter into its base model, loaded in 16-bit, and save a standalone model + processor.

A QLoRA adapter merges into the 16-bit base, not the 4-bit one it was trained against: the merged weights are
W + BA at full resolution, which is what an inference server loading the result expects.

The output folder follows `vlmtune.outputs`: a folder that is not an earlier export (or empty) needs `overwrite`, a
folder that is or contains the adapter or the base model is refused, and files vlmtune did not write are never
removed. The model is written to `out/.vlmtune-staging-export` first and moved into place only once complete.
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
    check_adapter_family,
    is_adapter_dir,
    load_model,
    read_meta,
    to_dtype,
)
from vlmtune.outputs import (
    STAGING_PREFIX,
    claim_folder,
    disk_full_guard,
    move_into,
    new_folders,
    remove_if_empty,
)

log = logging.getLogger(__name__)


def merge_adapter(
    adapter_dir: Path | str,
    out_dir: Path | str,
    base: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Write the merged model and its processor to `out_dir` and return it.

    base: the base model folder or hub id; default: the one recorded in the adapter's adapter_config.json.
    dtype: the 16-bit (or float32) dtype to load the base in and save the merged weights in.
    overwrite: write into a folder that is not an earlier export, replacing files named like the export's.
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
    claim_folder(
        out, kind="export", what="the merged model", overwrite=overwrite,
        inputs={"the adapter": adapter, "the base model": base},
    )
    from vlmtune.hub import model_folder

    base = str(model_folder(base, meta.get("base_revision"), "the base model"))
    family = family_for_model(base)
    check_adapter_family(adapter, meta, family.name, base)
    model = load_model(base, to_dtype(dtype, torch.bfloat16), "cpu")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    source = adapter if any((adapter / f).is_file() for f in PROCESSOR_FILES) else base
    processor = family.load_processor(source)
    save_merged(merged, processor, out, overwrite=overwrite)
    log.info("merged %s into %s -> %s", adapter, base, out)
    return out


def save_merged(model: torch.nn.Module, processor: object, out: Path, overwrite: bool = False) -> None:
    """Save into a staging folder inside `out`, then move the files into `out`; on any failure (a full disk
    included) the staging folder goes and `out` is as it was."""
    created = new_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{STAGING_PREFIX}-export"
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        with disk_full_guard(out, size, "the merged model"):
            model.save_pretrained(str(staging))
            processor.save_pretrained(str(staging))  # type: ignore[attr-defined]
            move_into(staging, out, what="the merged model", by="export", overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        remove_if_empty(created)
