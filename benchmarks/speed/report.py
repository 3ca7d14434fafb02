"""The harness's table: one block per workload, ratios to its reference variant, and the issue's targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.speed.workloads import WORKLOADS


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _targets(name: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's acceptance lines for this workload, as far as the rows allow. Speeds are tokens/s at the median
    step (the mean where a row has no median): a compile warm-up or a slow step inside the measured window would
    otherwise decide the verdict (session 6: 0.12x by the mean for a run at 1.27x by the median)."""

    def tps(v: str) -> float | None:
        row = rows.get(v, {})
        return row.get("tokens_per_second_median_step") or row.get("tokens_per_second")

    def mem(v: str) -> float | None:
        return rows.get(v, {}).get("peak_reserved_gib")

    ours = {k: r for k, r in rows.items() if r.get("path") == "vlmtune"}
    lines: list[str] = []
    if name == "W1" and tps("plain_gc"):
        fits = [k for k, r in ours.items() if mem(k) is not None and mem(k) <= (mem("plain_gc") or 0)]
        best = max(fits, key=lambda k: tps(k) or 0, default=None)
        if best:
            lines.append(
                f"W1 >= 2x checkpointed reference at <= its peak reserved (median step): {best} "
                f"{tps(best) / tps('plain_gc'):.2f}x ({mem(best):.2f} vs {mem('plain_gc'):.2f} GiB)"
            )
        fastest = max(ours, key=lambda k: tps(k) or 0, default=None)
        if fastest and tps("plain_nogc"):
            lines.append(
                f"W1 >= 1.3x non-checkpointed reference, fastest setting (median step): {fastest} "
                f"{tps(fastest) / tps('plain_nogc'):.2f}x"
            )
    long_runs = ("auto300", "compile300", "compile300_again")
    for base, other in (("vlmtune_nogc_eager300", f"vlmtune_nogc_{v}") for v in long_runs):
        first, second = rows.get(base, {}), rows.get(other, {})
        if first.get("train_seconds_all_steps") and second.get("train_seconds_all_steps"):
            a, b = first["train_seconds_all_steps"], second["train_seconds_all_steps"]
            lines.append(
                f"{name} whole run, every step timed (compilation included): {other} {b:.1f} s vs {base} "
                f"{a:.1f} s ({a / b:.2f}x)"
            )
    if name == "W2" and tps("plain_gc"):
        for k, r in ours.items():
            smi = r.get("smi_in_process_gib")
            lines.append(
                f"W2 {k}: whole process {_fmt(smi)} GiB while training (target <= 7.5), "
                f"{(tps(k) or 0) / tps('plain_gc'):.2f}x reference tokens/s at the median step (>= 1)"
            )
    if name in ("W3", "W4") and tps("plain_gc"):
        best = max(ours, key=lambda k: tps(k) or 0, default=None)
        if best:
            lines.append(
                f"{name} >= 1.5x checkpointed reference (median step): {best} {tps(best) / tps('plain_gc'):.2f}x"
            )
    if name in ("W1", "W2", "W3") and tps("unsloth_gc"):  # issue 21: against Unsloth, same call, same batches
        ref_mem = mem("unsloth_gc") or 0
        if name == "W2":
            for k in ours:
                lines.append(
                    f"W2 vs Unsloth: {k} {(tps(k) or 0) / tps('unsloth_gc'):.2f}x its tokens/s (>= 1.0) at "
                    f"{_fmt(mem(k))} vs {ref_mem:.2f} GiB peak reserved (less)"
                )
        else:
            fits = [k for k in ours if mem(k) is not None and mem(k) <= ref_mem]
            best = max(fits, key=lambda k: tps(k) or 0, default=None)
            lines.append(
                f"{name} >= 1.3x Unsloth's tokens/s at <= its peak reserved ({ref_mem:.2f} GiB): "
                + (f"{best} {(tps(best) or 0) / tps('unsloth_gc'):.2f}x at {mem(best):.2f} GiB" if best else
                   "no vlmtune variant within that memory")
            )
    if name == "W5" and tps("vlmtune_padded") and tps("vlmtune_packed"):
        lines.append(
            f"W5 packed vs padded useful tokens/s (median step): {tps('vlmtune_packed') / tps('vlmtune_padded'):.2f}x "
            "(target >= 2); equal loss: see the correctness check"
        )
    return lines


