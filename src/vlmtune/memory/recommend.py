"""The advisor: the highest-throughput configuration that fits a GPU (or several) with a safety margin.

What changes the trained model is decided first: the user's image resolution before any lower max_pixels, then the
user's LoRA rank before smaller ones (down to 8). Within the first (max_pixels, rank) for which anything fits, the
configuration with the highest estimated throughput wins, over the allowed methods (LoRA and QLoRA by default; full
fine-tuning when asked), ZeRO stage and offload, micro-batch with gradient accumulation keeping the effective batch,
and gradient checkpointing. A 16-bit method (LoRA, full) that fits without offloading beats a QLoRA estimated at
most QLORA_TIE faster: 4-bit weights change what is trained, and QLoRA's gains at a larger micro-batch are within the
throughput model's error. So QLoRA is what smaller GPUs get. Throughput is a relative model (`relative_throughput`), good for ranking, not a benchmark;
its method and ZeRO slowdowns are the ones measured on the GPU machine (constants below).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from vlmtune.errors import VlmtuneError
from vlmtune.memory.breakdown import Breakdown
from vlmtune.memory.catalogue import lookup_model
from vlmtune.memory.data_scan import DataProfile, SampleCosts
from vlmtune.memory.estimator import estimate
from vlmtune.memory.gpus import GpuSpec, all_gpus
from vlmtune.memory.inputs import EstimateInputs
from vlmtune.memory.params import count_params

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
PIXEL_CAPS = (1003520, 602112, 401408, 200704)
"""max_pixels tried below the user's, for dynamic-resolution models (1280, 768, 512, 256 Qwen2-VL tokens)."""
MIN_RANK = 8
LAUNCH_TOKENS = 2048
"""Micro-batch tokens at which GPU efficiency reaches half its plateau (small batches are launch-bound)."""
# Measured on the GPU machine (benchmarks/RESULTS.md, 2026-11-23/24; Qwen2-VL-2B, batch 4 x 767 tokens, GC, 1 GPU
# unless named): QLoRA 3,674 vs LoRA 4,383 tokens/s (1.19x); ZeRO-2 LoRA 4,310 vs 4,795 without (1.11x), ZeRO-2 full
# 6,684 vs 9,611 (1.44x); ZeRO-3 LoRA 1,180 and full 2,254 tokens/s (4.1x and 4.3x at 3,068 tokens per step: the
# per-step weight gathers, amortised over more tokens per step); ZeRO-2 LoRA on 2 H200s 99.6% of linear.
QLORA_PENALTY = 1.2
ZERO12_BASE = 1.1
ZERO12_PER_TRAINED = 0.35
ZERO3_GATHER_TOKENS = 9_500
MULTI_GPU_EFFICIENCY = 0.95  # measured 0.996 on 2 GPUs; more GPUs not measured
QLORA_TIE = 1.1
"""How much faster (estimated) QLoRA must be to win over 16-bit LoRA or full fine-tuning without offloading."""
LEAN_PENALTY = 1.14
"""Lean QLoRA (4-bit vision tower and lm_head, paged 8-bit AdamW, embeddings in CPU memory) against vlmtune's plain
QLoRA: 509 vs 582 tokens/s on W2 (Qwen2.5-VL-7B, H100, benchmarks/RESULTS.md, session 5 recheck)."""
LOSS_CHUNKS = (1024, 512, 256, 128)
"""speed.loss_chunk_tokens tried at and below the config's (8 bytes x chunk x vocabulary of working memory)."""


@dataclass(frozen=True)
class Candidate:
    inputs: EstimateInputs
    breakdown: Breakdown
    throughput: float


@dataclass(frozen=True)
class Recommendation:
    gpu: GpuSpec
    num_gpus: int
    effective_batch: int
    best: Candidate | None
    considered: int
    margin: float
    reasons: tuple[str, ...] = ()
    """Why this and not something else: what would not fit, what fits but is slower (the file's header)."""

    def describe(self) -> str:
        if self.best is None:
            return (
                f"nothing fits on {self.num_gpus} x {self.gpu.name} with a {self.margin:.0%} margin "
                f"({self.considered} configurations tried): use more or larger GPUs, a smaller model, "
                "shorter sequences or a lower max_pixels"
            )
        i, b = self.best.inputs, self.best.breakdown
        method = f"{'lean ' if lean_qlora(i) else ''}{i.method}" + (f" r={i.lora_rank}" if i.method != "full" else "")
        zero = (
            f"ZeRO-{i.zero_stage}" + (f"+offload {i.offload}" if i.offload != "none" else "")
            if i.zero_stage
            else ("DDP" if i.num_gpus > 1 else "no ZeRO")
        )
        pixels = f", max_pixels {i.max_pixels}" if i.max_pixels else ""
        pixels += f", loss chunk {i.loss_chunk_tokens}" if i.chunked_loss else ""
        cpu = f" (+{b.cpu_ram / 2**30:.0f} GiB of CPU RAM)" if b.cpu_ram >= 2**29 else ""
        return (
            f"{method}, micro-batch {i.batch_size} x accumulation {i.gradient_accumulation_steps}, {zero}, "
            f"checkpointing {'on' if i.gradient_checkpointing else 'off'}{pixels}: "
            f"{b.peak_total / 2**30:.1f} of {self.gpu.usable_bytes / 2**30:.1f} GiB per GPU{cpu}"
        )


