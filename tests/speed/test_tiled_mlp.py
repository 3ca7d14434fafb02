"""speed.mlp_chunk_tokens (speed/tiled_mlp.py): the checkpointed layers' gated MLP keeps only its input and runs its
backward a chunk of tokens at a time; the same loss and gradients, the same dropout masks, the MLP's forward twice
per step where the layer only adds its output to the residual stream, and less memory alive in backward."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlmtune.families import get_family
from vlmtune.speed.gated_mlp import gated_mlps, recompute_mlp_activations
from vlmtune.speed.tiled_mlp import TiledMLP, skips_recompute, tile_mlps

SKIPS = {"qwen2_vl": True, "qwen2_5_vl": True, "llava": True, "qwen3_vl": True, "qwen3_5": True, "smolvlm": True,
         "internvl": True, "gemma3": False}
"""Whether each family's decoder layer only adds the MLP's output to the residual stream (Gemma 3 normalizes it
first). Llama 3.2 Vision: its self-attention layers add, its cross-attention layers gate the output (below)."""


def _model(tiny_model_dir, family_name: str, **lora) -> tuple[nn.Module, nn.ModuleList]:
    from speed_helpers import lora_model

    from vlmtune.speed.loss_hook import unwrap_peft

    peft = lora_model(tiny_model_dir(family_name), family_name, **lora)
    layers = unwrap_peft(peft).get_submodule(get_family(family_name).language_layers_prefix)
    return peft, layers


def _text_batch(model: nn.Module, tokens: int = 40, rows: int = 2) -> dict[str, torch.Tensor]:
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids.clone()}


def _loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _checkpointed(model: nn.Module) -> nn.Module:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class _Counted:
    """Counts calls of an MLP's forward as installed (what each chunk runs)."""

    def __init__(self, mlps: list[nn.Module]):
        self.calls = 0
        for mlp in mlps:
            inner = mlp.forward

            def counted(x, inner=inner):
                self.calls += 1
                return inner(x)

            mlp.forward = counted


@pytest.mark.parametrize("family_name", sorted(SKIPS))
def test_which_layers_skip_the_mlp_in_the_recomputation(tiny_model_dir, family_name):
    _, layers = _model(tiny_model_dir, family_name)
    assert {skips_recompute(layer, "mlp") for layer in layers} == {SKIPS[family_name]}


def test_llama_vision_gated_cross_attention_layers_recompute(tiny_model_dir):
    _, layers = _model(tiny_model_dir, "mllama")
    kinds = {type(layer).__name__: skips_recompute(layer, "mlp") for layer in layers}
    assert kinds == {"MllamaSelfAttentionDecoderLayer": True, "MllamaCrossAttentionDecoderLayer": False}


