"""speed.fp8's cheaper path against the first one: the fused (torch.compile'd) quantization, the kept transposed weight
and one quantization per shared input give the same outputs and gradients; the shared input is reused, counted, and
freed; gradient checkpointing's recomputation gives the same gradients. On the CPU (inductor's C++ backend compiles
the quantization here, as Triton does on a GPU)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from speed_helpers import assert_same, lora_model, loss_and_grads
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from vlmtune.data.collate import Collator
from vlmtune.speed.fp8_linear import Quantizer, SharedInput, quantize
from vlmtune.speed.fused_lora import enable_fp8, fuse_lora
from vlmtune.speed.loss_hook import unwrap_peft

FIRST = {"keep_transposed": False, "fused_quant": False, "share_inputs": False}
"""The path as measured in session 12: eager quantization, W^T per backward, every layer quantizing its input."""
NOW = {"keep_transposed": True, "fused_quant": True, "share_inputs": True}
"""What speed.fp8 runs on a GPU (fused_quant None there means compiled on CUDA; forced here on the CPU)."""
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantization_equals_eager_bit_for_bit(dtype):
    """Rows, rows with the weight's scales folded in, and per tensor: the same e4m3 bits and fp32 scales as eager
    `quantize` (rows of very different ranges, a zero row, a strided input)."""
    torch.manual_seed(0)
    t = (torch.randn(37, 64) * torch.logspace(-3, 2, 37).unsqueeze(1)).to(dtype)
    t[5] = 0
    columns = torch.rand(1, 64) + 0.5
    fused = Quantizer(fused=True)
    for rowwise, cols in [(True, None), (True, columns), (False, None)]:
        values, scale = fused(t, rowwise, cols)
        ref_values, ref_scale = quantize(t * cols.to(dtype) if cols is not None else t, rowwise)
        assert torch.equal(_bits(values), _bits(ref_values)) and torch.equal(scale, ref_scale)
        assert scale.shape == ref_scale.shape
    strided = t.t().contiguous().t()
    values, _ = fused(strided, True)
    assert values.is_contiguous() and torch.equal(_bits(values), _bits(quantize(t, True)[0]))
    assert fused.compiled_calls == fused.calls == 4 and fused.failed is None
    eager = Quantizer()  # the default: compiled on CUDA tensors only
    eager(t)
    assert eager.compiled_calls == 0 and eager.calls == 1


class _Block(nn.Module):
    """A decoder layer's linear layers as Qwen2's are called: q/k/v on one normed input, o, gate/up on another, down."""

    def __init__(self, d: int = 32, kv: int = 16, ff: int = 48):
        super().__init__()
        self.norm, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        x = x + self.o_proj(q * torch.cat([k, v], dim=-1).sigmoid())
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class _Stack(nn.Module):
    def __init__(self, blocks: int = 2, checkpointed: str | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointed is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointed == "reentrant")
        return x


def _stack(dtype: torch.dtype = torch.float32, checkpointed: str | None = None):
    """(PEFT model, its fused layers): LoRA rank 4 on every projection, lora_B random, dropout 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Stack(checkpointed=checkpointed).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    fused = fuse_lora(model.get_base_model(), zero_stage=0)
    assert not isinstance(fused, str) and len(fused.layers) == 14
    return model.train(), fused


def _step(model: nn.Module, dtype: torch.dtype = torch.float32, seed: int = 3):
    """Output, input gradient and every adapter gradient of one forward + backward."""
    torch.manual_seed(seed)
    x = torch.randn(2, 9, 32, dtype=dtype, requires_grad=True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.randn_like(y))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _assert_equal(a, b, exact: bool = True):
    (ya, dxa, ga), (yb, dxb, gb) = a, b
    assert ga.keys() == gb.keys() and len(ga) == 28
    tol = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(dxa, dxb, **tol)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("change", ["keep_transposed", "fused_quant", "share_inputs", "all"])
def test_each_change_gives_the_first_paths_numbers(dtype, change):
    """The same quantization in a different place: output, input gradient and adapter gradients equal the first
    path's exactly, each change alone and all together."""
    model, fused = _stack(dtype)
    first = enable_fp8(fused, **FIRST)
    reference = _step(model, dtype)
    first.remove()
    options = dict(NOW) if change == "all" else {**FIRST, change: NOW[change]}
    now = enable_fp8(fused, **options)
    _assert_equal(_step(model, dtype), reference)
    assert now.quantizer.failed is None
    if options["keep_transposed"]:
        assert all(layer._vlmtune_fp8.transposed is not None for layer in now.layers)
    assert now.kept_bytes() == now.planned


def test_shared_inputs_quantized_once_and_counted():
    """Per block: 4 inputs quantized in the forward (the normed input for q/k/v, o's, the normed input for gate/up,
    down's) instead of 7, and 7 incoming gradients in the backward either way."""
    model, fused = _stack()
    fp8 = enable_fp8(fused, **NOW)
    _step(model)
    assert fp8.quantizer.calls == 2 * (4 + 7) and fp8.shared.reuses == 2 * 3
    fp8.remove()
    plain = enable_fp8(fused, **FIRST)
    _step(model)
    assert plain.quantizer.calls == 2 * (7 + 7) and plain.shared is None


