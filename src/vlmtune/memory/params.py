"""Exact parameter counts, split by part, without downloading weights.

The model is instantiated from its config on the `meta` device (shapes, no storage), as accelerate's
`estimate-memory` does, so the counts equal `sum(p.numel() for p in model.parameters())` of the real model; tied
embeddings are counted once. Architectures transformers does not ship (remote code) use the analytic counts stored
in the catalogue, which say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtune.memory.catalogue import ModelSpec, config_value, hf_config

PARTS = ("vision", "projector", "language", "embeddings", "lm_head")


@dataclass(frozen=True)
class LinearInfo:
    name: str
    part: str
    in_features: int
    out_features: int
    count: int = 1
    """Weight matrices of this shape under this name: a fused 3-D expert parameter (experts, out, in) holds one per
    expert. Those are not nn.Linear, so bitsandbytes leaves them 16-bit; LoRA reaches them through the family's
    `lora_target_parameters` (PEFT's target_parameters: r x (in + out) per expert)."""


@dataclass(frozen=True)
class ModelDims:
    """The numbers the activation and logits formulas need."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_width: int
    vision_depth: int
    layer_types: tuple[str, ...] = ()
    """Each decoder layer's kind as the config names it (`layer_types`); empty where the config has none."""
    linear_key_heads: int = 0
    """Linear-attention layers (Qwen3.5's gated DeltaNet): query/key heads, value heads and their widths."""
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ParamCounts:
    model: str
    parts: dict[str, int]
    """Parameters per part: vision, projector, language (decoder body and final norm), embeddings, lm_head
    (0 when tied to the embeddings)."""
    tied: bool
    largest_module: int
    """Most parameters held directly by one module (DeepSpeed's ZeRO-3 estimator uses it)."""
    layer_params: int
    """Parameters of one language-model decoder layer (the unit ZeRO-3 gathers)."""
    linear_weights: dict[str, int]
    """Parameters in nn.Linear weights per part (what bitsandbytes quantizes; biases stay 16-bit)."""
    linears: tuple[LinearInfo, ...]
    """Linear layers of the language model and vision tower (LoRA targets are chosen among them)."""
    dims: ModelDims
    source: str
    """How the counts were obtained ("meta-device build, transformers X" or "analytic")."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _part_of(name: str, prefixes: list[tuple[str, str]]) -> str:
    for prefix, part in prefixes:  # longest first
        if name == prefix or name.startswith(prefix + "."):
            return part
    return "language"


def _dims(config: Any, paths: dict[str, str]) -> ModelDims:
    def get(key: str, default: int = 0) -> int:
        value = config_value(config, paths[key]) if key in paths else None
        return int(value) if value is not None else default

    hidden, heads = get("hidden"), get("heads")
    types = config_value(config, paths["layer_types"]) if "layer_types" in paths else None
    return ModelDims(
        hidden=hidden,
        intermediate=get("intermediate"),
        layers=get("layers"),
        heads=heads,
        kv_heads=get("kv_heads", heads),
        head_dim=get("head_dim", hidden // max(heads, 1)),
        vocab=get("vocab"),
        vision_width=get("vision_width"),
        vision_depth=get("vision_depth"),
        layer_types=tuple(str(t) for t in types or ()),
        linear_key_heads=get("linear_key_heads"),
        linear_value_heads=get("linear_value_heads"),
        linear_key_head_dim=get("linear_key_head_dim"),
        linear_value_head_dim=get("linear_value_head_dim"),
    )


def _module_name(model: Any, module: Any) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _from_model(spec: ModelSpec, model: Any, config: Any) -> ParamCounts:
    import torch
    import transformers

    prefixes = [(p, "vision") for p in spec.arch.vision] + [(p, "projector") for p in spec.arch.projector]
    embed = _module_name(model, model.get_input_embeddings())
    head = _module_name(model, model.get_output_embeddings())
    prefixes += [(n, part) for n, part in ((embed, "embeddings"), (head, "lm_head")) if n]
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)

    parts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        parts[_part_of(name, prefixes)] += p.numel()
    linear_weights = dict.fromkeys(PARTS, 0)
    linears = []
    largest = 0
    layer_params = 0
    for name, module in model.named_modules():
        largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))
        part = _part_of(name, prefixes)
        if isinstance(module, torch.nn.Linear):
            linear_weights[part] += module.weight.numel()
            if part in ("language", "vision", "projector"):
                linears.append(LinearInfo(name, part, module.in_features, module.out_features))
        elif part == "language" and not isinstance(module, torch.nn.modules.conv._ConvNd):
            linears += [LinearInfo(f"{name}.{pname}", part, p.shape[2], p.shape[1], count=p.shape[0])
                        for pname, p in module.named_parameters(recurse=False) if p.dim() == 3]
        elif isinstance(module, torch.nn.ModuleList) and part == "language":
            layer_params = max([layer_params] + [sum(p.numel() for p in c.parameters()) for c in module])
    tied = parts["lm_head"] == 0 and head is not None
    if tied:
        linear_weights["lm_head"] = 0
    return ParamCounts(
        model=spec.name,
        parts=parts,
        tied=tied,
        largest_module=largest,
        layer_params=layer_params,
        linear_weights=linear_weights,
        linears=tuple(linears),
        dims=_dims(config, spec.arch.dims),
        source=f"meta-device build, transformers {transformers.__version__}",
    )


def _analytic(spec: ModelSpec) -> ParamCounts:
    data = spec.analytic or {}
    dims = ModelDims(**data["dims"])
    linears: list[LinearInfo] = []
    for part, key, depth, stem in (
        ("language", "language_linears", dims.layers, "transformer.h"),
        ("vision", "vision_linears", dims.vision_depth, "transformer.visual.transformer.resblocks"),
    ):
        for layer in range(depth):
            for leaf, (fan_in, fan_out) in data[key].items():
                linears.append(LinearInfo(f"{stem}.{layer}.{leaf}", part, fan_in, fan_out))
    linear_weights = dict.fromkeys(PARTS, 0)
    for lin in linears:
        linear_weights[lin.part] += lin.in_features * lin.out_features
    if not data["tied"]:
        linear_weights["lm_head"] = data["parts"]["lm_head"]
    layer = sum(a * b for a, b in data["language_linears"].values()) + 2 * dims.hidden
    return ParamCounts(
        model=spec.name,
        parts={p: int(data["parts"].get(p, 0)) for p in PARTS},
        tied=data["tied"],
        largest_module=int(data["largest_module"]),
        layer_params=layer,
        linear_weights=linear_weights,
        linears=tuple(linears),
        dims=dims,
        source="analytic (remote-code architecture, from the published config)",
    )


_CACHE: dict[tuple[str, str | None], ParamCounts] = {}


def count_params(spec: ModelSpec) -> ParamCounts:
    """Parameter counts of a model, by part (cached per model)."""
    key = (spec.name, spec.path)
    if key not in _CACHE:
        if spec.analytic is not None:
            _CACHE[key] = _analytic(spec)
        else:
            import torch
            from transformers import AutoModelForImageTextToText

            config = hf_config(spec)
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(config)
            _CACHE[key] = _from_model(spec, model, config)
    return _CACHE[key]


def _matches(name: str, leaves: list[str] | tuple[str, ...]) -> bool:
    return any(name == leaf or name.endswith("." + leaf) for leaf in leaves)


def lora_params(
    counts: ParamCounts,
    targets: list[str],
    rank: int,
    vision_targets: tuple[str, ...] = (),
    projector_targets: tuple[str, ...] = (),
) -> int:
    """Adapter parameters: r * (in + out) for every targeted linear of the language model (and of the vision tower
    when `vision_targets` is given, of the projector when `projector_targets` is), chosen the way
    vlmtune.methods.lora does (leaf-name match inside the part)."""
    total = 0
    for lin in counts.linears:
        wanted = {"language": targets, "vision": vision_targets, "projector": projector_targets}.get(lin.part, ())
        if wanted and _matches(lin.name, wanted):
            total += rank * (lin.in_features + lin.out_features) * lin.count
    return total


def adapted_base_shapes(counts: ParamCounts, targets: list[str]) -> list[tuple[int, int, int]]:
    """(out_features, in_features, count) of every targeted linear of the language model: the frozen base weights
    LoRA adapts (and speed.fp8 keeps e4m3 copies of)."""
    return [
        (lin.out_features, lin.in_features, lin.count)
        for lin in counts.linears
        if lin.part == "language" and _matches(lin.name, targets)
    ]


OWN_INPUT_LINEARS = ("o_proj", "out_proj", "down_proj", "c_proj")
"""Leaf names of the linears that read a tensor made inside their block: the attention's output (o_proj; Qwen-VL's
attn.c_proj), the DeltaNet mixer's gated norm (out_proj), the gated MLP's product (down_proj; Qwen-VL's mlp.c_proj).
Every other linear reads its block's input, one tensor for the siblings of the same input width (q/k/v_proj,
gate/up_proj, Qwen3.5's in_proj_qkv/z/b/a, Qwen-VL's w1/w2)."""


def target_inputs(
    counts: ParamCounts, targets: list[str], layer: int = 0, among: tuple[str, ...] = ()
) -> dict[str, int]:
    """The distinct tensors the targeted linears of decoder layer `layer` read, each once, with its width: keyed by
    the linear's name for one that reads its own (OWN_INPUT_LINEARS), else by its block and input width (linears
    that read one input share it). `among` as in `target_input_widths`."""
    out: dict[str, int] = {}
    for lin in counts.linears:
        if lin.part != "language" or f".{layer}." not in f".{lin.name}." or not _matches(lin.name, targets):
            continue
        if among and not _matches(lin.name, among):
            continue
        block, leaf = lin.name.rsplit(".", 1) if "." in lin.name else ("", lin.name)
        out[lin.name if leaf in OWN_INPUT_LINEARS else f"{block}:{lin.in_features}"] = lin.in_features
    return out


def target_input_widths(
    counts: ParamCounts, targets: list[str], layer: int = 0, among: tuple[str, ...] = ()
) -> tuple[int, int]:
    """(sum of input widths of the targeted linears, of all linears) in decoder layer `layer`: scales the
    LoRA-specific activation term for target sets smaller than `all` (hybrid models' layer kinds differ). `among`:
    count as targeted only linears that are also named by one of these (the gated MLP's three)."""
    linears = [lin for lin in counts.linears if lin.part == "language" and f".{layer}." in f".{lin.name}."]
    chosen = sum(lin.in_features for lin in linears
                 if _matches(lin.name, targets) and (not among or _matches(lin.name, among)))
    return chosen, sum(lin.in_features for lin in linears) or 1
