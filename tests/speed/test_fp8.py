"""speed.fp8: e4m3 quantization and its scales, the fused LoRA function's FP8 base matmuls against an emulated FP8
reference (quantize -> dequantize -> fp32 matmul) and against bf16, adapters still trained and the base never, and
the auto / true / false decision with its reasons and errors (the GPU mocked)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from speed_helpers import lora_model, loss_and_grads

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.data.collate import Collator
from vlmtune.errors import VlmtuneError
from vlmtune.speed import fp8_policy
from vlmtune.speed.fp8_linear import E4M3, E4M3_MAX, Fp8Weight, dequantize, planned_bytes, quantize
from vlmtune.speed.fp8_policy import NOT_FASTER, decide_fp8
from vlmtune.speed.fused_lora import LoraLinearFunction, enable_fp8, fuse_lora
from vlmtune.speed.loss_hook import unwrap_peft

ROWWISE = [True, False]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _emulated_scale(fp8: Fp8Weight) -> torch.Tensor:
    """The weight's scale as a column (out, 1) for dequantizing its rows."""
    return fp8.scale.view(-1, 1) if fp8.rowwise else fp8.scale


def _emulated_forward(x2: torch.Tensor, fp8: Fp8Weight) -> torch.Tensor:
    x_q, s_x = quantize(x2, fp8.rowwise)
    return dequantize(x_q, s_x) @ dequantize(fp8.values, _emulated_scale(fp8)).t()


def _emulated_input_grad(g: torch.Tensor, fp8: Fp8Weight) -> torch.Tensor:
    if fp8.rowwise:  # the weight's row scales folded into the gradient's columns, as the layer does
        g_q, s_g = quantize(g * fp8.scale.to(g.dtype), True)
        return dequantize(g_q, s_g) @ fp8.values.float()
    g_q, s_g = quantize(g, False)
    return dequantize(g_q, s_g) @ dequantize(fp8.values, fp8.scale)


# --- quantization ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rowwise", ROWWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_e4m3_error(rowwise, dtype):
    """Each element comes back within 2^-4 relative (3 mantissa bits, round to nearest; a 16-bit input is scaled in
    bf16, whose two roundings add up to 2^-8 relative) where it is in e4m3's normal range after scaling, and within
    half the smallest subnormal step (2^-10 x scale) below it; the amax maps to 448."""
    torch.manual_seed(0)
    t = (torch.randn(33, 64) * torch.logspace(-3, 2, 33).unsqueeze(1)).to(dtype)
    values, scale = quantize(t, rowwise)
    assert values.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == ((33, 1) if rowwise else ())
    back = dequantize(values, scale)
    ref = t.float()
    error = (back - ref).abs()
    normal = ref.abs() >= 2.0**-6 * scale
    slack = 1e-3 if dtype == torch.float32 else 2.0**-4  # bf16 scaling: (2^-4 + 2^-8) relative at most
    assert (error[normal] <= 2.0**-4 * ref.abs()[normal] * (1 + slack)).all()
    bound = 2.0**-10 * scale.expand_as(ref) * (1 + 1e-3) + (
        0 if dtype == torch.float32 else 2.0**-8 * ref.abs()
    )
    assert (error[~normal] <= bound[~normal]).all()
    scaled_max = values.float().abs().amax(dim=-1) if rowwise else values.float().abs().amax()
    assert torch.equal(
        scaled_max, torch.full_like(scaled_max, E4M3_MAX)
    )  # nothing saturates, the range is used


def test_rowwise_scales_follow_each_rows_range():
    """A row of large values does not flatten a row of small ones under row-wise scales (it does per tensor)."""
    t = torch.stack([torch.linspace(-1e-3, 1e-3, 64), torch.linspace(-1e3, 1e3, 64)])
    assert _rel(dequantize(*quantize(t, True))[0], t[0]) < 0.05
    assert _rel(dequantize(*quantize(t, False))[0], t[0]) > 0.5


def test_zero_rows_and_finite_scales():
    t = torch.zeros(3, 16)
    t[1] = 2.0
    values, scale = quantize(t, True)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize(values, scale)[0], torch.zeros(16))
    torch.testing.assert_close(dequantize(values, scale)[1], torch.full((16,), 2.0))


