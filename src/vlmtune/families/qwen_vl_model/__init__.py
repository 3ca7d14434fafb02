"""A transformers-style port of Qwen-VL (the Hub checkpoints ship only remote code written for transformers 4.3x).

Modules: `configuration` (config.json as it is on the Hub), `language` (Qwen-7B decoder blocks), `visual` (ViT-bigG
and the resampler), `modeling` (the model), `tokenizer` (qwen.tiktoken read into a fast tokenizer), `processor`
(images + tokenizer, saved in the Hub layout). `register()` makes transformers' Auto classes resolve
`model_type: qwen` to this port, so vlmtune's one loading path (`AutoConfig`, `AutoModelForImageTextToText`) loads
Hub checkpoints without `trust_remote_code`.
"""

from __future__ import annotations

from vlmtune.families.qwen_vl_model.configuration import QwenVLConfig
from vlmtune.families.qwen_vl_model.modeling import QwenVLForCausalLM


def register() -> None:
    """Register the port with transformers' Auto classes (idempotent). Called by the qwen_vl family module: it is
    the registry transformers offers for model types it does not ship; transformers has no `qwen` type of its own."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if CONFIG_MAPPING._extra_content.get(QwenVLConfig.model_type) is QwenVLConfig:
        return
    AutoConfig.register(QwenVLConfig.model_type, QwenVLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(QwenVLConfig, QwenVLForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM, exist_ok=True)


__all__ = ["QwenVLConfig", "QwenVLForCausalLM", "register"]
