"""Packed rows whose family builds the attention masks itself (`FamilyDescriptor.packed_row_attention =
"family_mask"`, Gemma 3): a forward pre-hook on the family's `packed_mask_module` that, for a packed batch (no
attention_mask, no KV cache), passes the family's masks as `attention_mask`. Padded batches and generation keep the
model's own masks. The masks are dense (rows x length^2 per mask type) and SDPA with a mask runs no flash kernel.

Format: sdpa takes the family's boolean masks as they are; eager adds its mask to the attention scores, so it gets
them additive (0 where allowed, the dtype's minimum elsewhere), as transformers' eager masks are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vlmtune.families.base import FamilyDescriptor


class FamilyPackedMasks:
    """The installed pre-hook; `remove()` takes it off."""

    def __init__(self, module: nn.Module, family: FamilyDescriptor, text_config: Any):
        self.family, self.text_config = family, text_config
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
            return args, kwargs
        masks = self.family.packed_attention_masks(kwargs, self.text_config)
        if masks is None:
            return args, kwargs
        if self.text_config._attn_implementation == "eager":
            dtype = module.get_input_embeddings().weight.dtype
            low = torch.finfo(dtype if dtype.is_floating_point else torch.float32).min
            masks = {kind: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, low)
                     for kind, m in masks.items()}
        return args, {**kwargs, "attention_mask": dict(masks)}

    def remove(self) -> None:
        self.handle.remove()


def family_packed_masks(hf_model: nn.Module, family: FamilyDescriptor) -> FamilyPackedMasks | str:
    """Install the family's packed-row masks on `hf_model` (the transformers model, PEFT unwrapped), or say why not."""
    name = family.packed_mask_module
    if name is None:
        return f"{family.name} names no module for its packed masks (packed_mask_module)"
    try:
        module = hf_model.get_submodule(name)
    except AttributeError:
        return f"{family.name}'s packed_mask_module {name!r} is not in the model"
    text_config = module.config.get_text_config()
    current = getattr(text_config, "_attn_implementation", None)
    if current not in ("sdpa", "eager"):
        return f"the language model uses attention {current!r}; {family.name}'s packed masks need sdpa or eager"
    return FamilyPackedMasks(module, family, text_config)