def test_source_patterns():
    class Adds(nn.Module):
        def forward(self, hidden_states):
            residual = hidden_states
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
            return hidden_states

    class AddsReversedReturnsTuple(nn.Module):
        def forward(self, h):
            res = h
            out = self.mlp(h)
            out = out + res
            return (out,)

    class Norms(nn.Module):
        def forward(self, h):
            res = h
            h = self.mlp(h)
            h = self.norm(h)
            return res + h

    class AddsThenMore(nn.Module):
        def forward(self, h):
            res = h
            h = self.mlp(h)
            h = res + h
            h = self.final_norm(h)
            return h

    assert skips_recompute(Adds(), "mlp") and skips_recompute(AddsReversedReturnsTuple(), "mlp")
    assert not skips_recompute(Norms(), "mlp") and not skips_recompute(AddsThenMore(), "mlp")
    assert not skips_recompute(Adds(), "feed_forward")  # the attribute is not called


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "gemma3", "qwen3_5"])
def test_checkpointed_model_same_loss_and_gradients(tiny_model_dir, family_name):
    from speed_helpers import assert_same

    model, layers = _model(tiny_model_dir, family_name)
    _checkpointed(model)
    batch = _text_batch(model)
    reference = _loss_and_grads(model, batch)
    mlps = [m for _, m in gated_mlps(list(layers))]
    counter = _Counted(mlps)
    reference_calls = counter.calls
    handle = tile_mlps(model, f"base_model.model.{get_family(family_name).language_layers_prefix}", chunk=16)
    assert not isinstance(handle, str) and len(handle.names) == len(mlps)
    counter.calls = 0
    tiled = _loss_and_grads(model, batch)
    assert_same(reference, tiled, rel=1e-6, cosine=0.999999)
    pieces = -(-batch["input_ids"].numel() // 16)  # 80 tokens: 5 chunks
    # first forward: every chunk under no_grad; recomputation: none where the layer only adds the output (else every
    # chunk once more); backward: every chunk with grad
    per_layer = (2 if SKIPS[family_name] else 3) * pieces
    assert counter.calls == per_layer * len(mlps)
    assert reference_calls == 0  # _Counted wraps the MLPs after the reference ran
    handle.remove()
    counter.calls = 0
    assert torch.equal(_loss_and_grads(model, batch)[0], reference[0])
    assert counter.calls == 2 * len(mlps)  # plain checkpointing: forward and recomputation, one call each


def test_dropout_masks_of_backward_are_the_forwards(tiny_model_dir):
    """LoRA dropout on the MLP: the gradients are those of the chunked forward that produced the output (the same
    masks, replayed from the generator's state at the forward), and the generator ends where the forward left it."""
    model, layers = _model(tiny_model_dir, "qwen2_5_vl", lora_dropout=0.3)
    _, mlp = gated_mlps(list(layers))[0]
    x = torch.randn(3, 10, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(3, 10, mlp.down_proj.out_features, generator=torch.Generator().manual_seed(6))
    params = [p for p in mlp.parameters() if p.requires_grad]

    torch.manual_seed(11)
    leaf = x.clone().requires_grad_(True)
    want = torch.cat([mlp(piece) for piece in leaf.reshape(-1, leaf.shape[-1]).split(8)]).view_as(grad)
    want.backward(grad)
    want_grads = [leaf.grad] + [p.grad.clone() for p in params]
    mlp.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    leaf = x.clone().requires_grad_(True)
    got = TiledMLP.apply(leaf, mlp.forward, 8, False)
    after_forward = torch.get_rng_state()
    got.backward(grad)
    assert torch.equal(torch.get_rng_state(), after_forward)
    assert torch.equal(got, want.detach())
    for a, b in zip([leaf.grad] + [p.grad for p in params], want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # with other masks the adapters' gradients would differ: the dropout is live
    torch.manual_seed(12)
    other = torch.cat([mlp(piece) for piece in x.reshape(-1, x.shape[-1]).split(8)])
    assert not torch.allclose(other, want.detach().reshape(other.shape))


def test_uncheckpointed_layers_and_no_grad_run_the_mlp_as_before(tiny_model_dir):
    model, layers = _model(tiny_model_dir, "qwen2_vl")
    tile_mlps(model, f"base_model.model.{get_family('qwen2_vl').language_layers_prefix}", chunk=4)
    _, mlp = gated_mlps(list(layers))[0]
    x = torch.randn(1, 9, mlp.gate_proj.in_features, requires_grad=True)
    assert type(mlp(x).grad_fn).__name__ != "TiledMLPBackward"  # checkpointing off: autograd's graph as before
    layers[0].gradient_checkpointing = True
    assert type(mlp(x).grad_fn).__name__ == "TiledMLPBackward"
    with torch.no_grad():
        assert mlp(x).grad_fn is None
    model.eval()
    assert type(mlp(x).grad_fn).__name__ != "TiledMLPBackward"


def test_stacks_with_the_activation_recompute_and_removes_in_order(tiny_model_dir):
    model, layers = _model(tiny_model_dir, "qwen2_vl")
    prefix = f"base_model.model.{get_family('qwen2_vl').language_layers_prefix}"
    recomputed = recompute_mlp_activations(model, prefix)
    recomputed_forward = vars(gated_mlps(list(layers))[0][1])["forward"]
    tiled = tile_mlps(model, prefix, chunk=4, eager_layers=1)
    assert [name.split(".")[0] for name in tiled.names] == ["0"]
    _, mlp = gated_mlps(list(layers))[0]
    assert mlp._vlmtune_tiling.inner == recomputed_forward
    tiled.remove()
    assert vars(mlp)["forward"] == recomputed_forward and not hasattr(mlp, "_vlmtune_tiling")
    recomputed.remove()
    assert "forward" not in vars(mlp)
    assert "no decoder layers" in tile_mlps(model, "missing", chunk=4)


class _LiveBytes(TorchDispatchMode):
    """The most bytes of tensors created under it and alive at once (storages freed as their last tensor dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or not storage.nbytes():
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def test_backward_holds_less_of_the_intermediate_width(tiny_model_dir):
    """The recomputed layer's backward, the step's peak under checkpointing: with 1,024 tokens in chunks of 64 the
    tensors alive at once in backward shrink by most of the MLP's intermediate-width tensors."""
    model, layers = _model(tiny_model_dir, "qwen2_vl")
    _checkpointed(model)
    batch = _text_batch(model, tokens=512)
    inter = gated_mlps(list(layers))[0][1].up_proj.out_features
    tokens = batch["input_ids"].numel()

    from vlmtune.speed.loss_hook import unwrap_peft

    language = unwrap_peft(model).model  # up to the last hidden states: no logits, whose gradient would be the peak

    def backward_peak() -> int:
        model.zero_grad(set_to_none=True)
        hidden = language(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
        loss = hidden.square().mean()
        with _LiveBytes() as live:
            loss.backward()
        return live.peak

    plain = backward_peak()
    tile_mlps(model, f"base_model.model.{get_family('qwen2_vl').language_layers_prefix}", chunk=64)
    tiled = backward_peak()
    # fp32: autograd keeps gate, up, act and product, the adapters keep down_proj's input, backward adds gradients of
    # that width; measured 4.6 such tensors of all 1,024 tokens gone (5.84 -> 3.45 MB), at least 4 asserted
    assert plain - tiled >= 4 * 4 * tokens * inter, (plain, tiled, 4 * tokens * inter)


def test_apply_speed_installs_it_where_it_applies(tiny_model_dir):
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.speed import apply_speed

    family = get_family("qwen2_vl")
    model, layers = _model(tiny_model_dir, "qwen2_vl")
    config = VlmtuneConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))},
         "hardware": {"use_cpu": True, "gradient_checkpointing": True},
         "speed": {"compile": False, "mlp_chunk_tokens": 32}})
    setup = apply_speed(model, config, family)
    assert "mlp_chunk_tokens" in setup.active
    mlps = [m for _, m in gated_mlps(list(layers))]
    assert all(m._vlmtune_tiling.chunk == 32 for m in mlps)
    setup.remove()
    assert not any(hasattr(m, "_vlmtune_tiling") or "forward" in vars(m) for m in mlps)

    off = config.model_copy(update={"hardware": config.hardware.model_copy(update={"gradient_checkpointing": False})})
    setup = apply_speed(model, off, family)
    assert "gradient_checkpointing is off" in setup.skipped["mlp_chunk_tokens"]
    setup.remove()
    setup = apply_speed(model, config, family, world=2)
    assert "one process without DeepSpeed" in setup.skipped["mlp_chunk_tokens"]
    setup.remove()
    default = VlmtuneConfig.model_validate({"model": {"name_or_path": "x"}})
    assert default.speed.mlp_chunk_tokens == 0  # off unless asked for


