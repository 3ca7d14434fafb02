"""cuDNN's SDPA kernels are switched off for a GPU run that attends through SDPA, restored afterwards, and left
alone (with the reason) where they do not matter."""

from __future__ import annotations

import pytest
import torch

from vlmtune.config.schema import VlmtuneConfig
from vlmtune.speed.attention_backend import cudnn_attention_off


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


def test_default_is_off_and_the_field_turns_it_back_on():
    assert VlmtuneConfig().speed.sdpa_cudnn is False
    assert VlmtuneConfig.model_validate({"speed": {"sdpa_cudnn": True}}).speed.sdpa_cudnn is True
