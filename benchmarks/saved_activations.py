"""What each decoder layer keeps for backward, per layer kind and token: the check behind the estimator's
per-layer activation rules (memory/activations.py `layer_bytes_per_token`, catalogue `layer_kinds`).

    python -m benchmarks.saved_activations --family qwen3_5 --arch 9b --tokens 709 --layers 4
    python -m benchmarks.saved_activations --family gemma3 --arch 12b --tokens 775 --layers 6 --mask

Builds the family's text model (its architecture's real widths, `--layers` decoder layers in the config's own
layer-kind pattern, a tiny vocabulary), a frozen 16-bit base with PEFT LoRA on the family's `all` target set (rank
16, dropout 0.05, adapters fp32 taking the 16-bit input: speed.lora_bf16_compute) and runs one forward under 16-bit
autocast in training mode, as `vlmtune train` does without checkpointing. `torch.autograd.graph.saved_tensors_hooks`
sees every tensor autograd saves; the bytes of each distinct storage are counted once, in the layer that saved it
first, parameters and autocast's copies of the adapters' weights excepted. Prints one JSON line per layer: its kind
and bytes per token (`--tensors`: with each storage's dtype and shape). Results: benchmarks/results/
2026-12-07-saved-activations.

On the CPU (where tests/memory/test_layer_kinds.py runs it): autocast lowers the same ops as CUDA's (linear, matmul,
bmm, conv1d, SDPA); SDPA's CPU kernel saves what CUDA's flash / memory-efficient kernels save (q, k, v, output,
log-sum-exp); LoRA dropout runs as CUDA's `native_dropout` (`FusedDropout`). On a GPU the rows add what
memory_allocated says each layer kept (its output included) and its peak above its start. `--mask` passes the
4-D boolean masks a Gemma 3 batch with an image gets, which SDPA turns into a 16-bit bias per call. `--kernels fla`
lets transformers use flash-linear-attention for Qwen3.5's DeltaNet layers where it is installed; `--kernels torch`
runs transformers' reference traced by autograd (the plain loop), the default `operator` runs it as vlmtune does.
`--fused-lora` runs the adapted linears as `vlmtune train` does by default (speed.fused_lora: one autograd function
each, speed/fused_lora.py) instead of PEFT's modules (the default here, as the results above were counted);
`--lora-dropout` sets the adapters' dropout (default 0.05). Qwen2.5-VL-7B widths, 709 tokens, dropout 0.05: 280,408
bytes per token per layer on PEFT's path, 211,288 fused (memory/activations.py `fused_lora_bytes`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SavedBytes:
    """Bytes of the distinct storages autograd saved, by the decoder layer that saved them first."""

    per_layer: dict[int, int] = field(default_factory=dict)
    outside: int = 0
    kept: dict[int, int] = field(default_factory=dict)
    """CUDA: memory_allocated after the layer minus before it (what it keeps, its output included)."""
    working: dict[int, int] = field(default_factory=dict)
    """CUDA: the layer's peak allocated memory above what was allocated when it started."""
    tensors: dict[int, list[tuple[str, tuple[int, ...], int]]] = field(default_factory=dict)
    """(dtype, shape, bytes) of each storage a layer saved (for reading the breakdown)."""


@contextmanager
def record_saved(layers: list[Any], skip_shapes: set[tuple[int, ...]], params: set[int]) -> Iterator[SavedBytes]:
    out = SavedBytes()
    seen: set[int] = set()
    current: list[int] = []
    handles = []

    cuda = torch.cuda.is_available()
    start: dict[int, int] = {}

    def enter(index: int) -> Any:
        def hook(_module: Any, _args: Any) -> None:
            current.append(index)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start[index] = torch.cuda.memory_allocated()

        return hook

    def leave(_module: Any, _args: Any, _output: Any) -> None:
        index = current.pop()
        if cuda:
            torch.cuda.synchronize()
            out.kept[index] = torch.cuda.memory_allocated() - start[index]
            out.working[index] = torch.cuda.max_memory_allocated() - start[index]

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index)))
        handles.append(layer.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or ptr in params or tuple(t.shape) in skip_shapes:
            return t
        seen.add(ptr)
        if current:
            out.per_layer[current[-1]] = out.per_layer.get(current[-1], 0) + storage.nbytes()
            out.tensors.setdefault(current[-1], []).append((str(t.dtype), tuple(t.shape), storage.nbytes()))
        else:
            out.outside += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        for h in handles:
            h.remove()


def text_model(text_config: dict[str, Any], model_type: str, layers: int) -> Any:
    """The family's text decoder at these widths with `layers` layers (the config's own layer-kind pattern)."""
    from transformers import AutoConfig, AutoModel

    same = text_config.get("num_hidden_layers") == layers  # else the config's own pattern over `layers` layers
    cfg = AutoConfig.for_model(model_type, **{**text_config, "num_hidden_layers": layers, "vocab_size": 512,
                                              **({} if same else {"layer_types": None})})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, torch_dtype=torch.bfloat16)


