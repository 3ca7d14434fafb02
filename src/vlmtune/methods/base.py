"""What every method shares: the precision plan, loading the base model, module selection by prefix, counting.

A method (LoRA, QLoRA, full) is a strategy: it loads the base model and prepares which weights train. The training
loop lives in `vlmtune.train.engine` and is the same for all of them.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.errors import ConfigError, VlmtuneError

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class PrecisionPlan:
    """How `hardware.precision` is carried out on the device at hand (decided once, used by method and engine)."""

    device: str
    """"cuda" or "cpu"."""
    weights_dtype: torch.dtype
    """dtype the base model's (non-quantized) weights are loaded in."""
    bf16: bool
    """Trainer bf16 autocast."""
    fp16: bool
    """Trainer fp16 autocast (with loss scaling)."""
    note: str
    """One line saying what was decided and why (logged at the start of a run)."""


def on_cpu(config: VlmtuneConfig) -> bool:
    return config.hardware.use_cpu or not torch.cuda.is_available()


def gpu_has_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 (Ampere and newer); True when that cannot be asked."""
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (AssertionError, RuntimeError):  # no usable CUDA build or driver: nothing to fall back from
        return True


def resolve_precision(config: VlmtuneConfig) -> PrecisionPlan:
    """Map the requested precision onto the device.

    GPU: bf16/fp16 load the weights in 16-bit and autocast (LoRA adapters stay fp32, PEFT's default). Full fine-tuning
    in fp16 keeps fp32 weights, because loss scaling cannot unscale fp16 gradients.
    CPU: LoRA and full fine-tuning run in fp32 without autocast (CPU autocast covers few ops and bf16 matmuls are
    not faster than fp32 on most CPUs; fp32 is exact). QLoRA keeps its 16-bit parts in bf16 (the point of the method
    is not to upcast frozen weights) and runs without autocast: PEFT casts between the adapters and the base layers.
    """
    requested = config.hardware.precision
    method = config.method.name.value
    if on_cpu(config):
        if method == "qlora":
            note = "CPU: QLoRA keeps 16-bit parts in bf16 (fp16 is slow on CPUs), no autocast"
            return PrecisionPlan(
                "cpu",
                torch.bfloat16,
                False,
                False,
                note
                if requested == "fp16"
                else "CPU: QLoRA keeps its non-quantized weights in bf16, no autocast",
            )
        note = "CPU: training in fp32" + (
            f" (requested {requested}; CPU autocast covers few ops)" if requested != "fp32" else ""
        )
        return PrecisionPlan("cpu", torch.float32, False, False, note)
    if requested == "fp32":
        return PrecisionPlan("cuda", torch.float32, False, False, "GPU: fp32 weights, no autocast")
    fallback = ""
    if requested == "bf16" and not gpu_has_bf16():
        # pre-Ampere cards (T4, V100, RTX 20xx) have no bf16 units: fp16 with loss scaling is what they compute in
        requested = "fp16"
        fallback = f" ({torch.cuda.get_device_name()} has no bf16: hardware.precision=bf16 runs as fp16)"
    if requested == "fp16" and method == "full":
        return PrecisionPlan(
            "cuda",
            torch.float32,
            False,
            True,
            "GPU: full fine-tuning in fp16 keeps fp32 master weights with fp16 autocast + loss scaling" + fallback,
        )
    dtype = _DTYPES[requested]
    return PrecisionPlan(
        "cuda",
        dtype,
        requested == "bf16",
        requested == "fp16",
        f"GPU: {requested} weights with {requested} autocast" + fallback,
    )


def base_reference(config: VlmtuneConfig) -> str:
    """The base model as later loads should see it: an absolute path for a local folder, else the hub id."""
    path = Path(config.model.name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else config.model.name_or_path


def has_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """`name` is one of `prefixes` or lies inside one (dot boundary: `model.visual` does not match `model.visualx`)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def linear_names(
    model: torch.nn.Module,
    prefixes: Iterable[str],
    leaves: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Full names of the Linear layers (4-bit ones included: they subclass nn.Linear) under `prefixes`, optionally
    only those whose name ends with one of `leaves` (`q_proj`, or `self_attn.q_proj`)."""
    prefixes, exclude = list(prefixes), list(exclude)
    wanted = None if leaves is None else list(leaves)
    out = []
    for name, module in model.named_modules():
        if (
            not isinstance(module, torch.nn.Linear)
            or not has_prefix(name, prefixes)
            or has_prefix(name, exclude)
        ):
            continue
        if wanted is None or any(name == w or name.endswith("." + w) for w in wanted):
            out.append(name)
    return out


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total). 4-bit weights are packed two per byte (four per element of a 16-bit quant storage), so
    they count that many times their element count. Under ZeRO-3 a parameter holds only this rank's shard;
    `ds_numel` is its full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel()) * (2 * p.element_size() if hasattr(p, "quant_state") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def log_parameter_counts(model: torch.nn.Module, method: str) -> tuple[int, int]:
    trainable, total = count_parameters(model)
    log.info(
        "%s: %s trainable of %s parameters (%.3f%%)",
        method,
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )
    return trainable, total


def check_attention(config: VlmtuneConfig) -> None:
    impl = config.hardware.attn_implementation
    if impl != "flash_attention_2":
        return
    if on_cpu(config):
        raise ConfigError(
            ["hardware.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on the CPU"]
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise VlmtuneError(
            "hardware.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
            "installed (it compiles from source for hours). Use hardware.attn_implementation=sdpa: "
            "PyTorch SDPA runs flash kernels on recent GPUs for bf16/fp16."
        )


def load_base_model(config: VlmtuneConfig, dtype: torch.dtype, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForImageTextToText.from_pretrained`, or the architecture with random weights (`model.random_init`).

    Extra keyword arguments (quantization_config, device_map) go to `from_pretrained`.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.hub import model_folder

    check_attention(config)
    path = str(model_folder(config.model.name_or_path, config.model.revision))
    common: dict[str, Any] = {"dtype": dtype, "attn_implementation": config.hardware.attn_implementation}
    try:
        if config.model.random_init:
            hf_config = AutoConfig.from_pretrained(path)
            device = "cpu" if on_cpu(config) else "cuda"
            with torch.device(device):
                return AutoModelForImageTextToText.from_config(hf_config, **common)
        return AutoModelForImageTextToText.from_pretrained(path, **common, **kwargs)
    except OSError as exc:
        raise VlmtuneError(
            f"cannot load the model '{path}' (model.name_or_path): {exc}. Give a local folder written "
            "by save_pretrained or a Hugging Face Hub id reachable from this machine."
        ) from exc


class Method(ABC):
    """A training method: loads the base model and decides which weights train."""

    name: str

    @abstractmethod
    def load_and_prepare(self, config: VlmtuneConfig, family: FamilyDescriptor) -> torch.nn.Module:
        """The model ready for the engine: weights loaded, trainable parameters chosen, counts logged."""
