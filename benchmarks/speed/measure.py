"""Step timing, memory and model FLOPs (MFU) for the speed harness; shared by the plain path and vlmtune's.

FLOP convention (model FLOPs, the same for every variant of a workload, recomputation never counted):
- a matmul with P weights over T tokens: 2PT forward; backward 2PT for the input gradient (every language-model
  weight: adapters sit in every layer) plus 2PT for the weight gradient when the weight trains;
- language-model attention: causal, 2 * S^2 * q_width per layer forward (QK^T and AV over the lower triangle),
  x3 with backward; the LM head over every token (as the usual 6 N T does), tied or not;
- the frozen vision tower: forward only, 2 * P per patch plus full attention 4 * n^2 * d per block over an image's n
  patches (Qwen2.5-VL: windows of 64 patches except its full-attention blocks); the merger 2 * P per merged token
  (x3 when it trains, i.e. full fine-tuning);
- peak: dense bf16 tensor-core FLOP/s of the card (H100 SXM and H200: 989.4 TFLOP/s; H100 PCIe: 756 TFLOP/s).
MFU = model FLOPs per step / step time / peak.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import torch

GIB = 1024**3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the harness trains: the GPU; the CPU only for the smoke test of the harness itself (BENCH_SMOKE=1)."""


def reset_peaks() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_flops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    if "H100" in name and "PCIe" in name:
        return 756e12
    return 989.4e12  # H100 SXM / H200 dense bf16


@functools.cache
def _nvml_handle() -> Any:
    """NVML's handle of this process's GPU, NVML initialised once (nvml_used runs after every step)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(torch.cuda.current_device()))


def nvml_used() -> float | None:
    """Device memory in use (GiB) as nvidia-smi's memory.used reports it: every process's context and allocator
    pools, without the driver's own reservation. NVML's version-1 memory query (what torch.cuda.device_memory_used
    reads) counts that reservation as used: 0.47 GiB on an H100 80GB with driver 580, which put every in-process
    figure of sessions 9-14 that much above the nvidia-smi trace of the same process (benchmarks/RESULTS.md,
    session 14). So: NVML's version-2 query (used excludes the reservation), else the nvidia-smi tool itself."""
    try:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(), version=pynvml.nvmlMemory_v2).used / GIB
    except Exception:  # noqa: BLE001 - no pynvml, no v2 query or no GPU: ask the command line tool
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@dataclass
class StepMeter:
    """Call `step(tokens)` after each optimizer step; the first `warmup` steps are not measured."""

    warmup: int
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    smi: list[float] = field(default_factory=list)
    _last: float | None = None

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def step(self, tokens: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        assert self._last is not None, "start() first"
        self.times.append(now - self._last)
        self.tokens.append(int(tokens))
        used = nvml_used()
        if used is not None:
            self.smi.append(used)
        self._last = time.perf_counter()  # the NVML query is not training time

    def summary(self) -> dict[str, Any]:
        times, tokens = self.times[self.warmup :], self.tokens[self.warmup :]
        out: dict[str, Any] = {
            "steps_measured": len(times),
            "warmup_steps": min(self.warmup, len(self.times)),
        }
        if times:
            out["tokens_per_second"] = round(sum(tokens) / sum(times), 1)
            out["step_seconds_median"] = round(statistics.median(times), 4)
            out["tokens_per_step"] = round(sum(tokens) / len(tokens), 1)
            # A stall (an epoch boundary restarting the loader's workers, an allocator retry) moves the mean but
            # not the median: both are reported, and the steps slower than twice the median are counted.
            median = statistics.median(times)
            out["tokens_per_second_median_step"] = round(out["tokens_per_step"] / median, 1)
            out["slow_steps"] = sum(t > 2 * median for t in times)
            out["step_seconds_max"] = round(max(times), 4)
            out["train_seconds_all_steps"] = round(sum(self.times), 2)  # warm-up (compilation) included
        if torch.cuda.is_available():
            out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        if self.smi:
            out["smi_in_process_gib"] = round(max(self.smi), 3)
        return out


# ---- model FLOPs ----


def _text(config: Any) -> Any:
    return getattr(config, "text_config", config)


def llm_flops_per_sample(config: Any, seq: int, method: str, lora_rank: int = 16) -> float:
    t = _text(config)
    h, i, layers, vocab = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * i)
    head = vocab * h
    attention = layers * 2 * seq * seq * q * 3
    if method == "full":
        return 6 * (linear + head) * seq + attention
    lora = layers * lora_rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    return 4 * (linear + head) * seq + 6 * lora * seq + attention


def vision_flops_per_image(config: Any, side: int, method: str) -> float:
    v = config.vision_config
    d = getattr(v, "embed_dim", None) or v.hidden_size
    patch, merge = v.patch_size, v.spatial_merge_size
    n = (side // patch) ** 2
    depth = v.depth
    mlp = 8 * d * d if hasattr(v, "mlp_ratio") else 3 * d * v.intermediate_size
    blocks = depth * 2 * (4 * d * d + mlp) * n
    window = getattr(v, "window_size", None)
    full = set(getattr(v, "fullatt_block_indexes", []) or [])
    group = (window // patch) ** 2 if window else n
    attention = sum(4 * n * (n if (not window or b in full) else min(group, n)) * d for b in range(depth))
    out_hidden = getattr(v, "out_hidden_size", None) or getattr(v, "hidden_size", d)
    merged = n // (merge * merge)
    wide = d * merge * merge
    merger = 2 * (wide * wide + wide * out_hidden) * merged * (3 if method == "full" else 1)
    return blocks + attention + merger


def sample_shape(config: Any, image_side: int, text_tokens: int) -> tuple[int, int]:
    """(language-model tokens, image tokens) of one sample."""
    v = config.vision_config
    image_tokens = (image_side // (v.patch_size * v.spatial_merge_size)) ** 2
    return image_tokens + text_tokens, image_tokens


def flops_per_sample(config: Any, method: str, image_side: int, text_tokens: int) -> float:
    seq, _ = sample_shape(config, image_side, text_tokens)
    return llm_flops_per_sample(config, seq, method) + vision_flops_per_image(config, image_side, method)


def mfu(config: Any, method: str, image_side: int, text_tokens: int, tokens_per_second: float) -> float:
    """Model FLOP utilisation of a fixed-shape workload running at `tokens_per_second` (language-model tokens)."""
    seq, _ = sample_shape(config, image_side, text_tokens)
    return tokens_per_second / seq * flops_per_sample(config, method, image_side, text_tokens) / peak_flops()


# ---- same weights in every path ----


def init_fingerprint(model: Any) -> dict[str, float]:
    """Sums (float64) of the first 2^20 values of the first embedding table and of the first LoRA A matrix, before
    the first step (a slice: a float64 copy of a whole 152k-vocab table would sit in the allocator's cache and in
    the reserved peak): equal values across the paths of a workload say they start from the same weights. The
    losses of step 1 compare the base weights and the first batch (LoRA B starts at 0: neither A nor dropout moves
    them)."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = "embed" if "embed_tokens" in name else "lora_A" if "lora_A" in name else None
            if key and key not in out and param.is_floating_point():
                out[key] = round(param.detach().reshape(-1)[: 1 << 20].double().sum().item(), 6)
            if len(out) == 2:
                break
    return out
