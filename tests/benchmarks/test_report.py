"""The speed report's repeated rounds (BENCH_REPEATS): each variant is compared with the reference of its own round."""

from __future__ import annotations

import json

from benchmarks.speed.report import _spread, paired_ratios, print_report


def _row(variant: str, round_: int, speed: float, workload: str = "W5") -> dict:
    return {"workload": workload, "variant": variant, "round": round_, "tokens_per_second": speed,
            "tokens_per_second_median_step": speed, "path": "vlmtune"}


def test_ratios_pair_runs_of_the_same_round():
    # the machine is 20% slower in round 1: paired ratios stay 2.0, unpaired ones would not
    rows = [_row("vlmtune_padded", 0, 5000), _row("vlmtune_packed", 0, 10000),
            _row("vlmtune_padded", 1, 4000), _row("vlmtune_packed", 1, 8000),
            _row("vlmtune_padded", 2, 5000), _row("vlmtune_packed", 2, 9000),
            _row("vlmtune_packed", 3, 9999)]  # a round whose reference did not run is left out
    ratios = paired_ratios(rows, "W5", "vlmtune_padded")
    assert ratios == {"vlmtune_packed": [2.0, 2.0, 1.8]}
    assert _spread(ratios["vlmtune_packed"]) == "median 2.00x, range 1.80-2.00x over 3 rounds"
    assert _spread([1.0, 3.0]) == "median 2.00x, range 1.00-3.00x over 2 rounds"


def test_report_prints_the_spread_only_for_repeated_rounds(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    rows = [_row("vlmtune_padded", 0, 5000), _row("vlmtune_packed", 0, 10000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_report(path)
    assert "repeated rounds" not in capsys.readouterr().out
    rows += [_row("vlmtune_padded", 1, 4000), _row("vlmtune_packed", 1, 7000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_report(path)
    out = capsys.readouterr().out
    assert "over vlmtune_padded of the same round" in out
    assert "- vlmtune_packed: median 1.88x, range 1.75-2.00x over 2 rounds" in out
