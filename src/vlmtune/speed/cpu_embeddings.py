"""Frozen input embeddings in CPU memory: the token lookup runs there and only the looked-up rows go to the GPU.

A QLoRA run quantizes the decoder's linear layers but not the input embeddings, which stay a 16-bit
vocab x hidden table: 152,064 x 3,584 x 2 bytes = 1.02 GiB for Qwen2.5-VL-7B, about a seventh of what an 8 GB card
has. A lookup is a gather of batch x tokens rows (a few MB per step), so moving the table costs one small copy per
step, not a matmul. Applies when the embeddings are frozen (LoRA and QLoRA freeze them) and not tied to lm_head
(a tied lm_head needs the same weight on the GPU); only to QLoRA, whose 4-bit model the Trainer leaves where it was
loaded (a 16-bit model is moved to the GPU as a whole when the Trainer starts, which would undo the move).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CpuEmbeddings:
    """Moves `embedding` to the CPU; its input goes there and its output comes back to `device` (reversibly)."""

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        self.embedding, self.device = embedding, device
        self.bytes = embedding.weight.numel() * embedding.weight.element_size()
        self.moved_back = 0
        """Times the table was found off the CPU at a forward and moved back."""
        self._to_cpu()
        self._handles = [
            embedding.register_forward_pre_hook(self._inputs_to_cpu),
            # prepend: runs before hooks registered earlier, e.g. enable_input_require_grads', which then mark the
            # GPU copy (the tensor the model goes on with) instead of the CPU one
            embedding.register_forward_hook(self._output_to_device, prepend=True),
        ]

    def _inputs_to_cpu(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.embedding.weight.device.type != "cpu":
            # Something moved the whole model to the GPU after install (the H100 run of 2026-11-24: the Trainer
            # did, QLoRA or not): move the table back once and return its GPU blocks to the driver.
            self._to_cpu()
            self.moved_back += 1
        return tuple(a.to("cpu") if torch.is_tensor(a) else a for a in args)

    def _to_cpu(self) -> None:
        """Move the table and hand its GPU block back to the driver. Without the empty_cache the freed block stays
        reserved by PyTorch's caching allocator and nvidia-smi sees no saving: on the H100 (W2, session 3) the
        allocated peak fell by the whole 1.01 GiB but the reserved one by 0.33 GiB."""
        on_gpu = self.embedding.weight.device.type == "cuda"
        self.embedding.to("cpu")
        if on_gpu:
            torch.cuda.empty_cache()

    def _output_to_device(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output.to(self.device, non_blocking=True)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.embedding.to(self.device)


def embeddings_on_cpu(hf_model: nn.Module, method: str) -> CpuEmbeddings | str:
    """Install on the transformers model (inside any PEFT wrapper); returns the handle or why it does not apply."""
    if method != "qlora":
        return f"only with method qlora (the Trainer moves a {method} model to the GPU whole)"
    embedding = hf_model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return f"the input embeddings are a {type(embedding).__name__}, not an nn.Embedding"
    if embedding.weight.requires_grad:
        return "the input embeddings train (their gradient and optimizer states would live on the CPU)"
    head = hf_model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return "the input embeddings are tied to lm_head, which needs the weight on the GPU"
    device = embedding.weight.device
    if device.type == "cpu":
        return "the model is on the CPU already"
    return CpuEmbeddings(embedding, device)
