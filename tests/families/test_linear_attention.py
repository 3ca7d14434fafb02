"""flash-linear-attention where it can train, transformers' PyTorch reference where it cannot (fla-core 0.6.0 refuses
its backward on Hopper with Triton >= 3.4.0 and < 3.7.1 unless tilelang takes it), on Qwen3.5's tiny model."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.families import get_family
from vlmtune.families import linear_attention as la

FAMILY = get_family("qwen3_5")
REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def machine(monkeypatch):
    """fla importable, a CUDA GPU of the given capability, the given Triton, tilelang present or not."""

    def make(capability=(9, 0), triton="3.6.0", tilelang=False, fla=True):
        present = {"fla": fla, "tilelang": tilelang}
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if present[name] else None)
                            if name in present else REAL_FIND_SPEC(name, *a))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(la, "_triton_version", lambda: triton)
        monkeypatch.setattr(la, "_fla_installed", lambda: fla)
        monkeypatch.delenv("FLA_TILELANG", raising=False)
        monkeypatch.delenv("FLA_DISABLE_BACKEND_DISPATCH", raising=False)

    return make


@pytest.mark.parametrize(
    ("capability", "triton", "tilelang", "kernel"),
    [
        ((9, 0), "3.6.0", False, "torch"),  # the H100 measured: fla's backward raises
        ((9, 0), "3.4.0", False, "torch"),
        ((9, 0), "3.7.1", False, "fla"),
        ((9, 0), "3.3.1", False, "fla"),
        ((9, 0), "3.6.0", True, "fla"),  # fla's tilelang backend takes the backward
        ((8, 0), "3.6.0", False, "fla"),  # Ampere: the check is Hopper's only
        ((10, 0), "3.6.0", False, "fla"),
    ],
)
def test_fla_can_train_unless_hopper_with_the_broken_triton(machine, capability, triton, tilelang, kernel):
    machine(capability, triton, tilelang)
    chosen = la.linear_attention_kernel("cuda")
    assert chosen.name == kernel and chosen.fallback == (kernel == "torch")
    assert FAMILY.linear_attention_kernel("cuda") == chosen
    if kernel == "torch":
        assert f"Triton {triton}" in chosen.reason and "3.7.1" in chosen.reason and "pip install tilelang" in chosen.reason


def test_tilelang_switched_off_by_fla_env_counts_as_absent(machine, monkeypatch):
    machine((9, 0), "3.6.0", tilelang=True)
    monkeypatch.setenv("FLA_TILELANG", "0")
    assert la.linear_attention_kernel("cuda").name == "torch"


def test_without_fla_or_on_the_cpu_the_reference_runs(machine):
    machine((9, 0), "3.7.1", fla=False)
    missing = la.linear_attention_kernel("cuda")
    assert missing.name == "torch" and not missing.fallback and "not installed" in missing.reason  # transformers' own
    machine((9, 0), "3.7.1", fla=True)
    cpu = la.linear_attention_kernel("cpu")
    assert cpu.name == "torch" and cpu.fallback and "CUDA GPU" in cpu.reason  # fla bound, but Triton needs CUDA
    assert get_family("qwen2_vl").linear_attention_kernel("cuda") is None  # no linear attention


def test_a_folder_named_fla_is_not_flash_linear_attention(tmp_path, monkeypatch):
    """A stray `fla` folder on sys.path imports as a namespace package (transformers finds no kernel in it and runs the
    reference): without an installed fla-core / flash-linear-attention distribution the reference is what runs."""
    (tmp_path / "fla").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.util.find_spec("fla") is not None
    kernel = la.linear_attention_kernel("cuda")
    assert kernel.name == "torch" and not kernel.fallback and "not installed" in kernel.reason


def test_the_estimator_counts_the_kernel_training_will_run(machine):
    from vlmtune.memory.inputs import inputs_from_config, linear_attention_kernel

    config = VlmtuneConfig.model_validate({"model": {"name_or_path": "Qwen/Qwen3.5-9B"}})
    machine((9, 0), "3.6.0")
    assert linear_attention_kernel(True) == "operator"  # the reference, as vlmtune trains it
    assert inputs_from_config(config).linear_attention_kernel == "operator"
    machine((9, 0), "3.7.1")
    assert linear_attention_kernel(True) == "fla"
    machine((9, 0), "3.6.0", tilelang=True)
    assert inputs_from_config(config).linear_attention_kernel == "fla"
    machine((8, 6), "3.6.0")
    assert linear_attention_kernel(True) == "fla"


class _RefusingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")


def _fake_fla_chunk(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """Stands in for fla's chunk_gated_delta_rule on a Hopper GPU with Triton 3.6: a forward (here visibly not the
    reference's: zeros) whose backward raises."""
    out = torch.zeros(*v.shape, dtype=v.dtype, device=v.device) + 0 * v
    return _RefusingBackward.apply(out), None


