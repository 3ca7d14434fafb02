"""Loading a trained result for inference or merging: a full model folder, or a base model plus an adapter."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmtune.errors import VlmtuneError, require

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor

log = logging.getLogger(__name__)

META_FILE = "vlmtune.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    family: FamilyDescriptor
    base: str
    """The base model folder or hub id."""
    adapter: Path | None = None


def is_adapter_dir(path: Path | str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_meta(path: Path | str) -> dict[str, Any]:
    """vlmtune.json written next to a training result ({} for folders vlmtune did not write)."""
    meta = Path(path) / META_FILE
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}


def adapter_base(adapter_dir: Path | str) -> str:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise VlmtuneError(
            f"{adapter_dir}/adapter_config.json does not record its base model; pass the base "
            "model explicitly (--model / base=...)."
        )
    return str(base)


def check_adapter_family(adapter: Path, meta: dict[str, Any], base_family: str, base: Path | str) -> None:
    """An adapter goes on a base of the family it was trained on (else transformers fails deep inside, or the
    output is garbage)."""
    trained = meta.get("family")
    if trained and trained != base_family:
        raise VlmtuneError(
            f"the adapter {adapter} was trained on a {trained} model ({meta.get('base_model', 'its base')}), but "
            f"the base model {base} is a {base_family} model. Give a {trained} base (--model / base=), or leave it "
            f"out to use the one recorded in {adapter}/{META_FILE}.")


def to_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise VlmtuneError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _bnb_config(meta: dict[str, Any]) -> Any:
    from transformers import BitsAndBytesConfig

    q = meta.get("quantization") or {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=q.get("double_quant", True),
        bnb_4bit_compute_dtype=_DTYPES[q.get("compute_dtype", "bfloat16")],
        llm_int8_skip_modules=q.get("skip_modules"),
    )


def load_model(
    path: str, dtype: torch.dtype, device: str, load_in_4bit: bool = False, meta: dict[str, Any] | None = None
) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        require("bitsandbytes", "qlora", "loading a model in 4-bit")
        kwargs.update(
            quantization_config=_bnb_config(meta or {}), device_map={"": device if device == "cpu" else 0}
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise VlmtuneError(
            f"cannot load the model '{path}': {exc}. Give a folder written by save_pretrained "
            "(or a hub id reachable from this machine)."
        ) from exc
    if load_in_4bit and device == "cpu":
        from vlmtune.methods.qlora import disable_cpu_bf16_repack

        disable_cpu_bf16_repack(model)
    elif not load_in_4bit:
        model.to(device)
    return model


def load_for_inference(
    model_dir: Path | str,
    adapter_dir: Path | str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    load_in_4bit: bool | None = None,
) -> LoadedModel:
    """A model ready for `generate`, in eval mode.

    model_dir: a base model, a full fine-tuned or merged model, or an adapter folder (its base is read from
    adapter_config.json). adapter_dir: a LoRA/QLoRA adapter to put on model_dir.
    dtype: default bfloat16 on a GPU and float32 on the CPU; a 4-bit base keeps its 16-bit parts in its compute dtype.
    load_in_4bit: None loads a QLoRA adapter's base in 4-bit as it was trained (bitsandbytes needed), else 16-bit.
    """
    from vlmtune.families import family_for_model
    from vlmtune.hub import model_folder

    if adapter_dir is None and is_adapter_dir(model_dir):
        adapter_dir = model_dir
        model_dir = adapter_base(model_dir)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    if adapter is not None and not is_adapter_dir(adapter):
        raise VlmtuneError(
            f"{adapter} is not an adapter folder (no adapter_config.json); pass a full model as "
            "the model instead."
        )
    meta = read_meta(adapter) if adapter is not None else read_meta(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    four_bit = meta.get("method") == "qlora" if load_in_4bit is None else load_in_4bit
    quant_dtype = _DTYPES[(meta.get("quantization") or {}).get("compute_dtype", "bfloat16")]
    default = quant_dtype if four_bit else (torch.bfloat16 if device == "cuda" else torch.float32)
    model_dir = model_folder(model_dir, meta.get("base_revision") if adapter is not None else None, "the base model")
    family = family_for_model(str(model_dir))
    if adapter is not None:
        check_adapter_family(adapter, meta, family.name, model_dir)
    model = load_model(str(model_dir), to_dtype(dtype, default), device, four_bit, meta)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    source = (
        adapter
        if adapter is not None and any((adapter / f).is_file() for f in PROCESSOR_FILES)
        else model_dir
    )
    processor = family.load_processor(source)
    return LoadedModel(model=model, processor=processor, family=family, base=str(model_dir), adapter=adapter)
