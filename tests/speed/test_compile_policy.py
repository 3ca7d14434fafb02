"""speed.compile=auto: which runs compile, why the others stay eager, and what auto installs around compilation."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.speed import compile_policy
from vlmtune.speed.compile_policy import MIN_STEPS, decide_compile, optimizer_steps


def _config(**speed) -> VlmtuneConfig:
    return VlmtuneConfig.model_validate({"speed": speed})


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU of the given compute capability with Triton installed, as far as the policy can tell."""

    def make(capability=(9, 0), triton=True, compiler=True):
        monkeypatch.setattr(compile_policy, "_c_compiler", lambda: "/usr/bin/cc" if compiler else None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
        real = compile_policy.importlib.util.find_spec
        monkeypatch.setattr(
            compile_policy.importlib.util,
            "find_spec",
            lambda name, *a: (object() if triton else None) if name == "triton" else real(name, *a),
        )

    return make


def test_auto_is_the_default_and_reads_from_yaml_values():
    assert VlmtuneConfig().speed.compile == "auto"
    assert _config(compile=True).speed.compile is True
    assert _config(compile=False).speed.compile is False
    with pytest.raises(ValueError):
        _config(compile="sometimes")


def test_auto_compiles_a_long_single_gpu_run(gpu):
    gpu((9, 0))
    decision = decide_compile(_config(), "cuda:0", world=1, steps=MIN_STEPS)
    assert decision.on and decision.auto
    assert "Test GPU" in decision.reason and f"{MIN_STEPS} steps" in decision.reason
    assert decide_compile(_config(), "cuda", steps=None).on  # step count unknown: taken as long


@pytest.mark.parametrize(
    ("device", "capability", "triton", "world", "steps", "deepspeed", "says"),
    [
        ("cpu", (9, 0), True, 1, 1000, False, "no CUDA GPU"),
        ("cuda", (6, 1), True, 1, 1000, False, "compute capability 6.1"),
        ("cuda", (8, 6), False, 1, 1000, False, "Triton is not installed"),
        ("cuda", (9, 0), True, 2, 1000, False, "several processes"),
        ("cuda", (9, 0), True, 1, 1000, True, "DeepSpeed"),
        ("cuda", (9, 0), True, 1, MIN_STEPS - 1, False, f"{MIN_STEPS - 1} optimizer steps is too short"),
    ],
)
def test_auto_stays_eager_and_says_why(gpu, device, capability, triton, world, steps, deepspeed, says):
    gpu(capability, triton)
    decision = decide_compile(_config(), device, world=world, steps=steps, deepspeed=deepspeed)
    assert not decision.on and decision.auto
    assert says in decision.reason


def test_auto_stays_eager_without_a_c_compiler(gpu):
    gpu((9, 0), compiler=False)
    decision = decide_compile(_config(), "cuda", steps=5000)
    assert not decision.on and "no C compiler" in decision.reason


def test_c_compiler_lookup(monkeypatch, tmp_path):
    """$CC first, else cc / gcc / clang on PATH."""
    tool = tmp_path / "mycc"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CC", "mycc")
    assert compile_policy._c_compiler() == str(tool)
    monkeypatch.delenv("CC")
    assert compile_policy._c_compiler() is None  # no cc, gcc or clang in tmp_path
    (tmp_path / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "gcc").chmod(0o755)
    assert compile_policy._c_compiler() == str(tmp_path / "gcc")


def test_explicit_settings_override_the_policy(gpu):
    gpu((6, 0), triton=False)
    assert decide_compile(_config(compile=True), "cpu", world=4, steps=3).on
    assert not decide_compile(_config(compile=False), "cuda", steps=10_000).on
    assert not decide_compile(_config(compile=True), "cpu").auto


def test_optimizer_steps_counts_epochs_batches_accumulation_and_processes():
    def config(**training):
        return VlmtuneConfig.model_validate({"training": training})

    assert optimizer_steps(config(max_steps=37, epochs=5), samples=10_000, world=8) == 37
    assert optimizer_steps(config(epochs=2, batch_size=4, gradient_accumulation_steps=2), 1000, 1) == 250
    assert optimizer_steps(config(epochs=2, batch_size=4, gradient_accumulation_steps=2), 1000, 2) == 126  # 63 x 2
    assert optimizer_steps(config(epochs=0.5, batch_size=3), 10, 1) == 2  # ceil(10 / 3) = 4 per epoch
    assert optimizer_steps(config(batch_size="auto"), 7, 1) == 7  # before the batch is resolved: 1 per step


def test_reduce_overhead_with_checkpointing_is_refused_under_auto_too():
    with pytest.raises(ValueError, match="reduce-overhead"):
        VlmtuneConfig.model_validate(
            {"speed": {"compile_mode": "reduce-overhead"}, "hardware": {"gradient_checkpointing": True}}
        )
    VlmtuneConfig.model_validate(  # compile off: the mode is not used
        {"speed": {"compile": False, "compile_mode": "reduce-overhead"}, "hardware": {"gradient_checkpointing": True}}
    )


def test_apply_speed_under_auto(monkeypatch, tiny_model_dir):
    """On the CPU auto stays eager and the run's speed summary says why; where auto compiles, every decoder layer is
    compiled and compiler failures fall back to eager until the setup is removed (torch's setting restored)."""
    import torch._dynamo

    from vlmtune.families import get_family
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed
    from vlmtune.speed.loss_hook import unwrap_peft

    config = VlmtuneConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))}, "hardware": {"precision": "fp32"}}
    )
    family = get_family("qwen2_vl")
    model = get_method(config.method.name).load_and_prepare(config, family)

    eager = apply_speed(model, config, family, steps=5000)
    assert "compile" not in eager.active and "fused_lora" in eager.active
    assert "no CUDA GPU" in eager.summary()["skipped"]["compile"]
    eager.remove()

    monkeypatch.setattr(compile_policy, "_auto_refusal", lambda *args: None)
    monkeypatch.setattr(compile_policy, "_gpu_name", lambda device: "a GPU")
    before = torch._dynamo.config.suppress_errors
    compiled = apply_speed(model, config, family, steps=5000)
    try:
        assert "compile" in compiled.active and "compile" not in compiled.skipped
        assert "fused_lora" in compiled.active  # on the eager first layer (the compiled ones run PEFT's modules)
        layers = unwrap_peft(model).get_submodule(family.language_layers_prefix)
        # every layer but the first, whose input alone does not require grad here (dynamo would compile it apart)
        assert layers[0]._compiled_call_impl is None
        assert all(layer._compiled_call_impl is not None for layer in layers[1:])
        assert torch._dynamo.config.suppress_errors is True
    finally:
        compiled.remove()
    assert torch._dynamo.config.suppress_errors is before
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_auto_stays_eager_close_to_the_gpus_memory(gpu):
    """A run whose estimate is within the margin of the GPU's memory stays eager under auto (compiling added up to
    0.8 GiB of reserved memory on batches of varying shape); true still compiles."""
    from types import SimpleNamespace

    from vlmtune.train.preflight import PreflightResult

    def memory_room(breakdown, card) -> str | None:
        return PreflightResult(VlmtuneConfig(), breakdown, card).little_room

    gib = 1024**3
    gpu((8, 6))
    breakdown = SimpleNamespace(peak_reserved=int(7.4 * gib))
    card = SimpleNamespace(available=8 * gib)
    room = memory_room(breakdown, card)
    assert room == "the memory estimate (7.40 GiB reserved) is within 10% of the 8.00 GiB the GPU has for this run"
    assert memory_room(SimpleNamespace(peak_reserved=int(7.1 * gib)), card) is None
    assert memory_room(None, card) is None and memory_room(breakdown, None) is None
    decision = decide_compile(_config(), "cuda", steps=5000, tight_memory=room)
    assert not decision.on and "within 10%" in decision.reason and "0.8 GiB" in decision.reason
    assert decide_compile(_config(compile=True), "cuda", steps=5000, tight_memory=room).on


