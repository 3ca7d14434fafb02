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


def test_target_lines_read_the_median_step():
    """A compiled variant whose mean holds its compilation (1,485 tokens/s) but whose median step is fast (15,887)
    is judged by the median: the verdict lines would otherwise say 0.12x for a 1.27x run (session 6)."""
    from benchmarks.speed.report import _targets

    def row(path: str, mean: float, median: float, reserved: float) -> dict:
        return {"path": path, "tokens_per_second": mean, "tokens_per_second_median_step": median,
                "peak_reserved_gib": reserved}

    rows = {
        "plain_gc": row("plain", 5436, 5982, 17.10),
        "plain_nogc": row("plain", 12043, 12512, 27.51),
        "vlmtune_nogc_compile": row("vlmtune", 1485, 15887, 15.93),
        "vlmtune_gc4": row("vlmtune", 9000, 8800, 14.96),
    }
    lines = _targets("W1", rows)
    assert "vlmtune_nogc_compile 1.27x" in lines[1]
    assert "vlmtune_nogc_compile 2.66x (15.93 vs 17.10 GiB)" in lines[0]
    mean_only = {k: {**r, "tokens_per_second_median_step": None} for k, r in rows.items()}
    assert "vlmtune_gc4 1.66x" in _targets("W1", mean_only)[0]


def test_long_run_line_compares_whole_runs_compilation_included():
    """The 300-step pair (eager vs speed.compile=auto) is judged on every step's time, compilation included: a run
    whose median step is fast but whose compilation is not paid back reads below 1x."""
    from benchmarks.speed.report import _targets

    rows = {
        "vlmtune_nogc_eager300": {"path": "vlmtune", "train_seconds_all_steps": 90.0},
        "vlmtune_nogc_auto300": {"path": "vlmtune", "train_seconds_all_steps": 100.0},
    }
    assert _targets("W1", rows) == [
        "W1 whole run, every step timed (compilation included): vlmtune_nogc_auto300 100.0 s vs "
        "vlmtune_nogc_eager300 90.0 s (0.90x)"
    ]
    assert _targets("W1", {"vlmtune_nogc_auto300": rows["vlmtune_nogc_auto300"]}) == []


def test_alternate_order_runs_every_second_round_backwards():
    from benchmarks.speed.bench import round_order

    assert round_order(["u", "v", "w"], 2) == [(0, "u"), (0, "v"), (0, "w"), (1, "u"), (1, "v"), (1, "w")]
    assert round_order(["u", "v", "w"], 3, alternate=True) == [
        (0, "u"), (0, "v"), (0, "w"), (1, "w"), (1, "v"), (1, "u"), (2, "u"), (2, "v"), (2, "w")]


def test_rounds_are_paired_with_unsloths_run_too(tmp_path, capsys):
    # W3's reference is the plain loop; with Unsloth in the rounds, each variant's ratio to Unsloth's run of the same
    # round is printed as well (the bar's ratio), here 1.25x in the first order and 1.20x in the other
    def unsloth(round_: int, speed: float) -> dict:
        return {**_row("unsloth_gc", round_, speed, "W3"), "path": "unsloth"}

    rows = [unsloth(0, 4000), _row("vlmtune_min", 0, 5000, "W3"),
            _row("vlmtune_min", 1, 6000, "W3"), unsloth(1, 5000)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_report(path)
    out = capsys.readouterr().out
    assert "median-step tokens/s over unsloth_gc of the same round" in out
    assert "- vlmtune_min: median 1.23x, range 1.20-1.25x over 2 rounds" in out