# --- the FP8 base matmuls --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rowwise", ROWWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_matmuls_equal_the_emulated_fp8_reference(rowwise, dtype):
    """PyTorch 2.13 runs torch._scaled_mm on the CPU: the real path equals quantize -> dequantize -> fp32 matmul (to
    the output dtype's rounding) and stays within FP8's error of the exact product."""
    torch.manual_seed(1)
    weight = (torch.randn(48, 64) * 0.05).to(dtype)
    x2, g = torch.randn(37, 64, dtype=dtype), torch.randn(37, 48, dtype=dtype)
    fp8 = Fp8Weight(rowwise=rowwise).of(weight)
    y, dx = fp8.forward(x2), fp8.input_grad(g)
    assert y.dtype == dx.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 output: its rounding, 2^-9 relative
    assert _rel(y, _emulated_forward(x2, fp8)) < tolerance
    assert _rel(dx, _emulated_input_grad(g, fp8)) < tolerance
    assert _rel(y, x2.float() @ weight.float().t()) < 0.06  # two e4m3 operands: about 2 x 2^-4 / sqrt(3) each
    assert _rel(dx, g.float() @ weight.float()) < 0.06


def test_weight_copy_built_once_and_rebuilt_when_the_weight_changes():
    weight = torch.randn(32, 16)
    fp8 = Fp8Weight()
    for _ in range(3):
        fp8.of(weight)
    assert fp8.builds == 1
    assert fp8.nbytes() == planned_bytes(32, 16, rowwise=True) == 32 * 16 + 4 * (32 + 16)
    with torch.no_grad():
        weight.mul_(2)
    fp8.of(weight)
    assert fp8.builds == 2
    torch.testing.assert_close(dequantize(fp8.values, fp8.scale.view(-1, 1)), weight, rtol=2**-4, atol=1e-6)
    kept = Fp8Weight(keep_transposed=True).of(weight)
    assert kept.transposed is not None and kept.transposed.stride() == (1, 32)
    assert kept.nbytes() == planned_bytes(32, 16, rowwise=True, keep_transposed=True)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_function_forward_and_gradients_with_fp8_base(p):
    """The fused function with an FP8 base: output and input gradient as the emulated FP8 base plus the exact LoRA
    part; the adapters' gradients are those of the bf16-base function (they do not depend on the base's matmuls);
    the frozen weight gets no gradient."""
    torch.manual_seed(2)
    weight = torch.randn(48, 32) * 0.1
    bias = torch.randn(48)
    x = torch.randn(2, 9, 32, requires_grad=True)
    a = (torch.randn(4, 32) * 0.1).requires_grad_()
    b = (torch.randn(48, 4) * 0.1).requires_grad_()
    fp8 = Fp8Weight().of(weight)
    grad_out = torch.randn(2, 9, 48)

    def run(**base):
        x.grad = a.grad = b.grad = None
        torch.manual_seed(5)  # the same dropout mask for both
        y = LoraLinearFunction.apply(x, None, base.get("weight"), bias, a, b, a, b, 1.5, p, base.get("fp8"))
        y.backward(grad_out)
        return y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()

    y8, dx8, da8, db8 = run(fp8=fp8)
    y, dx, da, db = run(weight=weight)
    x2, g = x.detach().reshape(-1, 32), grad_out.reshape(-1, 48)
    base_y = _emulated_forward(x2, fp8) + bias
    base_dx = _emulated_input_grad(g, fp8)
    torch.testing.assert_close(
        y8.reshape(-1, 48) - base_y, y.reshape(-1, 48) - (x2 @ weight.t() + bias), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        dx8.reshape(-1, 32) - base_dx, dx.reshape(-1, 32) - g @ weight, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(da8, da)
    torch.testing.assert_close(db8, db)
    assert weight.grad is None


def test_fp8_lora_model_trains_adapters_only(tiny_model_dir, encoded):
    """The tiny model with FP8 base layers: the loss within FP8's error of the fp32 one, every LoRA matrix gets a
    gradient close to the reference's, no base weight gets one, and remove() gives the plain fused layers back."""
    processor, samples = encoded("qwen2_vl")
    batch = Collator(processor.tokenizer.pad_token_id)(samples)
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    reference = loss_and_grads(model, batch)
    fused = fuse_lora(unwrap_peft(model), zero_stage=0)
    assert not isinstance(fused, str)
    fp8 = enable_fp8(fused)
    assert not isinstance(fp8, str) and len(fp8.layers) == len(fused.layers)
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss.item() - reference[0].item()) < 0.02 * abs(reference[0].item())
    assert set(grads) == set(reference[1]) and all("lora_" in name for name in grads)
    for name, grad in reference[1].items():
        assert torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0) > 0.95, (
            name
        )
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert fp8.kept_bytes() == fp8.planned > 0
    assert all(layer._vlmtune_fp8.builds == 1 for layer in fp8.layers)
    fp8.remove()
    assert all("_vlmtune_fp8" not in layer.__dict__ for layer in fused.layers)
    torch.testing.assert_close(loss_and_grads(model, batch)[0], reference[0], rtol=1e-5, atol=1e-6)
    fused.remove()