def test_an_input_changed_in_place_is_quantized_again():
    model, fused = _stack()
    fp8 = enable_fp8(fused, **NOW)
    layer = fused.layers[0]  # blocks.0.q_proj
    other = next(m for m in fused.layers if m.base_layer.in_features == layer.base_layer.in_features and m is not layer)
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = layer(x)
        x.mul_(2)
        other(x)
        after = layer(x)
    assert fp8.quantizer.calls == 2 and fp8.shared.reuses == 1  # other(x) quantized the changed x, layer reused it
    torch.testing.assert_close(after, 2 * before - layer.base_layer.bias * 1, rtol=0.1, atol=0.2)


class _Spy(Quantizer):
    """Keeps a weak reference to every e4m3 copy it makes."""

    def __init__(self) -> None:
        super().__init__(fused=True)
        self.made: list[weakref.ref] = []

    def __call__(self, *args, **kwargs):
        values, scale = super().__call__(*args, **kwargs)
        self.made.append(weakref.ref(values))
        return values, scale


def test_the_shared_copy_is_freed():
    """Nothing is held once the model's forward returns (the hook), once its input tensor is freed (the weak
    reference), or after remove(); over several steps no quantized copy outlives its step."""
    model, fused = _stack()
    fp8 = enable_fp8(fused, **NOW)
    spy = _Spy()
    for layer in fp8.layers:
        layer._vlmtune_fp8.quantizer = spy
    fp8.shared.quantizer = spy
    for seed in range(3):
        _step(model, seed=seed)
        assert fp8.shared.held() is None
    gc.collect()
    assert len(spy.made) == 3 * 2 * (4 + 7) and all(ref() is None for ref in spy.made)
    # a layer called outside the model's forward: the copy goes with its input
    x = torch.randn(5, 32)
    with torch.no_grad():
        fused.layers[0](x)
    assert fp8.shared.held() is not None
    del x
    assert fp8.shared.held() is None
    fp8.remove()
    assert fp8.hook is not None and not fused.model._forward_hooks
    assert all("_vlmtune_fp8_shared" not in layer.__dict__ for layer in fused.layers)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpoint_recomputation_gives_the_same_gradients(mode):
    """Gradient checkpointing recomputes each block in the backward: new input tensors, quantized (and shared)
    again, to the same values: the gradients equal those without checkpointing."""
    model, fused = _stack()
    fp8 = enable_fp8(fused, **NOW)
    reference = _step(model)
    calls = fp8.quantizer.calls
    checkpointed, fused_c = _stack(checkpointed=mode)
    fp8_c = enable_fp8(fused_c, **NOW)
    _assert_equal(_step(checkpointed), reference)
    assert fp8_c.quantizer.calls == calls + 2 * 4  # the forward quantizations once more, in the recomputation
    assert fp8_c.shared.reuses == 2 * fp8.shared.reuses
    assert fp8_c.shared.held() is None or mode == "reentrant"


def test_tiny_model_same_loss_and_gradients_as_the_first_path(tiny_model_dir, encoded):
    """The tiny Qwen2-VL through its own attention and MLP code: the language layers' q/k/v and gate/up share their
    inputs, and loss and gradients equal the first path's."""
    processor, samples = encoded("qwen2_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    fused = fuse_lora(unwrap_peft(model), zero_stage=0)
    assert not isinstance(fused, str)
    first = enable_fp8(fused, **FIRST)
    reference = loss_and_grads(model, batch)
    first.remove()
    now = enable_fp8(fused, **NOW)
    assert_same(reference, loss_and_grads(model, batch), rel=1e-6, cosine=1 - 1e-6)
    assert now.shared.reuses > 0 and now.quantizer.compiled_calls == now.quantizer.calls
    assert now.shared.held() is None
    now.remove()
    fused.remove()


def test_shared_input_key_needs_the_same_object():
    """An equal tensor that is another object (or a view of the same storage) is quantized again."""
    shared = SharedInput(Quantizer(fused=False))
    x = torch.randn(4, 8)
    shared.get(x, True)
    shared.get(x.clone(), True)
    shared.get(x.view(4, 8), True)
    shared.get(x, False)
    assert shared.quantizer.calls == 4 and shared.reuses == 0
    shared.get(x, False)
    assert shared.reuses == 1


def test_a_compile_that_fails_leaves_the_quantizer_eager(monkeypatch, caplog):
    """No Triton, a Dynamo error: one warning naming it, then eager quantization with the same numbers."""

    def broken(*args):
        raise RuntimeError("backend compiler failed (mocked)")

    quantizer = Quantizer(fused=True)
    monkeypatch.setattr(quantizer, "_compiled_fn", lambda fn: broken)
    t = torch.randn(6, 16)
    with caplog.at_level("WARNING", logger="vlmtune.speed.fp8_linear"):
        values, scale = quantizer(t)
        quantizer(t)
    assert quantizer.failed and "mocked" in quantizer.failed and quantizer.compiled_calls == 0
    assert sum("does not compile here" in r.getMessage() for r in caplog.records) == 1
    ref_values, ref_scale = quantize(t)
    assert torch.equal(_bits(values), _bits(ref_values)) and torch.equal(scale, ref_scale)
