"""The issue #6 workloads (W1-W5) and the variants each one runs: the plain reference path ("plain"), the same with
Liger kernels ("liger", when liger-kernel imports), vlmtune's engine ("vlmtune", with config overrides) and Unsloth's
FastVisionModel ("unsloth", issue 21: when its wheels are installed, see unsloth_run.py).

Shapes follow the issue: a 448 px image is 256 image tokens for Qwen2-VL/2.5-VL (32 x 32 patches of 14 px, 2 x 2
merged), a 336 px one 144. LoRA r16 alpha 32 on all language linear layers, dropout 0.05, AdamW (fused) lr 1e-4,
max grad norm 1, bf16 weights + bf16 autocast, SDPA, in both paths.

The paths train the same model on the same samples in the same order, so their per-step losses (results.jsonl
`losses`) can be compared: the plain loop (and Unsloth's, which is the plain loop) builds its weights after
torch.manual_seed(0), vlmtune's engine with training.seed=0 (engine_run.py), Unsloth loads weights written the same
way (unsloth_run.write_weights); every path draws its order as accelerate's seedable sampler does with seed 0
(plain.EpochOrder); constant lr 1e-4, no warmup, no weight decay, AdamW's betas (0.9, 0.999) and eps 1e-8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Path_ = Literal["plain", "liger", "vlmtune", "unsloth"]


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path_
    gc: bool
    overrides: dict[str, Any] = field(default_factory=dict)
    """vlmtune: dotted config overrides (speed.*, training.*, method.*); unsloth: `lora_dropout`."""
    batch: int | None = None
    """Rows per step when it differs from the workload's (packing)."""
    steps: int | None = None
    """Measured steps when they differ from the workload's (a long run: what compiling costs and pays over it)."""
    warmup: int | None = None
    """Unmeasured first steps when they differ from the workload's (torch.compile: compilation and the recompiles
    for a second sequence length, layer 0's input without grad and batches without padding fall in them)."""


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    family: str
    arch: str
    method: Literal["lora", "qlora", "full"]
    batch: int
    image_side: int
    """Fixed image side in px; with `spread` the largest side."""
    text_tokens: int
    """Text tokens per sample (chat template included); with `spread` the longest answer."""
    variants: tuple[Variant, ...]
    reference: str
    """The variant the ratios divide by."""
    warmup: int = 3
    steps: int = 10
    spread: bool = False
    """Images 224..image_side px and answers 5..text_tokens tokens, drawn per record."""
    records: int = 0
    """Records to write (0: batch x (warmup + steps) + a few)."""
    mfu: bool = False
    part: int = 1
    """Which of the three GPU calls runs it (each call must stay under ~9.5 minutes); 0: only with --only."""


FAST = {"speed.checkpoint_every_n_layers": 2}
"""Checkpoint every second layer: half the recomputation, about half the activations of no checkpointing."""

NONE = {"speed.chunked_loss": False, "speed.frozen_vision_no_grad": False, "speed.lora_bf16_compute": False,
        "speed.sdpa_cudnn": True, "speed.fused_lora": False, "speed.varlen_attention": False,
        "speed.positions_in_collator": False}
"""vlmtune's engine with its default model-level switches off: the HF Trainer around the plain model."""

LEAN = {
    "method.quantization.quantize_vision_tower": True,
    "method.quantization.quantize_lm_head": True,
    "training.optimizer": "paged_adamw_8bit",
    "speed.embeddings_on_cpu": True,
}
"""W2's 8 GB setting: 4-bit vision tower and lm_head, paged 8-bit AdamW, the embedding table in CPU memory."""

GRAPHS = {"speed.compile": True, "speed.compile_mode": "reduce-overhead"}
"""torch.compile per decoder layer, each replayed as a CUDA graph."""


AT_PLAIN_PEAK = "@plain_gc_peak_reserved"
"""An override value the suite replaces by the cap that equals the same round's plain_gc peak reserved memory
(hardware.memory_fraction = that peak / the card's memory): "at no more memory" as a user's card would enforce it."""

