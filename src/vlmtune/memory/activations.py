"""Activation memory of one micro-batch: what the language model and the vision tower keep for backward.

Per decoder layer and token, measured in HF transformers with SDPA (memory_anchors.md §6.2-6.3; h hidden, q query
width, kv key/value width, i MLP width; bytes):
- full fine-tuning (bf16): 20h + 4kv + 8i
- LoRA with PEFT's fp32 adapters on all seven linears: 28h + 8q + 4kv + 10i; the LoRA part (8h + 8q + 2i) is scaled
  by the share of targeted linear inputs for smaller target sets; lora_dropout > 0 adds 6h + i (plain path, no
  autocast); under vlmtune's 16-bit autocast: 20h + 4kv + 8i + 2 bytes per adapted linear's input (LORA_AUTOCAST_BYTES),
  and with vlmtune's fused LoRA layers (speed.fused_lora) and dropout less: no masks or dropped copies, each distinct
  input once instead (`fused_lora_bytes`: 11h + 3q + i less with all seven linears adapted)
- with gradient checkpointing only the layer input is kept (2h bytes in bf16), plus one layer's activations while it
  is recomputed in backward.
The base is written 15h + 5q + 4kv + 8i (SDPA's query and output and the o_proj input's dropout are q wide; equal to
20h + ... where q = h, as in the measured models). Layers unlike a plain attention layer say so in the catalogue
(models.yaml `layer_kinds`, by the config's `layer_types` name; catalogue.LayerKind): `kind_extra_bytes` adds what
q/k norms, an output gate, sandwich norms or an always-present SDPA mask keep, and the `gated_delta_net` rule counts
Qwen3.5's linear-attention mixer (`delta_net_bytes`) in place of SDPA's. Those terms were counted from what autograd
saves on the CPU (benchmarks/saved_activations.py; tests/memory/test_layer_kinds.py), which is 2h + i per token per
layer below the GPU-calibrated plain layer (Qwen2-VL-2B / 7B widths): the kinds' extras are added to that base.
Vision tower: with checkpointing HF hooks it into autograd even when frozen, so each block keeps its input
(2 bytes x patches x width); without checkpointing a frozen tower keeps nothing and a trained one about 53 bytes per
patch per unit width per block (fitted on one run, approximate). vlmtune's speed.frozen_vision_no_grad runs a
frozen tower without grad: it keeps nothing in either case. speed.checkpoint_every_n_layers keeps the other
layers' activations in full; speed.checkpoint_offload moves the checkpointed inputs to CPU memory (not measured).
speed.compile=true keeps `compiled_saving` less per token in every layer but the first (EstimateInputs.compiled).
speed.mlp_chunk_tokens holds a recomputed layer's MLP activations and intermediate-width gradient for one chunk of
tokens instead of the micro-batch (`recompute_working`; modelled, not measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vlmtune.memory.catalogue import LayerKind, ModelSpec
from vlmtune.memory.image_tokens import image_cost, tile_wrapper_tokens
from vlmtune.memory.inputs import EstimateInputs
from vlmtune.memory.params import ModelDims, ParamCounts, target_input_widths, target_inputs

TRAINED_VIT_BYTES = 53
PLAIN = LayerKind()
DELTA_CHUNK = 64
"""Tokens per chunk of transformers' `torch_chunk_gated_delta_rule` (its default, which Qwen3.5 uses)."""
GATED_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
"""The linear layers of transformers' gated MLP (speed/gated_mlp.py GATED_MLP_NAMES)."""
LORA_AUTOCAST_BYTES = 2
"""Under 16-bit autocast (vlmtune's Trainer) each adapted linear keeps one 16-bit copy of its input for lora_A's
weight gradient: the dropout output (or, without dropout, autocast's re-cast of PEFT's fp32 input copy). Whether
PEFT hands the adapter an fp32 copy (speed.lora_bf16_compute off) or the 16-bit input does not change what is saved:
autocast casts it back to 16-bit before lora_A, and the fp32 copy is never saved (W1x: 16.69 GiB allocated either
way, within 10 MiB). Counted on top of the full fine-tuning layer: the frozen base linears save no input of their own
(autograd keeps an input only for a gradient it computes), the dropout masks (1 byte per element) are saved; the two
nearly cancel, and 2 bytes per adapted input element on top of 20h + 4kv + 8i matches the no-checkpointing LoRA
runs of Qwen2-VL-2B and Qwen2.5-VL-7B within 1% per layer (counting masks and base inputs separately gives 30h + 4kv
+ 9i for Qwen2-VL, 7% under them: something of about 2h + i per token per layer is kept that this count misses).
Those runs had PEFT's path or vlmtune's fused LoRA layers as they were before commit ad4f8d3, which kept the same
tensors; the fused layers now keep less with dropout (`fused_lora_bytes`)."""
LORA_DROPOUT_MASK_BYTES = 1
"""Dropout's boolean mask per adapted input element (`torch.native_dropout`), kept by PEFT's path with the dropped
16-bit copy."""