def test_qlora_and_trained_bases_are_left_alone(tiny_model_dir):
    """Only frozen plain nn.Linear bases: a base that trains (as full fine-tuning's would) keeps its 16-bit matmul."""
    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    fused = fuse_lora(unwrap_peft(model), zero_stage=0)
    first = fused.layers[0]
    first.base_layer.weight.requires_grad_(True)
    fp8 = enable_fp8(fused)
    assert first not in fp8.layers and len(fp8.layers) == len(fused.layers) - 1
    fp8.remove()
    for layer in fused.layers:
        layer.base_layer.weight.requires_grad_(False)
        layer.base_layer = torch.nn.Identity()  # stands for a 4-bit layer: not an nn.Linear
    assert "no LoRA layer" in enable_fp8(fused)


# --- the decision ------------------------------------------------------------------------------------------------


def _config(speed: dict | None = None, **sections) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate({"speed": speed or {}, **sections})


def _plan(device: str = "cuda", bf16: bool = True) -> SimpleNamespace:
    return SimpleNamespace(device=device, bf16=bf16, fp16=False, note=f"{device} plan")


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU of the given compute capability whose scaled matmul works (or fails) as told."""

    def make(capability=(9, 0), rowwise_ok=True, tensorwise_ok=True):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
        ok = {True: rowwise_ok, False: tensorwise_ok}
        monkeypatch.setattr(fp8_policy, "probe", lambda device, rowwise: None if ok[rowwise] else "no kernel")

    return make


def test_auto_is_the_default_and_stays_off_while_fp8_is_slower(gpu, monkeypatch):
    assert VlmtuneConfig().speed.fp8 == "auto"
    gpu((9, 0))
    monkeypatch.setattr(fp8_policy, "probe", lambda *a: pytest.fail("a default run probed the GPU"))
    decision = decide_fp8(_config(), _plan())
    assert not decision.on and decision.auto
    assert decision.reason == NOT_FASTER
    assert "0.60x" in NOT_FASTER and "speed.fp8=true" in NOT_FASTER


def test_auto_once_measured_runs_on_hopper_and_ada(gpu, monkeypatch):
    monkeypatch.setattr(fp8_policy, "PAYS", True)
    for capability in [(8, 9), (9, 0), (10, 0)]:
        gpu(capability)
        decision = decide_fp8(_config(), _plan())
        assert decision.on and decision.auto and "Test GPU" in decision.reason


@pytest.mark.parametrize(
    ("config", "plan", "capability", "deepspeed", "says"),
    [
        ({}, ("cpu", False), (9, 0), False, "no CUDA GPU"),
        ({}, ("cuda", True), (8, 6), False, "compute capability 8.6"),
        ({}, ("cuda", True), (9, 0), True, "DeepSpeed"),
        ({}, ("cuda", False), (9, 0), False, "set hardware.precision=bf16"),
        ({"method": {"name": "qlora"}}, ("cuda", True), (9, 0), False, "method.name=qlora"),
        ({"method": {"name": "full"}}, ("cuda", True), (9, 0), False, "method.name=full"),
        ({"speed": {"fused_lora": False}}, ("cuda", True), (9, 0), False, "speed.fused_lora=false"),
    ],
)
def test_auto_off_says_why(gpu, monkeypatch, config, plan, capability, deepspeed, says):
    monkeypatch.setattr(fp8_policy, "PAYS", True)  # the reasons that hold even once measured
    gpu(capability)
    decision = decide_fp8(VlmtuneConfig.model_validate(config), _plan(*plan), deepspeed=deepspeed)
    assert not decision.on and decision.auto
    assert decision.reason.startswith("fp8: off (auto): ") and says in decision.reason


def test_auto_off_without_a_scaled_matmul(gpu, monkeypatch):
    monkeypatch.setattr(fp8_policy, "PAYS", True)
    gpu((9, 0), rowwise_ok=False, tensorwise_ok=False)
    assert "torch._scaled_mm fails on cuda" in decide_fp8(_config(), _plan()).reason
    monkeypatch.delattr(torch, "_scaled_mm")
    assert "has no torch._scaled_mm" in decide_fp8(_config(), _plan()).reason


def test_true_forces_it_and_falls_back_to_tensor_scales(gpu):
    gpu((9, 0))
    decision = decide_fp8(_config({"fp8": True}), _plan())
    assert decision.on and not decision.auto and decision.rowwise and "speed.fp8=true" in decision.reason
    gpu((8, 9), rowwise_ok=False)
    decision = decide_fp8(_config({"fp8": True}), _plan())
    assert decision.on and not decision.rowwise and "per tensor" in decision.reason
    assert decide_fp8(_config({"fp8": True}), _plan(), deepspeed=True).on  # ZeRO-1/2: tried when forced


def test_tensor_scales_when_asked_for(gpu, monkeypatch):
    """speed.fp8_scales=tensor: per-tensor scales although the row-wise kernel runs, and the row-wise one is never
    probed; where the per-tensor kernel fails, the run stops instead of falling back to rows."""
    assert VlmtuneConfig().speed.fp8_scales == "row"
    gpu((9, 0))
    probed = []
    monkeypatch.setattr(fp8_policy, "probe", lambda device, rowwise: probed.append(rowwise))
    decision = decide_fp8(_config({"fp8": True, "fp8_scales": "tensor"}), _plan())
    assert decision.on and not decision.rowwise and "speed.fp8_scales=tensor" in decision.reason
    assert probed == [False]
    gpu((9, 0), rowwise_ok=True, tensorwise_ok=False)
    with pytest.raises(VlmtuneError, match=r"torch._scaled_mm fails on cuda \(no kernel\)"):
        decide_fp8(_config({"fp8": True, "fp8_scales": "tensor"}), _plan())
    with pytest.raises(ValueError, match="fp8_scales"):
        _config({"fp8": True, "fp8_scales": "block"})


def test_apply_speed_builds_per_tensor_scales_when_asked(tiny_model_dir):
    """The fp8 layers follow speed.fp8_scales (CPU scaled matmul): a weight's scale is one number, not one per row."""
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed

    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    base = {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"use_cpu": True}}
    for scales, rowwise in (("row", True), ("tensor", False)):
        config = VlmtuneConfig.model_validate({**base, "speed": {"fp8": True, "fp8_scales": scales}})
        setup = apply_speed(model, config, get_family("qwen2_vl"))
        weights = [m.__dict__["_vlmtune_fp8"] for m in model.modules() if "_vlmtune_fp8" in m.__dict__]
        assert weights and {w.rowwise for w in weights} == {rowwise}
        setup.remove()