AUTO = Variant(
    "vlmtune_auto",
    "vlmtune",
    True,
    {"speed.checkpoint_every_n_layers": "auto", "hardware.memory_fraction": AT_PLAIN_PEAK},
)
"""vlmtune's defaults for checkpointing (auto: as few checkpointed layers as the card needs, issue 21) on a card
whose memory is what the plain loop with checkpointing reserved in the same round (it runs after plain_gc)."""

FROM_DISK = "@weights"
"""An override value (model.name_or_path) the suite replaces by the architecture's random weights written to disk
once (as for Unsloth): a capped QLoRA run loads them quantized as a user's run does, where random_init under
hardware.memory_fraction would build the 16-bit model on the CPU first (minutes for 8B)."""

AT_UNSLOTH_PEAK = "@unsloth_gc_peak_reserved"
"""As AT_PLAIN_PEAK, at the same round's unsloth_gc peak reserved memory: "at no more memory than Unsloth"."""

PEAK_OF = {AT_PLAIN_PEAK: "plain_gc", AT_UNSLOTH_PEAK: "unsloth_gc"}
"""Each memory-cap placeholder and the variant of the same round whose peak reserved memory it stands for."""

LOWMEM = {
    "speed.checkpoint_every_n_layers": 1,
    "speed.loss_chunk_tokens": 256,
    "hardware.expandable_segments": True,
}
"""vlmtune at its smallest footprint: every layer checkpointed, the chunked loss's fp32 logits block a quarter of the
default's (256 tokens x 152k vocab: ~0.3 GiB instead of ~1.2 GiB at 1024; Unsloth's whole lead over vlmtune_gc is
~1.1 GiB allocated on W1) and the allocator's expandable segments (little reserved beyond what is allocated)."""

LOWMEM_VARIANT = Variant("vlmtune_lowmem", "vlmtune", True, LOWMEM)
"""vlmtune at its smallest footprint (W1, W3): the candidate for "at no more memory than Unsloth"."""

MIN_VARIANT = Variant(
    "vlmtune_min",
    "vlmtune",
    True,
    {**LOWMEM, "speed.loss_chunk_tokens": 128, "speed.checkpoint_offload": True},
)
"""LOWMEM with a 128-token loss chunk and the checkpointed layer inputs in pinned CPU memory (as Unsloth's own
checkpointing keeps them): what is left of vlmtune's memory above Unsloth's once the loss block and the saved
activations (W1 0.25 GiB, W3 0.57 GiB) are gone, and what the copies cost."""

DEFAULT_1000 = Variant(
    "vlmtune_default1000",
    "vlmtune",
    True,
    {"speed.compile": "auto", "speed.checkpoint_every_n_layers": "auto", "hardware.dataloader_workers": 0,
     "hardware.memory_fraction": AT_PLAIN_PEAK},
    steps=1000,
    warmup=0,
)
"""Issue 21's "fast by default": `vlmtune train` with no speed setting over 1,000 steps (checkpointing and compile on
auto: a run this long compiles), timed whole from its first step, compilation included (warmup 0), against the
checkpointed plain loop of the same call, on a card capped at that loop's peak reserved memory ("at no more
memory": without the cap, auto would checkpoint nothing on an 80 GB card and hold more than the plain loop)."""

AUTO_AT_UNSLOTH = Variant(
    "vlmtune_auto_at_unsloth",
    "vlmtune",
    True,
    {**LOWMEM, "speed.checkpoint_every_n_layers": "auto", "hardware.memory_fraction": AT_UNSLOTH_PEAK},
)
"""LOWMEM with checkpointing auto on a card whose memory is what unsloth_gc reserved in the same round (it runs after
unsloth_gc): as few checkpointed layers as that leaves room for; the preflight refuses the run when even every layer
checkpointed does not fit (the result line then carries its reason)."""

AUTO_QLORA = Variant(
    "vlmtune_auto",
    "vlmtune",
    True,
    {**AUTO.overrides, "model.name_or_path": FROM_DISK, "model.random_init": False},
)
"""AUTO for QLoRA pairs, loading its weights from disk."""

