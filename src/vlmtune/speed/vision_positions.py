"""The Qwen vision towers' index tensors made on the CPU, once per image grid (`speed.vision_positions_on_cpu`).

Why: before its first block, a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 vision tower turns `grid_thw` (images x
(t, h, w) patches) into its rotary position ids, its attention boundaries (`cu_seqlens`, `max_seqlen`) and, on
Qwen2.5-VL, its window order (`window_index`, `cu_window_seqlens`, `max_window_seqlen`). transformers computes them
on the GPU's timeline at every forward: Python loops over the images with `grid_thw.tolist()`, `.item()` and small
kernels per image, and Qwen2.5-VL's window order is built on the CPU and copied in at each of its four uses. On the
GPU each of those is a host-device sync that drains the queue. Measured on an H100 (W3: Qwen2.5-VL-7B, 4 images of
448 px a step, eager, no checkpointing; benchmarks/RESULTS.md session 19): the frozen tower's forward took 97 ms of
host time with 27 blocking syncs for about 8 ms of matmul work.

What this does: a forward pre-hook on the tower reads the grid once (one sync), computes the same tensors with
transformers' own functions (`transformers.vision_utils`) on a CPU copy of the grid, moves them to the GPU, and hands
them to the tower through the keyword arguments those functions take precomputed values from (transformers >= 5.17:
each `get_vision_*` pops its value from the tower's kwargs when present). The result is cached per distinct grid
(a data set of equal-sized images hits it at every step). Only integer tensors and lengths are made here, so the
tower's numbers do not change by a bit; Qwen3-VL's interpolation weights (floating point) stay on the GPU.

Which towers: a module under the family's vision prefixes whose `forward` calls these functions (read from its code
object, so an older transformers without them is simply left alone), with the calls the Qwen towers make.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

CACHE_SIZE = 64
"""Distinct image grids kept (a few KB each): varied image sizes miss, and cost what the tower did without this."""

_NAMES = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index")


def _calls(module: nn.Module) -> frozenset[str]:
    """The `get_vision_*` helpers the module's forward calls (empty for anything else)."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return frozenset(n for n in _NAMES if code is not None and n in code.co_names)


def _grid(args: tuple, kwargs: dict) -> torch.Tensor | None:
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    return grid if isinstance(grid, torch.Tensor) and grid.dim() == 2 and grid.shape[-1] == 3 else None


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t))


class VisionPositionsOnCpu:
    """Pre-hooks on the given towers; `hits` / `misses` count grids found in / added to the cache."""

    def __init__(self, towers: list[tuple[str, nn.Module, frozenset[str]]]):
        self.names = [name for name, _, _ in towers]
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._handles = [
            tower.register_forward_pre_hook(self._hook(calls), with_kwargs=True) for _, tower, calls in towers
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._cache.clear()

    def _hook(self, calls: frozenset[str]) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            grid = _grid(args, kwargs)
            if grid is None or grid.device.type == "meta" or torch.compiler.is_compiling() or _is_fake(grid):
                return None  # no values to read: the tower computes them as it would
            rows = tuple(tuple(int(v) for v in row) for row in grid.tolist())  # the one sync
            key = (id(module), rows, grid.dtype, str(grid.device))
            values = self._cache.get(key)
            if values is None:
                self.misses += 1
                values = _compute(module, calls, torch.tensor(rows, dtype=grid.dtype), grid.device)
                self._cache[key] = values
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self.hits += 1
                self._cache.move_to_end(key)
            # the tower's own kwargs win (a caller that precomputed them); the functions pop what they take
            return args, {**values, **kwargs}

        return hook


def _compute(tower: nn.Module, calls: frozenset[str], grid: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """What the tower's forward would compute from `grid` (on the CPU), as the kwargs it takes them from."""
    from transformers import vision_utils
    from transformers.utils.generic import get_max_seqlen

    out: dict[str, Any] = {}
    if "get_vision_position_ids" in calls:
        out["position_ids"] = vision_utils.get_vision_position_ids(grid, tower.spatial_merge_size)
    if "get_vision_attention_seqlens" in calls:
        out["cu_seqlens"], out["max_seqlen"] = vision_utils.get_vision_attention_seqlens(grid, tower.config)
    if "get_vision_window_index" in calls:
        out["window_index"], out["cu_window_seqlens"] = vision_utils.get_vision_window_index(
            grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
            patch_size=tower.patch_size)
        out["max_window_seqlen"] = get_max_seqlen(out["cu_window_seqlens"], tower.config)
    pinned = device.type == "cuda"
    moved: dict[str, Any] = {}
    for key, value in out.items():
        if value is None:  # max_seqlen where the attention takes none: the tower computes None itself
            continue
        if isinstance(value, torch.Tensor):
            value = (value.pin_memory() if pinned else value).to(device, non_blocking=pinned)
        moved[key] = value
    return moved


def vision_positions_on_cpu(hf_model: nn.Module, vision_prefixes: tuple[str, ...]) -> VisionPositionsOnCpu | str:
    """Install the pre-hooks on the model's Qwen-style vision towers, or say why there are none."""
    try:
        import transformers.vision_utils  # noqa: F401  (transformers >= 5.17)
    except ImportError:
        import transformers

        return f"transformers {transformers.__version__} has no vision_utils (its towers take no precomputed indices)"
    towers: list[tuple[str, nn.Module, frozenset[str]]] = []
    for prefix in vision_prefixes:
        try:
            module = hf_model.get_submodule(prefix)
        except AttributeError:
            continue
        for name, sub in module.named_modules(prefix=prefix):
            calls = _calls(sub)
            if calls and not any(name.startswith(n + ".") for n, _, _ in towers):
                towers.append((name, sub, calls))
    if not towers:
        return "this family's vision tower computes no grid indices that transformers lets a caller precompute"
    return VisionPositionsOnCpu(towers)