@pytest.mark.parametrize(
    ("capability", "plan", "rowwise_ok", "says"),
    [
        ((8, 0), ("cuda", True), True, "compute capability 8.0; FP8 matmuls need 8.9"),
        ((9, 0), ("cuda", False), True, "set hardware.precision=bf16"),
        ((9, 0), ("cuda", True), False, "torch._scaled_mm fails"),
    ],
)
def test_true_that_cannot_run_is_an_error_naming_the_field(gpu, capability, plan, rowwise_ok, says):
    gpu(capability, rowwise_ok=rowwise_ok, tensorwise_ok=rowwise_ok)
    with pytest.raises(VlmtuneError, match="speed.fp8=true cannot run here") as info:
        decide_fp8(_config({"fp8": True}), _plan(*plan))
    assert says in str(info.value) and "speed.fp8=false" in str(info.value)


def test_true_on_the_cpu_uses_torchs_cpu_scaled_matmul():
    decision = decide_fp8(_config({"fp8": True}), _plan("cpu", bf16=False))
    assert decision.on and "cpu" in decision.reason


def test_false_never_probes(monkeypatch):
    monkeypatch.setattr(fp8_policy, "probe", lambda *a: pytest.fail("probed"))
    decision = decide_fp8(_config({"fp8": False}), _plan())
    assert not decision.on and not decision.auto and decision.reason == "speed.fp8=false"