def relative_throughput(inputs: EstimateInputs, b: Breakdown) -> float:
    """Samples per unit time over all GPUs, up to a constant (FLOPs per sample / efficiency, with penalties)."""
    counts = count_params(lookup_model(inputs.model))
    n_llm = (
        counts.parts["language"]
        + counts.parts["lm_head"]
        + (counts.parts["embeddings"] if counts.tied else 0)
    )
    llm = (6 if inputs.method == "full" else 4) + (2 if inputs.gradient_checkpointing else 0)
    vit_trained = (inputs.method == "full" and not inputs.freeze_vision_tower) or inputs.adapt_vision_tower
    vit = 6 if (vit_trained or inputs.gradient_checkpointing) else 2
    patches = b.vit_patches / inputs.batch_size
    flops = b.seq_len * n_llm * llm + patches * counts.parts["vision"] * (
        vit + (2 if vit_trained and inputs.gradient_checkpointing else 0)
    )
    tokens = inputs.batch_size * b.seq_len
    efficiency = tokens / (tokens + LAUNCH_TOKENS)
    penalty = QLORA_PENALTY if inputs.method == "qlora" else 1.0
    if lean_qlora(inputs):
        penalty *= LEAN_PENALTY
    trained = b.trainable_params / b.total_params
    if inputs.zero_stage in (1, 2):  # gradient partitions and the flat optimizer step scale with what trains
        penalty *= ZERO12_BASE + ZERO12_PER_TRAINED * trained
    elif inputs.zero_stage == 3:  # every layer's weights gathered in forward, backward and recompute, per step
        penalty *= 1 + ZERO3_GATHER_TOKENS / tokens
    if inputs.offload != "none":  # CPU Adam over the trainable parameters
        penalty *= 1 + trained
    if inputs.offload == "all":  # every weight crosses PCIe in forward, backward (and recompute)
        penalty *= 4.0
    scale = inputs.num_gpus * (MULTI_GPU_EFFICIENCY if inputs.num_gpus > 1 else 1.0)
    return scale * efficiency / (flops * penalty)


def lean_qlora(inputs: EstimateInputs) -> bool:
    """Whether inputs are lean QLoRA's (method.quantization.lean)."""
    return (inputs.method == "qlora" and inputs.quantize_vision_tower and inputs.quantize_lm_head
            and inputs.embeddings_on_cpu and inputs.optimizer == "paged_adamw_8bit")


LEAN = {"quantize_vision_tower": True, "quantize_lm_head": True, "embeddings_on_cpu": True,
        "optimizer": "paged_adamw_8bit"}


def _variants(base: EstimateInputs, method: str, stage: int, offload: str) -> list[dict]:
    """Lean QLoRA or not, and the loss chunk, for one method and ZeRO option (the larger chunk first: it wins a
    tie in throughput). Lean's 8-bit optimizer cannot be offloaded nor run on ZeRO-3 (config/schema.py)."""
    chunks = [c for c in LOSS_CHUNKS if c < base.loss_chunk_tokens] if base.chunked_loss else []
    chunks = [base.loss_chunk_tokens, *chunks]
    # a lean base (the ultra_low_memory preset) gives the other candidates the schema's non-lean values
    not_lean = {k: getattr(EstimateInputs, k) for k in LEAN} if lean_qlora(base) else {}
    plain = [{**not_lean, "loss_chunk_tokens": c} for c in chunks]
    if method != "qlora" or stage == 3 or offload != "none":
        return plain
    return plain + [{**LEAN, "loss_chunk_tokens": c} for c in chunks]