@dataclass(frozen=True)
class ActivationTerms:
    seq_len: int
    image_tokens: int
    """Image tokens (wrappers included) in one sample."""
    vit_patches: int
    """Vision-tower patches in the micro-batch."""
    language_saved: int
    vision_saved: int
    layer_working: int
    """One decoder layer's activations while it is recomputed (gradient checkpointing only)."""
    dequant: int
    """QLoRA: the 16-bit copies of the largest decoder linear layer's weight alive in a layer's backward."""
    head_dequant: int
    """QLoRA with a 4-bit lm_head: its 16-bit copy, alive while the (chunked) loss runs, not in the layers' backward."""
    """QLoRA: 16-bit copies of the largest quantized weight during its matmuls."""
    pixel_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return self.language_saved + self.vision_saved


def per_token_layer_bytes(
    inputs: EstimateInputs,
    counts: ParamCounts,
    targets: list[str],
    bf16_adapters: bool,
    kind: LayerKind = PLAIN,
    layer: int = 0,
    mlp_recomputed: bool = False,
) -> int:
    """Bytes decoder layer `layer`, of this kind, keeps per token without checkpointing (bf16 residual stream).
    The MLP keeps 8i: gate and up projections, act(gate) and the product; 6i with `mlp_recomputed`
    (speed.mlp_activation_recompute: act(gate) is recomputed in backward, speed/gated_mlp.py)."""
    d = counts.dims
    h, q, kv = d.hidden, d.q_width, d.kv_width
    out = 15 * h + 5 * q + 4 * kv + mlp_activation_bytes(d, mlp_recomputed)
    out += kind_extra_bytes(kind, d, inputs.seq_len, inputs.linear_attention_kernel)
    out += lora_bytes(inputs, counts, targets, bf16_adapters, layer, kind)
    if inputs.attn_implementation == "eager" and kind.rule == "attention":
        out += (
            4 * d.heads * inputs.seq_len
        )  # bf16 scores and probabilities, S per token per head (not measured)
    return out


def mlp_bytes_per_token(
    inputs: EstimateInputs,
    counts: ParamCounts,
    targets: list[str],
    bf16_adapters: bool,
    layer: int = 0,
    mlp_recomputed: bool = False,
) -> int:
    """The part of `per_token_layer_bytes` that the gated MLP of decoder layer `layer` keeps per token: its
    activations and the LoRA inputs of its adapted linears (gate_proj and up_proj read the hidden width, down_proj
    the intermediate width)."""
    return mlp_activation_bytes(counts.dims, mlp_recomputed) + lora_bytes(
        inputs, counts, targets, bf16_adapters, layer, among=GATED_MLP_LINEARS)


def mlp_activation_bytes(d: ModelDims, recomputed: bool = False) -> int:
    """The MLP keeps 8i: gate and up projections, act(gate) and the product; 6i when act(gate) is recomputed."""
    return (6 if recomputed else 8) * d.intermediate


def lora_bytes(
    inputs: EstimateInputs,
    counts: ParamCounts,
    targets: list[str],
    bf16_adapters: bool,
    layer: int = 0,
    kind: LayerKind = PLAIN,
    among: tuple[str, ...] = (),
) -> int:
    """`lora_input_bytes` of decoder layer `layer`'s adapted linears (of those named by `among`, when given)."""
    chosen, every = target_input_widths(counts, targets, layer, among=among)
    kept = 0
    if fused_lora_layers(inputs):
        kept = fused_lora_kept_width(counts, targets, layer, kind, inputs.attn_implementation, among)
    return lora_input_bytes(inputs, counts.dims, chosen, every, bf16_adapters, kept)


