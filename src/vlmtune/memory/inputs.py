"""Typed inputs of the estimate, and their construction from a vlmtune config."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from vlmtune.errors import ConfigError
from vlmtune.memory.allocator_setting import resolve_allocator
from vlmtune.memory.zero import check_plan

if TYPE_CHECKING:
    from vlmtune.config.schema import VlmtuneConfig

DEFAULT_IMAGE = (448, 448)
"""Image size assumed without a data set or --image-size (one image per sample)."""
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit")


@dataclass(frozen=True)
class EstimateInputs:
    """Everything the estimate depends on. Sequence and image numbers describe the worst micro-batch."""

    model: str = "Qwen/Qwen2-VL-2B-Instruct"
    method: Literal["lora", "qlora", "full"] = "lora"
    lora_rank: int = 16
    lora_targets: str | tuple[str, ...] = "all"
    """minimal / attention / all, or explicit linear-layer names."""
    lora_dropout: float = 0.05
    adapt_vision_tower: bool = False
    train_projector: bool = False
    adapt_projector: bool = False
    """LoRA on the projector's layers (families that name them: InstructBLIP's Q-Former)."""
    freeze_vision_tower: bool = True
    """Full fine-tuning: keep the vision tower frozen."""
    quantize_vision_tower: bool = False
    quantize_lm_head: bool = False
    double_quant: bool = True
    batch_size: int = 1
    """Micro-batch per GPU."""
    gradient_accumulation_steps: int = 1
    seq_len: int = 2048
    """Tokens per sample after padding to the longest in the batch, image tokens included."""
    images_per_sample: int = 1
    image_hw: tuple[int, int] = DEFAULT_IMAGE
    """(height, width) of each image before the processor resizes it."""
    image_size: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    vit_patches_per_batch: int | None = None
    """Vision-tower patches of the whole micro-batch (from a data scan); derived from the image size when None."""
    image_tokens_per_sample: int | None = None
    """Most image tokens in one sample (from a data scan); derived from the image size when None."""
    gradient_checkpointing: bool = True
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    optimizer: str = "adamw_torch"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    chunked_loss: bool = False
    """vlmtune's chunked loss (speed.chunked_loss): no full-vocabulary logits, one chunk of labelled tokens at a
    time. False: HF's ForCausalLMLoss, as in the plain transformers path the anchors measured."""
    loss_chunk_tokens: int = 1024
    labelled_tokens: int | None = None
    """Labelled tokens in the worst micro-batch (from the data); None: every token of batch_size x seq_len."""
    vision_no_grad: bool = False
    """speed.frozen_vision_no_grad: a frozen vision tower runs without grad (nothing saved for backward)."""
    autocast: bool = False
    """16-bit autocast around fp32 LoRA adapters (vlmtune's Trainer, bf16/fp16); the anchors' plain path ran the
    16-bit model without autocast."""
    lora_16bit_inputs: bool = False
    """speed.lora_bf16_compute: adapters take the layer's 16-bit input instead of an fp32 copy."""
    embeddings_on_cpu: bool = False
    """speed.embeddings_on_cpu (QLoRA, untied): the input-embedding table lives in CPU memory."""
    packing: bool = False
    """speed.packing: batch_size rows of seq_len tokens, each holding several samples (the training preflight sizes
    the rows the data packs into); counts the dense masks of families that build them (Architecture.packed_row_masks)."""
    checkpoint_every: int = 1
    """speed.checkpoint_every_n_layers: with checkpointing, only every n-th decoder layer is checkpointed."""
    checkpoint_offload: bool = False
    """speed.checkpoint_offload: the checkpointed layer inputs live in CPU memory."""
    compiled: bool = False
    """Every decoder layer but the first runs under torch.compile, which keeps less for backward (memory/activations.py
    `compiled_saving`). From a config: speed.compile=true. Under auto the training preflight sets it where auto will
    compile the run (train/preflight.py: memory aside, speed/compile_policy.auto_compiles, and with room on the GPU);
    elsewhere (`estimate`, `recommend`, `--dry-run`) auto is estimated eager, the larger estimate."""
    mlp_activation_recompute: bool = False
    """speed.mlp_activation_recompute: the eagerly run decoder layers' gated MLP keeps 6i bytes per token instead of
    8i (speed/gated_mlp.py), where the architecture's MLP is the gated one (Architecture.gated_mlp). Off for inputs
    built by hand (the measured runs before 2026-12-07 session 17 had autograd's MLP); a config maps its setting."""
    fused_lora: bool = False
    """speed.fused_lora: the adapted linears run as vlmtune's fused LoRA function (speed/fused_lora.py), which with
    dropout keeps each distinct input once instead of PEFT's dropped copy and mask per linear (memory/activations.py
    `fused_lora_bytes`). Counted for LoRA / QLoRA under autocast without ZeRO-3, in the eager layers only (with
    `compiled`, the first) (`fused_lora_layers`).
    Off for inputs built by hand (PEFT's path, and what the fused layers kept before commit ad4f8d3: the measured runs);
    a config maps its setting."""
    hash_dropout: bool = False
    """speed.hash_dropout: with `compiled` and LoRA dropout, the compiled layers draw hashed dropout masks in
    checkpointed regions and keep `hash_dropout_saving` less (memory/activations.py)."""
    mlp_chunk_tokens: int = 0
    """speed.mlp_chunk_tokens (0: off): the checkpointed decoder layers' gated MLP keeps only its input and runs its
    backward this many tokens at a time (speed/tiled_mlp.py), so a recomputed layer holds its MLP's activations and
    intermediate-width gradient for one chunk instead of the whole micro-batch. Counted where training applies it:
    with checkpointing, one process without DeepSpeed (zero_stage 0, num_gpus 1), eager layers (only the first with
    `compiled`), architectures with the gated MLP (Architecture.gated_mlp); memory/activations.py `recompute_working`."""
    fp8_base: bool = False
    """speed.fp8 is on (LoRA): each adapted base weight also keeps its e4m3 copies, both layouts (speed/fp8_linear.py
    planned_bytes), beside the bf16 weight."""
    linear_attention_kernel: Literal["operator", "torch", "fla"] = "operator"
    """Which kernel runs linear-attention layers (Qwen3.5's gated DeltaNet) and so what they keep for backward
    (memory/activations.py delta_net_bytes): "operator", transformers' PyTorch reference as the one operator vlmtune
    trains it as (speed/opaque_delta_rule.py: its inputs saved, the rest recomputed in backward); "torch", the same
    reference traced by autograd, as transformers runs it (the plain loop; vlmtune before 2026-12-07 session 16);
    "fla", flash-linear-attention's fused kernel, which transformers uses when `fla` imports. From a config: fla when
    the target is a CUDA GPU and fla can train there, else operator (`linear_attention_kernel`)."""
    expandable: bool = False
    """The caching allocator uses expandable segments (hardware.expandable_segments; on by default in training since
    2026-12-07). False here: the measured anchors and calibration points ran without them."""
    zero_stage: int = 0
    offload: Literal["none", "optimizer", "all"] = "none"
    offload_ratio: float = 1.0
    """ZeRO-3 with offload: share of the optimizer's sub-groups in CPU RAM (distributed.offload_ratio)."""
    sub_group_size: int = 1_000_000_000
    """ZeRO-3 sub_group_size (distributed.sub_group_size)."""
    max_live_parameters: int = 1_000_000_000
    """ZeRO-3 stage3_max_live_parameters (distributed.max_live_parameters): caps the prefetcher's run-ahead."""
    num_gpus: int = 1
    gpu: str | None = None
    """GPU name from the catalogue for the verdict (None: no verdict)."""

    def problems(self) -> list[str]:
        out = []
        if self.method not in ("lora", "qlora", "full"):
            out.append(f"method must be lora, qlora or full, got {self.method!r}")
        for name in ("lora_rank", "batch_size", "gradient_accumulation_steps", "seq_len", "loss_chunk_tokens",
                     "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                out.append(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mlp_chunk_tokens < 0:
            out.append(f"mlp_chunk_tokens must be 0 (off) or a positive integer, got {self.mlp_chunk_tokens}")
        if self.images_per_sample < 0:
            out.append(f"images_per_sample must be 0 or more, got {self.images_per_sample}")
        if min(self.image_hw) < 1:
            out.append(f"image size must be positive, got {self.image_hw[1]}x{self.image_hw[0]}")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            out.append(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.method == "qlora" and self.precision == "fp32":
            out.append("qlora needs precision bf16 or fp16 (4-bit layers compute in 16-bit)")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            out.append(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        out += check_plan(self.zero_stage, self.offload, self.num_gpus, self.offload_ratio)
        if self.sub_group_size < 1:
            out.append(f"sub_group_size must be a positive integer, got {self.sub_group_size}")
        if self.max_live_parameters < 1:
            out.append(f"max_live_parameters must be a positive integer, got {self.max_live_parameters}")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="memory estimate inputs")

    def target_list(self, kinds: dict[str, list[str]]) -> list[str]:
        if isinstance(self.lora_targets, str):
            if self.lora_targets not in kinds:
                raise ConfigError(
                    [
                        f"lora_targets must be one of {', '.join(kinds)} or a list of linear-layer "
                        f"names, got {self.lora_targets!r}"
                    ]
                )
            return list(kinds[self.lora_targets])
        return list(self.lora_targets)

    def with_(self, **changes: Any) -> EstimateInputs:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fp8_planned(config: VlmtuneConfig) -> bool:
    """Whether the run will keep FP8 weight copies: speed.fp8=true on a LoRA run, or auto once FP8 is measured to
    pay (speed/fp8_policy.PAYS; auto then needs an FP8 GPU, which the estimate assumes its target is)."""
    from vlmtune.speed.fp8_policy import PAYS

    wanted = config.speed.fp8 is True or (config.speed.fp8 == "auto" and PAYS)
    return wanted and config.method.name.value == "lora" and not config.hardware.use_cpu


def linear_attention_kernel(cuda: bool) -> Literal["operator", "fla"]:
    """"fla" where the training run will use flash-linear-attention's fused kernels, "operator" where it runs
    transformers' PyTorch reference (as one operator): the answer training acts on (families/linear_attention.py: no
    fla, the CPU, or fla's backward refusing the GPU's Triton)."""
    from vlmtune.families.linear_attention import linear_attention_kernel as training_kernel

    return "fla" if training_kernel("cuda" if cuda else "cpu").name == "fla" else "operator"


def inputs_from_config(config: VlmtuneConfig, **overrides: Any) -> EstimateInputs:
    """The estimate inputs a vlmtune config implies (sequence = data.max_length, padded worst case). ZeRO stage,
    offload and GPU count are what training renders from `distributed` (a given DeepSpeed JSON's stage and offload
    included; stage 0 without DeepSpeed), on num_gpus x num_nodes processes; expandable segments what training sets
    in this process's environment (hardware.expandable_segments, memory/allocator_setting.py)."""
    from vlmtune.config.distributed import world_size, zero_plan

    world = world_size(config.distributed)
    zero = zero_plan(config, world)
    m = config.method
    targets = m.lora.target_modules
    values: dict[str, Any] = dict(
        model=config.model.name_or_path,
        method=m.name.value,
        lora_rank=m.lora.rank,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=m.lora.dropout,
        adapt_vision_tower=m.lora.adapt_vision_tower,
        train_projector=m.lora.train_projector,
        adapt_projector=m.lora.adapt_projector,
        freeze_vision_tower=m.freeze_vision_tower,
        quantize_vision_tower=m.quantization.quantize_vision_tower,
        quantize_lm_head=m.quantization.quantize_lm_head,
        double_quant=m.quantization.double_quant,
        # `auto` is sized by `vlmtune train` against the visible GPU (train/preflight.py); estimate one sample here.
        batch_size=1 if config.training.batch_size == "auto" else config.training.batch_size,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        seq_len=config.data.max_length,
        image_size=config.data.image_size,
        min_pixels=config.data.min_pixels,
        max_pixels=config.data.max_pixels,
        gradient_checkpointing=config.hardware.gradient_checkpointing,
        precision=config.hardware.precision,
        optimizer=config.training.optimizer,
        attn_implementation=config.hardware.attn_implementation,
        chunked_loss=config.speed.chunked_loss,
        loss_chunk_tokens=config.speed.loss_chunk_tokens,
        vision_no_grad=config.speed.frozen_vision_no_grad,
        autocast=config.hardware.precision != "fp32",
        lora_16bit_inputs=config.speed.lora_bf16_compute and config.hardware.precision != "fp32",
        embeddings_on_cpu=config.speed.embeddings_on_cpu,
        packing=config.speed.packing,
        # `auto` is chosen by `vlmtune train` against its GPU (speed/checkpoint_policy.py); every layer here.
        checkpoint_every=1 if config.speed.checkpoint_every_n_layers == "auto" else config.speed.checkpoint_every_n_layers,
        checkpoint_offload=config.speed.checkpoint_offload,
        compiled=config.speed.compile is True,
        # what training sets in this environment (train/gpu_memory.py); the estimate's target is a CUDA GPU
        mlp_activation_recompute=config.speed.mlp_activation_recompute,
        mlp_chunk_tokens=config.speed.mlp_chunk_tokens,
        hash_dropout=config.speed.hash_dropout,
        fused_lora=config.speed.fused_lora,
        fp8_base=fp8_planned(config),
        linear_attention_kernel=linear_attention_kernel(not config.hardware.use_cpu),
        expandable=resolve_allocator(config.hardware.expandable_segments, not config.hardware.use_cpu,
                                     os.environ).expandable,
        zero_stage=zero.stage,
        offload="all" if zero.offload == "optimizer_and_params" else zero.offload,
        offload_ratio=zero.offload_ratio,
        sub_group_size=zero.sub_group_size,
        max_live_parameters=zero.max_live_parameters,
        num_gpus=world,
    )
    if config.data.image_size:
        values["image_hw"] = (config.data.image_size, config.data.image_size)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("gpu") and values["precision"] == "bf16":
        from vlmtune.memory.gpus import get_gpu

        if not get_gpu(values["gpu"]).bf16:  # what training does there (methods.base.resolve_precision)
            values["precision"] = "fp16"
    return EstimateInputs(**values)
