"""benchmarks/gpu_next.sh names only workloads and variants the speed harness has: a misspelt variant would cost a
scarce GPU call (the suite skips names it does not know)."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.speed.workloads import WORKLOADS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_next.sh"


def _steps() -> dict[str, str]:
    text = SCRIPT.read_text().replace("\\\n", "")
    body = text[text.index("case $step in"):]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+)\)(.*?);;", body, re.S | re.M)}


def test_every_step_names_known_workloads_and_variants():
    steps = _steps()
    assert {"u1v", "mfuv", "u3v", "u3c", "mfu"} <= steps.keys()
    checked = 0
    for step, body in steps.items():
        only = re.search(r"ONLY=([\w,]+)", body)
        names = re.search(r"BENCH_VARIANTS=([\w,]+)", body)
        profiles = re.findall(r"(\w+):(\w+)", (re.search(r'PROFILE="([^"]*)"', body) or [None, ""])[1])
        workloads = only.group(1).split(",") if only else []
        for work in workloads:
            assert work in WORKLOADS, (step, work)
            known = {v.name for v in WORKLOADS[work].variants}
            for name in names.group(1).split(",") if names else []:
                assert name in known, (step, work, name)
                checked += 1
        for work, name in profiles:
            assert name in {v.name for v in WORKLOADS[work].variants}, (step, work, name)
            checked += 1
    assert checked > 50
