"""The speed harness's profile report counts only the GPU's own work as busy, not the phase marks that the profiler
mirrors onto the GPU timeline."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.speed.profiling import _overlap, gpu_intervals, kernel_breakdown, kernel_category

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(name: str, start: float, end: float, device=CUDA, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end))


def test_phase_marks_on_the_gpu_timeline_are_not_kernels():
    events = [
        _event("phase: forward", 0, 1000, annotation=True),  # as Kineto reports a record_function on the GPU
        _event("phase: backward", 1000, 2000),  # an older torch without the flag: known by its name
        _event("ProfilerStep#3", 0, 2000, annotation=True),
        _event("ampere_sgemm", 100, 300),
        _event("Memcpy DtoH", 1500, 1600),
        _event("aten::mm", 0, 50, device=CPU),
    ]
    kernels = gpu_intervals(events)
    assert kernels == [(100, 300), (1500, 1600)]
    assert _overlap(kernels, 0, 2000) == 300  # 15% busy, not 100%


def test_kernel_time_is_broken_down_by_kind_per_step():
    events = [
        _event("phase: forward", 0, 4000, annotation=True),
        _event("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", 0, 1000),
        _event("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 1000, 1500),
        _event("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", 1500, 1800),
        _event("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", 1800, 1900),
        _event("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
               1900, 2000),
        _event("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 2000, 2100),
        _event("Memcpy HtoD (Pinned -> Device)", 2100, 2150),
        _event("aten::mm", 0, 50, device=CPU),
    ]
    assert kernel_category(events[1].name).startswith("matmul")
    assert kernel_category("some_unknown_kernel") == "other"
    # the memory-efficient SDPA kernels are CUTLASS kernels, and attention (session 18's W3 profile counted them as
    # matmuls)
    assert kernel_category("fmha_cutlassB_bf16_aligned_128x128_k128_sm80(PyTorchMemEffAttention::AttentionBackward"
                           "Kernel<cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, true, 128, 128, 128, false>)"
                           ).startswith("attention")
    assert kernel_category("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_32x3_tn_align8>"
                           ).startswith("matmul")
    rows = {kind.split(" ")[0]: (ms, n) for kind, ms, n in kernel_breakdown(events, steps=2)}
    assert rows == {"matmul": (0.75, 1.0), "attention": (0.15, 0.5), "inductor": (0.05, 0.5),
                    "elementwise": (0.05, 0.5), "optimizer": (0.05, 0.5), "copies": (0.025, 0.5)}
    assert list(rows)[0] == "matmul"  # largest first