def test_config_refuses_true_where_it_cannot_apply():
    with pytest.raises(ValueError) as info:
        _config(
            {"fp8": True, "fused_lora": False, "compile": True},
            method={"name": "qlora"},
            hardware={"precision": "bf16"},
        )
    message = str(info.value)
    assert "speed.fp8=true applies to method.name=lora only (got qlora" in message
    assert "speed.fp8=true needs speed.fused_lora=true" in message
    assert "speed.compile" not in message  # with compile the FP8 matmuls run in the compiled layers (fp8_compiled.py)
    with pytest.raises(ValueError, match="speed.fp8"):
        _config({"fp8": "sometimes"})
    assert _config({"fp8": True}).speed.fp8 is True
    assert _config({"fp8": True, "compile": True}).speed.compile is True
    decision = decide_fp8(_config({"fp8": True, "compile": True}), _plan("cpu", bf16=False))
    assert decision.on and "compile" not in decision.reason


# --- through apply_speed and the engine ----------------------------------------------------------------------------


def test_apply_speed_logs_the_auto_decision(tiny_model_dir, caplog):
    from vlmtune.families import get_family
    from vlmtune.speed import apply_speed

    model = lora_model(tiny_model_dir("qwen2_vl"), "qwen2_vl")
    base = {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"use_cpu": True}}
    with caplog.at_level(logging.INFO, logger="vlmtune.speed"):
        setup = apply_speed(model, VlmtuneConfig.model_validate(base), get_family("qwen2_vl"))
    assert "fp8" not in setup.active and "no CUDA GPU" in setup.skipped["fp8"]
    assert any("fp8 does not apply: fp8: off (auto): no CUDA GPU" in r.getMessage() for r in caplog.records)
    setup.remove()
    with caplog.at_level(logging.INFO, logger="vlmtune.speed"):
        setup = apply_speed(
            model, VlmtuneConfig.model_validate({**base, "speed": {"fp8": True}}), get_family("qwen2_vl")
        )
    assert {"fused_lora", "fp8"} <= set(setup.active)
    assert any("base layers in FP8" in r.getMessage() for r in caplog.records)
    layers = [m for m in model.modules() if "_vlmtune_fp8" in m.__dict__]
    assert layers
    setup.remove()
    assert not [m for m in model.modules() if "_vlmtune_fp8" in m.__dict__]
    assert all("forward" not in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))


@pytest.mark.slow
def test_tiny_training_run_with_fp8_on_the_cpu(tiny_model_dir, varied_jsonl, tmp_path):
    """speed.fp8=true through the engine on the CPU (PyTorch's CPU scaled matmul): it trains, the start event lists
    fp8, and the losses stay within a few percent of the same run without it."""
    from test_engine_speed import _config

    from vlmtune.train.engine import train

    def run(out: str, fp8: bool):
        config = _config(tiny_model_dir, varied_jsonl, tmp_path / out, {"fp8": fp8})  # test_engine_speed's run
        result = train(config)
        events = [json.loads(line) for line in result.log_path.read_text().splitlines()]
        start = next(e for e in events if e.get("event") == "start")
        return start, [e["loss"] for e in events if "loss" in e]

    start, losses = run("fp8", True)
    plain_start, plain = run("plain", False)
    assert "fp8" in start["speed"]["active"] and "fp8" not in plain_start["speed"]["active"]
    assert len(losses) == len(plain) == 3
    for a, b in zip(losses, plain, strict=True):
        assert abs(a - b) <= 0.02 * abs(b), (losses, plain)


def test_engine_refuses_true_before_loading_weights(monkeypatch, tiny_model_dir, varied_jsonl, tmp_path):
    """speed.fp8=true on a GPU that cannot run it: the run stops with the reason before any weights load."""
    import vlmtune.methods
    from vlmtune.train import engine

    monkeypatch.setattr(
        fp8_policy, "_device_support", lambda device, forced, **kw: (True, "a GPU too old (mocked)")
    )
    monkeypatch.setattr(vlmtune.methods, "get_method", lambda *a, **k: pytest.fail("the model was loaded"))
    config = VlmtuneConfig.model_validate(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))},
            "data": {"train_path": str(varied_jsonl), "check_before_training": False},
            "training": {"max_steps": 1, "batch_size": 1, "report_to": ["none"]},
            "hardware": {"precision": "fp32", "use_cpu": True},
            "speed": {"fp8": True},
        }
    )
    with pytest.raises(VlmtuneError, match=r"speed.fp8=true cannot run here: a GPU too old \(mocked\)"):
        engine.train(config)
