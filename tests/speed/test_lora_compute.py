"""LoRA on the 16-bit layer input under autocast: the same loss and gradients, less saved for backward; and the
checkpointing switches reach the Trainer's arguments."""

from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads

from vlmtune.data.collate import Collator
from vlmtune.speed.lora_compute import lora_compute_in_16bit
from vlmtune.train.args import _checkpointing_args


def _run(model, batch) -> tuple[tuple, int]:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        result = loss_and_grads(model, batch)
    return result, sum(storages.values())


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen3_vl", "smolvlm", "gemma3", "qwen3_5", "internvl",
                                         "mllama", "qwen_vl"])
def test_same_loss_less_saved(tiny_model_dir, encoded, family_name):
    processor, samples = encoded(family_name)
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir(family_name), family_name, dtype=torch.bfloat16)
    reference, saved_before = _run(model, batch)
    handle = lora_compute_in_16bit(model, autocast=True)
    assert not isinstance(handle, str) and handle.layers
    fast, saved_after = _run(model, batch)
    handle.remove()
    assert all(layer.cast_input_dtype_enabled for layer in model.modules() if hasattr(layer, "lora_A"))
    assert saved_after < saved_before
    assert_same(reference, fast, rel=1e-3, cosine=0.999)


def test_not_without_autocast(tiny_model_dir):
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    assert "autocast" in lora_compute_in_16bit(model, autocast=False)


@pytest.mark.parametrize("every, offload", [(1, False), (2, False), (3, True)])
def test_checkpointing_arguments(every, offload):
    args = _checkpointing_args(True, every, offload)
    kwargs = next(v for k, v in args.items() if k.endswith("_kwargs"))
    assert kwargs["use_reentrant"] is False
    assert kwargs.get("every_n_layers", 1) == every and kwargs.get("offload", False) == offload
    assert not any(k.endswith("_kwargs") for k in _checkpointing_args(False, every, offload))


def test_compiled_layers_same_loss(tiny_model_dir, encoded):
    """speed.compile: every decoder layer compiled (the `eager` backend here: dynamo's tracing without inductor's
    code generation, which takes minutes on this CPU), through checkpointing and LoRA, with the same loss."""
    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    processor, samples = encoded("qwen2_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = loss_and_grads(model, batch)
    handle = compile_layers(
        unwrap_peft(model), get_family("qwen2_vl").language_layers_prefix, backend="eager"
    )
    assert not isinstance(handle, str) and all(
        layer._compiled_call_impl is not None for layer in handle.layers
    )
    compiled = loss_and_grads(model, batch)
    handle.remove()
    assert_same(reference, compiled, rel=1e-5, cosine=0.9999)


def test_compile_mode_reaches_every_layer(monkeypatch, tiny_model_dir):
    """speed.compile_mode is handed to torch.compile for each compiled decoder layer ("default" as torch's own
    default)."""
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    seen: list[dict] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    prefix = get_family("qwen2_vl").language_layers_prefix
    handle = compile_layers(unwrap_peft(model), prefix, mode="reduce-overhead")
    assert not isinstance(handle, str)
    assert seen and all(k == {"backend": "inductor", "mode": "reduce-overhead"} for k in seen)
    assert len(seen) == len(unwrap_peft(model).get_submodule(prefix)) - 1  # the first layer stays eager
    assert VlmtuneConfig().speed.compile_mode == "default"


def test_compiled_layers_with_packed_rows(tiny_model_dir, encoded):
    """speed.compile with speed.packing: packed rows (per-sample spans attention, positions restarting) through the
    compiled layers give the eager loss and gradients (dynamo traces or breaks around the spans code, never wrong)."""
    from vlmtune.data.packing import PackingCollator, rope_index_of
    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft
    from vlmtune.speed.packed_attention import packed_attention

    processor, samples = encoded("qwen2_vl")
    family = get_family("qwen2_vl")
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    rows = PackingCollator(processor.tokenizer.pad_token_id, rope_index_of(model))([samples[:3], samples[3:]])
    spans = packed_attention(unwrap_peft(model), family.language_prefixes)
    reference = loss_and_grads(model, rows)
    handle = compile_layers(unwrap_peft(model), family.language_layers_prefix, backend="eager")
    assert not isinstance(handle, str)
    compiled = loss_and_grads(model, rows)
    handle.remove()
    spans.remove()
    assert_same(reference, compiled, rel=1e-5, cosine=0.9999)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen3_vl", "llava"])
def test_one_graph_for_every_compiled_layer(tiny_model_dir, encoded, tmp_path, family_name):
    """The compiled layers share one graph: the first layer, whose input alone does not require grad under LoRA,
    stays eager. Compiling it too makes dynamo build a second graph (every compilation twice on a GPU)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.families import get_family
    from vlmtune.speed.compile_layers import compile_layers
    from vlmtune.speed.loss_hook import unwrap_peft

    config = AutoConfig.from_pretrained(tiny_model_dir(family_name))
    config.text_config.num_hidden_layers = 4
    if getattr(config.text_config, "layer_types", None):
        config.text_config.layer_types = config.text_config.layer_types[:1] * 4
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    processor, samples = encoded(family_name)
    # use_cache=False as the Trainer passes it: a KV cache's per-layer guard would give each layer its own graph
    batch = {**Collator(processor.tokenizer.pad_token_id)(samples), "use_cache": False}
    model = lora_model(tmp_path, family_name)
    layers = unwrap_peft(model).get_submodule(get_family(family_name).language_layers_prefix)
    graphs: list = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    reference = loss_and_grads(model, batch)
    handle = compile_layers(unwrap_peft(model), get_family(family_name).language_layers_prefix, backend=counting)
    assert not isinstance(handle, str) and handle.layers == list(layers)[1:]
    assert_same(reference, loss_and_grads(model, batch), rel=1e-5, cosine=0.9999)
    assert len(graphs) == 1  # one graph, three layers
    layers[0].compile(backend=counting)  # what the first layer would add
    loss_and_grads(model, batch)
    assert len(graphs) == 2
    layers[0]._compiled_call_impl = None
    handle.remove()
    torch._dynamo.reset()
