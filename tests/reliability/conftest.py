"""The fault-injection suite: every test carries `@pytest.mark.reliability("KIND")` and the run ends with one count
per kind, e.g. "kills survived 24/24, damaged checkpoints handled 9/9, malformed inputs refused cleanly 62/62".

A test may also count several cases of its own (one parametrized case each is clearest); `record_cases(kind, ok,
total)` adds to the tally for tests that loop over many inputs. Run the whole suite, slow cases included, with
`bash scripts/reliability.sh`.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

KIND_LABELS = {
    "kills": "kills survived",
    "damage": "damaged checkpoints handled",
    "overwrite": "existing folders left intact",
    "disk": "full-disk cases reported cleanly",
    "data": "malformed data files refused cleanly",
    "config": "malformed configs refused cleanly",
    "settings": "impossible settings refused",
    "pickle": "crafted pickles that ran no code",
    "memory": "bounded-memory checks",
    "ignored": "ignored fields made loud",
}

_tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
_extra: dict[str, list[int]] = defaultdict(lambda: [0, 0])
_notes: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability(kind): a fault-injection case counted in the suite's summary")


@pytest.fixture
def record_cases():
    """record_cases(kind, ok, total): count `total` cases of `kind`, `ok` of them handled well."""

    def add(kind: str, ok: int, total: int) -> None:
        _extra[kind][0] += ok
        _extra[kind][1] += total

    return add


@pytest.fixture
def reliability_note():
    """reliability_note("peak RSS <= 310 MB"): a line printed under the counts."""
    return _notes.append


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or report.when != "call" and not (report.when == "setup" and report.failed):
        return
    if report.skipped:
        return
    kind = marker.args[0]
    _tally[kind][1] += 1
    _tally[kind][0] += int(report.passed)


def pytest_terminal_summary(terminalreporter) -> None:
    kinds = sorted(set(_tally) | set(_extra), key=lambda k: list(KIND_LABELS).index(k) if k in KIND_LABELS else 99)
    if not kinds:
        return
    parts = []
    for kind in kinds:
        ok = _tally[kind][0] + _extra[kind][0]
        total = _tally[kind][1] + _extra[kind][1]
        parts.append(f"{KIND_LABELS.get(kind, kind)} {ok}/{total}")
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(", ".join(parts))
    for note in _notes:
        terminalreporter.write_line(note)