def _zero_options(num_gpus: int, zero: bool = True) -> list[tuple[int, str]]:
    if not zero:
        return [(0, "none")]
    if num_gpus == 1:
        return [(0, "none"), (2, "optimizer"), (3, "optimizer"), (3, "all")]
    return [
        (0, "none"),
        (1, "none"),
        (2, "none"),
        (3, "none"),
        (2, "optimizer"),
        (3, "optimizer"),
        (3, "all"),
    ]


def _pixel_options(base: EstimateInputs) -> list[int | None]:
    rule = lookup_model(base.model).image
    if rule["rule"] != "dynamic" or not base.images_per_sample:
        return [base.max_pixels]
    current = base.max_pixels or (base.image_size**2 if base.image_size else rule["max_pixels"])
    return [base.max_pixels] + [p for p in PIXEL_CAPS if p < current]


def _ranks(base: EstimateInputs) -> list[int]:
    out = [base.lora_rank]
    r = base.lora_rank // 2
    while r >= MIN_RANK:
        out.append(r)
        r //= 2
    return out


class _Shapes:
    """Worst-batch shapes of a data set, computed once per (max_pixels, micro-batch)."""

    def __init__(self, base: EstimateInputs, profile: DataProfile | None):
        self.base, self.profile = base, profile
        self.spec = lookup_model(base.model)
        self._costs: dict[int | None, SampleCosts] = {}

    def __call__(self, batch: int, max_pixels: int | None) -> dict:
        if self.profile is None:
            return {}
        b = self.base
        if max_pixels not in self._costs:
            self._costs[max_pixels] = self.profile.costs(self.spec, b.image_size, b.min_pixels, max_pixels)
        shape = self.profile.batch(self.spec, batch, b.seq_len, costs=self._costs[max_pixels])
        return {
            "seq_len": shape.seq_len,
            "vit_patches_per_batch": shape.vit_patches,
            "images_per_sample": shape.images_per_sample,
            "image_tokens_per_sample": shape.image_tokens,
        }


