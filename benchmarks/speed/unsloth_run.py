"""Unsloth's path (issue 21): FastVisionModel on the harness's workloads, trained by the plain path's own loop on the
same encoded batches (plain.train: AdamW fused lr 1e-4, clip 1.0, bf16 autocast, the same StepMeter and result keys).

    model, _ = FastVisionModel.from_pretrained(<weights folder>, load_in_4bit=<QLoRA>, dtype=bf16,
                                               use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                           r=16, lora_alpha=32, lora_dropout=0.05, ...)   # the harness's LoRA
    FastVisionModel.for_training(model)

Unsloth loads from a checkpoint on disk: the suite writes the architecture's random weights once per family/size
(`bench weights W`, in its own process, as `vlmtune tiny-model --arch ... --with-weights --device cuda` does) before
the first unsloth variant of a workload. It runs from wheels installed into their own folder (BENCH_UNSLOTH_SITE,
default /tmp/site-unsloth; run.sh UNSLOTH=1 fills it from .whl-unsloth/), put first on the PYTHONPATH of the unsloth
processes only, offline (HF_HUB_OFFLINE=1, UNSLOTH_DISABLE_STATISTICS=1), its compiled cache under BENCH_ROOT.
Unsloth must be imported before transformers and PEFT (it patches them): `bench one` imports it first.
The result line adds which modules carry LoRA against the harness's target regex (lora_targets_match) and how many
linear layers are 4-bit in the language model and the vision tower (Unsloth picks its own skip list for QLoRA).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any

from benchmarks.speed.workloads import MAX_LENGTH, SMOKE, Variant, Workload

SITE = Path(os.environ.get("BENCH_UNSLOTH_SITE", "/tmp/site-unsloth"))
TIMEOUT_S = float(os.environ.get("BENCH_UNSLOTH_TIMEOUT_S", "240"))
"""At most this long per unsloth process (a hang, e.g. a network probe, must not eat the whole call's budget)."""


def unavailable() -> str | None:
    """Why the unsloth variants cannot run here; None when they can. BENCH_UNSLOTH_FORCE=1 runs them anyway (to see
    Unsloth's own error, e.g. on the CPU, whose backend refuses vision models)."""
    if os.environ.get("BENCH_UNSLOTH_FORCE") == "1":
        return None
    if SMOKE:
        return "Unsloth's path needs a CUDA GPU (CPU smoke run; Unsloth's CPU backend has no vision models)"
    import torch

    if not torch.cuda.is_available():
        return "Unsloth's path needs a CUDA GPU (none visible)"
    if not (SITE / "unsloth" / "__init__.py").is_file() and importlib.util.find_spec("unsloth") is None:
        return (
            f"unsloth is not installed: no {SITE}/unsloth and no importable unsloth (benchmarks/speed/run.sh with "
            "UNSLOTH=1 installs .whl-unsloth/ there)"
        )
    return None


def child_env(name: str, root: Path) -> dict[str, str]:
    """The environment of an unsloth process: its wheels first on the path, offline, its caches under `root`."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{SITE}:{path}" if path else str(SITE)
    cache = root / "unsloth-compiled-cache" / name
    cache.mkdir(parents=True, exist_ok=True)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        UNSLOTH_COMPILE_LOCATION=str(cache),
    )
    return env


def import_first() -> None:
    """Import Unsloth before anything imports transformers or PEFT (it patches both on import)."""
    import unsloth  # noqa: F401
    from unsloth import FastVisionModel  # noqa: F401


def weights_dir(work: Workload, root: Path) -> Path:
    """The checkpoint Unsloth loads: the tiny smoke model's own folder, else random weights of the architecture."""
    from benchmarks.speed.data import model_dir

    folder = model_dir(root / "models", work.family, work.arch)
    return folder if work.arch == "tiny" else folder.with_name(f"{folder.name}-weights")


def write_weights(work: Workload, root: Path) -> Path:
    """Write random weights of the harness's architecture folder once (reused after), as `vlmtune tiny-model --arch
    ... --with-weights --device cuda` does: seeded, built on the GPU in bf16, `save_pretrained`. The folder's config,
    tokenizer and processor files are the harness's own, so token ids match the encoded batches; seed 0 and bf16 on
    the GPU are what the plain path builds its model with, so both start from the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from benchmarks.speed.data import model_dir
    from vlmtune.families import get_family
    from vlmtune.families.tiny import random_weights

    out = weights_dir(work, root)
    if (out / "config.json").is_file():
        return out
    source = model_dir(root / "models", work.family, work.arch)
    partial = out.with_name(out.name + ".partial")  # a run cut short leaves no folder that looks complete
    shutil.rmtree(partial, ignore_errors=True)
    config = AutoConfig.from_pretrained(source)
    with random_weights(0, "cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.get_default_dtype())
        get_family(work.family).tiny_init(model)
    model.save_pretrained(partial)
    del model
    for item in source.iterdir():  # tokenizer, processor, chat template, generation config
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, partial / item.name)
    partial.rename(out)
    return out


def _lora_dropout(variant: Variant) -> float:
    return float(variant.overrides.get("lora_dropout", 0.05))


def build(work: Workload, variant: Variant, weights: Path, lora_targets: str) -> tuple[Any, dict[str, Any]]:
    """Unsloth's model with the harness's LoRA, ready to train; and what the result line adds about it."""
    import torch
    from unsloth import FastVisionModel

    if work.method == "full":
        raise ValueError("the unsloth path covers LoRA and QLoRA workloads only")
    gc: Any = "unsloth" if variant.gc else False
    torch.manual_seed(0)
    model, _processor = FastVisionModel.from_pretrained(
        str(weights),
        max_seq_length=MAX_LENGTH[work.spread],
        dtype=torch.bfloat16,
        load_in_4bit=work.method == "qlora",
        use_gradient_checkpointing=gc,
        fix_tokenizer=False,  # the harness encodes the batches itself: Unsloth's processor is not used
        use_exact_model_name=True,  # a local folder: no mapping to a pre-quantized Hub name
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=32,
        lora_dropout=_lora_dropout(variant),
        bias="none",
        random_state=0,
        use_gradient_checkpointing=gc,
    )
    FastVisionModel.for_training(model)
    found = describe(model, lora_targets)
    if work.method == "qlora" and not found["linear4bit_language"]:
        # Unsloth quietly loads 16-bit weights where bitsandbytes does not work: that is not the QLoRA workload
        raise RuntimeError(f"Unsloth loaded no 4-bit layer for a QLoRA workload (bitsandbytes unusable?): {found}")
    return model, found


def describe(model: Any, lora_targets: str) -> dict[str, Any]:
    """LoRA placement against the harness's target regex, and 4-bit linear layers per component."""
    names = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()}
    lora = {name for name, module in names.items() if hasattr(module, "lora_A")}
    expected = {name for name in names if re.fullmatch(lora_targets, name)}
    four_bit = [name for name, module in names.items() if type(module).__name__ == "Linear4bit"]
    return {
        "lora_modules": len(lora),
        "lora_modules_expected": len(expected),
        "lora_targets_match": lora == expected,
        "lora_targets_extra": sorted(lora - expected)[:8],
        "lora_targets_missing": sorted(expected - lora)[:8],
        "lora_dropout": max((_dropout(m) for m in names.values()), default=0.0),
        "linear4bit_language": sum(".visual." not in f".{n}" for n in four_bit),
        "linear4bit_vision": sum(".visual." in f".{n}" for n in four_bit),
    }


def _dropout(module: Any) -> float:
    layers = getattr(module, "lora_dropout", None)
    if layers is None or "default" not in layers:
        return 0.0
    return float(getattr(layers["default"], "p", 0.0))  # nn.Identity when the dropout is 0
