"""Runs `vlmtune train ARGS` in this process and kills it with SIGKILL at a chosen moment, as a power cut or the OOM
killer would: nothing is flushed, no `finally` runs.

    python tests/reliability/kill_runner.py PHASE STEP -- train ARGS...
    torchrun --standalone --nproc_per_node 1 tests/reliability/kill_runner.py PHASE STEP -- train ARGS...

PHASE is where, STEP the optimizer step (the save of checkpoint-STEP, or the training step STEP):
- step:      in the middle of training step STEP (after its forward, before the optimizer step)
- weights:   half-way through writing the model or adapter weights of checkpoint-STEP
- optimizer: half-way through writing the optimizer states (optimizer.pt, or DeepSpeed's *optim_states.pt)
- rng:       before the RNG state is written (weights, optimizer and scheduler are written)
- manifest:  after every file is hashed, before the manifest is put in place
- rename:    after checkpoint-STEP is renamed into place, before older checkpoints are rotated out
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_then_die(path: str | Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    _die()


def install(phase: str, step: int) -> None:
    import io

    import safetensors.torch
    import torch

    import vlmtune.train.checkpoints as checkpoints
    import vlmtune.train.trainer as trainer_module
    from vlmtune.train.trainer import VlmTrainer

    # Which step the Trainer is at, readable from the patched functions.
    VlmTrainer.current_step = 0
    original_step = VlmTrainer.training_step

    def training_step(self, *args, **kwargs):
        VlmTrainer.current_step = self.state.global_step + 1  # the step being computed
        loss = original_step(self, *args, **kwargs)
        if phase == "step" and VlmTrainer.current_step == step:
            _die()
        return loss

    VlmTrainer.training_step = training_step

    def saving() -> bool:
        return VlmTrainer.current_step == step

    if phase == "weights":
        original_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if saving() and ".staging" in str(filename):
                _half_then_die(filename, safetensors.torch.save(tensors, *args, **kwargs))
            return original_save_file(tensors, filename, *args, **kwargs)

        import peft.peft_model
        import transformers.modeling_utils

        safetensors.torch.save_file = save_file  # the Trainer's own call
        transformers.modeling_utils.safe_save_file = save_file  # save_pretrained of a full model
        peft.peft_model.safe_save_file = save_file  # an adapter

    if phase == "optimizer":
        original_torch_save = torch.save

        def save(obj, f, *args, **kwargs):
            name = os.path.basename(str(f))
            if saving() and ".staging" in str(f) and (name == "optimizer.pt" or "optim_states" in name):
                buffer = io.BytesIO()
                original_torch_save(obj, buffer, *args, **kwargs)
                _half_then_die(f, buffer.getvalue())
            return original_torch_save(obj, f, *args, **kwargs)

        torch.save = save

    if phase == "rng":
        original_rng = VlmTrainer._save_rng_state

        def save_rng(self, output_dir):
            if saving():
                _die()
            return original_rng(self, output_dir)

        VlmTrainer._save_rng_state = save_rng

    if phase == "manifest":
        original_replace = checkpoints.os.replace

        class _Os:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if saving() and os.path.basename(str(dst)) == checkpoints.MANIFEST:
                    _die()
                return original_replace(src, dst)

        checkpoints.os = _Os()

    if phase == "rename":
        original_rotate = trainer_module.rotate_checkpoints

        def rotate(*args, **kwargs):
            if saving():
                _die()
            return original_rotate(*args, **kwargs)

        trainer_module.rotate_checkpoints = rotate


def main() -> int:
    phase, step = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    install(phase, step)
    from vlmtune.cli.main import main as cli_main

    code = cli_main(argv)
    from vlmtune.train.launch import close_process_group

    close_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