def loss_parity(work: Any, rows: dict[str, dict[str, Any]]) -> str | None:
    """One line: each variant's loss at step 1 and at the last step both ran, relative to the plain loop's (plain_gc,
    else the workload's first plain variant) on the same weights and batches. Step 1 compares the initial weights
    and the first batch (LoRA B starts at 0); the last step, the training (dropout masks differ between paths).
    Variants with other rows per step (packing) are left out; "other weights" marks a run whose initial weights'
    fingerprint differs from the reference's."""
    with_losses = [v for v in work.variants if rows.get(v.name, {}).get("losses") and v.batch is None]
    plain = [v.name for v in with_losses if v.path == "plain"]
    if not plain:
        return None
    ref_name = "plain_gc" if "plain_gc" in plain else plain[0]
    ref = rows[ref_name]["losses"]
    parts = []
    for variant in with_losses:
        if variant.name == ref_name:
            continue
        row = rows[variant.name]
        losses = row["losses"]
        last = min(len(ref), len(losses))
        weights = row.get("init_fingerprint", {}).get("embed")
        other = weights is not None and weights != rows[ref_name].get("init_fingerprint", {}).get("embed")
        parts.append(
            f"{variant.name} {losses[0]:.4f} ({(losses[0] - ref[0]) / ref[0]:+.2%}) / {losses[last - 1]:.4f} "
            f"({(losses[last - 1] - ref[last - 1]) / ref[last - 1]:+.2%}) at step {last}"
            + (" [other weights]" if other else "")
        )
    if not parts:
        return None
    return (f"loss parity vs {ref_name} (step 1 {ref[0]:.4f}, step {len(ref)} {ref[-1]:.4f}): loss at step 1 / at the "
            "last step both ran (relative difference): " + "; ".join(parts))