def compiled(variant: Variant) -> Variant:
    """`variant` with torch.compile per decoder layer, `<name>_compile`: on an AUTO variant, what `vlmtune train` runs
    by default on a run long enough that compiling pays (speed.compile=auto compiles from 500 optimizer steps), at
    the plain loop's memory; the compilation falls in the 5 warm-up steps (its time is in the run's log)."""
    return replace(variant, name=f"{variant.name}_compile", overrides={**variant.overrides, "speed.compile": True},
                   warmup=5)

AT_UNSLOTH_COMPILED = (compiled(MIN_VARIANT), compiled(LOWMEM_VARIANT))
"""vlmtune_min and vlmtune_lowmem with each decoder layer compiled (`vlmtune_min_compile`, `vlmtune_lowmem_compile`):
at Unsloth's memory (session 17: vlmtune_min 5.07 vs Unsloth's 5.05 GiB reserved on W1 at 1.06x its tokens/s, 17.42 vs
17.31 on W3 at 1.57x) W1's step is short enough for kernel launches to count, and Unsloth compiles each block itself
("compiling each transformer block as one region", its log). Memory stays vlmtune_min's: the peak is the first
layer's recomputation, which speed.compile leaves eager."""

TILED = (
    replace(MIN_VARIANT, name="vlmtune_min_tiled", overrides={**MIN_VARIANT.overrides, "speed.mlp_chunk_tokens": 512}),
    replace(MIN_VARIANT, name="vlmtune_min_tiled1024",
            overrides={**MIN_VARIANT.overrides, "speed.mlp_chunk_tokens": 1024}),
    replace(MIN_VARIANT, name="vlmtune_min_tiled2048",
            overrides={**MIN_VARIANT.overrides, "speed.mlp_chunk_tokens": 2048}),
    replace(LOWMEM_VARIANT, name="vlmtune_lowmem_tiled",
            overrides={**LOWMEM_VARIANT.overrides, "speed.mlp_chunk_tokens": 512}),
)
"""vlmtune_min and vlmtune_lowmem with the checkpointed layers' MLP in chunks of 512 tokens (speed.mlp_chunk_tokens,
speed/tiled_mlp.py): at Unsloth's memory the peak is a recomputed layer's backward, mostly its MLP's intermediate-
width tensors (W3: 0.11 GiB over Unsloth's reserved in session 17, vlmtune_min at 1.57x its speed)."""

VISION = {"speed.compile": True, "speed.compile_vision": True}
HASH_TILED = {"speed.compile": True, "speed.hash_dropout": True, "speed.mlp_chunk_tokens": 2048}
COMPILED_VISION = (
    replace(MIN_VARIANT, name="vlmtune_min_compile_vision", overrides={**MIN_VARIANT.overrides, **VISION}, warmup=5),
    replace(MIN_VARIANT, name="vlmtune_min_compile_hash_tiled2048",
            overrides={**MIN_VARIANT.overrides, **HASH_TILED}, warmup=5),
    replace(MIN_VARIANT, name="vlmtune_min_compile_vision_hash_tiled2048",
            overrides={**MIN_VARIANT.overrides, **HASH_TILED, **VISION}, warmup=5),
    Variant("vlmtune_nogc_compile_vision", "vlmtune", False, VISION, warmup=6),
)
"""vlmtune_min compiled at Unsloth's memory (session 19, W1: 1.30x Unsloth's tokens/s but 0.10 GiB over: the eager first
layer ran PEFT's adapters and the compiled ones kept a dropout mask per linear). Since then the first layer runs the
fused LoRA function under speed.compile; `_hash_tiled2048` adds speed.hash_dropout (the compiled layers keep no masks,
54 kB per token and 2B layer less, CPU count) and the first layer's MLP in 2,048-token chunks: estimated 4.72 GiB
allocated on W1 against vlmtune_min's 4.80 (measured 4.98, 5.05 reserved). `_vision`: speed.compile_vision, the frozen
vision tower's blocks compiled too (session 19's W3 profile: the eager tower's forward was 17% of the step's kernel time
for under 3% of its FLOPs); `vlmtune_nogc_compile_vision` for W3's MFU."""