def test_backward_chunks_run_under_the_forwards_autocast(tiny_model_dir):
    """Under bf16 autocast (as the Trainer runs) the chunks recomputed in backward run under autocast too (their
    matmuls in bf16, as in the forward), and the gradients match plain checkpointing's to bf16's precision."""
    from speed_helpers import assert_same

    model, layers = _model(tiny_model_dir, "qwen2_5_vl")
    _checkpointed(model)
    batch = _text_batch(model)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.zero_grad(set_to_none=True)
            loss = model(**batch, use_cache=False).loss
        loss.backward()  # outside the context, as the Trainer's backward
        return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = run()
    mlps = [m for _, m in gated_mlps(list(layers))]
    seen: list[tuple[bool, bool]] = []  # (grad enabled, autocast on) at each chunk's call
    for mlp in mlps:
        inner = mlp.forward

        def recorded(x, inner=inner):
            seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return inner(x)

        mlp.forward = recorded
    tile_mlps(model, f"base_model.model.{get_family('qwen2_5_vl').language_layers_prefix}", chunk=16)
    tiled = run()
    backward_calls = [autocast for grad, autocast in seen if grad]
    assert backward_calls and all(backward_calls)  # every chunk recomputed in backward ran under autocast
    assert_same(reference, tiled, rel=1e-2, cosine=0.99, total_cosine=0.999)
