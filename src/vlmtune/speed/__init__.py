"""Speed and memory work inside the one engine, each switchable in the `speed` config section (see schema.py).

    setup = apply_speed(model, config, family)   # after the method prepared the model, before the Trainer
    ...                                          # train
    setup.remove()                               # back to the plain model (tests, in-process reuse)

Model-level pieces live here (chunked loss, frozen vision tower without grad); packing is a data-side collator
(`vlmtune.data.packing`). Each piece says in the log whether it is on and, when it cannot apply, why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)


class _Removable(Protocol):
    def remove(self) -> None: ...


@dataclass
class SpeedSetup:
    """What `apply_speed` switched on (`active`), what it could not (`skipped`: name -> reason), and the handles."""

    active: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    handles: list[_Removable] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)
    """Layer kind -> the kernel it runs and why (the family's linear attention)."""

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []
        self.active = []

    def add(self, name: str, installed: Any) -> Any:
        """Record one optimisation: the installers return a removable handle, or a string saying why not."""
        if isinstance(installed, str):
            self.skipped[name] = installed
            return None
        self.handles.append(installed)
        self.active.append(name)
        return installed

    def summary(self) -> dict[str, Any]:
        return {"active": list(self.active), "skipped": dict(self.skipped), "kernels": dict(self.kernels)}


def apply_speed(
    model: nn.Module,
    config: VlmtuneConfig,
    family: FamilyDescriptor,
    steps: int | None = None,
    world: int | None = None,
    tight_memory: str | None = None,
) -> SpeedSetup:
    """Install the model-level optimisations that `config.speed` switches on; `model` is what the Trainer calls.
    `steps` (the run's optimizer steps, when known), `world` (processes; default: as the config and launcher say)
    and `tight_memory` (why the memory estimate leaves little room, if it does) decide speed.compile=auto."""
    from vlmtune.config.distributed import uses_deepspeed, world_size, zero_plan
    from vlmtune.methods.base import resolve_precision
    from vlmtune.speed.attention_backend import cudnn_attention_off, cudnn_keep_reason
    from vlmtune.speed.compile_cache import persistent_compile_cache
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.compile_policy import FallBackToEager, decide_compile
    from vlmtune.speed.cpu_embeddings import embeddings_on_cpu
    from vlmtune.speed.fp8_policy import decide_fp8
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.lora_compute import lora_compute_in_16bit
    from vlmtune.speed.loss_hook import install_chunked_loss, unwrap_peft
    from vlmtune.speed.packed_attention import packed_attention
    from vlmtune.speed.varlen_attention import PACKED_NAME, varlen_attention

    speed, setup = config.speed, SpeedSetup()
    plan = resolve_precision(config)
    world = world_size(config.distributed) if world is None else world
    deepspeed = uses_deepspeed(config.distributed, world)
    layer_refusal = family.compile_refusal(plan.device)
    compiled = decide_compile(config, plan.device, world, steps, deepspeed, tight_memory, family.packed_span_modules,
                              layer_refusal=layer_refusal)
    fp8 = decide_fp8(config, plan, deepspeed)  # speed.fp8=true that cannot run stops here
    if compiled.auto and not compiled.on:
        setup.skipped["compile"] = compiled.reason
    _linear_attention(setup, family, plan.device)
    if speed.sdpa_cudnn is not True:
        keep = cudnn_keep_reason(speed.sdpa_cudnn, family, unwrap_peft(model).config.get_text_config())
        setup.add("sdpa_without_cudnn", cudnn_attention_off(config.hardware.attn_implementation, plan.device, keep))
    if speed.chunked_loss:
        setup.add("chunked_loss", install_chunked_loss(model, family.lm_head_names, speed.loss_chunk_tokens))
    if speed.vision_positions_on_cpu:
        from vlmtune.speed.vision_positions import vision_positions_on_cpu

        setup.add("vision_positions_on_cpu", vision_positions_on_cpu(unwrap_peft(model), family.vision_prefixes))
    if speed.frozen_vision_no_grad:
        wrapped = setup.add("frozen_vision_no_grad", vision_without_grad(unwrap_peft(model), family.vision_prefixes))
        if wrapped is not None:
            log.debug("without grad: %s", ", ".join(wrapped.names))
    if speed.lora_bf16_compute and config.method.name.value != "full":
        setup.add("lora_bf16_compute", lora_compute_in_16bit(model, autocast=plan.bf16 or plan.fp16))
    if speed.fused_lora and config.method.name.value != "full":
        from vlmtune.speed.fused_lora import fuse_lora

        # under speed.compile only the layers that stay eager (the first decoder layer, anything outside the decoder
        # layers): dynamo does not trace the fused function's shared copies, and inductor fuses the compiled ones' ops
        leave = tuple(_compiled_decoder_layers(model, family)) if compiled.on else ()
        fused = setup.add("fused_lora", fuse_lora(unwrap_peft(model), zero_plan(config, world).stage, leave))
        if fp8.on and not compiled.on:
            _install_fp8(setup, fused, fp8)
    if speed.mlp_activation_recompute:  # eager layers only: compiled ones get the same from inductor
        from vlmtune.speed.gated_mlp import recompute_mlp_activations

        setup.add("mlp_activation_recompute", recompute_mlp_activations(
            unwrap_peft(model), family.language_layers_prefix, eager_layers=1 if compiled.on else None))
    if speed.mlp_chunk_tokens:  # after mlp_activation_recompute: each chunk runs the MLP's forward as installed
        setup.add("mlp_chunk_tokens", _tiled_mlps(model, config, family, world, deepspeed, compiled.on))
    if speed.hash_dropout:
        setup.add("hash_dropout", _hash_dropout(model, config, family, compiled.on))
    if fp8.on and compiled.on:  # before the layers are compiled: dynamo traces the base layers' FP8 forward
        _install_fp8(setup, None, fp8, compiled_in=model, zero_stage=zero_plan(config, world).stage)
    if fp8.auto and not fp8.on:
        setup.skipped["fp8"] = fp8.reason
    if speed.embeddings_on_cpu:
        setup.add("embeddings_on_cpu", embeddings_on_cpu(unwrap_peft(model), config.method.name.value))
    if compiled.on:
        # before the layers are wrapped and anything compiles: inductor and Triton read their folders from the env
        cache = setup.add("compile_cache", persistent_compile_cache(plan.device))
        log.info("speed: %s", cache.reason if cache is not None else
                 f"compile cache: not persistent: {setup.skipped['compile_cache']}")
        mode = None if speed.compile_mode == "default" else speed.compile_mode
        if setup.add("compile", compile_layers(unwrap_peft(model), family.language_layers_prefix, mode=mode)):
            log.info("speed: %s", compiled.reason)
            if compiled.auto:
                setup.handles.append(FallBackToEager())
        if speed.compile_vision:
            from vlmtune.speed.compile_vision import compile_vision

            setup.add("compile_vision", compile_vision(unwrap_peft(model), family.vision_prefixes, mode=mode))
    elif speed.compile_vision:
        setup.skipped["compile_vision"] = "speed.compile is off (the vision blocks compile with the decoder layers)"
    own_masks = family.packed_row_attention == "family_mask"
    spans = speed.packing and speed.packed_attention == "spans" and not own_masks
    if speed.packing:
        setup.active.append("packing")
    if speed.packing and own_masks:
        _install_family_masks(setup, model, family)
    if speed.packing and family.packed_span_modules:
        _install_span_layers(setup, model, family)
    varlen = None
    if speed.varlen_attention:
        varlen = setup.add("varlen_attention", varlen_attention(unwrap_peft(model), family, plan.device, spans))
    if spans and not (varlen is not None and PACKED_NAME in varlen.names):
        setup.add("packed_attention=spans", packed_attention(unwrap_peft(model), family.language_prefixes))
    if speed.compile is False and decide_compile(
        config.model_copy(update={"speed": speed.model_copy(update={"compile": "auto"})}),
        plan.device, world, steps, deepspeed, tight_memory, family.packed_span_modules, layer_refusal=layer_refusal,
    ).on:
        log.info(
            "speed: speed.compile=auto would compile this run and likely train faster (about 40 s of compiling at "
            "the start, 12 s once cached; H100, median step: 1.2-1.4x vlmtune's eager speed on LoRA, QLoRA and full "
            "fine-tuning; docs/SPEED.md)"
        )
    skipped = "; ".join(f"{name} does not apply: {reason}" for name, reason in setup.skipped.items())
    log.info(
        "speed: %s%s", ", ".join(setup.active) or "nothing switched on", f" ({skipped})" if skipped else ""
    )
    return setup


def _compiled_decoder_layers(model: nn.Module, family: FamilyDescriptor) -> list[nn.Module]:
    """The decoder layers speed.compile compiles ([] where it compiles none)."""
    from vlmtune.speed.compile_layers import compiled_decoder_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    layers = compiled_decoder_layers(unwrap_peft(model), family.language_layers_prefix)
    return [] if isinstance(layers, str) else layers


def _hash_dropout(model: nn.Module, config: VlmtuneConfig, family: FamilyDescriptor, compiled: bool) -> Any:
    """speed.hash_dropout on the compiled decoder layers (all but the first), or why not."""
    from vlmtune.speed.hash_dropout import hash_lora_dropout

    if not compiled:
        return "speed.compile is off (eager layers run the fused LoRA function, which keeps no masks either)"
    if config.method.name.value == "full":
        return "full fine-tuning has no LoRA dropout"
    return hash_lora_dropout(_compiled_decoder_layers(model, family))


def _linear_attention(setup: SpeedSetup, family: FamilyDescriptor, device: str) -> None:
    """The family's linear-attention layers on the kernel that can train on `device` (`linear_attention_kernel`):
    flash-linear-attention's where it can, else transformers' PyTorch reference, run as one operator
    (speed/opaque_delta_rule.py): it keeps its inputs for backward instead of the loop's fp32 intermediates (about
    half the layer's activations at Qwen3.5-9B's widths) and compiled layers do not trace into its loop over chunks."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.families.linear_attention import reference_kernels

    kernel = family.linear_attention_kernel(device)
    if kernel is None:
        return
    setup.kernels["linear_attention"] = kernel.describe()
    if kernel.name == "fla":
        log.info("speed: the linear-attention layers run %s", kernel.describe())
        return
    installed = reference_kernels(family.linear_attention_functions, opaque=True)
    if isinstance(installed, str):
        raise VlmtuneError(f"the linear-attention layers cannot run the PyTorch reference here ({kernel.reason}) "
                           f"and {installed}")
    setup.add("linear_attention=torch_reference_operator", installed)
    if kernel.fallback:
        log.warning("speed: the linear-attention layers run transformers' PyTorch reference instead of "
                    "flash-linear-attention, which is installed: %s", kernel.reason)
    log.info("speed: the linear-attention reference runs as one operator (its inputs kept for backward, the chunk "
             "loop recomputed there)")


def _tiled_mlps(
    model: nn.Module, config: VlmtuneConfig, family: FamilyDescriptor, world: int, deepspeed: bool, compiled: bool
) -> Any:
    """speed.mlp_chunk_tokens: the handle, or why it does not apply."""
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.tiled_mlp import tile_mlps

    if not config.hardware.gradient_checkpointing:
        return "it chunks the checkpointed layers' MLP, and hardware.gradient_checkpointing is off"
    if deepspeed or world > 1:
        return ("its per-chunk backward is nested inside autograd's, where DDP's and DeepSpeed's gradient hooks do not "
                "see it: one process without DeepSpeed only")
    tiled = tile_mlps(unwrap_peft(model), family.language_layers_prefix, config.speed.mlp_chunk_tokens,
                      eager_layers=1 if compiled else None)
    if not isinstance(tiled, str):
        log.info("speed: the checkpointed layers' MLP runs %d tokens at a time in backward (%d MLPs%s)",
                 config.speed.mlp_chunk_tokens, len(tiled.names),
                 f"; {len(tiled.recomputing)} of them feed more than the residual stream, so checkpointing's "
                 "recomputation computes them once more" if tiled.recomputing else "")
    return tiled


def _needed_for_packing(installed: Any) -> Any:
    """A part packed rows cannot train correctly without: its handle, or the run stops with why it cannot apply."""
    from vlmtune.errors import VlmtuneError

    if isinstance(installed, str):
        raise VlmtuneError(f"speed.packing cannot run here: {installed}. Set speed.packing=false.")
    return installed


def _install_family_masks(setup: SpeedSetup, model: nn.Module, family: FamilyDescriptor) -> None:
    """Packed rows of a family that builds their masks itself (`FamilyDescriptor.packed_row_attention`): without
    them the rows would train on transformers' own packed masks, so a failure to install stops the run."""
    from vlmtune.speed.family_mask import family_packed_masks
    from vlmtune.speed.loss_hook import unwrap_peft

    setup.add("packed_attention=family_mask", _needed_for_packing(family_packed_masks(unwrap_peft(model), family)))
    setup.skipped["packed_attention"] = (
        f"{family.name} builds its packed rows' attention masks itself (dense, rows x length^2 per mask type; SDPA "
        "with a mask runs no flash kernel), so speed.packed_attention does not apply"
    )


def _install_span_layers(setup: SpeedSetup, model: nn.Module, family: FamilyDescriptor) -> None:
    """Packed rows of a family with layers that carry state along the sequence (`packed_span_modules`): without
    the per-span forward each sample would start from the state of the one before, so a failure stops the run."""
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.span_layers import span_layers

    installed = _needed_for_packing(
        span_layers(unwrap_peft(model), family.packed_span_modules, family.language_prefixes))
    setup.add("packed_layers=per_sample", installed)
    log.info("speed: packing: %d %s layers run once per sample of a packed row (a Python loop over the row's "
             "samples in each)", len(installed.layers), "/".join(family.packed_span_modules))


def _install_fp8(
    setup: SpeedSetup, fused: Any, decision: Any, compiled_in: nn.Module | None = None, zero_stage: int = 0
) -> None:
    """speed.fp8 on the fused LoRA layers, or with `compiled_in` (the model, under speed.compile) on the LoRA base
    layers as code torch.compile traces (fp8_compiled.py); under speed.fp8=true, a run where it cannot apply stops
    with the reason."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.speed.fp8_compiled import compiled_fp8
    from vlmtune.speed.fused_lora import enable_fp8
    from vlmtune.speed.loss_hook import unwrap_peft

    if compiled_in is not None:
        installed = compiled_fp8(unwrap_peft(compiled_in), zero_stage, rowwise=decision.rowwise, root=compiled_in)
        path = "inside the compiled decoder layers (traced by torch.compile, quantization fused by inductor)"
    else:
        installed = (
            enable_fp8(fused, rowwise=decision.rowwise)
            if fused is not None
            else f"the fused LoRA layers it runs in do not apply ({setup.skipped.get('fused_lora')})"
        )
        path = "inside the fused LoRA layers"
    if isinstance(installed, str) and not decision.auto:
        raise VlmtuneError(f"speed.fp8=true cannot run here: {installed}. Set speed.fp8=false (or auto).")
    if setup.add("fp8", installed) is None:
        setup.skipped["fp8"] = f"fp8: off: {installed}"
        return
    from collections import Counter

    shapes = Counter(installed.left_bf16)  # out x in of the layers cuBLAS's FP8 matmul cannot take
    left = "".join(
        f"; {count} layer(s) of {shape} left in bf16 (dimensions not multiples of 16)" for shape, count in shapes.items()
    )
    log.info(
        "speed: %s; %d base layers in FP8 %s, %.2f GiB of e4m3 copies kept beside the bf16 weights%s",
        decision.reason, len(installed.layers), path, installed.planned / 1024**3, left,
    )


CUDNN_PAD_MULTIPLE = 16
"""Where cuDNN's attention stays on for the language model, padded batches are padded to a multiple of this many
tokens. cuDNN plans each new sequence length anew (about 2 ms of CPU per call on an H100: W5 profile,
benchmarks/RESULTS.md session 5), so a batch length it has not seen costs every attention call of the step that much;
rounding up to 16 tokens leaves at most max_length / 16 lengths to plan, for at most 15 padding tokens per row."""


def _cudnn_attends(config: VlmtuneConfig, family: FamilyDescriptor, model: nn.Module) -> bool:
    """Whether the language model's SDPA calls will run cuDNN's kernels on a GPU (`attention_backend.cudnn_keep_reason`,
    as apply_speed decides it)."""
    from vlmtune.methods.base import resolve_precision
    from vlmtune.speed.attention_backend import cudnn_keep_reason, sdpa_on_gpu_refusal
    from vlmtune.speed.loss_hook import unwrap_peft

    if sdpa_on_gpu_refusal(config.hardware.attn_implementation, resolve_precision(config).device) is not None:
        return False
    text_config = unwrap_peft(model).config.get_text_config()
    return cudnn_keep_reason(config.speed.sdpa_cudnn, family, text_config) is not None


def batching(
    config: VlmtuneConfig,
    pad_token_id: int,
    model: nn.Module,
    train_set: Any,
    val_set: Any | None,
    family: FamilyDescriptor,
) -> tuple[Any, Any, Any | None]:
    """(collator, train data, val data) for the Trainer: padded batches, or packed rows with `speed.packing`."""
    from vlmtune.data.collate import Collator
    from vlmtune.data.packing import PackedDataset, PackingCollator, rope_index_of

    if not config.speed.packing:
        rope = rope_index_of(model) if config.speed.positions_in_collator else None
        multiple = CUDNN_PAD_MULTIPLE if _cudnn_attends(config, family, model) else None
        return Collator(pad_token_id=pad_token_id, pad_to_multiple_of=multiple, rope_index=rope), train_set, val_set
    budget = config.speed.packing_max_tokens or config.data.max_length
    train = PackedDataset.from_dataset(train_set, budget)
    val = PackedDataset.from_dataset(val_set, budget) if val_set is not None else None
    log.info("packing: %d samples in %d rows of at most %d tokens", len(train_set), len(train), budget)
    return PackingCollator(pad_token_id, rope_index_of(model)), train, val