def lora_input_bytes(
    inputs: EstimateInputs, d: ModelDims, chosen: int, every: int, bf16_adapters: bool, kept: int = 0
) -> int:
    """Bytes per token that LoRA adds for adapted linears whose input widths sum to `chosen`, of `every` (all the
    layer's linears): one 16-bit input copy each under autocast, the measured adapter and dropout terms scaled by
    the share of inputs on the plain path. With the fused LoRA layers (`fused_lora_layers`, autocast) and dropout:
    `fused_lora_bytes(chosen, kept)`, `kept` the widths of the distinct inputs they keep (`fused_lora_kept_width`);
    without dropout they keep what PEFT's path keeps on the 16-bit input. Runs without autocast (precision fp32)
    count PEFT's plain path either way (the fused layers there are not measured)."""
    if inputs.method not in ("lora", "qlora"):
        return 0
    if inputs.autocast:
        if fused_lora_layers(inputs):
            return fused_lora_bytes(chosen, kept) if inputs.lora_dropout > 0 else 0
        keeps_copy = inputs.lora_dropout > 0 or not (bf16_adapters or inputs.lora_16bit_inputs)
        return LORA_AUTOCAST_BYTES * chosen if keeps_copy else 0
    # the plain path: the 16-bit model run without autocast, fp32 adapters (memory_anchors.md §6.2)
    h, q, i = d.hidden, d.q_width, d.intermediate
    adapter = 0 if bf16_adapters or inputs.lora_16bit_inputs else 8 * h + 8 * q + 2 * i
    dropout = 6 * h + i if inputs.lora_dropout > 0 else 0
    return int((adapter + dropout) * chosen / every)


def fused_lora_layers(inputs: EstimateInputs) -> bool:
    """Whether the eagerly run layers' adapted linears run as vlmtune's fused LoRA function (speed.fused_lora,
    speed/fused_lora.py): LoRA and QLoRA, not under ZeRO-3 (`fuse_lora` refuses it). With speed.compile that is the
    first decoder layer only; the compiled layers run PEFT's path (`layer_bytes_per_token`; speed/__init__.py)."""
    return inputs.fused_lora and inputs.method in ("lora", "qlora") and inputs.zero_stage < 3


def fused_lora_bytes(chosen: int, kept: int) -> int:
    """The LoRA term per token of a layer whose adapted linears (input widths summing to `chosen`) run as the fused
    function with dropout: PEFT's term (LORA_AUTOCAST_BYTES x chosen, calibrated on runs that kept a dropped 16-bit
    copy and a 1-byte mask of every adapted input, and none of the inputs themselves) less the copies and masks the
    function does not keep, 3 x chosen, plus the inputs it keeps in their place, each distinct one once: 2 x `kept`
    (`fused_lora_kept_width`). So 2 x kept - chosen: with all seven linears of a plain layer adapted, kept = 2h + i
    (the attention and MLP inputs, down_proj's), chosen = 5h + q + i, and the layer keeps 11h + 3q + i less than on
    PEFT's path (14h + i where q = h).
    Counted with benchmarks/saved_activations.py on the CPU (r16 on all linears, dropout 0.05, bf16 autocast, 709
    tokens, the second of 2 layers; torch 2.13, transformers 5.23, peft 0.21; benchmarks/results/
    2026-12-07-fused-lora-saved-activations), bytes per token per layer:
    - Qwen2-VL-2B widths: PEFT 128,024; the fused layers before ad4f8d3 (dropped copy and mask) 128,024; now 97,560
      (30,464 less, the formula exactly); dropout 0, either path, 97,560 too;
    - Qwen2.5-VL-7B widths: PEFT 280,408; before 280,408; now 211,288 (69,120 less, the formula exactly); dropout 0
      211,288.
    Against those counts plus the GPU's 2h + i (tests/memory/test_layer_kinds.py) the estimate is 2B 109,312 for
    109,592 (-0.3%), 7B 237,056 for 237,400 (-0.1%); PEFT's 139,776 for 140,056, 306,176 for 306,520. Without dropout
    it stays i - h - q lower (5.9 / 11.8 kB) though the count is the same: LORA_AUTOCAST_BYTES, which carries the
    GPU's difference, was calibrated on runs with dropout, and the no-dropout term is 0 on either path."""
    # PEFT's 2 x chosen, less its copies and masks (2 + 1) x chosen, plus each kept 16-bit input (2 x kept)
    return 2 * kept - LORA_DROPOUT_MASK_BYTES * chosen


