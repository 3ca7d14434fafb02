"""GPU correctness check (issue #6, part 4): every optimisation gives the plain path's loss on the same batch
(relative difference < 1e-3 in fp32, < 1e-2 in bf16) and LoRA gradients with cosine similarity >= 0.999.

    python3 -m benchmarks.speed.check --out $OUT        # also run by `bench suite --part 1`
    python3 -m benchmarks.speed.check --out $OUT --family qwen3_vl --arch 2b   # another family's architecture

Qwen2-VL-2B architecture (or --family/--arch), random weights, LoRA r16 on all language linear layers (dropout 0: deterministic), lora_B
random so every adapter gets a gradient; three samples of different image sizes and lengths. Each optimisation is
switched on alone on the same model (the same functions the engine's `apply_speed` installs), then all together
through `apply_speed` itself. Results: one JSON line each in $OUT/check.jsonl.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.speed.measure import DEVICE

ROOT_DATA = "check-spread"


def _samples(model_dir: Path, root: Path, family: str) -> tuple[list[Any], int]:
    from benchmarks.speed.data import data_config, encoded_dataset, write_data

    path = write_data(
        root / f"{ROOT_DATA}-{model_dir.name}", model_dir, family, 3, 672, 300, spread=True, max_length=2048, seed=1
    )
    cfg = data_config(2048, 672, spread=True)
    from vlmtune.families import get_family

    pad = get_family(family).load_processor(model_dir, cfg).tokenizer.pad_token_id
    return encoded_dataset(path, model_dir, family, cfg), pad


def _model(model_dir: Path, dtype: torch.dtype, family: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.families import get_family

    torch.manual_seed(0)
    with torch.device(DEVICE):
        base = AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(model_dir), dtype=dtype, attn_implementation="sdpa"
        )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=get_family(family).lora_target_regex("all")
    )
    model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.train()


def _loss_grads(
    model: torch.nn.Module, batch: dict[str, Any], autocast: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    cuda = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**cuda).loss
    loss.backward()
    grads = {
        n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n
    }
    return loss.item(), grads


def _compare(name: str, precision: str, ref: tuple, got: tuple) -> dict[str, Any]:
    (loss_a, grads_a), (loss_b, grads_b) = ref, got
    cos = min(
        torch.nn.functional.cosine_similarity(g.flatten(), grads_b[n].flatten(), dim=0).item()
        for n, g in grads_a.items()
    )
    rel = abs(loss_a - loss_b) / abs(loss_a)
    limit = 1e-3 if precision == "fp32" else 1e-2
    return {
        "name": name,
        "precision": precision,
        "loss_ref": loss_a,
        "loss": loss_b,
        "rel": rel,
        "cosine": cos,
        "ok": rel < limit and cos >= 0.999 and grads_a.keys() == grads_b.keys(),
    }


def _gc(model: torch.nn.Module, every: int | None) -> None:
    if every is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every
        )


def run(model_dir: Path, root: Path, precision: str, family_name: str = "qwen2_vl") -> list[dict[str, Any]]:
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.data.collate import Collator
    from vlmtune.data.packing import PackingCollator, rope_index_of
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.fused_lora import fuse_lora
    from vlmtune.speed.lora_compute import lora_compute_in_16bit
    from vlmtune.speed.loss_hook import install_chunked_loss, unwrap_peft
    from vlmtune.speed.packed_attention import packed_attention
    from vlmtune.speed.varlen_attention import varlen_attention

    family = get_family(family_name)
    samples, pad = _samples(model_dir, root, family_name)
    autocast = precision == "bf16"
    model = _model(model_dir, torch.bfloat16 if autocast else torch.float32, family_name)
    padded = Collator(pad)(samples)
    packed = PackingCollator(pad, rope_index_of(model))(samples)

    def measure(
        name: str,
        install: Callable[[], Any] | None,
        batch: dict[str, Any] = padded,
        gc: int | None = None,
        ref_gc: int | None = None,
    ) -> dict[str, Any]:
        _gc(model, ref_gc)
        ref = _loss_grads(model, padded, autocast)
        _gc(model, gc)
        handle = install() if install else None
        got = _loss_grads(model, batch, autocast)
        if isinstance(handle, str):  # the optimisation did not install: say so, and do not count it as passed
            return {**_compare(name, precision, ref, got), "ok": False, "not_applied": handle}
        if handle is not None:
            handle.remove()
        return _compare(name, precision, ref, got)

    out = [
        measure("noise floor (the reference twice)", None),
        measure("chunked_loss", lambda: install_chunked_loss(model, family.lm_head_names, 1024)),
        measure(
            "frozen_vision_no_grad (GC on)",
            lambda: vision_without_grad(unwrap_peft(model), family.vision_prefixes),
            gc=1,
            ref_gc=1,
        ),
        measure("checkpoint_every_n_layers=2 vs every layer", None, gc=2, ref_gc=1),
        measure("fused_lora (one autograd function per adapted layer)", lambda: fuse_lora(unwrap_peft(model), 0)),
        measure("fused_lora, GC on", lambda: fuse_lora(unwrap_peft(model), 0), gc=1, ref_gc=1),
        measure(
            "positions_in_collator (M-RoPE ids from the collator)",
            None,
            batch=Collator(pad, rope_index=rope_index_of(model))(samples),
        ),
        measure(
            "compile (torch.compile per decoder layer, inductor)",
            lambda: compile_layers(unwrap_peft(model), family.language_layers_prefix),
        ),
        measure("packing, block-diagonal mask (one packed row vs padded batch)", None, batch=packed),
        measure(
            "packing, packed_attention=spans",
            lambda: packed_attention(unwrap_peft(model), family.language_prefixes),
            batch=packed,
        ),
    ]
    if autocast:  # the varlen kernel takes 16-bit tensors only
        out.append(measure("lora_bf16_compute", lambda: lora_compute_in_16bit(model, autocast=True)))
        out.append(
            measure(
                "varlen_attention (vision tower: all images in one call)",
                lambda: varlen_attention(unwrap_peft(model), family, DEVICE, packed=False),
            )
        )
        out.append(
            measure(
                "varlen_attention, packed rows (one call per layer) vs padded batch",
                lambda: varlen_attention(unwrap_peft(model), family, DEVICE, packed=True),
                batch=packed,
            )
        )
    config = VlmtuneConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "speed": {"packing": True},
            "hardware": {"precision": precision},
        }
    )
    out.append(
        measure(
            "all of them (apply_speed, speed.compile=auto: compiled on a GPU) + packing + GC every 2nd layer",
            lambda: apply_speed(model, config, family),
            batch=packed,
            gc=2,
        )
    )
    return out


def main(out: Path, family: str = "qwen2_vl", arch: str | None = None) -> None:
    from benchmarks.speed.bench import ROOT, WORKLOADS, prepare
    from benchmarks.speed.data import model_dir as build_model_dir

    if arch is None:
        model_dir, _ = prepare(WORKLOADS["W1"])
    else:
        model_dir = build_model_dir(ROOT / "models", family, arch)
    with open(out / "check.jsonl", "a", encoding="utf-8") as fh:
        for precision in ("fp32", "bf16"):
            for line in run(model_dir, ROOT, precision, family):
                line = {"family": family, "arch": arch or "W1", **line}
                fh.write(json.dumps(line) + "\n")
                print(("PASS " if line["ok"] else "FAIL ") + json.dumps(line), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--arch", default=None, help="a size of the family's `architectures` (default: W1's model)")
    args = ap.parse_args()
    main(args.out, args.family, args.arch)
