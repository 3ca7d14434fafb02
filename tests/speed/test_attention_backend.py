"""cuDNN's SDPA kernels are switched off for a GPU run that attends through SDPA, restored afterwards, and left
alone (with the reason) where they do not matter."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.speed.attention_backend import cudnn_attention_off, keeps_cudnn


@pytest.fixture
def cudnn_on():
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(was)


def test_off_for_the_run_and_restored(cudnn_on):
    handle = cudnn_attention_off("sdpa", "cuda")
    assert not isinstance(handle, str)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    handle.remove()
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize(
    ("implementation", "device", "reason"),
    [("eager", "cuda", "does not go through SDPA"), ("flash_attention_2", "cuda", "does not go through SDPA"),
     ("sdpa", "cpu", "runs on the CPU")],
)
def test_left_alone_where_it_does_not_apply(cudnn_on, implementation, device, reason):
    result = cudnn_attention_off(implementation, device)
    assert isinstance(result, str) and reason in result
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_user_who_turned_it_off_keeps_it_off(cudnn_on):
    torch.backends.cuda.enable_cudnn_sdp(False)
    assert "already off" in cudnn_attention_off("sdpa", "cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_default_is_auto_and_the_field_takes_true_and_false():
    assert VlmtuneConfig().speed.sdpa_cudnn == "auto"
    assert VlmtuneConfig.model_validate({"speed": {"sdpa_cudnn": True}}).speed.sdpa_cudnn is True
    assert VlmtuneConfig.model_validate({"speed": {"sdpa_cudnn": False}}).speed.sdpa_cudnn is False


def test_a_kept_reason_leaves_it_on(cudnn_on):
    assert cudnn_attention_off("sdpa", "cuda", "kept for a test") == "kept for a test"
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_kept_only_for_a_masked_language_model_with_a_fixed_resolution_tower():
    """Gemma 3 masks every batch (bidirectional image blocks) and sees every image at 896 px: SDPA can run no flash
    kernel there, so cuDNN stays on. The Qwen families attend unmasked on unpadded batches, with images of any size."""
    from types import SimpleNamespace

    from vlmtune.families import get_family

    gemma = get_family("gemma3")
    reason = keeps_cudnn(gemma, SimpleNamespace(head_dim=256, num_attention_heads=16, hidden_size=3840))
    assert reason is not None and "head_dim 256" in reason and "gemma3" in reason
    assert keeps_cudnn(get_family("qwen2_vl"), SimpleNamespace(num_attention_heads=12, hidden_size=1536)) is None

    class DynamicMasked(type(gemma)):
        dynamic_resolution = True

    assert keeps_cudnn(DynamicMasked(), SimpleNamespace(head_dim=256)) is None


@pytest.mark.parametrize(("family_name", "setting", "off"),
                         [("gemma3", "auto", False), ("gemma3", False, True), ("qwen2_vl", "auto", True)])
def test_apply_speed_on_a_gpu_run(monkeypatch, cudnn_on, tiny_model_dir, family_name, setting, off):
    """What apply_speed does with cuDNN on a GPU run (the device mocked): Gemma 3 under auto keeps it on (before
    2026-12-07 it was switched off, and F5 attended with the memory-efficient kernel at head_dim 256)."""
    from vlmtune.families import get_family
    from vlmtune.methods import base, get_method
    from vlmtune.speed import CUDNN_PAD_MULTIPLE, apply_speed, batching, compile_policy

    config = VlmtuneConfig.model_validate({
        "model": {"name_or_path": str(tiny_model_dir(family_name))}, "hardware": {"precision": "fp32"},
        "speed": {"sdpa_cudnn": setting, "compile": False, "fp8": False, "chunked_loss": False,
                  "frozen_vision_no_grad": False, "lora_bf16_compute": False, "fused_lora": False,
                  "varlen_attention": False},
    })
    family = get_family(family_name)
    model = get_method(config.method.name).load_and_prepare(config, family)
    monkeypatch.setattr(base, "resolve_precision",
                        lambda config: base.PrecisionPlan("cuda", torch.float32, False, False, "test: a GPU"))
    monkeypatch.setattr(compile_policy, "_auto_refusal", lambda *args: "test: no compile")
    collator, _, _ = batching(config, 0, model, [], None, family)
    # where cuDNN attends, batch lengths are rounded up to 16 tokens: cuDNN plans every new length anew
    assert collator.pad_to_multiple_of == (None if off else CUDNN_PAD_MULTIPLE)
    setup = apply_speed(model, config, family)
    try:
        assert ("sdpa_without_cudnn" in setup.active) is off
        assert torch.backends.cuda.cudnn_sdp_enabled() is not off
        if not off:
            assert "keeps cuDNN attention on" in setup.skipped["sdpa_without_cudnn"]
    finally:
        setup.remove()
    assert torch.backends.cuda.cudnn_sdp_enabled()