def add_lora(model: Any, targets: list[str], rank: int = 16, dropout: float = 0.05, fused: bool = False) -> Any:
    """PEFT LoRA on the named linear layers, base frozen, adapters fp32 fed the 16-bit input (lora_bf16_compute).
    `fused`: each adapted linear runs as vlmtune's fused function (speed.fused_lora, speed/fused_lora.py), which
    draws its dropout with `native_dropout` itself, so PEFT's `nn.Dropout` modules stay as they are."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.speed.lora_compute import lora_compute_in_16bit

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                            target_modules=[t for t in targets if t.split(".")[-1] in names]))
    for n, p in peft.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    for module in peft.modules():
        if hasattr(module, "lora_dropout") and not fused:
            for key, drop in module.lora_dropout.items():
                if isinstance(drop, torch.nn.Dropout):
                    module.lora_dropout[key] = FusedDropout(drop.p)
    lora_compute_in_16bit(peft, autocast=True)
    if fused:
        from vlmtune.speed.fused_lora import FusedLora, fuse_lora

        assert isinstance(handle := fuse_lora(model, zero_stage=0), FusedLora), handle
    return peft


class FusedDropout(torch.nn.Dropout):
    """CUDA's dropout (`native_dropout`: a boolean mask saved, 1 byte per element). On the CPU `F.dropout` multiplies
    by a noise tensor of the input's dtype instead (2 bytes per element in bf16), which a GPU run never saves."""

    def __init__(self, p: float):
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, self.training)[0]


def gemma3_masks(tokens: int, sliding_window: int, image: tuple[int, int] | None) -> dict[str, Any]:
    """The 4-D boolean masks of a Gemma 3 batch: causal, the image block bidirectional, sliding window."""

    index = torch.arange(tokens)
    full = index[None, :] <= index[:, None]
    if image is not None:
        start, end = image
        block = (index >= start) & (index < end)
        full = full | (block[None, :] & block[:, None])
    window = (index[:, None] - index[None, :]) < sliding_window
    return {"full_attention": full[None, None], "sliding_attention": (full & window)[None, None]}


