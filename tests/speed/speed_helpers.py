"""Helpers shared by the speed tests (imported as `speed_helpers`; pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.families import get_family


def lora_model(
    model_dir: Path, family_name: str, dtype: torch.dtype = torch.float32, **lora
) -> torch.nn.Module:
    """The tiny model in train mode with LoRA on all language linear layers; lora_B is random, so every adapter
    matrix gets a non-zero gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    family = get_family(family_name)
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=lora.pop("lora_dropout", 0.0),
        target_modules=family.lora_target_regex("all", lora.pop("adapt_vision_tower", False)),
        **lora,
    )
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(reference: tuple, other: tuple, rel: float = 1e-5, cosine: float = 0.999,
                total_cosine: float | None = None) -> None:
    """Equal loss (relative) and every gradient pointing the same way (cosine similarity per tensor); with
    `total_cosine`, also all gradients together (one vector) at that bound."""
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert abs(loss_a.item() - loss_b.item()) <= rel * abs(loss_a.item()), (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        cos = torch.nn.functional.cosine_similarity(
            grad.flatten().double(), grads_b[name].flatten().double(), dim=0
        )
        assert cos >= cosine, (name, cos.item())
    if total_cosine is not None:
        a = torch.cat([g.flatten().double() for g in grads_a.values()])
        b = torch.cat([grads_b[n].flatten().double() for n in grads_a])
        total = torch.nn.functional.cosine_similarity(a, b, dim=0)
        assert total >= total_cosine, total.item()


def eager_then_installed(model: torch.nn.Module, batch: dict, install) -> tuple[tuple, tuple]:
    """Loss and gradients with the same seed before and after `install()` (which returns a handle with `remove()`,
    or a string saying why it could not); the handle is removed afterwards."""
    torch.manual_seed(0)
    reference = loss_and_grads(model, batch)
    handle = install()
    assert not isinstance(handle, str), handle
    try:
        torch.manual_seed(0)
        return reference, loss_and_grads(model, batch)
    finally:
        handle.remove()


def cpu_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, is_causal=False):
    """A stand-in for PyTorch's CUDA varlen kernel on the CPU, written without host syncs (as the kernel has none):
    each token attends to the tokens of its own sequence."""
    positions = torch.arange(q.shape[0], device=q.device)
    seq = torch.searchsorted(cu_q[1:].to(torch.int64), positions, right=True)
    mask = seq[:, None] == seq[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def varied_batch(tiny_model_dir, varied_jsonl: Path, family, n: int = 3) -> dict:
    """The first `n` varied records the family takes, encoded and collated as the data loader does."""
    from vlmtune.config.schema import DataConfig
    from vlmtune.data.collate import Collator
    from vlmtune.data.processing import encode
    from vlmtune.data.records import read_records

    processor = family.load_processor(tiny_model_dir(family.name), DataConfig())
    records = [r for r in read_records(varied_jsonl) if family.record_problem(r) is None][:n]
    samples = [encode(r, processor, family, DataConfig()) for r in records]
    assert len(samples) >= 2 and all(s is not None for s in samples)
    return {**Collator(processor.tokenizer.pad_token_id)(samples), "use_cache": False}
