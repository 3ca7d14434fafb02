"""Defaults that depend on the method: fields the user did not set take the value for their method.

A field counts as set when a preset, the config file, a flag or an override names it (pydantic's
`model_fields_set` of its section); such a value is kept whatever the method. Only unset fields are filled, after
validation, without marking them set, so `derived_fields` can tell later which values came from here
(`vlmtune train --print-config` marks them) and `recommend` can leave them out of the files it writes (a method
changed there derives them anew when the file loads).

Learning rate, as the peers document it:
- LLaMA-Factory's examples: `examples/train_lora/qwen2_5vl_lora_sft.yaml` learning_rate 1.0e-4,
  `examples/train_full/qwen2_5vl_full_sft.yaml` learning_rate 1.0e-5.
- ms-swift (docs/source_en/Instruction/Command-line-parameters.md): "learning_rate: defaults to 1e-5 for full
  parameters, and 1e-4 for LoRA and other tuners".
- QLoRA (Dettmers et al. 2023, arXiv 2305.14314, appendix): 2e-4 for 7B-13B adapters.
vlmtune keeps its 2e-4 for LoRA and QLoRA (every preset and measured run used it) and takes the peers' 1e-5 for
full fine-tuning: 2e-4 over all weights of a 2B-7B model destroys it.

Lean QLoRA (`method.quantization.lean`): the 8 GB setting measured on the GPU machine (benchmarks/RESULTS.md, W2
`vlmtune_lean`: Qwen2.5-VL-7B QLoRA at 7.47 GiB as nvidia-smi shows it, 1.08-1.28x the plain QLoRA path's speed):
4-bit vision tower and lm_head, paged 8-bit AdamW, the input-embedding table in CPU memory, and a smaller loss
chunk (8 bytes x chunk x vocabulary: 0.29 GiB at 256 tokens for a Qwen vocabulary instead of 1.16 GiB at 1,024;
`vlmtune recommend` sizes it to the card and writes it).
"""

from __future__ import annotations

from typing import Any

LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "training.learning_rate": LEARNING_RATE,
}
"""field -> {method: default}."""

LEAN_DEFAULTS: dict[str, Any] = {
    "method.quantization.quantize_vision_tower": True,
    "method.quantization.quantize_lm_head": True,
    "training.optimizer": "paged_adamw_8bit",
    "speed.embeddings_on_cpu": True,
    "speed.loss_chunk_tokens": 256,
}
"""What `method.quantization.lean: true` (QLoRA) sets where the user did not."""


def defaults_for(method: str, lean: bool) -> dict[str, tuple[Any, str]]:
    """field -> (default, where it comes from) for a method (and lean QLoRA)."""
    out = {field: (values[method], f"method default ({method})") for field, values in METHOD_DEFAULTS.items()
           if method in values}
    if lean and method == "qlora":
        out.update({field: (value, "lean QLoRA default (method.quantization.lean)")
                    for field, value in LEAN_DEFAULTS.items()})
    return out


def _section(config: Any, field: str) -> tuple[Any, str]:
    *path, name = field.split(".")
    node = config
    for part in path:
        node = getattr(node, part)
    return node, name


def derived_fields(config: Any) -> dict[str, str]:
    """field -> where its value came from, for each field that holds a method-dependent default (not set)."""
    method = config.method.name.value
    out = {}
    for field, (_, where) in defaults_for(method, config.method.quantization.lean).items():
        section, name = _section(config, field)
        if name not in section.model_fields_set:
            out[field] = where
    return out


def apply_method_defaults(config: Any) -> None:
    """Fill the unset method-dependent fields of a validated config in place, leaving them unset."""
    method = config.method.name.value
    for field, (value, _) in defaults_for(method, config.method.quantization.lean).items():
        section, name = _section(config, field)
        if name not in section.model_fields_set:
            # Straight into the instance's values: validate_assignment would mark the field as set.
            section.__dict__[name] = value
