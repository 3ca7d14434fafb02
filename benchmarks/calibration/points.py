"""The calibration grid and the seed card classes: which configurations are measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30
CONTEXT_MIB = 769  # memory_anchors.md §0: nvidia-smi minus torch reserved on this H100 / torch 2.11 / CUDA 13
STEPS = 5

# name -> (family, --arch, catalogue model with the same numbers)
MODELS = {
    "q2vl2b": ("qwen2_vl", "2b", "Qwen/Qwen2-VL-2B-Instruct"),
    "q25vl7b": ("qwen2_5_vl", "7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "llava7b": ("llava", "7b", "llava-hf/llava-1.5-7b-hf"),
    "q25vl3b": ("qwen2_5_vl", "3b", "Qwen/Qwen2.5-VL-3B-Instruct"),  # held-out points only
}
# data name -> (image side px, text tokens): A/B for the dynamic-resolution Qwen models, L for LLaVA (fixed 336)
DATA = {"A": (448, 512), "B": (896, 1536), "L": (336, 512),
        "C": (672, 1024), "M": (336, 1024)}  # C, M: held-out shapes (never used to derive the estimator's terms)
# card class -> (catalogue GPU, model, data)
CARDS = {
    "8GB": ("RTX 4060 8GB", "q2vl2b", "A"),
    "16GB": ("RTX 4080 16GB", "q25vl7b", "A"),
    "24GB": ("RTX 4090 24GB", "q25vl7b", "A"),
    "80GB": ("A100 80GB", "q25vl7b", "A"),
}


@dataclass(frozen=True)
class Point:
    model: str
    method: str
    gc: bool
    batch: int
    data: str
    zero: int = 0
    plain: bool = False
    """speed.chunked_loss and speed.frozen_vision_no_grad off: HF's loss and vision tower, as the anchors ran."""

    @property
    def id(self) -> str:
        z = f"-z{self.zero}" if self.zero else ""
        return f"{self.model}-{self.method}-gc{int(self.gc)}-b{self.batch}-{self.data}{z}{'-plain' if self.plain else ''}"


def grid(with_zero: bool) -> list[Point]:
    """2B: LoRA/QLoRA/full x checkpointing x batch 1/4 x two image sizes and text lengths; 7B likewise without full
    (pure-bf16 AdamW states of 7.7 B trained parameters alone take 61 GiB); LLaVA-1.5 LoRA/QLoRA; all with
    vlmtune's default speed settings, then six points of the plain path (speed off)."""
    p = []
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B"), (1, 4, "B"), (0, 1, "B")]:
        p.append(Point("q2vl2b", "lora", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B"), (1, 4, "B")]:
        p.append(Point("q2vl2b", "qlora", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B")]:
        p.append(Point("q2vl2b", "full", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (0, 4, "A"), (1, 1, "B"), (1, 4, "B")]:
        p.append(Point("q25vl7b", "lora", bool(gc), b, d))
    for gc, b, d in [(1, 1, "A"), (1, 4, "A"), (0, 1, "A"), (1, 1, "B"), (1, 4, "B")]:
        p.append(Point("q25vl7b", "qlora", bool(gc), b, d))
    for gc, b in [(1, 1), (1, 4), (0, 1)]:
        p.append(Point("llava7b", "lora", bool(gc), b, "L"))
    p.append(Point("llava7b", "qlora", True, 1, "L"))
    for m, method, gc, b, d in [("q2vl2b", "lora", 1, 4, "A"), ("q2vl2b", "lora", 0, 1, "B"), ("q2vl2b", "qlora", 1, 4, "A"),
                                ("q2vl2b", "full", 1, 1, "A"), ("q25vl7b", "lora", 1, 1, "A"),
                                ("q25vl7b", "qlora", 1, 1, "B")]:
        p.append(Point(m, method, bool(gc), b, d, plain=True))
    if with_zero:  # single-GPU ZeRO: model states in DeepSpeed's partitions (fp32 master, 16-bit module)
        p += [Point("q2vl2b", "full", True, 1, "A", 2), Point("q2vl2b", "full", True, 1, "A", 3),
              Point("q2vl2b", "lora", True, 4, "A", 2), Point("q2vl2b", "lora", True, 4, "A", 3)]
    return p


def heldout() -> list[Point]:
    """Points the estimator's terms were not derived from: a third image size and text length (672 px + 1024 text),
    micro-batch 2 (the grid has 1 and 4), LLaVA with 1024 text tokens, and the Qwen2.5-VL-3B architecture (tied
    embeddings, not in the grid)."""
    p = [Point("q2vl2b", m, bool(gc), 2, "C") for m in ("lora", "qlora", "full") for gc in (1, 0)]
    p += [Point("q25vl7b", m, bool(gc), 2, "C") for m in ("lora", "qlora") for gc in (1, 0)]
    p += [Point("llava7b", "lora", True, 2, "M"), Point("llava7b", "qlora", False, 2, "M")]
    p += [Point("q25vl3b", "lora", True, 2, "C"), Point("q25vl3b", "full", True, 1, "C")]
    return p
