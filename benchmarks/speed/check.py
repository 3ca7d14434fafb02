"""GPU correctness check (issue #6, part 4): every optimisation gives the plain path's loss on the same batch
(relative difference < 1e-3 in fp32, < 1e-2 in bf16) and LoRA gradients with cosine similarity >= 0.999.

    python3 -m benchmarks.speed.check --out $OUT        # also run by `bench suite --part 1`
    python3 -m benchmarks.speed.check --out $OUT --family gemma3 --arch 4b    # another family's architecture
    python3 -m benchmarks.speed.check --out $OUT --family smolvlm --smoke     # CPU: the family's tiny model, fp32

Qwen2-VL-2B architecture (or --family/--arch), random weights, LoRA r16 on all language linear layers (dropout 0:
deterministic), lora_B random so every adapter gets a gradient; three samples of different image sizes and lengths.
Each optimisation is switched on alone on the same model (the same functions the engine's `apply_speed` installs),
then all together through `apply_speed` itself. Results: one JSON line each in $OUT/check.jsonl (--out is created).

Family-generic: images are sized as the family takes them (per-image pixel bounds where it has them, else the longest
edge, else its fixed resolution: benchmarks/speed/data.py `data_config`); packed rows are kept apart by the family's
own mechanism (its masks with packed_row_attention=family_mask, its per-span layers with packed_span_modules, as
apply_speed installs them); a switch the family's capability map marks Unsupported (packing, varlen vision
attention, M-RoPE positions) gets a line with `skipped` and the reason instead of a comparison.
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


SHAPES = {False: (672, 300, 2048), True: (112, 40, 1024)}
"""(largest image side, longest answer, data.max_length) of the three samples: on the GPU / in --smoke (tiny model)."""


def _samples(model_dir: Path, root: Path, family: str, smoke: bool = False) -> tuple[list[Any], int]:
    from benchmarks.speed.data import data_config, encoded_dataset, write_data
    from vlmtune.families import get_family

    side, text, max_length = SHAPES[smoke]
    path = write_data(
        root / f"{ROOT_DATA}-{model_dir.name}", model_dir, family, 3, side, text, spread=True, max_length=max_length,
        seed=1,
    )
    cfg = data_config(max_length, side, spread=True, family=family)
    pad = get_family(family).load_processor(model_dir, cfg).tokenizer.pad_token_id
    return encoded_dataset(path, model_dir, family, cfg), pad


def _model(model_dir: Path, dtype: torch.dtype, family: str, layers: int | None = None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.families import get_family

    torch.manual_seed(0)
    with torch.device(DEVICE):
        config = _without_dropout(AutoConfig.from_pretrained(model_dir))
        if layers is not None:  # the first `layers` decoder layers, in the config's own pattern of layer kinds
            text = config.get_text_config()
            text.num_hidden_layers = layers
            if getattr(text, "layer_types", None):
                text.layer_types = text.layer_types[:layers]
        base = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
        get_family(family).tiny_init(base)  # Mllama's cross-attention gates open: its images reach the text
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=get_family(family).lora_target_regex("all")
    )
    model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.train()


def _without_dropout(config: Any) -> Any:
    """`config` with every dropout probability 0, in it and its sub-configs (InstructBLIP's Q-Former has 0.1): two
    passes over one batch must give the same loss for the comparisons to mean anything."""
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _without_dropout(value)
        elif "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


def _loss_grads(
    model: torch.nn.Module, batch: dict[str, Any], autocast: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    cuda = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    from vlmtune.train.trainer import _takes_use_cache

    if _takes_use_cache(model):  # as the trainer does: with a cache, Qwen3.5's DeltaNet layers take the generation
        cuda.setdefault("use_cache", False)  # path, which compiled layers recompile per chunk count (session 16)
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


class _Together:
    """Several installed pieces removed as one (a packed row's masks or spans and its per-span layers)."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()


def _all_of(*installers: Callable[[], Any]) -> Any:
    """Install each; one handle for all, or the first reason one of them gives for not installing (the others are
    removed again)."""
    handles = []
    for install in installers:
        handle = install()
        if isinstance(handle, str):
            _Together(handles).remove()
            return handle
        handles.append(handle)
    return _Together(handles)


def _unsupported(family: Any, feature: str) -> str | None:
    """The family's reason when its capability map marks `feature` Unsupported; None otherwise."""
    from vlmtune.families.capabilities import Unsupported

    capability = family.capabilities.get(feature)
    return f"{family.name}: {capability.reason}" if isinstance(capability, Unsupported) else None


def run(
    model_dir: Path, root: Path, precision: str, family_name: str = "qwen2_vl", smoke: bool = False,
    layers: int | None = None,
) -> list[dict[str, Any]]:
    """Every check on one precision; `smoke`: the tiny model on the CPU, without compiling (minutes there); `layers`:
    only that many decoder layers of the architecture (its real widths, a shorter stack)."""
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.data.collate import Collator
    from vlmtune.data.packing import PackingCollator, rope_index_of
    from vlmtune.families import get_family
    from vlmtune.families.linear_attention import reference_kernels
    from vlmtune.speed import apply_speed
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.family_mask import family_packed_masks
    from vlmtune.speed.frozen_vision import vision_without_grad
    from vlmtune.speed.fused_lora import fuse_lora
    from vlmtune.speed.gated_mlp import recompute_mlp_activations
    from vlmtune.speed.lora_compute import lora_compute_in_16bit
    from vlmtune.speed.loss_hook import install_chunked_loss, unwrap_peft
    from vlmtune.speed.packed_attention import packed_attention
    from vlmtune.speed.span_layers import span_layers
    from vlmtune.speed.tiled_mlp import tile_mlps
    from vlmtune.speed.varlen_attention import varlen_attention

    family = get_family(family_name)
    samples, pad = _samples(model_dir, root, family_name, smoke)
    autocast = precision == "bf16"
    model = _model(model_dir, torch.bfloat16 if autocast else torch.float32, family_name, layers)
    padded = Collator(pad)(samples)
    rope = rope_index_of(model)
    no_packing = _unsupported(family, "packing")
    packed = PackingCollator(pad, rope)(samples) if no_packing is None else None
    own_masks = family.packed_row_attention == "family_mask"

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
        if isinstance(handle, str):  # the optimisation did not install: say so, and do not count it as passed
            return {**_compare(name, precision, ref, _loss_grads(model, batch, autocast)), "ok": False,
                    "not_applied": handle}
        try:
            got = _loss_grads(model, batch, autocast)
        finally:
            if handle is not None:
                handle.remove()
        return _compare(name, precision, ref, got)

    def skipped(name: str, reason: str) -> dict[str, Any]:
        return {"name": name, "precision": precision, "skipped": reason, "ok": None}

    def packed_rows(*extra: Callable[[], Any]) -> Callable[[], Any]:
        """What a packed row needs besides `extra`: the family's own masks (family_mask), its per-span layers."""
        parts = list(extra)
        if own_masks:
            parts.insert(0, lambda: family_packed_masks(unwrap_peft(model), family))
        if family.packed_span_modules:
            parts.append(lambda: span_layers(unwrap_peft(model), family.packed_span_modules, family.language_prefixes))
        return lambda: _all_of(*parts)

    no_mrope = _unsupported(family, "mrope_positions") or (
        None if rope is not None else f"{family.name} has no get_rope_index (1-D positions)")
    no_varlen = _unsupported(family, "varlen_vision_attention")
    own = (f"{family.name} builds its packed rows' masks itself (packed_row_attention=family_mask): "
           "speed.packed_attention does not apply")
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
        measure("mlp_activation_recompute (gated MLP keeps gate and up, not act(gate))",
                lambda: recompute_mlp_activations(unwrap_peft(model), family.language_layers_prefix)),
        measure("mlp_activation_recompute, GC on",
                lambda: recompute_mlp_activations(unwrap_peft(model), family.language_layers_prefix), gc=1, ref_gc=1),
        measure("mlp_chunk_tokens=64 (GC on: the checkpointed layers' MLP in chunks in backward)",
                lambda: tile_mlps(unwrap_peft(model), family.language_layers_prefix, 64), gc=1, ref_gc=1),
        skipped("positions_in_collator (M-RoPE ids from the collator)", no_mrope) if no_mrope else measure(
            "positions_in_collator (M-RoPE ids from the collator)", None, batch=Collator(pad, rope_index=rope)(samples)
        ),
        skipped("compile (torch.compile per decoder layer, inductor)", "--smoke: compiling takes minutes on the CPU")
        if smoke else measure(
            "compile (torch.compile per decoder layer, inductor)",
            # with the linear-attention reference as the operator vlmtune compiles it as (speed/opaque_delta_rule.py)
            lambda: _all_of(
                *((lambda: reference_kernels(family.linear_attention_functions, opaque=True),)
                  if family.linear_attention_functions else ()),
                lambda: compile_layers(unwrap_peft(model), family.language_layers_prefix),
            ),
        ),
    ]
    mask_name = ("packing, the family's own masks (packed_row_attention=family_mask)" if own_masks
                 else "packing, block-diagonal mask")
    if family.packed_span_modules:
        mask_name += f", {'/'.join(family.packed_span_modules)} per sample span"
    mask_name += " (one packed row vs padded batch)"
    spans_name = "packing, packed_attention=spans"
    if no_packing:
        out += [skipped(mask_name, no_packing), skipped(spans_name, no_packing)]
    else:
        out.append(measure(mask_name, packed_rows(), batch=packed))
        out.append(skipped(spans_name, own) if own_masks else measure(
            spans_name, packed_rows(lambda: packed_attention(unwrap_peft(model), family.language_prefixes)),
            batch=packed,
        ))
    if autocast:  # the varlen kernel takes 16-bit tensors only
        out.append(measure("lora_bf16_compute", lambda: lora_compute_in_16bit(model, autocast=True)))
        vision = "varlen_attention (vision tower: all images in one call)"
        out.append(skipped(vision, no_varlen) if no_varlen else measure(
            vision, lambda: varlen_attention(unwrap_peft(model), family, DEVICE, packed=False)
        ))
        rows = "varlen_attention, packed rows (one call per layer) vs padded batch"
        why = no_varlen or no_packing or (own if own_masks else None)
        out.append(skipped(rows, why) if why else measure(
            rows, packed_rows(lambda: varlen_attention(unwrap_peft(model), family, DEVICE, packed=True)), batch=packed
        ))
    config = VlmtuneConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "speed": {"packing": no_packing is None},
            "hardware": {"precision": precision},
        }
    )
    together = "all of them (apply_speed, speed.compile=auto: compiled on a GPU)"
    together += " + packing" if no_packing is None else f" (no packing: {no_packing})"
    out.append(
        measure(
            together + " + GC every 2nd layer",
            lambda: apply_speed(model, config, family),
            batch=padded if no_packing else packed,
            gc=2,
        )
    )
    return out