def measure(text_config: dict[str, Any], model_type: str, targets: list[str], layers: int, tokens: int,
            batch: int = 1, mask: bool = False, compiled: bool = False,
            opaque: tuple[str, ...] = (), mlp_recompute: bool = False, fused_lora: bool = False,
            lora_dropout: float = 0.05, hash_dropout: bool = False) -> list[dict[str, Any]]:
    """One forward at these widths; per layer its kind (from config.layer_types) and saved bytes per token. `mask`:
    pass the 4-D masks of a batch with an image (`gemma3_masks`, as Gemma 3 always has) instead of none (causal).
    `compiled`: every layer but the first under torch.compile (inductor), as speed.compile runs them; what the
    compiled graph saves reaches the hooks through its autograd function's save_for_backward. `opaque`: the family's
    linear-attention functions, run as one operator as vlmtune trains them (speed/opaque_delta_rule.py).
    `mlp_recompute`: speed.mlp_activation_recompute on the layers that run eagerly (speed/gated_mlp.py).
    `fused_lora`: the adapted linears as vlmtune's fused LoRA function (speed.fused_lora; vlmtune turns it off under
    speed.compile, so not with `compiled`); False: PEFT's modules. `lora_dropout`: the adapters' dropout.
    `hash_dropout`: with `compiled`, the compiled layers' adapters draw hashed masks (speed/hash_dropout.py), as
    speed.compile runs them."""

    if fused_lora and compiled:
        raise ValueError("speed.compile turns fused LoRA off (speed/__init__.py apply_speed): measure one or the other")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = text_model(text_config, model_type, layers).to(device)
    peft = add_lora(model, targets, dropout=lora_dropout, fused=fused_lora)
    kernels = None
    if opaque:
        from vlmtune.families.linear_attention import reference_kernels

        kernels = reference_kernels(opaque, opaque=True)
        assert not isinstance(kernels, str), kernels
    if mlp_recompute:
        from vlmtune.speed.gated_mlp import recompute_mlp_activations

        installed = recompute_mlp_activations(model, "layers", eager_layers=1 if compiled else None)
        assert not isinstance(installed, str), installed
    if compiled and hash_dropout:
        from vlmtune.speed.hash_dropout import hash_lora_dropout

        hashed = hash_lora_dropout(list(model.layers)[1:])
        assert not isinstance(hashed, str), hashed
    if compiled:
        for layer in list(model.layers)[1:]:  # speed/compile_layers.py: the first layer stays eager
            layer.compile(backend="inductor")
    peft.train()
    params = {p.untyped_storage().data_ptr() for p in peft.parameters()}
    skip = {s for n, p in peft.named_parameters() if "lora_" in n for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    decoder = list(model.layers)
    hidden = model.config.hidden_size
    x = torch.randn(batch, tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=True)
    kwargs: dict[str, Any] = {}
    if mask:
        masks = gemma3_masks(tokens, model.config.sliding_window, (tokens // 8, tokens // 8 + 256))
        kwargs["attention_mask"] = {k: v.to(device) for k, v in masks.items()}
    try:
        with record_saved(decoder, skip, params) as saved, torch.autocast(device, dtype=torch.bfloat16):
            model(inputs_embeds=x, use_cache=False, **kwargs)
    finally:
        if kernels is not None:
            kernels.remove()
    kinds = list(getattr(model.config, "layer_types", None) or ["attention"] * layers)
    n = batch * tokens
    rows = []
    for i in range(layers):
        row = {"layer": i, "kind": kinds[i], "bytes_per_token": saved.per_layer.get(i, 0) / n}
        if i in saved.kept:
            row.update(kept_per_token=saved.kept[i] / n, working_per_token=saved.working[i] / n)
        rows.append({**row, "tensors": saved.tensors.get(i, [])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--arch", required=True, help="an entry of the family's `architectures`, or `tiny`")
    parser.add_argument("--tokens", type=int, default=709)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mask", action="store_true",
                        help="pass 4-D masks (an image block attending bidirectionally, sliding windows) as Gemma 3 does")
    parser.add_argument("--tensors", action="store_true", help="also list each saved storage")
    parser.add_argument("--compile", action="store_true", help="every layer but the first under torch.compile")
    parser.add_argument("--mlp-recompute", action="store_true",
                        help="speed.mlp_activation_recompute on the eager layers (the gated MLP keeps gate and up only)")
    parser.add_argument("--fused-lora", action="store_true",
                        help="run the adapted linears as vlmtune's fused LoRA function (speed.fused_lora) instead of "
                             "PEFT's modules (the default)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--hash-dropout", action="store_true",
                        help="with --compile: the compiled layers' adapters draw hashed dropout masks "
                             "(speed/hash_dropout.py), as speed.compile runs them")
    parser.add_argument("--kernels", choices=["operator", "torch", "fla"], default="operator",
                        help="Qwen3.5: operator runs transformers' reference as vlmtune trains it (one operator, "
                             "speed/opaque_delta_rule.py), torch as transformers runs it (traced); both hide "
                             "flash-linear-attention")
    args = parser.parse_args()
    if args.kernels != "fla":
        from benchmarks.qwen3_5_kernels import _Hide

        sys.meta_path.insert(0, _Hide())

    from vlmtune.families import get_family
    from vlmtune.memory.catalogue import architectures

    family = get_family(args.family)
    numbers = family.tiny_numbers if args.arch == "tiny" else family.architectures[args.arch]
    model_type = family.model_types[0]
    text = dict(numbers["text_config"])
    text_type = text.pop("model_type", None) or f"{model_type}_text"
    targets = architectures()[model_type].lora_targets["all"]
    opaque = family.linear_attention_functions if args.kernels == "operator" else ()
    rows = measure(text, text_type, targets, args.layers, args.tokens, mask=args.mask, compiled=args.compile,
                   opaque=opaque, mlp_recompute=args.mlp_recompute, fused_lora=args.fused_lora,
                   lora_dropout=args.lora_dropout, hash_dropout=args.hash_dropout)
    for row in rows:
        if not args.tensors:
            row.pop("tensors")
        print(json.dumps({**row, "family": args.family, "arch": args.arch, "tokens": args.tokens,
                          "kernels": args.kernels, "fla_loaded": "fla" in sys.modules, "compiled": args.compile,
                          "mlp_recompute": args.mlp_recompute, "fused_lora": args.fused_lora,
                          "lora_dropout": args.lora_dropout, "hash_dropout": args.hash_dropout,
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))


if __name__ == "__main__":
    main()