def _candidates(
    base: EstimateInputs,
    method: str,
    rank: int,
    max_pixels: int | None,
    effective: int,
    num_gpus: int,
    shapes: _Shapes,
    zero: bool = True,
    param_offload: bool = False,
) -> Iterator[EstimateInputs]:
    """param_offload: only the configurations that offload parameters (ZeRO-3 offload all), else all others."""
    per_gpu = max(1, effective // num_gpus)
    for stage, offload in _zero_options(num_gpus, zero):
        if (offload == "all") != param_offload:
            continue
        if method == "qlora" and stage == 3:
            continue  # partitioning 4-bit weights needs bnb_4bit_quant_storage, which vlmtune's QLoRA does not set
        for variant in _variants(base, method, stage, offload):
            for batch in (b for b in MICRO_BATCHES if b <= per_gpu):
                accumulation = math.ceil(effective / (batch * num_gpus))
                for checkpointing in (False, True):
                    yield base.with_(
                        method=method,
                        lora_rank=rank,
                        max_pixels=max_pixels,
                        zero_stage=stage,
                        offload=offload,
                        num_gpus=num_gpus,
                        batch_size=batch,
                        gradient_accumulation_steps=accumulation,
                        gradient_checkpointing=checkpointing,
                        **variant,
                        **shapes(batch, max_pixels),
                    )


def recommend(
    base: EstimateInputs,
    gpu: GpuSpec,
    num_gpus: int = 1,
    effective_batch: int | None = None,
    methods: tuple[str, ...] = ("lora", "qlora"),
    margin: float = 0.10,
    profile: DataProfile | None = None,
    max_cpu_ram: int | None = None,
    zero: bool = True,
) -> Recommendation:
    """Search for the best configuration of `base`'s model and data on `num_gpus` x `gpu`.

    `margin` is the fraction of GPU memory left free; `max_cpu_ram` (bytes, None: no limit) bounds what offloading
    may put in the node's CPU RAM; `zero=False` leaves DeepSpeed out (not installed)."""
    unknown = [m for m in methods if m not in ("lora", "qlora", "full")]
    if unknown or not methods:
        raise VlmtuneError(f"methods must be among lora, qlora, full; got {', '.join(methods) or 'none'}")
    if not 0 <= margin < 1:
        raise VlmtuneError(f"the safety margin must be in [0, 1), got {margin}")
    effective = effective_batch or base.batch_size * base.gradient_accumulation_steps * base.num_gpus
    if effective < 1:
        raise VlmtuneError(f"the effective batch must be at least 1, got {effective}")
    verdict_gpu = gpu.name if gpu in all_gpus() else None  # a GPU measured at run time has no catalogue entry
    base = base.with_(gpu=verdict_gpu, precision="fp32" if base.precision == "fp32" else gpu.precision)
    considered = 0
    shapes = _Shapes(base, profile)
    limit = gpu.usable_bytes * (1 - margin)
    # Parameter offload streams every weight over PCIe three times a step: lean QLoRA, smaller loss chunks, lower
    # max_pixels and smaller ranks are all tried before it.
    closest: dict[str, Candidate] = {}  # per method (lean QLoRA apart): the configuration closest to fitting
    for param_offload in (False, True) if zero else (False,):
        for max_pixels in _pixel_options(base):
            for rank_index, rank in enumerate(_ranks(base)):
                best: Candidate | None = None
                fitting: dict[str, Candidate] = {}
                for method in methods:
                    if method == "full" and rank_index:
                        continue
                    for inputs in _candidates(
                        base, method, rank, max_pixels, effective, num_gpus, shapes, zero, param_offload
                    ):
                        considered += 1
                        b = estimate(inputs)
                        t = relative_throughput(inputs, b)
                        if b.peak_total > limit or (max_cpu_ram is not None and b.cpu_ram > max_cpu_ram):
                            near = closest.get(_method(inputs))
                            if not param_offload and (near is None or b.peak_total < near.breakdown.peak_total):
                                closest[_method(inputs)] = Candidate(inputs, b, t)
                            continue
                        kind = _kind(inputs)
                        if kind not in fitting or t > fitting[kind].throughput:
                            fitting[kind] = Candidate(inputs, b, t)
                        if best is None or t > best.throughput:
                            best = Candidate(inputs, b, t)
                if best is not None:
                    # the fastest 16-bit one that fits without offloading (fitting holds each kind's fastest)
                    best16 = max((c for c in fitting.values() if _sixteen_bit(c.inputs)),
                                 key=lambda c: c.throughput, default=None)
                    if best16 is not None and best16.throughput * QLORA_TIE >= best.throughput:
                        best = best16
                    reasons = _reasons(best, fitting, closest, limit, gpu, margin)
                    return Recommendation(gpu, num_gpus, effective, best, considered, margin, reasons)
    return Recommendation(gpu, num_gpus, effective, None, considered, margin)


def _sixteen_bit(i: EstimateInputs) -> bool:
    """16-bit weights (LoRA or full) without offloading: preferred over QLoRA within QLORA_TIE."""
    return i.method != "qlora" and i.offload == "none"


def _method(i: EstimateInputs) -> str:
    return f"{'lean ' if lean_qlora(i) else ''}{i.method}"


def _kind(i: EstimateInputs) -> str:
    zero = f"ZeRO-{i.zero_stage}" + (f"+offload {i.offload}" if i.offload != "none" else "") if i.zero_stage else ""
    return " ".join(filter(None, ["lean" if lean_qlora(i) else "", i.method, zero]))


def _reasons(best: Candidate, fitting: dict[str, Candidate], closest: dict[str, Candidate], limit: float,
             gpu: GpuSpec, margin: float) -> tuple[str, ...]:
    """The header's reasons: each method that did not fit at its best, each other kind that fits but is slower."""
    out = []
    for method, near in closest.items():
        if any(_method(c.inputs) == method and c.inputs.offload != "all" for c in fitting.values()):
            continue
        out.append(f"{_kind(near.inputs)}{' (without parameter offload)' if best.inputs.offload == 'all' else ''} "
                   f"does not fit: {near.breakdown.peak_total / 2**30:.1f} GiB at best "
                   f"(micro-batch {near.inputs.batch_size}, checkpointing "
                   f"{'on' if near.inputs.gradient_checkpointing else 'off'}) against {limit / 2**30:.1f} GiB "
                   f"({gpu.name} less a {margin:.0%} margin)")
    chosen, said = _kind(best.inputs), {_method(best.inputs)}
    for kind, other in sorted(fitting.items(), key=lambda kv: -kv[1].throughput):
        if kind != chosen and _method(other.inputs) not in said:  # the fastest other of each method
            said.add(_method(other.inputs))
            fits = f"{kind} fits ({other.breakdown.peak_total / 2**30:.1f} GiB)"
            if other.throughput > best.throughput:  # passed over within QLORA_TIE
                out.append(f"{fits} and is estimated {other.throughput / best.throughput:.2f}x as fast, but "
                           f"{best.inputs.method} keeps 16-bit weights and fits without offloading, so it is preferred")
            else:
                out.append(f"{fits} but is estimated {best.throughput / other.throughput:.2f}x slower")
    return tuple(out)
