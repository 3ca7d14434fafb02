"""speed.mlp_chunk_tokens in the estimate: a recomputed (checkpointed, eager) layer whose gated MLP runs in chunks of
c tokens (speed/tiled_mlp.py) keeps the MLP's activations and its intermediate-width gradient for c of the
micro-batch's b x s tokens only (memory/activations.py `recompute_working`). The expected figures are written out
from the catalogue's widths here, not read from the helpers they check. Modelled, not measured on a GPU yet.
"""

from __future__ import annotations

import pytest
import yaml

from vlmtune.config.loader import load_config
from vlmtune.config.schema import VlmtuneConfig
from vlmtune.memory import EstimateInputs, estimate, get_gpu, inputs_from_config
from vlmtune.memory.activations import activation_terms, layer_bytes_per_token
from vlmtune.memory.advice import config_yaml
from vlmtune.memory.catalogue import lookup_model
from vlmtune.memory.params import count_params
from vlmtune.memory.recommend import recommend

QWEN25_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
B, S = 4, 769  # W3's shapes: 448 px image + 512 text tokens
TOKENS = B * S
# vlmtune's LoRA path: r16 on all linears, dropout 0.05, bf16 autocast, adapters on the 16-bit input
BASE = EstimateInputs(model=QWEN25_7B, method="lora", lora_rank=16, lora_targets="all", lora_dropout=0.05,
                      batch_size=B, seq_len=S, image_size=448, image_hw=(448, 448), chunked_loss=True,
                      loss_chunk_tokens=128, vision_no_grad=True, autocast=True, lora_16bit_inputs=True,
                      checkpoint_offload=True, mlp_activation_recompute=True)


def _terms(inputs: EstimateInputs):
    spec = lookup_model(inputs.model)
    return activation_terms(inputs, spec, count_params(spec), 2, inputs.target_list(spec.arch.lora_targets), False)


def _mlp_per_token(dims, inputs: EstimateInputs) -> int:
    """What the MLP keeps per token: 6i or 8i, and under autocast 2 bytes per element of each adapted linear's input
    (gate_proj and up_proj read h, down_proj reads i) where LoRA keeps a 16-bit copy; on the plain path (no
    autocast) the dropout's 6h + i per layer scaled by the MLP's share of the adapted linears' input widths."""
    h, q, i = dims.hidden, dims.q_width, dims.intermediate
    adapted = 2 * h + i if inputs.lora_targets == "all" else 0
    out = (6 if inputs.mlp_activation_recompute else 8) * i
    if inputs.autocast:
        return out + (2 * adapted if inputs.lora_dropout > 0 else 0)
    every = 3 * h + q + 2 * h + i  # q, k, v and gate, up read h; o_proj reads q, down_proj i
    return out + int((6 * h + i) * adapted / every)


@pytest.mark.parametrize(("chunk", "changes"), [
    (512, {}),
    (1024, {}),
    (512, {"mlp_activation_recompute": False}),
    (512, {"lora_dropout": 0.0}),  # no dropout, the 16-bit input: lora_A keeps the layer's own input, no copy
    (512, {"lora_targets": "attention"}),  # no adapted MLP linear
    (512, {"autocast": False}),  # the plain path's LoRA terms
])
def test_the_recomputed_layer_keeps_its_mlp_for_one_chunk(chunk, changes):
    inputs = BASE.with_(**changes)
    dims = count_params(lookup_model(QWEN25_7B)).dims
    mlp = _mlp_per_token(dims, inputs)
    # the MLP's activations and its intermediate-width gradient (2 bytes) for `chunk` of the tokens instead of all
    expected = (TOKENS - chunk) * (mlp + 2 * dims.intermediate)
    before, after = _terms(inputs), _terms(inputs.with_(mlp_chunk_tokens=chunk))
    assert before.layer_working - after.layer_working == expected
    assert after.language_saved == before.language_saved  # the saved layer inputs are not chunked
    plain, tiled = estimate(inputs), estimate(inputs.with_(mlp_chunk_tokens=chunk))
    assert plain.peak_phase == tiled.peak_phase == "layer backward"
    assert plain.peak_allocated - tiled.peak_allocated == expected
    assert any("mlp_chunk_tokens" in note and "measured on one model only" in note for note in tiled.notes)
    assert not any("mlp_chunk_tokens" in note for note in plain.notes)


