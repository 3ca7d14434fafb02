"""Run-folder bookkeeping: finding checkpoints to resume from, and writing the final result atomically."""

from __future__ import annotations

import json
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

FINAL_DIR = "final"
META_FILE = "vlmtune.json"
"""Written next to the final adapter/model: method, family and base model, for predict and merge."""

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (they hold trainer_state.json), oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    ]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE_NAME).is_file()]


def resolve_resume(output_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint folder to continue from, or None for a fresh run."""
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
        return checkpoints[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise VlmtuneError(
            f"--resume {path}: not a checkpoint folder (it has no {TRAINER_STATE_NAME}); give a "
            f"checkpoint-N folder from a run's output_dir, or --resume alone for the newest one."
        )
    return path


def save_final(trainer: Any, processor: Any, config: VlmtuneConfig, family: FamilyDescriptor) -> Path:
    """Adapter (lora/qlora) or full model, plus processor, into output_dir/final; appears there in one rename."""
    out = Path(config.output_dir)
    final, staging = out / FINAL_DIR, out / f".{FINAL_DIR}.staging"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # gathers sharded weights (DeepSpeed/FSDP); writes the processor too
    trainer.accelerator.wait_for_everyone()
    if not trainer.args.should_save:
        return final
    processor.save_pretrained(str(staging))
    meta = {
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
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        old = out / f".{FINAL_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        shutil.rmtree(old)
    staging.rename(final)
    return final
