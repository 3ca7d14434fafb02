"""What vlmtune's fused LoRA layers keep with dropout (speed.fused_lora), against autograd's saved tensors on the CPU.

Since commit ad4f8d3 the fused function keeps the layer's input and the generator's state instead of PEFT's dropped
16-bit copy and 1-byte mask per adapted linear, so linears that read one input (q/k/v_proj, gate/up_proj) keep one
tensor between them, and o_proj keeps nothing of its own (its input is the attention output SDPA keeps). The estimate
counts that where training runs the fused layers (`fused_lora_layers`: LoRA / QLoRA, autocast, not ZeRO-3, not
speed.compile) as PEFT's term less the structural difference (`fused_lora_bytes`); benchmarks/saved_activations.py
counts both paths. As in test_layer_kinds.py, the GPU keeps 2h + i per token per layer over the CPU count.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_layer_kinds import TOKENS, _gpu_extra, _rank_bytes, _tiny  # tests/memory: on pytest's path

from benchmarks.saved_activations import measure
from vlmtune.memory import EstimateInputs, estimate
from vlmtune.memory.activations import (
    decoder_layer_kinds,
    fused_lora_bytes,
    fused_lora_kept_width,
    fused_lora_layers,
    layer_bytes_per_token,
    mlp_bytes_per_token,
)
from vlmtune.memory.catalogue import architectures, lookup_model
from vlmtune.memory.params import count_params, target_input_widths

PEFT = EstimateInputs(method="lora", lora_dropout=0.05, seq_len=TOKENS, autocast=True, lora_16bit_inputs=True)
FUSED = replace(PEFT, fused_lora=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5", "gemma3"])
def test_the_fused_layers_keep_less_by_what_the_estimate_says(family):
    """Per layer kind: PEFT's path minus the fused one, measured, equals the estimate's difference exactly (Qwen3.5's
    DeltaNet out_proj and its gated o_proj read inputs of their own; Gemma 3's o_proj reads SDPA's output under its
    masks too); without dropout the fused layers keep what they keep with it."""
    descriptor, spec, counts, targets, text, model_type, masked = _tiny(family)
    opaque = descriptor.linear_attention_functions
    runs = {name: measure(text, model_type, targets, counts.dims.layers, TOKENS, mask=masked, opaque=opaque, **kw)
            for name, kw in [("peft", {}), ("fused", {"fused_lora": True}),
                             ("fused_p0", {"fused_lora": True, "lora_dropout": 0.0})]}
    peft = layer_bytes_per_token(PEFT, spec, counts, targets, bf16_adapters=False)
    fused = layer_bytes_per_token(FUSED, spec, counts, targets, bf16_adapters=False)
    for index in range(counts.dims.layers):
        measured = {name: rows[index]["bytes_per_token"] for name, rows in runs.items()}
        kept_less = measured["peft"] - measured["fused"]
        assert kept_less == pytest.approx(peft[index] - fused[index], abs=1e-6), (family, index, measured)
        assert measured["fused_p0"] == measured["fused"]
        on_gpu = measured["fused"] + _gpu_extra(counts.dims)
        assert fused[index] + _rank_bytes(counts, targets, index) == pytest.approx(on_gpu, rel=0.10), (family, index)


@pytest.mark.parametrize(("family", "arch", "within"), [("qwen2_vl", "2b", 0.003), ("qwen2_5_vl", "7b", 0.002)])
def test_real_widths_match_the_count(family, arch, within):
    """At Qwen2-VL-2B and Qwen2.5-VL-7B widths (2 layers, 64 tokens; the second layer, which keeps no rotary tables):
    the fused layers' estimate equals the CPU count plus the GPU's 2h + i within 0.3% / 0.2% (`fused_lora_bytes`:
    97,560 + 12,032 against 109,312 at 2B widths), and so does PEFT's path."""
    from vlmtune.families import get_family

    text = dict(get_family(family).architectures[arch]["text_config"])
    model_type = text.pop("model_type", None) or f"{family}_text"
    spec = lookup_model({"2b": "Qwen/Qwen2-VL-2B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct"}[arch])
    counts = count_params(spec)
    targets = architectures()[family].lora_targets["all"]
    for inputs, kw in [(PEFT, {}), (FUSED, {"fused_lora": True})]:
        (_, row) = measure(text, model_type, targets, 2, 64, **kw)
        estimated = layer_bytes_per_token(inputs, spec, counts, targets, bf16_adapters=False)[1]
        measured = row["bytes_per_token"] + _gpu_extra(counts.dims)
        assert estimated == pytest.approx(measured, rel=within), (arch, kw, estimated, measured)