def test_auto_stays_eager_where_packed_rows_run_layers_per_sample(gpu):
    """Qwen3.5's DeltaNet layers run once per sample of a packed row (speed/span_layers.py): auto does not compile
    such a run, says why, and speed.compile=true still forces it; without packing the layers run whole."""
    gpu((9, 0))
    packed = decide_compile(_config(packing=True), "cuda", steps=MIN_STEPS, span_layers=("linear_attn",))
    assert not packed.on and packed.auto and "linear_attn layers once per sample" in packed.reason
    assert decide_compile(_config(packing=False), "cuda", steps=MIN_STEPS, span_layers=("linear_attn",)).on
    assert decide_compile(_config(packing=True), "cuda", steps=MIN_STEPS).on  # a family without such layers
    assert decide_compile(_config(packing=True, compile=True), "cuda", span_layers=("linear_attn",)).on


def test_auto_stays_eager_where_linear_attention_runs_the_pytorch_reference(gpu, monkeypatch):
    """Qwen3.5's DeltaNet layers on transformers' PyTorch reference (no fla here, or fla refusing the GPU's Triton):
    compiling its loop over 64-token chunks took 87 s for the first step and had no second 200 s later (H100, 9B
    LoRA; eager 1.1 s/step), so auto stays eager and says why; true still compiles; fla that trains compiles."""
    import importlib.util

    from vlmtune.families import get_family, linear_attention

    gpu((9, 0))
    family = get_family("qwen3_5")
    real = importlib.util.find_spec
    for fla, triton in ((False, "3.7.1"), (True, "3.6.0")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, fla=fla: (object() if fla else None)
                            if name == "fla" else object() if name == "triton" else real(name, *a))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(linear_attention, "_triton_version", lambda triton=triton: triton)
        monkeypatch.setattr(linear_attention, "_fla_installed", lambda fla=fla: fla)
        refusal = family.compile_refusal("cuda")
        eager = decide_compile(_config(), "cuda", steps=MIN_STEPS, layer_refusal=refusal)
        assert not eager.on and eager.auto
        assert "PyTorch reference" in eager.reason and "one operator" in eager.reason and "1,450 LoRA" in eager.reason
        assert ("not installed" if not fla else "Triton 3.6.0") in eager.reason
        assert decide_compile(_config(compile=True), "cuda", steps=MIN_STEPS, layer_refusal=refusal).on
    monkeypatch.setattr(linear_attention, "_triton_version", lambda: "3.7.1")  # fla installed and able to train
    assert family.compile_refusal("cuda") is None
    assert decide_compile(_config(), "cuda", steps=MIN_STEPS, layer_refusal=family.compile_refusal("cuda")).on
    assert get_family("qwen2_vl").compile_refusal("cuda") is None


def test_apply_speed_hands_auto_the_familys_refusal(tiny_model_dir, monkeypatch):
    """apply_speed asks the family (FamilyDescriptor.compile_refusal) on the run's device: Qwen3.5 without fla stays
    eager where auto would compile otherwise, the start event's summary says why and which kernel the layers run."""
    from vlmtune.families import get_family
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed

    monkeypatch.setattr(compile_policy, "_auto_refusal", lambda *args: None)
    monkeypatch.setattr(compile_policy, "_gpu_name", lambda device: "a GPU")
    family = get_family("qwen3_5")
    config = VlmtuneConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir("qwen3_5"))}, "hardware": {"precision": "fp32"}}
    )
    model = get_method(config.method.name).load_and_prepare(config, family)
    setup = apply_speed(model, config, family, steps=5000)
    try:
        summary = setup.summary()
        assert "compile" not in setup.active and "1,450 LoRA" in summary["skipped"]["compile"]
        assert "PyTorch reference" in summary["kernels"]["linear_attention"]
    finally:
        setup.remove()