VPOS = {"speed.vision_positions_on_cpu": True}
VISION_POSITIONS = (
    replace(MIN_VARIANT, name="vlmtune_min_tiled2048_vpos",
            overrides={**MIN_VARIANT.overrides, "speed.mlp_chunk_tokens": 2048, **VPOS}),
    replace(MIN_VARIANT, name="vlmtune_min_compile_vision_hash_tiled2048_vpos",
            overrides={**MIN_VARIANT.overrides, **HASH_TILED, **VISION, **VPOS}, warmup=5),
    Variant("vlmtune_nogc_compile_vision_vpos", "vlmtune", False, {**VISION, **VPOS}, warmup=6),
)
"""`_vpos`: speed.vision_positions_on_cpu, the Qwen vision tower's position ids, attention boundaries and window order
made on the CPU once per image grid (every W1 / W3 step has the same grids) instead of in Python loops with host
syncs on the GPU's timeline (session 19's W3 profile: the eager tower's forward took 97 ms of host time with 27 syncs
for about 8 ms of matmuls): beside W3's bar variant, the compiled W1 candidate and W3's MFU variant."""

NOEXPANDABLE = Variant("vlmtune_gc_noexpandable", "vlmtune", True, {"hardware.expandable_segments": False})
"""vlmtune's defaults with every layer checkpointed and the allocator's expandable segments off (on by default since
session 12): W1 and the family pairs, where speeds moved after that default changed."""

UNSLOTH_GC = Variant("unsloth_gc", "unsloth", True)
"""Unsloth's FastVisionModel with its own checkpointing ("unsloth"), the harness's LoRA (W1, W2 4-bit, W3)."""


def _packed(name: str, rows: int, warmup: int | None = None, **overrides: Any) -> Variant:
    """W5's packed variant: one row per step holding up to `rows` x 3072 tokens (the longest sample's budget)."""
    return Variant(
        name,
        "vlmtune",
        True,
        {"speed.packing": True, "speed.packing_max_tokens": rows * 3072, **overrides},
        batch=1,
        warmup=warmup,
    )