def test_the_saving_per_layer_at_7b_widths():
    """11h + 3q + i per token per layer with all seven linears adapted: 69,120 bytes at Qwen2.5-VL-7B's widths (the
    CPU count: 280,408 -> 211,288); the MLP's share (speed.mlp_chunk_tokens's `mlp_bytes_per_token`) is its own
    linears' part of it: 4h + i (gate/up_proj's dropped copies and masks, 6h, for their one input, 2h; down_proj's
    3i for 2i), the attention's 7h + 3q the rest."""
    spec = lookup_model("Qwen/Qwen2.5-VL-7B-Instruct")
    counts = count_params(spec)
    d = counts.dims
    targets = spec.arch.lora_targets["all"]
    peft = layer_bytes_per_token(PEFT, spec, counts, targets, False)
    fused = layer_bytes_per_token(FUSED, spec, counts, targets, False)
    assert {p - f for p, f in zip(peft, fused, strict=True)} == {11 * d.hidden + 3 * d.q_width + d.intermediate}
    assert peft[0] - fused[0] == 69_120
    mlp_less = mlp_bytes_per_token(PEFT, counts, targets, False) - mlp_bytes_per_token(FUSED, counts, targets, False)
    assert mlp_less == 4 * d.hidden + d.intermediate
    chosen, _ = target_input_widths(counts, targets)
    assert fused_lora_kept_width(counts, targets, 0) == 2 * d.hidden + d.intermediate
    assert fused_lora_bytes(chosen, 2 * d.hidden + d.intermediate) == d.intermediate - d.hidden - d.q_width


def test_where_the_fused_layers_are_counted():
    """Like training: LoRA / QLoRA under autocast, not under ZeRO-3 (fuse_lora refuses it); under speed.compile only
    the eager first layer is fused, the compiled ones keep PEFT's path; without dropout they keep what PEFT's path
    keeps."""
    assert fused_lora_layers(FUSED)
    assert not fused_lora_layers(PEFT)
    assert fused_lora_layers(replace(FUSED, method="qlora"))
    assert not fused_lora_layers(replace(FUSED, method="full"))
    assert not fused_lora_layers(replace(FUSED, zero_stage=3, num_gpus=2))
    assert fused_lora_layers(replace(FUSED, zero_stage=2, num_gpus=2))
    assert fused_lora_layers(replace(FUSED, compiled=True))  # the eager first layer's adapters
    spec = lookup_model("Qwen/Qwen2-VL-2B-Instruct")
    counts = count_params(spec)
    targets = spec.arch.lora_targets["all"]

    def sizes(inputs: EstimateInputs) -> list[int]:
        return layer_bytes_per_token(inputs, spec, counts, targets, False)

    fused_compiled, peft_compiled = sizes(replace(FUSED, compiled=True)), sizes(replace(PEFT, compiled=True))
    assert fused_compiled[1:] == peft_compiled[1:]  # compiled layers: PEFT's path either way
    assert fused_compiled[0] == sizes(FUSED)[0] < peft_compiled[0] == sizes(PEFT)[0]  # the eager first layer
    assert sizes(replace(FUSED, zero_stage=3, num_gpus=2)) == sizes(replace(PEFT, zero_stage=3, num_gpus=2))
    assert sizes(replace(FUSED, lora_dropout=0.0)) == sizes(replace(PEFT, lora_dropout=0.0))
    no_autocast = replace(PEFT, autocast=False, lora_16bit_inputs=False)
    assert sizes(replace(no_autocast, fused_lora=True)) == sizes(no_autocast)  # the plain path: not measured fused
    assert sizes(FUSED) < sizes(PEFT)


def test_smaller_target_sets_and_eager_attention():
    """Only the adapted linears' inputs count: `attention` keeps the attention input (o_proj's is SDPA's output);
    with eager attention o_proj's input is a copy of its own."""
    spec = lookup_model("Qwen/Qwen2-VL-2B-Instruct")
    counts = count_params(spec)
    d = counts.dims
    attention = spec.arch.lora_targets["attention"]
    assert fused_lora_kept_width(counts, attention, 0) == d.hidden
    assert fused_lora_kept_width(counts, attention, 0, attn_implementation="eager") == d.hidden + d.q_width
    _, qwen35, q_counts, _, _, _, _ = _tiny("qwen3_5")
    gated = decoder_layer_kinds(qwen35, q_counts.dims)[1]
    assert gated.output_gate  # o_proj reads the gated product, a tensor of its own
    assert fused_lora_kept_width(q_counts, qwen35.arch.lora_targets["attention"], 1, gated) == (
        q_counts.dims.hidden + q_counts.dims.q_width)


def test_a_config_maps_speed_fused_lora():
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.memory.inputs import inputs_from_config

    model, hardware = {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"}, {"gradient_checkpointing": False}
    on = inputs_from_config(VlmtuneConfig.model_validate({"model": model, "hardware": hardware}))
    off = inputs_from_config(VlmtuneConfig.model_validate({"model": model, "hardware": hardware,
                                                           "speed": {"fused_lora": False}}))
    assert on.fused_lora and not off.fused_lora
    assert fused_lora_layers(on)
    d = count_params(lookup_model(on.model)).dims
    kept_less = estimate(off).activations_language - estimate(on).activations_language
    assert kept_less == d.layers * (11 * d.hidden + 3 * d.q_width + d.intermediate) * on.batch_size * on.seq_len
    compiled = inputs_from_config(VlmtuneConfig.model_validate({"model": model, "speed": {"compile": True}}))
    assert compiled.fused_lora and fused_lora_layers(compiled)  # the first layer, which stays eager
