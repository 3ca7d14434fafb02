"""QLoRA: the language model's linear layers in 4-bit NF4 (bitsandbytes), LoRA adapters on top.

Deliberately not `peft.prepare_model_for_kbit_training`: it upcasts every non-quantized frozen weight to fp32, which
cost 41 GiB instead of 11 GiB on the Qwen2-VL-2B reference run. Here the vision tower, projector and lm_head stay in
16-bit, and only the input-gradient hook that gradient checkpointing needs is added.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import require
from vlmtune.methods.base import (
    Method,
    gpu_has_bf16,
    load_base_model,
    log_parameter_counts,
    on_cpu,
    resolve_precision,
)
from vlmtune.methods.lora import add_adapters

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)

_COMPUTE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def skip_modules(config: VlmtuneConfig, family: FamilyDescriptor) -> list[str]:
    """Full module prefixes kept out of quantization. Full names matter: transformers 5 matches `visual` only as a
    whole prefix, suffix or regex, so the short name skips nothing while `model.visual` skips the tower."""
    quant = config.method.quantization
    skip = list(family.projector_prefixes)
    if not quant.quantize_vision_tower:
        skip += family.vision_prefixes
    if not quant.quantize_lm_head:
        skip += family.lm_head_names
    return list(dict.fromkeys(skip))


def bnb_config(config: VlmtuneConfig, family: FamilyDescriptor, quant_storage: torch.dtype | None = None) -> Any:
    """quant_storage: dtype the packed 4-bit weights are stored in (default uint8). ZeRO-3 needs the dtype of the
    other weights, so that it can flatten and shard the 4-bit ones with them."""
    from transformers import BitsAndBytesConfig

    quant = config.method.quantization
    compute = _COMPUTE[quant.compute_dtype]
    if compute is torch.bfloat16 and not on_cpu(config) and not gpu_has_bf16():
        compute = torch.float16  # a card without bf16 (T4, V100): as resolve_precision's fp16 for the rest
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skip_modules(config, family),
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def disable_cpu_bf16_repack(model: torch.nn.Module) -> int:
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights in place during a no-grad forward, after which
    training fails (in-place op on a leaf view) and layers with in_features < 64 break. Opting out avoids both."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _load_quantized(
    config: VlmtuneConfig, family: FamilyDescriptor, dtype: torch.dtype, device: str
) -> torch.nn.Module:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    device_map: dict[str, Any] | None = (
        {"": "cpu"} if device == "cpu" else {"": int(os.environ.get("LOCAL_RANK", "0"))}
    )
    zero3 = is_deepspeed_zero3_enabled()
    if zero3:  # ZeRO-3 places (partitions) the weights itself; a device_map is refused
        device_map = None
    kwargs = {"quantization_config": bnb_config(config, family, dtype if zero3 else None), "device_map": device_map}
    if not config.model.random_init:
        return load_base_model(config, dtype, **kwargs)
    # Quantization happens while weights load: random weights are built in 16-bit, then loaded from their state dict.
    # Under hardware.memory_fraction the 16-bit build goes to the CPU: a real QLoRA load never holds the whole 16-bit
    # model on the GPU, and a run capped to a small card's memory must not fail on it.
    build = config
    if config.hardware.memory_fraction is not None and not zero3:
        build = config.model_copy(update={"hardware": config.hardware.model_copy(update={"use_cpu": True})})
    model = load_base_model(build, dtype)
    state_dict = _full_state_dict(model) if zero3 else {k: v.to("cpu") for k, v in model.state_dict().items()}
    model_class, hf_config = type(model), model.config
    del model
    if device == "cuda":  # the 16-bit build is not part of training: hand its memory back, restart the peaks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return model_class.from_pretrained(
        None,
        config=hf_config,
        state_dict=state_dict,
        dtype=dtype,
        attn_implementation=config.hardware.attn_implementation,
        **kwargs,
    )


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a model built partitioned under ZeRO-3 (each rank holds a shard of every weight)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class QLoraMethod(Method):
    name = "qlora"

    def load_and_prepare(self, config: VlmtuneConfig, family: FamilyDescriptor) -> torch.nn.Module:
        require("bitsandbytes", "qlora", "QLoRA (method.name=qlora)")
        plan = resolve_precision(config)
        model = _load_quantized(config, family, plan.weights_dtype, plan.device)
        quantized = disable_cpu_bf16_repack(model) if plan.device == "cpu" else None
        if config.hardware.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_adapters(model, config, family, plan)
        log.info(
            "QLoRA: 4-bit %s (double quant %s, compute %s); kept 16-bit: %s%s",
            config.method.quantization.quant_type,
            config.method.quantization.double_quant,
            config.method.quantization.compute_dtype,
            ", ".join(skip_modules(config, family)),
            f"; CPU bf16 repack disabled on {quantized} layers" if quantized is not None else "",
        )
        log_parameter_counts(model, self.name)
        return model
