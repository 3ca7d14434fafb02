"""The estimate-vs-measured table, re-estimating recorded points with the current estimator (offline)."""

from __future__ import annotations

from benchmarks.calibration.points import CONTEXT_MIB, MIB


def pct(est: float | None, meas: float | None) -> float | None:
    return round(100 * (est - meas) / meas, 2) if est and meas else None


# ----------------------------------------------------------------------------------------------------------- table

def reestimate(row: dict) -> dict:
    """Estimate a recorded point again with the current estimator (catalogue model with the same numbers)."""
    from vlmtune.memory import EstimateInputs, estimate

    i = dict(row["inputs"])
    i.update(model=row["catalogue_model"], image_hw=tuple(i["image_hw"]), gpu=None)
    i.setdefault("autocast", i["precision"] != "fp32")  # rows recorded before the field: the Trainer autocasts
    if not isinstance(i["lora_targets"], str):
        i["lora_targets"] = tuple(i["lora_targets"])
    b = estimate(EstimateInputs(**i))
    return {"est_alloc_mib": round(b.peak_allocated / MIB), "est_reserved_mib": round(b.peak_reserved / MIB),
            "est_total_mib": round(b.peak_total / MIB), "est_phase": b.peak_phase}


def with_context(rows: list[dict]) -> tuple[list[dict], int]:
    """Rows with meas_total = reserved peak + the median measured CUDA context (NVML minus reserved) of the runs
    whose NVML peak is their training peak (not QLoRA's random 16-bit build)."""
    import statistics

    seen = [r["context_mib"] for r in rows if r.get("context_mib") and r.get("method") != "qlora"]
    context = round(statistics.median(seen)) if seen else CONTEXT_MIB
    out = []
    for r in rows:
        if r.get("meas_reserved_mib") is not None:
            r = {**r, "meas_total_mib": r["meas_reserved_mib"] + context}
        elif r.get("nvml_only"):  # an earlier run's record: its NVML per-process peak is the nvidia-smi level
            r = {**r, "meas_total_mib": r["meas_smi_process_mib"]}
        r["err_total_pct"] = pct(r.get("est_total_mib"), r.get("meas_total_mib"))
        out.append(r)
    return out, context


def _cell(r: dict, level: str) -> str:
    err = r.get(f"err_{level}_pct")
    return (f"{r[f'est_{level}_mib']} | {r.get(f'meas_{level}_mib') or '-'} | "
            + (f"{err:+.1f}%" if err is not None else "-"))


def table(rows: list[dict], again: bool) -> str:
    rows, context = with_context(rows)
    lines = [f"nvidia-smi level = max_memory_reserved + {context} MiB CUDA context (median measured)\n", "| point | method | GC | B | S | patches | est smi | meas smi | err | est reserved | meas reserved | err "
             "| est alloc | meas alloc | err |", "|" + "---|" * 15]
    ok5 = ok10 = n = 0
    for r in rows:
        if r.get("meas_total_mib") is None or not r.get("inputs") or (not again and not r.get("est_total_mib")):
            lines.append(f"| {r['id']} | {r['method']} | | | | | | | failed (rc {r.get('rc')}) | | | | | | |")
            continue
        if again:
            r = {**r, **reestimate(r)}
            for level in ("alloc", "reserved", "total"):
                r[f"err_{level}_pct"] = pct(r[f"est_{level}_mib"], r.get(f"meas_{level}_mib"))
        n += 1
        ok5 += abs(r["err_total_pct"]) <= 5
        ok10 += abs(r["err_total_pct"]) <= 10
        lines.append(
            f"| {r['id']} | {r['method']} | {'on' if r['gc'] else 'off'} | {r['batch']} | {r['seq_len']} "
            f"| {r['vit_patches']} | {_cell(r, 'total')} | {_cell(r, 'reserved')} | {_cell(r, 'alloc')} |")
    lines.append(f"\n{n} measured points: {ok5} within ±5% at the nvidia-smi level, {ok10} within ±10%.")
    return "\n".join(lines)