def fused_lora_kept_width(
    counts: ParamCounts,
    targets: list[str],
    layer: int,
    kind: LayerKind = PLAIN,
    attn_implementation: str = "sdpa",
    among: tuple[str, ...] = (),
) -> int:
    """Input widths the fused LoRA layers of decoder layer `layer` keep for backward with dropout: the distinct tensors
    their adapted linears read (params.target_inputs: q/k/v_proj share the attention input, gate/up_proj the MLP
    input), less o_proj's in a plain attention layer: there it reads SDPA's (or flash attention's) output, which the
    attention keeps for its own backward (transformers' transpose and reshape are views of it; counted on the CPU
    with and without Gemma 3's masks), but not behind an output gate (Qwen3.5: the gated product is o_proj's own)
    nor with eager attention (a copy). Qwen3.5's DeltaNet out_proj and every down_proj read a tensor of their own."""
    attention_keeps_it = kind.rule == "attention" and not kind.output_gate and attn_implementation != "eager"
    return sum(width for key, width in target_inputs(counts, targets, layer, among).items()
               if not (attention_keeps_it and key.endswith(".o_proj")))


def kind_extra_bytes(kind: LayerKind, d: ModelDims, seq_len: int, linear_kernel: str = "torch") -> int:
    """Bytes per token a layer of this kind keeps beyond the plain attention layer of the same widths (20h + 4kv +
    8i: SDPA's query, output, key and value, 4q + 4kv of it). Counted from what autograd saves on the CPU under bf16
    autocast (benchmarks/saved_activations.py), term by term:
    - qk_norm: each RMSNorm keeps its fp32 input, 4q + 4kv;
    - output_gate: the sigmoid's output and the attention output it multiplies, 4q;
    - sandwich_norms: two more RMSNorms' fp32 inputs, 8h;
    - attention_mask: keys and values repeated to the query heads, 4(q - kv), and SDPA's 16-bit bias, 2 x seq_len;
    - gated_delta_net: the DeltaNet token mixer (`delta_net_bytes`, on the kernel the run has) in place of SDPA's
      4q + 4kv."""
    h, q, kv = d.hidden, d.q_width, d.kv_width
    out = 0
    if kind.rule == "gated_delta_net":
        out += delta_net_bytes(d, seq_len, linear_kernel) - 4 * q - 4 * kv
    if kind.qk_norm:
        out += 4 * q + 4 * kv
    if kind.output_gate:
        out += 4 * q
    if kind.sandwich_norms:
        out += 8 * h
    if kind.attention_mask:
        out += 4 * (q - kv) + 2 * seq_len
    return out