def paired_ratios(results: list[dict[str, Any]], workload: str, reference: str) -> dict[str, list[float]]:
    """Per variant, its median-step tokens/s over the reference's in the same round (BENCH_REPEATS): pairing runs
    of one round cancels part of the machine's drift, which moved identical runs by up to 24% in one call
    (benchmarks/RESULTS.md, session 5)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        speed = r.get("tokens_per_second_median_step") or r.get("tokens_per_second")
        if r.get("workload") == workload and speed:
            by_round.setdefault(int(r.get("round", 0)), {})[r["variant"]] = speed
    out: dict[str, list[float]] = {}
    for row in by_round.values():
        if reference not in row:
            continue
        for variant, speed in row.items():
            if variant != reference:
                out.setdefault(variant, []).append(speed / row[reference])
    return out


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    middle = ordered[len(ordered) // 2] if len(ordered) % 2 else sum(ordered[len(ordered) // 2 - 1 :][:2]) / 2
    return f"median {middle:.2f}x, range {ordered[0]:.2f}-{ordered[-1]:.2f}x over {len(ordered)} rounds"


def print_report(path: Path) -> None:
    results = _load(path)
    smi = {
        (r["workload"], r["variant"]): r.get("smi_process_peak_gib")
        for r in _load(path.parent / "smi_peaks.jsonl")
    }
    print(
        "\nmemory: peak allocated / peak reserved (torch), smi train = nvidia-smi level while training (this "
        "process alone on the GPU), smi all = nvidia-smi peak over the whole process including model build"
    )
    for name, work in WORKLOADS.items():
        rows = {r["variant"]: r for r in results if r.get("workload") == name and "tokens_per_second" in r}
        failed = [r for r in results if r.get("workload") == name and "error" in r]
        if not rows and not failed:
            continue
        ref = rows.get(work.reference, {})
        print(f"\n## {name}: {work.title}\n")
        print(
            "| variant | tokens/s | x ref | tokens/s at median step (slow steps) | peak alloc GiB | peak reserved GiB "
            "| x ref | smi train GiB | smi all GiB | MFU | loss first -> last |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for variant in work.variants:
            r = rows.get(variant.name)
            if r is None:
                continue
            speed = (
                r["tokens_per_second"] / ref["tokens_per_second"] if ref.get("tokens_per_second") else None
            )
            memory = (
                (r.get("peak_reserved_gib") or 0) / ref["peak_reserved_gib"]
                if ref.get("peak_reserved_gib")
                else None
            )
            print(
                f"| {variant.name} | {r['tokens_per_second']:,.0f} | {_fmt(speed)} "
                f"| {_fmt(r.get('tokens_per_second_median_step'), ',.0f')} ({r.get('slow_steps', '-')}) "
                f"| {_fmt(r.get('peak_allocated_gib'))} "
                f"| {_fmt(r.get('peak_reserved_gib'))} | {_fmt(memory)} | {_fmt(r.get('smi_in_process_gib'))} "
                f"| {_fmt(smi.get((name, variant.name)))} | {_fmt(r.get('mfu'), '.1%')} "
                f"| {_fmt(r.get('loss_first'), '.3f')} -> {_fmt(r.get('loss_last'), '.3f')} |"
            )
        for line in _targets(name, rows):
            print(f"- {line}")
        parity = loss_parity(work, rows)
        if parity:
            print(f"- {parity}")
        for variant, r in rows.items():  # what Unsloth built, against the harness's LoRA targets
            if r.get("path") == "unsloth" and "lora_modules" in r:
                print(
                    f"- {variant}: LoRA on {r['lora_modules']} modules (harness regex {r['lora_modules_expected']}, "
                    f"same set: {'yes' if r.get('lora_targets_match') else 'NO'}), dropout {r.get('lora_dropout')}, "
                    f"4-bit linear layers language/vision {r.get('linear4bit_language')}/"
                    f"{r.get('linear4bit_vision')}, model load {r.get('model_load_seconds')} s"
                )
        for r in failed:  # a variant that did not finish: why (its log's last exception line)
            print(f"- {r['variant']}: FAILED (exit {r.get('exit')}): {r['error']}")
        for variant, r in rows.items():  # the run's own preflight estimate against the nvidia-smi level
            estimate, measured = r.get("estimate_total_gib"), r.get("smi_in_process_gib")
            trace = smi.get((name, variant))  # the nvidia-smi tool's trace of the whole process (build included)
            if estimate and measured:
                print(
                    f"- {variant}: estimate {estimate:.2f} GiB vs nvidia-smi while training {measured:.2f} GiB "
                    f"({(estimate - measured) / measured:+.1%})"
                    + (f", vs the nvidia-smi trace's peak {trace:.2f} GiB ({(estimate - trace) / trace:+.1%})"
                       if trace else "")
                )
        references = {work.reference, "plain_nogc"} if name == "W1" else {work.reference}
        # Unsloth's run of each round too: the bar's ratio, paired round by round
        references |= {r["variant"] for r in results if r.get("workload") == name and r.get("path") == "unsloth"}
        for reference in sorted(references):
            ratios = paired_ratios(results, name, reference)
            if any(len(v) > 1 for v in ratios.values()):
                print(f"\nrepeated rounds, median-step tokens/s over {reference} of the same round:")
                for variant, values in sorted(ratios.items()):
                    print(f"- {variant}: {_spread(values)}")
    checks = _load(path.parent / "check.jsonl")
    if checks:
        print("\n## correctness: each optimisation vs the plain path on one batch\n")
        print("| family arch | precision | optimisation | loss ref | loss opt | rel diff | min LoRA grad cosine | pass |")
        print("|---|---|---|---|---|---|---|---|")
        for c in checks:
            model = f"{c.get('family', 'qwen2_vl')} {c.get('arch', 'W1')}"
            if c.get("skipped"):
                print(f"| {model} | {c['precision']} | {c['name']} | - | - | - | - | skipped: {c['skipped']} |")
                continue
            print(
                f"| {model} | {c['precision']} | {c['name']} | {c['loss_ref']:.5f} | {c['loss']:.5f} | {c['rel']:.2e} "
                f"| {c['cosine']:.5f} | {'yes' if c['ok'] else 'NO'} |"
            )