W1 = Workload(
    "W1",
    "Qwen2-VL-2B LoRA r16 all linear, batch 4 x (448 px + 512 text)",
    "qwen2_vl",
    "2b",
    "lora",
    4,
    448,
    512,
    variants=(
        Variant("plain_gc", "plain", True),
        Variant("vlmtune_gc", "vlmtune", True),
        UNSLOTH_GC,
        AUTO,
        LOWMEM_VARIANT,
        AUTO_AT_UNSLOTH,
        MIN_VARIANT,
        *AT_UNSLOTH_COMPILED,
        *TILED,
        *COMPILED_VISION,
        *VISION_POSITIONS,
        # session 17: vlmtune_gc (defaults, every layer checkpointed: 1,024-token loss chunks, expandable segments on)
        # stepped in 0.45 s against vlmtune_lowmem's 0.28 s in the same call, whose only other differences are
        # 256-token chunks; 11,054 tokens/s in session 12 before expandable segments were the default. Each apart:
        NOEXPANDABLE,
        Variant("vlmtune_gc_chunk256", "vlmtune", True, {"speed.loss_chunk_tokens": 256}),
        DEFAULT_1000,
        Variant("vlmtune_gc2", "vlmtune", True, FAST),
        # every 4th layer: the estimate is 15.7 GiB at the nvidia-smi level, under the GC'd reference's 18.3-23.5
        # measured, with a quarter of the recomputation (the candidate for ">= 2x at <= its memory")
        Variant("vlmtune_gc4", "vlmtune", True, {"speed.checkpoint_every_n_layers": 4}),
        Variant("vlmtune_nogc", "vlmtune", False),
        # PEFT's own LoRA forward (module calls, casts, small ops) instead of one autograd function per layer
        Variant("vlmtune_nogc_nofuse", "vlmtune", False, {"speed.fused_lora": False}),
        Variant("vlmtune_gc4_nofuse", "vlmtune", True, {"speed.checkpoint_every_n_layers": 4, "speed.fused_lora": False}),
        # the vision tower's images attended per image with SDPA, as before speed.varlen_attention
        Variant("vlmtune_nogc_novarlen", "vlmtune", False, {"speed.varlen_attention": False}),
        Variant("plain_nogc", "plain", False),
        Variant("liger_gc", "liger", True),
        Variant("liger_nogc", "liger", False),
        Variant("vlmtune_gc2_compile", "vlmtune", True, {**FAST, "speed.compile": True}, warmup=8),
        Variant(
            "vlmtune_gc4_compile", "vlmtune", True, {"speed.checkpoint_every_n_layers": 4, "speed.compile": True}, warmup=8
        ),
        # torch.compile per decoder layer: inductor's fused kernels (measured before session 6 with a KV cache built
        # in every training forward, whose per-layer guard stopped compilation after 8 layers: those runs were void)
        Variant("vlmtune_nogc_compile", "vlmtune", False, {"speed.compile": True}, warmup=8),
        # and each compiled layer replayed as a CUDA graph (the no-GC step is launch-bound)
        Variant("vlmtune_nogc_graphs", "vlmtune", False, GRAPHS, warmup=8),
        # (CUDA graphs with checkpointing: refused by the config since session 7, a graph's output would be overwritten
        # before the recomputation reads it)
        # cuDNN's attention for the language model (fixed shapes here: its plans are cached), varlen for the vision
        Variant("vlmtune_nogc_cudnn", "vlmtune", False, {"speed.sdpa_cudnn": True}),
        # M-RoPE positions computed in the forward (transformers' loops, ~80 syncs per step) instead of the collator
        Variant("vlmtune_nogc_nopos", "vlmtune", False, {"speed.positions_in_collator": False}),
        # a run of 300 steps as a user would start it: speed.compile=auto (the default, compiles: 200+ steps on a GPU)
        # against the same run eager; the whole run's step time (compilation included) is in train_seconds_all_steps
        Variant("vlmtune_nogc_eager300", "vlmtune", False, {"speed.compile": False}, steps=290, warmup=10),
        Variant("vlmtune_nogc_auto300", "vlmtune", False, {"speed.compile": "auto"}, steps=290, warmup=10),
        # speed.compile=true over 300 steps, then the same again reusing the first one's inductor cache (run with
        # BENCH_INDUCTOR_CACHE=shared): a user's first run on a machine, and every later one
        Variant("vlmtune_nogc_compile300", "vlmtune", False, {"speed.compile": True}, steps=290, warmup=10),
        Variant("vlmtune_nogc_compile300_again", "vlmtune", False, {"speed.compile": True}, steps=290, warmup=10),
        # vlmtune_nogc again, run last: how far the machine drifts within one call
        Variant("vlmtune_nogc_repeat", "vlmtune", False),
        Variant("plain_nogc_repeat", "plain", False),
        # Unsloth as its docs recommend (lora_dropout 0 lets its fast LoRA kernels apply), beside the harness's 0.05
        Variant("unsloth_gc_nodrop", "unsloth", True, {"lora_dropout": 0.0}),
    ),
    reference="plain_gc",
    mfu=True,
    part=1,
)

