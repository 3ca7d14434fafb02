"""The HF Trainer with three changes: checkpoints appear atomically, every training log carries tokens/s and memory,
and with several processes a batch without images still runs the vision tower (so ZeRO-3 cannot hang on it).

transformers 5.23 writes `checkpoint-N` in place (model, then optimizer, scheduler, RNG, trainer_state.json), so a
run killed mid-save leaves a folder that `get_last_checkpoint` would pick and fail to resume from. Here the whole
checkpoint is written into `.staging/` inside the run folder and renamed into place in one step (same file system,
so the rename is atomic); only then are old checkpoints rotated out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vlmtune.outputs import is_disk_full
from vlmtune.train.callbacks import ThroughputMeter, memory_stats
from vlmtune.train.checkpoints import newest_finished, write_manifest
from vlmtune.train.disk_full import disk_full_error, folder_bytes
from vlmtune.train.vision_keepalive import VisionKeepAlive

STAGING_DIR = ".staging"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def token_mean_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """The causal-LM loss as the Trainer's `compute_loss_func`: position t predicts label t+1, summed over the
    labelled tokens and divided by `num_items_in_batch` (the whole accumulated step's labelled tokens; the micro-batch's
    own count where the Trainer gives none, as in evaluation). What transformers' `ForCausalLMLoss` computes, for
    models whose class keeps the Trainer from handing it the count (`accepts_loss_kwargs = False`)."""
    import torch.nn.functional as F

    from vlmtune.speed.chunked_ce import labelled_rows

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if labels is None or logits.shape[:2] != labels.shape:
        raise RuntimeError(
            f"token_mean_loss: the model's logits {tuple(logits.shape)} do not line up with the labels "
            f"{None if labels is None else tuple(labels.shape)}; this family needs its own loss (report it)")
    rows, targets = labelled_rows(logits, labels)  # the chunked loss's shift and selection
    total = F.cross_entropy(rows.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.shape[0]
    if hasattr(count, "to"):
        count = count.to(total.device)
    return total / count


def _takes_use_cache(model: Any) -> bool:
    """Whether the model's forward (through DDP / DeepSpeed / PEFT wrappers) takes `use_cache`: as an argument
    (Qwen2-VL, Qwen2.5-VL), or through **kwargs handed to a decoder whose config has it (LLaVA)."""
    import inspect

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "module", None) or getattr(model, "get_base_model", lambda: None)()
        if inner is None:
            break
        model = inner
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in params:
        return True
    config = getattr(model, "config", None)
    decoder = getattr(config, "text_config", None) or config
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) and hasattr(decoder, "use_cache")


class VlmTrainer(Trainer):
    def __init__(
        self, *args: Any, device: str = "cpu", vision_keepalive: VisionKeepAlive | None = None,
        loss_counts_items: bool = False, **kwargs: Any
    ):
        """`loss_counts_items`: the model's loss divides by the Trainer's `num_items_in_batch` (vlmtune's chunked
        loss, speed/loss_hook.py, does for every model). transformers 5.23 marks some classes (Qwen2-VL ... Qwen3.5)
        `accepts_loss_kwargs = False`, and the Trainer then averages the micro-batches' own token means under
        gradient accumulation: tokens of a micro-batch with few labels weigh more, and packed rows (other
        micro-batches) train on another loss than the same samples padded. With it, the loss is the token mean over
        the whole accumulated batch, as for the other families. Without it, such a model's loss is computed here
        (`token_mean_loss`, the Trainer's `compute_loss_func`) for the same token mean."""
        super().__init__(*args, **kwargs)
        if loss_counts_items:
            self.model_accepts_loss_kwargs = True
        elif not self.model_accepts_loss_kwargs and self.compute_loss_func is None and self.label_smoother is None:
            self.compute_loss_func = token_mean_loss
        self._device = device
        self._keepalive = vision_keepalive.attach(self.model) if vision_keepalive is not None else None
        self._staging: str | None = None
        self._takes_use_cache: bool | None = None
        self._throughput = ThroughputMeter()
        self.add_callback(self._throughput)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Training never needs a KV cache: without `use_cache=False` transformers builds one in every forward (a
        DynamicCache updated by each layer: host work per layer, and a guard that makes torch.compile recompile per
        layer). With several processes, a batch without images still runs the vision tower (see vision_keepalive)."""
        if self._takes_use_cache is None:
            self._takes_use_cache = _takes_use_cache(model)
        if self._takes_use_cache and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}
        if self._keepalive is not None:
            self._keepalive.arm(inputs)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Packed rows (speed.packing) carry no attention mask and the processor has no pad_token_id, so the
        Trainer would warn on every step and count the rows' padding as tokens: count what is not padding."""
        pad = getattr(getattr(self.processing_class, "tokenizer", None), "pad_token_id", None)
        if "attention_mask" not in inputs and pad is not None and "input_ids" in inputs:
            inputs = {**inputs, "attention_mask": inputs["input_ids"] != pad}
        super()._track_num_input_tokens(inputs)

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that was killed
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N; nothing there to rotate
            self.accelerator.wait_for_everyone()  # every rank's RNG state / shards are written before the rename
            if self.args.should_save:
                write_manifest(staging / name, step=self.state.global_step)  # last: it means the save finished
        except Exception as exc:
            if not is_disk_full(exc, run_dir):
                raise
            last = newest_finished(run_dir)
            need = folder_bytes(last or staging / name)  # a checkpoint is as large as the last one
            shutil.rmtree(staging, ignore_errors=True)
            raise disk_full_error(name, run_dir, need, resume_from=last.name if last else None) from exc
        finally:
            self._staging = None
        if not self.args.should_save:
            return
        final = run_dir / name
        if final.exists():  # a resumed run saving the same step again: replace the old one
            old = run_dir / STAGING_DIR.replace("staging", "replaced")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        os.replace(staging / name, final)
        _fsync_dir(run_dir)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """A full model's weights load key by key through the names `save_pretrained` wrote (checkpoint_weights.py),
        or the resume stops naming the keys; adapters load through PEFT as the Trainer does."""
        from vlmtune.train.checkpoint_weights import load_full_checkpoint

        target = model if model is not None else self.model
        if hasattr(target, "peft_config"):  # its keys and shapes were checked by the engine (check_adapter_keys)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

        load_full_checkpoint(self.accelerator.unwrap_model(target), Path(resume_from_checkpoint))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            rate = self._throughput.rate(self.state.num_input_tokens_seen)
            if rate is not None:
                logs["tokens_per_second"] = round(rate, 1)
            logs.update(memory_stats(self._device))
        super().log(logs, *args, **kwargs)
