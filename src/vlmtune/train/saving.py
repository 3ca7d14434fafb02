"""Run-folder bookkeeping: finding checkpoints to resume from, and writing the final result atomically."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import VlmtuneError
from vlmtune.methods.base import base_reference

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)

FINAL_DIR = "final"
META_FILE = "vlmtune.json"
"""Written next to the final adapter/model: method, family and base model, for predict and merge."""

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N` folder, oldest step first; whether one is intact is `checkpoints.verify_checkpoint`'s
    question (a damaged one must be reported, not skipped silently)."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: Path, resume: bool | str | Path, trust: bool = False) -> Path | None:
    """The checkpoint folder to continue from, or None for a fresh run.

    Each candidate is verified against its manifest (`train/checkpoints.py`) before anything of it is read. With
    `resume=True` a damaged or incomplete newest checkpoint is reported and the newest intact one is used; a folder
    named explicitly must be intact. `trust` (`--trust-checkpoint`) skips the check, for checkpoints written without
    a manifest (another tool, an older vlmtune)."""
    from vlmtune.train.checkpoints import MANIFEST, verify_checkpoint

    if resume is False or resume is None:
        return None
    if resume is True:
        checkpoints = find_checkpoints(output_dir)
        if not checkpoints:
            raise VlmtuneError(
                f"--resume: no checkpoint found in {output_dir} (checkpoints are written every "
                "training.save_steps steps as checkpoint-N). Start without --resume, or point "
                "output_dir at the run you want to continue."
            )
        if trust:
            return checkpoints[-1]
        damaged = []
        for candidate in reversed(checkpoints):
            report = verify_checkpoint(candidate)
            if report.ok:
                if damaged:
                    log.warning(
                        "--resume: skipped %d damaged or incomplete checkpoint(s), continuing from %s (step %s):\n%s",
                        len(damaged), candidate.name, candidate.name.rsplit("-", 1)[-1],
                        "\n".join(r.format() for r in damaged),
                    )
                return candidate
            damaged.append(report)
        raise VlmtuneError(
            f"--resume: none of the {len(checkpoints)} checkpoint(s) in {output_dir} is intact, so nothing was "
            "loaded:\n" + "\n".join(r.format() for r in damaged) + "\nStart the run again without --resume "
            "(into a new output_dir), or, for checkpoints written by another tool, add --trust-checkpoint."
        )
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file() and not (path / MANIFEST).is_file():
        raise VlmtuneError(
            f"--resume {path}: not a checkpoint folder (it has no {TRAINER_STATE_NAME}); give a "
            f"checkpoint-N folder from a run's output_dir, or --resume alone for the newest one."
        )
    if not trust:
        report = verify_checkpoint(path)
        if not report.ok:
            raise VlmtuneError(
                f"--resume {path}: the checkpoint is damaged or incomplete, so nothing was loaded:\n"
                f"{report.format()}\nGive another checkpoint-N folder, or --resume alone to continue from the newest "
                "intact one."
            )
    return path


def save_final(trainer: Any, processor: Any, config: VlmtuneConfig, family: FamilyDescriptor) -> Path:
    """Adapter (lora/qlora) or full model, plus processor, into output_dir/final; appears there in one rename.

    A full disk removes what was half-written and raises a message naming the folder and the space needed."""
    from vlmtune.outputs import is_disk_full
    from vlmtune.train.disk_full import disk_full_error, folder_bytes

    out = Path(config.output_dir)
    final, staging = out / FINAL_DIR, out / f".{FINAL_DIR}.staging"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))  # gathers sharded weights (DeepSpeed/FSDP); writes the processor too
        trainer.accelerator.wait_for_everyone()
        if not trainer.args.should_save:
            return final
        processor.save_pretrained(str(staging))
        (staging / META_FILE).write_text(json.dumps(_meta(config, family), indent=2) + "\n", encoding="utf-8")
    except Exception as exc:
        if not is_disk_full(exc, out):
            raise
        need = folder_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        from vlmtune.train.checkpoints import newest_finished

        last = newest_finished(out)
        raise disk_full_error(f"the final {'model' if config.method.name.value == 'full' else 'adapter'}", out,
                              need, resume_from=last.name if last else None) from exc
    if final.exists():
        _retire(final, {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()})
    staging.rename(final)
    return final


def _retire(final: Path, new_files: set[str]) -> None:
    """Make room for a new `final/`. The old one is deleted only when it holds nothing but what training writes
    there; files added since (predictions.jsonl, a user's notes) keep the old folder as `final.previous-N`."""
    added = [p for p in final.rglob("*") if p.is_file() and p.relative_to(final).as_posix() not in new_files
             and p.name not in (META_FILE, ".vlmtune-output")]
    if added:
        n = 1
        while (kept := final.with_name(f"{FINAL_DIR}.previous-{n}")).exists():
            n += 1
        final.rename(kept)
        log.warning("the earlier %s/ holds files training did not write (%s): kept as %s", FINAL_DIR,
                    ", ".join(p.name for p in added[:5]), kept)
        return
    old = final.with_name(f".{FINAL_DIR}.old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    shutil.rmtree(old)


def _meta(config: VlmtuneConfig, family: FamilyDescriptor) -> dict[str, Any]:
    """What predict and export need to know about the result: method, family, base model, quantization."""
    meta: dict[str, Any] = {
        "method": config.method.name.value,
        "family": family.name,
        "base_model": base_reference(config),
        "base_revision": config.model.revision,
        "random_init": config.model.random_init,
        "format": "model" if config.method.name.value == "full" else "adapter",
    }
    if config.method.name.value == "qlora":
        from vlmtune.methods.qlora import skip_modules

        q = config.method.quantization
        meta["quantization"] = {
            "quant_type": q.quant_type,
            "double_quant": q.double_quant,
            "compute_dtype": q.compute_dtype,
            "skip_modules": skip_modules(config, family),
        }
    return meta