W1X = replace(
    W1,
    name="W1x",
    title="W1 ablation, no GC: which of vlmtune's switches (or the Trainer itself) costs time vs the plain loop",
    variants=(
        Variant("plain_nogc", "plain", False),
        Variant("vlmtune_nogc", "vlmtune", False),
        Variant("vlmtune_nogc_no_chunked", "vlmtune", False, {"speed.chunked_loss": False}),
        Variant("vlmtune_nogc_no_vision_nograd", "vlmtune", False, {"speed.frozen_vision_no_grad": False}),
        Variant("vlmtune_nogc_no_lora16", "vlmtune", False, {"speed.lora_bf16_compute": False}),
        Variant("vlmtune_nogc_cudnn", "vlmtune", False, {"speed.sdpa_cudnn": True}),
        Variant("vlmtune_nogc_none", "vlmtune", False, NONE),
    ),
    reference="plain_nogc",
    warmup=3,
    steps=16,
    part=0,
)
"""W1's shapes without checkpointing, each of vlmtune's switches off in turn (only run with --only W1x)."""


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        W1,
        W1X,
        Workload(
            "W4",
            "Qwen2-VL-2B full fine-tuning (vision tower frozen), batch 4 x (448 px + 512 text), GC",
            "qwen2_vl",
            "2b",
            "full",
            4,
            448,
            512,
            variants=(
                Variant("plain_gc", "plain", True),
                Variant("vlmtune_gc", "vlmtune", True),
                Variant("vlmtune_gc2", "vlmtune", True, FAST),
                Variant("liger_gc", "liger", True),
                # torch.compile per decoder layer with full fine-tuning (every layer's weights train)
                Variant("vlmtune_gc_compile", "vlmtune", True, {"speed.compile": True}, warmup=8),
                Variant("vlmtune_gc2_compile", "vlmtune", True, {**FAST, "speed.compile": True}, warmup=8),
            ),
            reference="plain_gc",
            mfu=True,
            part=2,
        ),
        Workload(
            "W2",
            "Qwen2.5-VL-7B QLoRA r16, batch 1 x (336 px + 256 text), GC",
            "qwen2_5_vl",
            "7b",
            "qlora",
            1,
            336,
            256,
            variants=(
                Variant("plain_gc", "plain", True),
                Variant("vlmtune_gc", "vlmtune", True),
                UNSLOTH_GC,
                Variant("vlmtune_lean", "vlmtune", True, LEAN),
                # torch.compile over 4-bit layers (bitsandbytes' matmul inside the compiled decoder layer)
                Variant("vlmtune_gc_compile", "vlmtune", True, {"speed.compile": True}, warmup=6),
                # the 8 GB setting compiled (what speed.compile=auto does to a long run on such a card)
                Variant("vlmtune_lean_compile", "vlmtune", True, {**LEAN, "speed.compile": True}, warmup=6),
            ),
            reference="plain_gc",
            warmup=3,
            steps=12,
            part=3,
        ),
        Workload(
            "W3",
            "Qwen2.5-VL-7B LoRA r16 all linear, batch 4 x (448 px + 512 text), GC",
            "qwen2_5_vl",
            "7b",
            "lora",
            4,
            448,
            512,
            variants=(
                Variant("plain_gc", "plain", True),
                Variant("vlmtune_gc", "vlmtune", True),
                UNSLOTH_GC,
                AUTO,
                LOWMEM_VARIANT,
                AUTO_AT_UNSLOTH,
                MIN_VARIANT,
                *AT_UNSLOTH_COMPILED,
                *TILED,
                *COMPILED_VISION,
                *VISION_POSITIONS,
                Variant("vlmtune_gc2", "vlmtune", True, FAST),
                Variant("liger_gc", "liger", True),
                Variant("vlmtune_gc_compile", "vlmtune", True, {"speed.compile": True}, warmup=6),
                # issue 21's MFU bar on W3 (>= 35%, recomputation not counted): what the 80 GB card allows, no layer
                # recomputed (~42 GiB estimated at batch 4), eager and compiled
                Variant("vlmtune_nogc", "vlmtune", False),
                Variant("vlmtune_nogc_compile", "vlmtune", False, {"speed.compile": True}, warmup=6),
            ),
            reference="plain_gc",
            warmup=2,
            steps=6,
            mfu=True,
            part=2,
        ),
        Workload(
            "W5",
            "Qwen2-VL-2B LoRA, realistic spread (images 224-1344 px, answers 5-600 tokens), GC: padded vs packed",
            "qwen2_vl",
            "2b",
            "lora",
            4,
            1344,
            600,
            variants=(
                Variant("plain_padded", "plain", True),
                Variant("vlmtune_padded", "vlmtune", True),
                _packed("vlmtune_packed", rows=4),
                # "at the same memory budget": rows of 3 x 3072 tokens instead of 4 (packed at 4 reserved 10.15 GiB,
                # padded 8.11 on the H100)
                _packed("vlmtune_packed_3row", rows=3),
                _packed("vlmtune_packed_cudnn", rows=4, **{"speed.sdpa_cudnn": True}),
                # before speed.varlen_attention: per-image vision attention and per-sample spans in the LM
                Variant("vlmtune_padded_novarlen", "vlmtune", True, {"speed.varlen_attention": False}),
                Variant("vlmtune_padded_nofuse", "vlmtune", True, {"speed.fused_lora": False}),
                # torch.compile on images and answers of every size (a new length every step: dynamic shapes)
                Variant("vlmtune_padded_compile", "vlmtune", True, {"speed.compile": True}, warmup=6),
                _packed("vlmtune_packed_compile", rows=4, warmup=6, **{"speed.compile": True}),
                _packed("vlmtune_packed_nofuse", rows=4, **{"speed.fused_lora": False}),
                # the same two again, run last: the spread between identical runs of one call
                Variant("vlmtune_padded_repeat", "vlmtune", True),
                _packed("vlmtune_packed_repeat", rows=4),
                _packed("vlmtune_packed_novarlen", rows=4, **{"speed.varlen_attention": False}),
            ),
            reference="vlmtune_padded",
            warmup=2,
            steps=8,
            spread=True,
            records=80,
            part=3,
        ),
    )
}

