"""A step whose loss or gradients are nan/inf stops the run (or is skipped), and no non-finite weights are saved.

The Trainer alone does neither: its `logging_nan_inf_filter` logs a nan loss as the average of the previous ones,
the optimizer steps with nan gradients, and a diverged run wrote nan adapters and exited 0.

Every optimizer step, in `on_pre_optimizer_step` (after backward and gradient clipping, before the step), checks:
- the loss of each micro-batch of the step, kept on the device by a forward hook on the model (one host sync per
  optimizer step, all checks together);
- the gradients, clipped or not (clipping by a non-finite norm turns them into nan): not under fp16 loss scaling,
  whose scaler skips an overflowing step itself and lowers the scale, nor under DeepSpeed (its gradients are its own).
Before each checkpoint and at the end of training it checks the trainable weights (a finite step can still overflow
them), so neither a checkpoint nor `final/` is written with nan weights.

stop (training.on_nonfinite): the step's gradients are dropped, so the optimizer step changes nothing; the Trainer
is told to stop without saving or evaluating, and the error is raised at the end of training, where the engine
would save `final/`. skip: the gradients are dropped, the step is logged to train_log.jsonl and training goes on;
MAX_CONSECUTIVE bad steps in a row stop it anyway. Under DeepSpeed the engine steps inside backward (accelerate), so
the check comes after the step: skip acts as stop, and the stop still saves nothing of that step. With several
processes the verdict is reduced over all of them, so every rank stops at the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import VlmtuneError
from vlmtune.train.callbacks import write_event

log = logging.getLogger(__name__)

MAX_CONSECUTIVE = 10
"""With on_nonfinite=skip, this many bad steps in a row stop the run: the model is not coming back by itself."""


class NonFiniteError(VlmtuneError):
    """Training met a nan/inf loss, gradient or weight; the message names the step and the value."""


class NonFiniteGuard(TrainerCallback):
    def __init__(self, config: VlmtuneConfig, log_path: Path, deepspeed: bool = False):
        self.mode = "stop" if deepspeed else config.training.on_nonfinite
        self.config, self.log_path, self.deepspeed = config, Path(log_path), deepspeed
        self.skipped = 0
        self.error: str | None = None
        self._consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._hook: Any = None
        self._check_gradients = True
        if deepspeed and config.training.on_nonfinite == "skip":
            log.warning("training.on_nonfinite=skip acts as stop under DeepSpeed (its optimizer steps before the "
                        "check can drop the step)")

    # ---- hooks ----
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        self._check_gradients = not args.fp16 and not self.deepspeed
        if model is not None:
            self._hook = model.register_forward_hook(self._keep_loss)

    def _keep_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()).float())

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        losses, self._losses = self._losses, []
        grads = [p.grad for p in model.parameters() if p.grad is not None] if self._check_gradients else []
        norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False) if grads else None
        checks = [~torch.isfinite(torch.stack(losses)).all()] if losses else []
        if norm is not None:
            checks.append(~torch.isfinite(norm))
        if not checks or not _any_rank(torch.stack(checks).any(), args.device):
            self._consecutive = 0
            return
        step = state.global_step + 1
        bad_loss = next((float(v) for v in losses if not math.isfinite(float(v))), None)
        parts = []
        if bad_loss is not None:
            parts.append(f"the loss was {bad_loss}")
        if norm is not None and not math.isfinite(float(norm)):
            parts.append(f"the gradient norm was {float(norm)}")
        what = " and ".join(parts) or "the loss or gradients were not finite on another process"
        if not self.deepspeed:
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        self._consecutive += 1
        if self.mode == "skip" and self._consecutive < MAX_CONSECUTIVE:
            self.skipped += 1
            log.warning("step %d skipped: %s (training.on_nonfinite=skip; %d skipped so far)", step, what,
                        self.skipped)
            self._event(state, step, "skipped", what, skipped_steps=self.skipped)
            return
        if self.mode == "skip":
            what += f" ({MAX_CONSECUTIVE} bad steps in a row)"
        self._fail(state, control, step, what, applied=self.deepspeed)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        if self.error is None and control.should_save and model is not None:
            bad = _nonfinite_weight(model, args.device)
            if bad is not None:
                what = f"the trainable weight {bad} became non-finite in the update of step {state.global_step}"
                self._fail(state, control, state.global_step, what, applied=True)
        if self.error is not None:
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.error is not None:
            control.should_save = control.should_evaluate = False

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.error is None and model is not None:  # what the engine is about to save as final/
            bad = _nonfinite_weight(model, args.device)
            if bad is not None:
                what = f"the trainable weight {bad} is non-finite at the end of training"
                self._fail(state, control, state.global_step, what, applied=True)
        if self.error is not None:
            raise NonFiniteError(self.error)

    # ---- reporting ----
    def _fail(self, state: TrainerState, control: TrainerControl, step: int, what: str, applied: bool) -> None:
        from vlmtune.train.saving import find_checkpoints

        control.should_training_stop = True
        control.should_save = control.should_evaluate = False
        checkpoints = find_checkpoints(Path(self.config.output_dir))
        kept = (f"the last checkpoint, {checkpoints[-1]}, was written before it" if checkpoints
                else "no checkpoint was written before it")
        done = "nothing of it was saved" if applied else "nothing of it was applied or saved"
        again = "continue from that checkpoint with --resume" if checkpoints else "start again"
        lr = self.config.training.learning_rate
        self.error = (
            f"training stopped at step {step}: {what}; {done}, and no final model was written ({kept}). "
            f"Usual causes: a learning rate too high for this model (training.learning_rate={lr:g}), fp16 overflow "
            f"(hardware.precision=bf16 where the GPU has it), or a broken sample. Lower the learning rate and {again}, "
            "or set training.on_nonfinite=skip to drop such steps."
        )
        self._event(state, step, "stopped", what, skipped_steps=self.skipped)

    def _event(self, state: TrainerState, step: int, action: str, what: str, **fields: Any) -> None:
        if state.is_world_process_zero:
            write_event(self.log_path, "nonfinite", step=step, action=action, problem=what, **fields)


def _any_rank(flag: torch.Tensor, device: Any) -> bool:
    """True where any process found `flag` true (one all-reduce with several processes; one host sync)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = flag.to(device=device, dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
    return bool(flag.item())


@torch.no_grad()
def _nonfinite_weight(model: torch.nn.Module, device: Any) -> str | None:
    """The name of a trainable weight holding nan/inf (None when all are finite; a ZeRO-3 shard placeholder is
    empty and passes)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point() and p.numel()]
    if not named:
        return None
    flags = torch.stack([(~torch.isfinite(p)).any().to(named[0][1].device) for _, p in named])
    if not _any_rank(flags.any(), device):
        return None
    bad = [n for (n, _), f in zip(named, flags.tolist(), strict=True) if f]
    return bad[0] if bad else "(on another process)"
