"""Axis ticks people can read, shared by the loss curve and the memory picture: round values (1, 2, 2.5 or 5 times a
power of ten) covering a range, and labels printed without float noise."""

from __future__ import annotations

import math


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values inside [lo, hi], about `count` of them (at least two unless the range is a point)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError(f"ticks need finite bounds, got {lo}, {hi}")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    steps = [m * power for m in (0.5, 1, 2, 2.5, 5, 10)]
    best: list[float] = []
    for step in reversed(steps):  # the step whose tick count is nearest `count` (the larger step on a tie)
        first = math.ceil(lo / step - 1e-9) * step
        ticks = [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]
        if len(ticks) >= 2 and (not best or abs(len(ticks) - count) < abs(len(best) - count)):
            best = ticks
    return best


def tick_label(value: float, ticks: list[float]) -> str:
    """The tick printed with as many decimals as the spacing needs (0.25 -> "0.25", 200 -> "200")."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else abs(value) or 1.0
    exponent = math.floor(math.log10(step) + 1e-9)
    quarter = round(step / 10**exponent, 6) == 2.5  # 0.25, 2.5, 25: one digit more than the power of ten
    return f"{value:.{max(0, -exponent + quarter)}f}"


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's debiased exponential moving average: the first points are not pulled towards zero."""
    out, mean = [], 0.0
    for n, value in enumerate(values, 1):
        mean = weight * mean + (1 - weight) * value
        out.append(mean / (1 - weight**n))
    return out