def _family_pair(name: str, title: str, family: str, arch: str, method: str, batch: int, side: int, part: int) -> Workload:
    """Issue 17's per-family run: the plain transformers + PEFT path against `vlmtune train`'s engine with its
    defaults, both with gradient checkpointing (what a user runs on a card this model fills)."""
    auto = AUTO if method == "lora" else AUTO_QLORA
    return Workload(
        name,
        title,
        family,
        arch,
        method,  # type: ignore[arg-type]
        batch,
        side,
        512,
        variants=(Variant("plain_gc", "plain", True), Variant("vlmtune_gc", "vlmtune", True))
        + (auto,)
        # compiled: on Qwen3.5 the DeltaNet layers run transformers' PyTorch reference on the GPU machine
        # (flash-linear-attention cannot train under its triton 3.6 on Hopper); traced, it took 87 s for F7's first
        # step and the second was not done 200 s later (session 14); compiled layers now run it as one operator
        # (speed/opaque_delta_rule.py)
        + (compiled(auto),)
        # cuDNN's attention (speed.sdpa_cudnn=auto: off, except for Gemma 3): Gemma 3 / Qwen3.5 have 256-wide heads
        # and masked batches, where SDPA without cuDNN falls back to the memory-efficient kernel (F5 ran at 0.94x the
        # plain path in session 12 with cuDNN off); vlmtune_gc_nocudnn: Gemma 3 with cuDNN off, as it ran before auto
        # kept it on there (benchmarks/results/2026-12-07-gemma3-step/)
        + (Variant("vlmtune_gc_cudnn", "vlmtune", True, {"speed.sdpa_cudnn": True}),)
        # the allocator's expandable segments off (on by default since session 12): F7 went from 1.20x the plain loop
        # (session 12, without them) to 0.83x (session 14, with them), the other switches unchanged
        + (NOEXPANDABLE,)
        + ((Variant("vlmtune_gc_nocudnn", "vlmtune", True, {"speed.sdpa_cudnn": False}),) if family == "gemma3"
           else ()),
        reference="plain_gc",
        warmup=2,
        # Qwen3.5's steps vary by ±30% (its DeltaNet reference is launch-bound: session 14's F7 medians of 6 steps,
        # 0.95 s plain vs 1.14 s vlmtune, came from runs whose 8 steps took 9.5 vs 9.9 s); more steps, a steadier median
        steps=14 if family == "qwen3_5" else 6,
        part=part,
    )