@pytest.fixture
def fla_bound(monkeypatch):
    """Qwen3.5's modeling module with `torch_chunk_gated_delta_rule` bound to a fake fla by transformers' own
    decorator, as importing it with fla installed does."""
    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

    module_name, _, name = FAMILY.linear_attention_functions[0].partition(":")
    modeling = importlib.import_module(module_name)
    package = types.ModuleType("vlmtune_fake_fla")
    package.chunk_gated_delta_rule = _fake_fla_chunk
    monkeypatch.setitem(sys.modules, "vlmtune_fake_fla", package)
    bound = use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "vlmtune_fake_fla")(
        getattr(modeling, name).__wrapped__)
    monkeypatch.setattr(modeling, name, bound)
    return modeling, name, bound


def test_the_fallback_runs_the_reference_and_restores_fla(tiny_model_dir, fla_bound, monkeypatch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen3_5"))
    ids = torch.arange(5, 40)[None]
    modeling, name, bound = fla_bound
    monkeypatch.setattr(modeling, name, bound.__wrapped__)  # the bare PyTorch reference: the expected output
    reference = model(input_ids=ids, use_cache=False).logits.detach()
    monkeypatch.setattr(modeling, name, bound)
    on_fla = model(input_ids=ids, use_cache=False).logits
    with pytest.raises(RuntimeError, match="Hopper"):
        on_fla.sum().backward()
    model.zero_grad()

    handle = la.reference_kernels(FAMILY.linear_attention_functions)
    assert not isinstance(handle, str)
    try:
        assert getattr(modeling, name) is not bound
        fallback = model(input_ids=ids, use_cache=False).logits
        fallback.sum().backward()  # trains
        x = torch.zeros(1, 4, 2, 8)
        with pytest.raises(ValueError, match="cu_seqlens"):  # packed sequences the reference cannot keep apart
            getattr(modeling, name)(x, x, x, g=torch.zeros(1, 4, 2), beta=torch.ones(1, 4, 2),
                                    cu_seqlens=torch.tensor([0, 2, 4]))
    finally:
        handle.remove()
    assert getattr(modeling, name) is bound
    torch.testing.assert_close(fallback.detach(), reference, rtol=0, atol=0)
    assert not torch.allclose(on_fla.detach(), reference, atol=1e-3)


def test_apply_speed_switches_the_layers_and_says_so(tiny_model_dir, fla_bound, monkeypatch):
    """fla importable on a CPU run (transformers bound it; its Triton kernels need CUDA): apply_speed points the
    DeltaNet layers at the reference for the run, the start event's speed summary says which kernel and why, and
    remove() gives fla back."""
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed

    modeling, name, bound = fla_bound
    monkeypatch.setattr(la, "_fla_installed", lambda: True)
    config = VlmtuneConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir("qwen3_5"))}, "hardware": {"precision": "fp32"}})
    model = get_method(config.method.name).load_and_prepare(config, FAMILY)
    setup = apply_speed(model, config, FAMILY, steps=5000)
    try:
        assert "linear_attention=torch_reference_operator" in setup.active
        assert getattr(modeling, name) is not bound and getattr(modeling, name).__wrapped__ is bound.__wrapped__
        kernels = setup.summary()["kernels"]
        assert "PyTorch reference" in kernels["linear_attention"] and "CUDA GPU" in kernels["linear_attention"]
        model(input_ids=torch.arange(5, 30)[None], use_cache=False).logits.sum().backward()
    finally:
        setup.remove()
    assert getattr(modeling, name) is bound


def test_the_reference_runs_as_one_operator_eager_and_compiled(tiny_model_dir):
    """No fla here: apply_speed points the DeltaNet layers at the reference as one operator (it keeps its inputs for
    backward instead of the chunk loop's intermediates; traced under compile, the loop compiles again for every chunk
    count), says so, trains, and remove() puts transformers' function back; the same with speed.compile=true."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed

    bound = modeling.torch_chunk_gated_delta_rule
    for compile_ in (False, True):
        config = VlmtuneConfig.model_validate({"model": {"name_or_path": str(tiny_model_dir("qwen3_5"))},
                                               "hardware": {"precision": "fp32"}, "speed": {"compile": compile_}})
        model = get_method(config.method.name).load_and_prepare(config, FAMILY)
        setup = apply_speed(model, config, FAMILY, steps=50)
        try:
            assert "linear_attention=torch_reference_operator" in setup.active
            assert ("compile" in setup.active) is compile_
            installed = modeling.torch_chunk_gated_delta_rule
            assert installed is not bound and installed.operator._qualname == "vlmtune::gated_delta_rule"
            if not compile_:  # (compiled: inductor needs a C compiler; the compiled layers' test traces them)
                model(input_ids=torch.arange(5, 90)[None], labels=torch.arange(5, 90)[None],
                      use_cache=False).loss.backward()
                assert any(p.grad is not None for n, p in model.named_parameters() if "linear_attn" in n)
        finally:
            setup.remove()
        assert modeling.torch_chunk_gated_delta_rule is bound
