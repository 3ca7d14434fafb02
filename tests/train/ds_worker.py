"""Started by test_deepspeed_runs.py under torchrun (one process per rank): trains from a config file through the
engine, then computes the trained model's logits on a saved batch in the training processes themselves (under
ZeRO-3 every rank joins the forward, which gathers the sharded weights); rank 0 saves them.

    torchrun --standalone --nproc_per_node 2 tests/train/ds_worker.py CONFIG BATCH_IN LOGITS_OUT [--gpu-bf16]

--gpu-bf16 trains with the precision plan of a bf16 GPU run (16-bit weights, bf16 in DeepSpeed) on the CPU, which
the engine would otherwise run in fp32: the dtype paths DeepSpeed takes on a GPU, without one.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import TrainerCallback

from vlmtune.config.loader import load_config
from vlmtune.train.engine import train
from vlmtune.train.launch import close_process_group


class SaveLogits(TrainerCallback):
    def __init__(self, batch_path: str, out_path: str):
        self.batch_path, self.out_path = batch_path, out_path

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Without labels: with them, speed.chunked_loss computes the loss instead of full-vocabulary logits.
        batch = {k: v for k, v in torch.load(self.batch_path).items() if k != "labels"}
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits.float()
        if os.environ.get("RANK", "0") == "0":
            torch.save(logits, self.out_path)


def _gpu_bf16_plan() -> None:
    import vlmtune.methods.base as base
    from vlmtune.methods import full, lora, qlora

    plan = base.PrecisionPlan("cpu", torch.bfloat16, True, False, "bf16 as on a GPU (test)")
    for module in (base, full, lora, qlora):
        module.resolve_precision = lambda config: plan


if __name__ == "__main__":
    config_path, batch_path, out_path = sys.argv[1:4]
    if "--gpu-bf16" in sys.argv:
        _gpu_bf16_plan()
    try:
        train(load_config(config_path), callbacks=[SaveLogits(batch_path, out_path)])
    finally:
        close_process_group()  # as `python -m vlmtune.train` does
