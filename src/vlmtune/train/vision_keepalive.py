"""Mixed batches never hang: with several processes, every rank runs the vision tower in every step.

Under ZeRO-3 each rank holds a shard of every weight, so running a module is a collective: all ranks gather its
weights together, and DeepSpeed checks that every rank ran the same modules in the same order. A rank whose
micro-batch has no image would skip the vision tower while the others gather it, and the job hangs (DeepSpeed#7170,
LLaMA-Factory#5648, ms-swift#4918); under DDP or ZeRO-1/2 a trainable projector or vision adapter would miss its
gradient reduce the same way.

Here a rank without images runs the tower (projector included) on a tiny blank image at the point where a rank with
images runs it: a forward pre-hook on the language model, which a VLM's forward calls right after embedding the
tokens and encoding the images. Its output enters the model's own loss as 0 x its sum (a forward hook on the model),
so the tower is part of the forward's output graph (DDP's unused-parameter search sees it) and the backward pass
reduces the same (zero) gradients on every rank. Family-independent: the blank image goes through the run's own
image processor and the model's `get_image_features` (the call the model's own forward makes), and the language
model is found by the family descriptor's `language_prefixes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

BLANK_SIDE = 56
"""Side of the blank image in pixels; the image processor resizes it to its smallest allowed input."""


def _float_sum(value: Any) -> torch.Tensor | None:
    """Sum of every floating-point tensor inside a model output (tensors, tuples, lists, dicts, ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value.float().sum() if value.is_floating_point() else None
    items = (
        value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    )
    total = None
    for item in items:
        part = _float_sum(item)
        if part is not None:
            total = part if total is None else total + part
    return total


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class VisionKeepAlive:
    """`attach(model)` once; then `arm(batch)` before each forward whose batch may lack images."""

    def __init__(self, image_processor: Any, language_prefixes: Sequence[str],
                 image_features: Callable[[torch.nn.Module, Mapping[str, Any]], Any] | None = None):
        from PIL import Image

        blank = Image.new("RGB", (BLANK_SIDE, BLANK_SIDE))
        self.inputs = dict(image_processor(images=[blank], return_tensors="pt"))
        self.image_keys = frozenset(self.inputs)
        self.language_prefixes = tuple(language_prefixes)
        self.image_features = image_features or (lambda model, inputs: model.get_image_features(**inputs))
        self._model: torch.nn.Module | None = None
        self._handles: list[Any] = []
        self._device: torch.device | None = None
        self._zero: torch.Tensor | None = None

    def attach(self, model: torch.nn.Module) -> VisionKeepAlive:
        """Hook `model` (a transformers VLM, possibly inside PEFT) and its language model."""
        hf_model = _unwrap_peft(model)
        for prefix in self.language_prefixes:
            try:
                language = hf_model.get_submodule(prefix)
            except AttributeError:
                continue
            self._model = hf_model
            self._handles = [
                language.register_forward_pre_hook(self._run_tower),
                hf_model.register_forward_hook(self._add_to_loss, always_call=True),
            ]
            return self
        raise RuntimeError(f"no language model among {self.language_prefixes} in {type(hf_model).__name__}")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def has_images(self, batch: Mapping[str, Any]) -> bool:
        return any(key in batch for key in self.image_keys)

    def arm(self, batch: Mapping[str, Any]) -> None:
        """The next forward runs the tower on the blank image when `batch` has no image."""
        self._zero = None
        self._device = None if self.has_images(batch) else batch["input_ids"].device

    def _run_tower(self, module: torch.nn.Module, args: Any) -> None:
        if self._device is None or self._model is None:
            return
        device, self._device = self._device, None
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        total = _float_sum(self.image_features(self._model, inputs))
        if total is None:
            raise RuntimeError("get_image_features returned no floating-point tensor to keep the vision tower alive")
        self._zero = total * 0.0

    def _add_to_loss(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        zero, self._zero, self._device = self._zero, None, None
        loss = getattr(output, "loss", None)
        if zero is not None and loss is not None:
            output.loss = loss + zero.to(loss.dtype)
        return output