def main(out: Path, family: str = "qwen2_vl", arch: str | None = None, smoke: bool = False,
         layers: int | None = None) -> list[dict[str, Any]]:
    from benchmarks.speed.bench import ROOT, WORKLOADS, prepare
    from benchmarks.speed.data import model_dir as build_model_dir

    out.mkdir(parents=True, exist_ok=True)
    if smoke:
        arch = "tiny"
    if arch is None:
        model_dir, _ = prepare(WORKLOADS["W1"])
    else:
        model_dir = build_model_dir(ROOT / "models", family, arch)
    lines = []
    with open(out / "check.jsonl", "a", encoding="utf-8") as fh:
        for precision in ("fp32",) if smoke else ("fp32", "bf16"):
            for line in run(model_dir, ROOT, precision, family, smoke, layers):
                line = {"family": family, "arch": arch or "W1", "layers": layers, **line}
                fh.write(json.dumps(line) + "\n")
                verdict = "SKIP " if line["ok"] is None else "PASS " if line["ok"] else "FAIL "
                print(verdict + json.dumps(line), flush=True)
                lines.append(line)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="folder for check.jsonl (created when missing)")
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--arch", default=None, help="a size of the family's `architectures` (default: W1's model)")
    ap.add_argument("--smoke", action="store_true", help="the family's tiny model, fp32, no compiling: the CPU")
    ap.add_argument("--layers", type=int, default=None,
                    help="only the first N decoder layers of --arch (real widths, a shorter stack: a 9B check in time)")
    args = ap.parse_args()
    main(args.out, args.family, args.arch, args.smoke, args.layers)