def delta_net_bytes(d: ModelDims, seq_len: int, kernel: str = "torch") -> int:
    """Bytes per token the gated DeltaNet token mixer keeps on transformers' PyTorch path (no flash-linear-attention:
    `torch_chunk_gated_delta_rule` and `F.conv1d`), its projections' LoRA inputs not included. V = value heads, dk /
    dv their key / value widths, C = 2 x key width + value width (the conv channels), c = DELTA_CHUNK, p = the sequence
    padded to whole chunks over the sequence:
    - per token: the conv's input and output, 4C; the fp32 q and k before their l2norm, 8 V dk; the gated RMSNorm's
      fp32 input, gate, silu and 16-bit product, 14 V dv; beta, the decay, the norms' scales, about 34 V;
    - per padded token (x p): the fp32 chunk matrices (decay, the UT system, the intra-chunk scores) and their 16-bit
      casts for the matmuls, 14 V c; fp32 q / k / k_beta chunks and their 16-bit casts, 30 V dk; v, v_beta and the
      per-chunk v_new casts, 12 V dv; the recurrent state [V, dk, dv] kept in fp32 and twice in 16-bit at every chunk
      of the Python loop, 8 V dk dv / c.
    Measured (benchmarks/saved_activations.py, CPU, bf16 autocast) at Qwen3.5-9B's widths, 709 tokens: 610-616 kB
    per token per layer against 621 kB from this count, the mixer alone within 1% at other widths; transformers 5.17
    (the GPU runs') and 5.23 save the same (5.23 only moved the q / k head repeat into the function).
    flash-linear-attention's fused kernel (transformers uses it when `fla` imports) keeps far less: its autograd
    function saves the l2-normed q and k (16-bit, at most V heads), v, the gates and one [c]-wide matrix per head
    and token (fla-core 0.6 `ChunkGatedDeltaRuleFunction`), recomputing the states in backward: with the conv and
    the gated norm around it about 4C + 14 V dv + 4 V dk + 2 V dv + 4 V c + 32 V (124 kB at 9B widths against 412 kB;
    causal-conv1d would keep 2C of the 4C). kernel="fla" (EstimateInputs.linear_attention_kernel: the run can import
    fla) counts that, read from fla's source, not measured.
    kernel="operator" (what `vlmtune train` runs where the reference runs: speed/opaque_delta_rule.py) keeps the
    conv's input and output, 4C, the gated RMSNorm's 14 V dv and the operator's inputs: 16-bit q and k (V heads on
    transformers 5.17, which repeats them before the call; 5.23 passes the key heads, 8 kB per token less at 9B
    widths), 4 V dk, 16-bit v, 2 V dv, beta and the fp32 decay with the norms' scales, 34 V. Measured at Qwen3.5-9B's
    widths, 709 tokens, transformers 5.23: 312,060 bytes per token for the whole layer against 614,572 traced."""
    v, dk, dv = d.linear_value_heads, d.linear_key_head_dim, d.linear_value_head_dim
    conv = 2 * d.linear_key_heads * dk + v * dv
    if kernel == "fla":
        return int(4 * conv + 14 * v * dv + 4 * v * dk + 2 * v * dv + 4 * v * DELTA_CHUNK + 32 * v)
    if kernel == "operator":
        return int(4 * conv + 14 * v * dv + 4 * v * dk + 2 * v * dv + 34 * v)
    padded = -(-seq_len // DELTA_CHUNK) * DELTA_CHUNK / max(seq_len, 1)
    per_token = 4 * conv + 8 * v * dk + 14 * v * dv + 34 * v
    per_chunk = 14 * v * DELTA_CHUNK + 30 * v * dk + 12 * v * dv + 8 * v * dk * dv / DELTA_CHUNK
    return int(per_token + padded * per_chunk)


def decoder_layer_kinds(spec: ModelSpec, d: ModelDims) -> list[LayerKind]:
    """Each decoder layer's kind: the config's `layer_types` looked up in the catalogue's `layer_kinds`."""
    if len(d.layer_types) != d.layers:
        return [PLAIN] * d.layers
    return [spec.arch.layer_kinds.get(name, PLAIN) for name in d.layer_types]


def layer_bytes_per_token(
    inputs: EstimateInputs, spec: ModelSpec, counts: ParamCounts, targets: list[str], bf16_adapters: bool
) -> list[int]:
    """`per_token_layer_bytes` of every decoder layer, in order (one computation per layer kind)."""
    kinds = decoder_layer_kinds(spec, counts.dims)
    first = {}
    for index, kind in enumerate(kinds):
        first.setdefault(kind, index)
    recomputed = mlp_recomputed(inputs, spec)
    sizes = {k: per_token_layer_bytes(inputs, counts, targets, bf16_adapters, k, i, recomputed)
             for k, i in first.items()}
    if not compiled_layers(inputs):
        return [sizes[k] for k in kinds]
    # speed.compile leaves the first layer eager (speed/compile_layers.py); the compiled ones keep autograd's MLP for
    # inductor, which recomputes the activation itself (compiled_saving's 2i)
    # (the compiled layers' adapters run PEFT's path: the fused function is not traced, speed/__init__.py)
    hashed = hashed_dropout_layers(inputs)
    compiled_inputs = replace(inputs, fused_lora=False, lora_dropout=0.0 if hashed else inputs.lora_dropout)
    plain = {k: per_token_layer_bytes(compiled_inputs, counts, targets, bf16_adapters, k, i) for k, i in first.items()}
    less = {k: compiled_saving(k, counts.dims) + (hash_dropout_saving(counts.dims) if hashed else 0) for k in first}
    return [plain[k] - less[k] if index else sizes[k] for index, k in enumerate(kinds)]


def hashed_dropout_layers(inputs: EstimateInputs) -> bool:
    """Whether the compiled layers' LoRA dropout draws hashed masks in checkpointed regions (speed.hash_dropout)."""
    return inputs.hash_dropout and inputs.lora_dropout > 0 and compiled_layers(inputs)


def hash_dropout_saving(d: ModelDims) -> int:
    """Bytes per token a compiled decoder layer keeps less with speed.hash_dropout than the same compiled layer
    without any dropout: 2i + 4h. Its adapters' dropout runs as a checkpointed region (speed/hash_dropout.py), so the
    partitioner computes the adapters' inputs again in backward (the normed hidden states, the MLP's product) instead
    of keeping them, and keeps no mask. Counted with benchmarks/saved_activations.py --compile on the CPU (256
    tokens, r16 on all linears): Qwen2-VL-2B 73,272 without dropout -> 49,272 with it (24,000; formula 24,064; with
    PyTorch's dropout 103,736), Qwen2.5-VL-7B 159,064 -> 106,968 (52,096; formula 52,224). Other layer kinds (Gemma 3's
    sandwich norms, Qwen3.5's DeltaNet layers) take the same formula, not counted separately."""
    return 2 * d.intermediate + 4 * d.hidden


def mlp_recomputed(inputs: EstimateInputs, spec: ModelSpec) -> bool:
    """Whether the eager layers' gated MLP recomputes its activation (speed.mlp_activation_recompute, gated_mlp)."""
    return inputs.mlp_activation_recompute and spec.arch.gated_mlp


def compiled_layers(inputs: EstimateInputs) -> bool:
    """Whether every decoder layer but the first runs compiled (speed.compile; LoRA and QLoRA)."""
    return inputs.compiled and inputs.method in ("lora", "qlora")


def tiled_layers(inputs: EstimateInputs, spec: ModelSpec, layers: int) -> list[bool]:
    """Which decoder layers run their gated MLP in chunks of tokens in backward (speed.mlp_chunk_tokens), where
    training installs it (speed/__init__.py `_tiled_mlps`): with checkpointing, one process without DeepSpeed, the
    checkpointed layers (every checkpoint_every-th) that run eagerly (only the first with speed.compile), in
    architectures with transformers' gated MLP."""
    applies = (inputs.mlp_chunk_tokens > 0 and inputs.gradient_checkpointing and inputs.zero_stage == 0
               and inputs.num_gpus == 1 and spec.arch.gated_mlp)
    if not applies:
        return [False] * layers
    every, eager = max(1, inputs.checkpoint_every), 1 if compiled_layers(inputs) else layers
    return [index % every == 0 and index < eager for index in range(layers)]


def recompute_working(
    inputs: EstimateInputs,
    spec: ModelSpec,
    counts: ParamCounts,
    targets: list[str],
    bf16_adapters: bool,
    per_layer: list[int],
    act_bytes: int,
) -> int:
    """Bytes alive on top of the saved activations in the backward of a checkpointed step, the largest over the
    decoder layers (`per_layer`: each layer's bytes per token): a layer's activations while it is recomputed, plus
    the gradients alive in its backward, the residual stream's (in and out) and, in the MLP, the gradient of one
    intermediate-width tensor beside its saved inputs. A layer whose MLP runs in chunks of c tokens (`tiled_layers`)
    keeps its MLP part (`mlp_bytes_per_token`) and that gradient for c of the micro-batch's tokens only:
    (per_layer - mlp) x tokens + mlp x c + act x tokens x 2h + act x c x i (modelled, not measured). Every other
    layer counts as without chunks, so the largest of them can stay the peak: with speed.compile the compiled
    layers (with mlp_activation_recompute they keep 4h per token less than the eager first one, which the chunks
    bring below them: the estimate drops little); with checkpoint_every > 1 the layers that keep their activations,
    which this maximum has always included (for alike layers the same figure as a checkpointed one's): the estimate
    does not drop, an overestimate kept so that a chunk of the whole micro-batch changes nothing."""
    d = counts.dims
    tokens = inputs.batch_size * inputs.seq_len
    residual = act_bytes * tokens * 2 * d.hidden
    tiled = tiled_layers(inputs, spec, len(per_layer))
    if not any(tiled):
        return max(per_layer) * tokens + residual + act_bytes * tokens * d.intermediate
    chunk = min(inputs.mlp_chunk_tokens, tokens)
    recomputed = mlp_recomputed(inputs, spec)
    kinds = decoder_layer_kinds(spec, d)
    mlp: dict[LayerKind, int] = {}
    for index, kind in enumerate(kinds):
        if tiled[index] and kind not in mlp:
            per_token = mlp_bytes_per_token(inputs, counts, targets, bf16_adapters, index, recomputed)
            mlp[kind] = int(per_token * act_bytes / 2)
    return max(
        (size - mlp[kind]) * tokens + mlp[kind] * chunk + residual + act_bytes * chunk * d.intermediate
        if tiled[index] else size * tokens + residual + act_bytes * tokens * d.intermediate
        for index, (size, kind) in enumerate(zip(per_layer, kinds, strict=True))
    )


def compiled_saving(kind: LayerKind, d: ModelDims) -> int:
    """Bytes per token a decoder layer of this kind keeps less for backward under torch.compile (speed.compile), bf16
    autocast, LoRA / QLoRA. Inductor saves each RMSNorm's 16-bit input where eager keeps its fp32 copy (2 bytes less
    per element) and recomputes the MLP's activation instead of keeping it (2i):
    - every layer: 2i + 4h (the two RMSNorms around attention and MLP);
    - qk_norm: + 2q + 2kv;
    - sandwich_norms (Gemma 3): + 6h (two more norms, and one whose 16-bit input something else keeps already).
    Counted with benchmarks/saved_activations.py on the CPU, eager against each layer compiled (inductor): Qwen3-VL-8B
    widths 258,568 -> 207,368 bytes per token (51,200, the formula exactly), Gemma-3-12B 328,944 -> 247,454 (81,490;
    formula 81,408, the rest its norms' fp32 (1 + weight) copies); on an H100 (allocated, layers keeping their
    activations): Qwen2-VL-2B fused LoRA 24.1-25.0 kB (formula 24,064; session 7, W1 gc4 / no checkpointing), Qwen3-VL-
    8B QLoRA 50.5 kB and Gemma-3-12B QLoRA 82.6 kB (session 14, F2 / F6).
    - gated_delta_net (the reference as one operator, speed/opaque_delta_rule.py): 2i + 4h + 10 V dv, the gated
      RMSNorm keeping its 16-bit input and gate instead of its fp32 input, silu and product. Counted at Qwen3.5-9B
      widths, 709 tokens: 312,060 -> 230,029 bytes per token (82,031; formula 81,920)."""
    h, q, kv = d.hidden, d.q_width, d.kv_width
    out = 2 * d.intermediate + 4 * h
    if kind.rule == "gated_delta_net":
        return out + 10 * d.linear_value_heads * d.linear_value_head_dim
    if kind.qk_norm:
        out += 2 * q + 2 * kv
    if kind.sandwich_norms:
        out += 6 * h
    return out


def image_tokens_and_patches(inputs: EstimateInputs, spec: ModelSpec) -> tuple[int, int]:
    """Language-model tokens (markup included) and vision-tower patches of one image of `inputs.image_hw`."""
    if not inputs.images_per_sample:
        return 0, 0
    rule = spec.image
    h, w = inputs.image_hw
    cost = image_cost(rule, h, w, inputs.image_size, inputs.min_pixels, inputs.max_pixels)
    tokens = cost.llm_tokens + spec.arch.chat.get("tokens_per_image", 0) + tile_wrapper_tokens(rule, cost)
    return tokens, cost.vit_patches


def sample_image_tokens(inputs: EstimateInputs) -> int:
    """The language-model tokens the images of one sample take (`image_tokens_per_sample` when measured)."""
    from vlmtune.memory.catalogue import lookup_model

    if inputs.image_tokens_per_sample is not None:
        return inputs.image_tokens_per_sample
    return image_tokens_and_patches(inputs, lookup_model(inputs.model))[0] * inputs.images_per_sample


def activation_terms(
    inputs: EstimateInputs,
    spec: ModelSpec,
    counts: ParamCounts,
    act_bytes: int,
    targets: list[str],
    bf16_adapters: bool,
) -> ActivationTerms:
    d = counts.dims
    notes: list[str] = []
    rule = spec.image
    per_image_tokens, per_image_patches = image_tokens_and_patches(inputs, spec)
    image_tokens = inputs.image_tokens_per_sample
    if image_tokens is None:
        image_tokens = per_image_tokens * inputs.images_per_sample
    b, s = inputs.batch_size, inputs.seq_len
    if image_tokens >= s:
        notes.append(
            f"the images alone take {image_tokens} tokens, more than seq_len {s}: such samples are dropped "
            "or cut by the engine; lower max_pixels / image_size or raise data.max_length"
        )
    patches = inputs.vit_patches_per_batch
    if patches is None:
        patches = b * inputs.images_per_sample * per_image_patches
    scale = act_bytes / 2
    per_layer = [int(x * scale) for x in layer_bytes_per_token(inputs, spec, counts, targets, bf16_adapters)]
    trained_vit = (inputs.method == "full" and not inputs.freeze_vision_tower) or inputs.adapt_vision_tower
    if inputs.gradient_checkpointing:
        every = max(1, inputs.checkpoint_every)
        # the decoder layers whose index in the language model is a multiple of n (train/checkpoint_layers.py)
        kept_layers = [x for index, x in enumerate(per_layer) if index % every]
        checkpointed = d.layers - len(kept_layers)
        whole = len(kept_layers)  # layers that keep all their activations
        kept = 0 if inputs.checkpoint_offload else checkpointed * act_bytes * b * s * d.hidden
        language = kept + sum(kept_layers) * b * s
        working = recompute_working(inputs, spec, counts, targets, bf16_adapters, per_layer, act_bytes)
        if any(tiled_layers(inputs, spec, d.layers)):
            notes.append(f"speed.mlp_chunk_tokens ({inputs.mlp_chunk_tokens}): the recomputed layers' MLP in chunks "
                         "is measured on one model only (Qwen2.5-VL-7B LoRA, within 0.3%)")
        vision = 0 if inputs.vision_no_grad and not trained_vit else (
            d.vision_depth * act_bytes * patches * d.vision_width)
    else:
        whole = d.layers
        language = sum(per_layer) * b * s
        working = 0
        vision = TRAINED_VIT_BYTES * d.vision_width * patches * d.vision_depth if trained_vit else 0
    dequant = head_dequant = 0
    if inputs.method == "qlora":
        largest = max(
            (lin.in_features * lin.out_features for lin in counts.linears if lin.part == "language" and lin.count == 1),
            default=0,
        )
        dequant = 2 * 2 * largest
        if inputs.quantize_lm_head and not counts.tied:  # the chunked loss calls the 4-bit head: one 16-bit copy
            head_dequant = 2 * d.vocab * d.hidden
    if inputs.packing and spec.arch.packed_row_masks:
        # the family's boolean masks live through forward and backward (the recomputation reads them); SDPA turns a
        # boolean mask into a 16-bit bias per call, which its backward keeps for every layer it did not recompute
        masks = spec.arch.packed_row_masks * b * s * s
        bias = 2 * b * s * s
        language += masks + whole * bias
        working += bias if inputs.gradient_checkpointing else 0
        notes.append(
            f"packed rows: {spec.arch.packed_row_masks} dense masks of {b} x {s}^2 booleans ({masks / 2**30:.2f} GiB) "
            "and a 16-bit copy per attention call (not measured on a GPU)"
        )
    patch = rule.get("patch_size", 14)
    pixel_values = patches * 3 * patch * patch * rule.get("temporal_patch_size", 1)
    return ActivationTerms(
        seq_len=s,
        image_tokens=image_tokens,
        vit_patches=patches,
        language_saved=language,
        vision_saved=vision,
        layer_working=working,
        dequant=dequant,
        head_dequant=head_dequant,
        pixel_bytes=pixel_values * 6,
        notes=notes,
    )