FAMILY_WORKLOADS = (
    # Qwen3-VL-8B: 448 px = 196 image tokens (16 px patches, 2 x 2 merged)
    _family_pair("F1", "Qwen3-VL-8B LoRA r16 all linear, batch 2 x (448 px + 512 text), GC", "qwen3_vl", "8b",
                 "lora", 2, 448, part=4),
    _family_pair("F2", "Qwen3-VL-8B QLoRA r16, batch 1 x (448 px + 512 text), GC", "qwen3_vl", "8b", "qlora", 1,
                 448, part=4),
    # SmolVLM2-2.2B: a 768 px image is 2 x 2 tiles of 384 px + the global image, 81 tokens each plus tile markers
    _family_pair("F3", "SmolVLM2-2.2B LoRA r16 all linear, batch 2 x (768 px + 512 text), GC", "smolvlm", "2.2b",
                 "lora", 2, 768, part=4),
    _family_pair("F4", "SmolVLM2-2.2B QLoRA r16, batch 1 x (768 px + 512 text), GC", "smolvlm", "2.2b", "qlora", 1,
                 768, part=5),
    # Gemma 3 12B: every image is 896 px, 256 image tokens (+ <start_of_image> / <end_of_image>)
    _family_pair("F5", "Gemma-3-12B LoRA r16 all linear, batch 2 x (896 px + 512 text), GC", "gemma3", "12b",
                 "lora", 2, 896, part=5),
    _family_pair("F6", "Gemma-3-12B QLoRA r16, batch 1 x (896 px + 512 text), GC", "gemma3", "12b", "qlora", 1,
                 896, part=5),
    # Qwen3.5-9B: Qwen3-VL's tower (448 px = 196 tokens); its DeltaNet layers run the kernels the machine has
    _family_pair("F7", "Qwen3.5-9B LoRA r16 all linear, batch 2 x (448 px + 512 text), GC", "qwen3_5", "9b", "lora",
                 2, 448, part=6),
    _family_pair("F8", "Qwen3.5-9B QLoRA r16, batch 1 x (448 px + 512 text), GC", "qwen3_5", "9b", "qlora", 1, 448,
                 part=6),
    # InternVL3.5-8B: a 448 px image is one tile, 256 tokens (+ <img> / </img>); Qwen3-8B language model
    _family_pair("F9", "InternVL3.5-8B LoRA r16 all linear, batch 2 x (448 px + 512 text), GC", "internvl", "8b",
                 "lora", 2, 448, part=7),
    # Llama 3.2 Vision 11B: a 560 px image is one <|image|> token and 4 tiles (3 padded) in the vision encoder, read
    # by the 8 cross-attention layers
    _family_pair("F10", "Llama-3.2-11B-Vision LoRA r16 all linear, batch 2 x (560 px + 512 text), GC", "mllama",
                 "11b", "lora", 2, 560, part=7),
)
WORKLOADS.update({w.name: w for w in FAMILY_WORKLOADS})

W2U = Workload(
    "W2u",
    "Qwen2.5-VL-7B QLoRA r16, batch 1 x (336 px + 512 text), GC: issue 19's 8 GB setting (lean QLoRA, the "
    "ultra_low_memory preset's method) against the plain QLoRA path",
    "qwen2_5_vl",
    "7b",
    "qlora",
    1,
    336,
    512,
    variants=(Variant("plain_gc", "plain", True), Variant("vlmtune_lean", "vlmtune", True, {"method.quantization.lean": True})),
    reference="plain_gc",
    warmup=3,
    steps=10,
    part=0,
)
WORKLOADS[W2U.name] = W2U


MAX_LENGTH = {False: 1024, True: 3072}
"""data.max_length for fixed shapes / the spread (a 1344 px image is 2304 tokens, plus up to 600 of text)."""


SMOKE = os.environ.get("BENCH_SMOKE") == "1"
"""CPU smoke test of the harness itself (tiny models, 2 steps, no GPU): BENCH_SMOKE=1."""


def smoke(work: Workload) -> Workload:
    return replace(
        work,
        arch="tiny",
        image_side=112 if work.spread else 56,
        text_tokens=48,
        warmup=1,
        steps=2,
        records=12,
        batch=min(work.batch, 2),
    )


if SMOKE:
    WORKLOADS = {name: smoke(work) for name, work in WORKLOADS.items()}
