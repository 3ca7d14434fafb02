"""One LoRA-adapted linear layer, PEFT's forward vs speed.fused_lora: host time, GPU time and kernels per call.

    python3 -m benchmarks.speed.lora_layer --out $OUT      # -> $OUT/lora_layer.jsonl, one line per (shape, path)

The W1 step without checkpointing is bound by host work and launches (RESULTS.md), so what matters per adapted layer
is the host time of forward + backward (measured without syncs over many calls: the CPU runs ahead until the launch
queue is full, so a short burst of calls is timed) and the number of kernels (torch.profiler). Shapes are Qwen2-VL-2B's
(hidden 1536, MLP 8960) at W1's 3,072 tokens per step, under bf16 autocast with fp32 adapters as the engine trains.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHAPES = {"q_proj (1536->1536)": (1536, 1536), "down_proj (8960->1536)": (8960, 1536)}


def _layer(fin: int, fout: int, device: str, fused: bool, dropout: float) -> tuple[nn.Module, Any]:
    from peft import LoraConfig, get_peft_model

    from vlmtune.speed.fused_lora import fuse_lora

    torch.manual_seed(0)

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(fin, fout, bias=False, device=device, dtype=torch.bfloat16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = get_peft_model(One(), LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["proj"]))
    for layer in model.modules():
        if hasattr(layer, "cast_input_dtype_enabled"):
            layer.cast_input_dtype_enabled = False  # as speed.lora_bf16_compute does
    handle = fuse_lora(model.get_base_model(), 0) if fused else None
    return model.train(), handle


def measure(fin: int, fout: int, tokens: int, fused: bool, dropout: float, calls: int = 30) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = _layer(fin, fout, device, fused, dropout)
    x = torch.randn(tokens, fin, device=device, dtype=torch.bfloat16, requires_grad=True)

    def once() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            y = model(x)
        y.sum().backward()

    for _ in range(5):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        once()
    host = (time.perf_counter() - started) / calls
    if device == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / calls
    kernels, gpu_ms = 0, 0.0
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type.name == "CUDA" and not e.name.startswith("phase")]
        kernels = len(events)
        gpu_ms = sum(e.device_time for e in events) / 1000
    return {
        "path": "fused_lora" if fused else "peft",
        "dropout": dropout,
        "host_ms_per_call": round(host * 1000, 3),
        "wall_ms_per_call": round(wall * 1000, 3),
        "gpu_kernels_per_call": kernels,
        "gpu_ms_per_call": round(gpu_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=3072)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lora_layer.jsonl", "a", encoding="utf-8") as fh:
        for shape, (fin, fout) in SHAPES.items():
            for dropout in (0.05, 0.0):
                for fused in (False, True):
                    row = {"shape": shape, "tokens": args.tokens, **measure(fin, fout, args.tokens, fused, dropout)}
                    print(json.dumps(row), flush=True)
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