@pytest.mark.parametrize("chunk", [TOKENS, 10 * TOKENS])
def test_a_chunk_of_the_whole_micro_batch_changes_nothing(chunk):
    assert _terms(BASE.with_(mlp_chunk_tokens=chunk)).layer_working == _terms(BASE).layer_working


@pytest.mark.parametrize("changes", [
    {"gradient_checkpointing": False},  # nothing is recomputed
    {"zero_stage": 2},  # DeepSpeed: the nested backward would be invisible to its gradient hooks
    {"num_gpus": 2},  # DDP: the same
    {"model": "Qwen/Qwen-VL-Chat"},  # the port's MLP (w1, w2, c_proj) is not transformers' gated one
])
def test_where_training_does_not_chunk_the_estimate_does_not_either(changes):
    inputs = BASE.with_(**changes)
    plain, tiled = estimate(inputs), estimate(inputs.with_(mlp_chunk_tokens=512))
    assert (tiled.peak_allocated, tiled.phases) == (plain.peak_allocated, plain.phases)
    assert not any("mlp_chunk_tokens" in note for note in tiled.notes)


def test_compiled_layers_are_not_chunked():
    """speed.compile leaves only the first layer eager, and only it is chunked; the compiled layers are recomputed
    with their whole MLP, and the largest of them is the working set once the first layer's MLP is chunked."""
    inputs = BASE.with_(compiled=True)
    spec = lookup_model(QWEN25_7B)
    counts = count_params(spec)
    per_layer = layer_bytes_per_token(inputs, spec, counts, spec.arch.lora_targets["all"], False)
    gradients = 2 * TOKENS * (2 * counts.dims.hidden + counts.dims.intermediate)
    assert per_layer[0] > max(per_layer[1:])  # eager, with the MLP's activation kept less than compiled
    assert _terms(inputs).layer_working == per_layer[0] * TOKENS + gradients
    assert _terms(inputs.with_(mlp_chunk_tokens=512)).layer_working == max(per_layer[1:]) * TOKENS + gradients


def test_layers_that_keep_their_activations_are_counted_as_before():
    """checkpoint_every_n_layers=2: the working set has always been the largest layer's of all, those that keep their
    activations included (for alike layers the same as a checkpointed one's); those are not chunked, so the estimate
    stays where it was (conservative: their activations are in the saved term already)."""
    inputs = BASE.with_(checkpoint_every=2)
    assert _terms(inputs.with_(mlp_chunk_tokens=512)).layer_working == _terms(inputs).layer_working


def test_the_config_setting_reaches_the_estimate():
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": QWEN25_7B}, "speed": {"mlp_chunk_tokens": 512}})
    assert inputs_from_config(config).mlp_chunk_tokens == 512
    assert inputs_from_config(VlmtuneConfig.model_validate({})).mlp_chunk_tokens == 0  # off by default
    assert any("mlp_chunk_tokens" in p for p in EstimateInputs(mlp_chunk_tokens=-1).problems())
    assert not EstimateInputs(mlp_chunk_tokens=0).problems()


def test_the_recommended_file_keeps_the_setting(tmp_path):
    """The advisor does not search it: the written file carries the config's value, and its estimate is the
    recommendation's."""
    config = load_config(overrides=[f"model.name_or_path={QWEN25_7B}", "data.max_length=769", "data.image_size=448",
                                    "speed.mlp_chunk_tokens=512"])
    rec = recommend(inputs_from_config(config), get_gpu("RTX 4090"), 1, 16)
    assert rec.best is not None and rec.best.inputs.mlp_chunk_tokens == 512
    path = tmp_path / "r.yaml"
    path.write_text(config_yaml(rec, config, str(path)))
    assert yaml.safe_load(path.read_text())["speed"]["mlp_chunk_tokens"] == 512
    loaded = load_config(path)
    assert estimate(inputs_from_config(loaded, gpu=rec.best.inputs.gpu)) == rec.best.breakdown
