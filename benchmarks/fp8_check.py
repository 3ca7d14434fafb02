"""speed.fp8 on the GPU: the FP8 base matmuls per layer (time, error), then loss parity through the engine.

    PYTHONPATH=/tmp/site:src:. python -m benchmarks.fp8_check --steps 300 --out $OUT/fp8_check.jsonl  # H100
    PYTHONPATH=src:. python -m benchmarks.fp8_check --smoke --out /tmp/fp8_smoke.jsonl        # CPU: the script itself

(/tmp/site: where benchmarks/gpu_env.sh installs the GPU machine's wheels; keep it on PYTHONPATH there.)

(a) layers: one frozen linear of Qwen2.5-VL-7B's language model per shape (q/o 3584x3584, k/v 3584->512, gate/up
    3584->18944, down 18944->3584) at 4,096 tokens, bf16: the base matmuls alone (forward + input gradient: bf16; the
    first FP8 path, eager quantization with the weight's transposed e4m3 copy made per backward; with it kept; with
    the fused (torch.compile'd) quantization, per backward and kept (what speed.fp8 runs now); the quantization
    alone, eager and fused; the scaled matmuls alone) and the whole fused LoRA layer (rank 16, forward + backward,
    bf16 vs each FP8 variant: `lora_layer_fp8_ms` is what speed.fp8 runs, `lora_layer_fp8_first_ms` the first path),
    median of CUDA-event timings; the relative error of y and dx against an fp32 reference, bf16's own error beside
    FP8's.
(a2) groups: the layers that take one input (q/k/v_proj, gate/up_proj) as fused LoRA layers called on the same
    tensor, forward + backward: bf16, FP8 with every layer quantizing the input, FP8 quantizing it once (speed.fp8),
    the first path; the quantizations per step of each.
(b) training: the Qwen2-VL-2B architecture with random weights (`model.random_init`, the same seed: the same weights),
    LoRA on all linear layers, bf16, no checkpointing, eager, the same JSONL and seed (the same batches in the same
    order), speed.fp8=false then true (with each of --scales: row, tensor) for --steps steps: the loss at every step,
    the final loss's relative difference (and over the last 5 steps), tokens/s at the median step, peak allocated and
    reserved memory. --compile runs both arms with speed.compile=true (the FP8 matmuls then run inside the compiled
    decoder layers, speed/fp8_compiled.py; the median step leaves the compiling steps out).

Each result is one JSON object per line in --out; the summary lines are printed too. The issue's bar (issue 21): the
final loss within 1% of bf16 after 300+ steps on W1 and W3 (`--steps 300` here is the 2B random-weight stand-in).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

SHAPES_7B = {  # name: (in_features, out_features), Qwen2.5-VL-7B's language model
    "q_proj/o_proj 3584->3584": (3584, 3584),
    "k_proj/v_proj 3584->512": (3584, 512),
    "gate/up_proj 3584->18944": (3584, 18944),
    "down_proj 18944->3584": (18944, 3584),
}
SHAPES_SMOKE = {"smoke 64->96": (64, 96)}
GROUPS_7B = {  # name: (in_features, [out_features of each layer taking the same input])
    "q/k/v_proj 3584->3584+512+512": (3584, [3584, 512, 512]),
    "gate/up_proj 3584->2x18944": (3584, [18944, 18944]),
}
GROUPS_SMOKE = {"smoke q/k/v 64->96+32+32": (64, [96, 32, 32])}
FIRST = {"keep_transposed": False, "fused_quant": False, "share_inputs": False}
"""The FP8 path measured in session 12 (benchmarks/results/2026-12-07-session12): eager quantization, W^T per
backward, every layer quantizing its own input."""
VARIANTS = {  # lora_layer_<name>_ms: each change alone on the first path, then all (what speed.fp8 runs)
    "fp8_first": FIRST,
    "fp8_kept_transposed": {**FIRST, "keep_transposed": True},
    "fp8_fused_quant": {**FIRST, "fused_quant": None},
    "fp8": {},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fp8_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per run in (b) (default 30)")
    parser.add_argument("--out", type=Path, default=Path("fp8_check.jsonl"), help="JSON lines written here")
    parser.add_argument(
        "--tokens", type=int, default=4096, help="tokens per layer call in (a) (default 4096)"
    )
    parser.add_argument("--arch", default="2b", help="Qwen2-VL architecture of (b): 2b (default), 7b or tiny")
    parser.add_argument("--batch", type=int, default=4, help="rows per step in (b) (default 4)")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/vlmtune-fp8-check"), help="model and data folder"
    )
    parser.add_argument(
        "--scales", default="row", help="(b): speed.fp8_scales of the FP8 runs, comma-separated: row (default), tensor"
    )
    parser.add_argument(
        "--compile", action="store_true", help="(b): both arms with speed.compile=true (default: both eager)"
    )
    parser.add_argument("--skip-layers", action="store_true", help="only (b)")
    parser.add_argument("--skip-train", action="store_true", help="only (a)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, tiny model, 3 steps: runs on the CPU"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.arch, args.steps, args.batch = 40, "tiny", min(args.steps, 3), 2
    elif not torch.cuda.is_available():
        parser.error(
            "no CUDA GPU: this check times FP8 on the GPU (use --smoke to run the script on the CPU)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    env = {"kind": "env", "torch": torch.__version__, "device": _device_name(), "argv": sys.argv[1:]}
    _emit(args.out, env)
    if not args.skip_layers:
        for name, (fin, fout) in (SHAPES_SMOKE if args.smoke else SHAPES_7B).items():
            _emit(args.out, {"kind": "layer", "shape": name, **layer(fin, fout, args.tokens)})
        for name, (fin, outs) in (GROUPS_SMOKE if args.smoke else GROUPS_7B).items():
            _emit(args.out, {"kind": "group", "layers": name, **group(fin, outs, args.tokens)})
    if not args.skip_train:
        bf16 = train_run(args, False)
        _emit(args.out, {"kind": "train", "fp8": False, "compiled": args.compile, **bf16})
        for scales in [s for s in args.scales.split(",") if s]:
            run = train_run(args, True, scales)
            _emit(args.out, {"kind": "train", "fp8": True, "scales": scales, "compiled": args.compile, **run})
            runs = {False: bf16, True: run}
            _emit(args.out, {"kind": "parity", "scales": scales, "compiled": args.compile,
                             **parity(bf16["losses"], run["losses"], runs)})
    return 0


# ---- (a) one layer ----


def _time(fn: Any, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds per call (CUDA events on a GPU, the wall clock on the CPU)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer(fin: int, fout: int, tokens: int, repeats: int = 20) -> dict[str, Any]:
    from vlmtune.speed.fp8_linear import Fp8Weight, Quantizer, scaled_mm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    weight = (torch.randn(fout, fin, device=device) * fin**-0.5).to(dtype)
    x = torch.randn(tokens, fin, device=device, dtype=dtype)
    g = (torch.randn(tokens, fout, device=device) * 1e-3).to(dtype)
    eager, fused = Quantizer(fused=False), Quantizer(fused=True)  # fused: compiled on the CPU too (--smoke)
    per_backward = Fp8Weight(quantizer=eager).of(weight)
    kept = Fp8Weight(keep_transposed=True, quantizer=eager).of(weight)
    fused_per_backward = Fp8Weight(quantizer=fused).of(weight)
    now = Fp8Weight(keep_transposed=True, quantizer=fused).of(weight)  # what speed.fp8 runs on a GPU
    # one scale per operand: cuBLASLt's FP8 path, where row-wise scales take PyTorch's CUTLASS row-wise kernel (is
    # that kernel why the FP8 matmuls alone were only 0.94-1.08x bf16 on an H100 in session 12?)
    whole = Fp8Weight(rowwise=False, keep_transposed=True, quantizer=fused).of(weight)
    y_ref, dx_ref = x.float() @ weight.float().t(), g.float() @ weight.float()
    x_q, g_q = eager(x), eager(g, columns=now.scale)
    x_w, g_w = eager(x, rowwise=False), eager(g, rowwise=False)
    out: dict[str, Any] = {
        "tokens": tokens,
        "in": fin,
        "out": fout,
        "bf16_ms": _time(lambda: (x @ weight.t(), g @ weight), repeats),
        "fp8_ms": _time(lambda: (per_backward.forward(x), per_backward.input_grad(g)), repeats),
        "fp8_kept_transposed_ms": _time(lambda: (kept.forward(x), kept.input_grad(g)), repeats),
        "fp8_fused_quant_ms": _time(lambda: (fused_per_backward.forward(x), fused_per_backward.input_grad(g)), repeats),
        "fp8_now_ms": _time(lambda: (now.forward(x), now.input_grad(g)), repeats),
        "fp8_forward_ms": _time(lambda: per_backward.forward(x), repeats),
        "fp8_now_forward_ms": _time(lambda: now.forward(x), repeats),
        "bf16_forward_ms": _time(lambda: x @ weight.t(), repeats),
        "quant_x_eager_ms": _time(lambda: eager(x), repeats),
        "quant_x_fused_ms": _time(lambda: fused(x), repeats),
        "quant_g_eager_ms": _time(lambda: eager(g, columns=now.scale), repeats),
        "quant_g_fused_ms": _time(lambda: fused(g, columns=now.scale), repeats),
        "transpose_weight_ms": _time(per_backward._transposed, repeats),
        "fp8_matmuls_only_ms": _time(
            lambda: (
                scaled_mm(x_q[0], now.values.t(), x_q[1], now.scale, dtype, fast_accum=True),
                scaled_mm(g_q[0], now.transposed, g_q[1], now.ones, dtype),
            ),
            repeats,
        ),
        "fp8_tensorwise_now_ms": _time(lambda: (whole.forward(x), whole.input_grad(g)), repeats),
        "fp8_matmuls_only_tensorwise_ms": _time(
            lambda: (
                scaled_mm(x_w[0], whole.values.t(), x_w[1], whole.scale, dtype, fast_accum=True),
                scaled_mm(g_w[0], whole.transposed, g_w[1], whole.scale, dtype),
            ),
            repeats,
        ),
        "rel_err_y_fp8_tensorwise": _rel(whole.forward(x), y_ref),
        "rel_err_dx_fp8_tensorwise": _rel(whole.input_grad(g), dx_ref),
        "rel_err_y_bf16": _rel(x @ weight.t(), y_ref),
        "rel_err_y_fp8": _rel(per_backward.forward(x), y_ref),
        "rel_err_y_fp8_now": _rel(now.forward(x), y_ref),
        "rel_err_dx_bf16": _rel(g @ weight, dx_ref),
        "rel_err_dx_fp8": _rel(per_backward.input_grad(g), dx_ref),
        "rel_err_dx_fp8_now": _rel(now.input_grad(g), dx_ref),
        "same_as_first_path": bool(
            torch.equal(now.forward(x), per_backward.forward(x))
            and torch.equal(now.input_grad(g), per_backward.input_grad(g))
        ),
        "fused_quant_failed": fused.failed,
        "weight_mib": weight.numel() * weight.element_size() / 2**20,
        "fp8_kept_mib": per_backward.nbytes() / 2**20,
        "fp8_kept_transposed_mib": kept.nbytes() / 2**20,
    }
    out["speedup_base"] = out["bf16_ms"] / out["fp8_ms"]
    out["speedup_base_kept_transposed"] = out["bf16_ms"] / out["fp8_kept_transposed_ms"]
    out["speedup_base_now"] = out["bf16_ms"] / out["fp8_now_ms"]
    out["speedup_base_tensorwise"] = out["bf16_ms"] / out["fp8_tensorwise_now_ms"]
    out.update(_lora_layer(weight, x, g, repeats))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def _lora_model(weights: list[torch.Tensor]) -> tuple[Any, Any]:
    """(PEFT model, fused layers): one frozen linear per weight, all called on the same input, LoRA rank 16 with fp32
    adapters on each, as the engine sets them up (input casting off, fused)."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.speed.fused_lora import fuse_lora

    class Group(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projs = torch.nn.ModuleList(
                torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype) for w in weights
            )
            for proj, w in zip(self.projs, weights, strict=True):
                proj.weight.data.copy_(w)

        def forward(self, t: torch.Tensor) -> list[torch.Tensor]:
            return [proj(t) for proj in self.projs]

    names = [str(i) for i in range(len(weights))]
    model = get_peft_model(Group(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=names))
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False  # as speed.lora_bf16_compute does
    fused = fuse_lora(model.get_base_model(), 0)
    assert not isinstance(fused, str)
    return model, fused


def _lora_timings(
    weights: list[torch.Tensor], x: torch.Tensor, gs: list[torch.Tensor], repeats: int, variants: dict[str, dict]
) -> dict[str, Any]:
    """<variant>_ms (bf16 and each FP8 variant) and <variant>_quantizations (per forward + backward) of the fused
    LoRA layers of `weights` on `x`, the gradients `gs`; under autocast on the GPU."""
    from vlmtune.speed.fused_lora import enable_fp8

    model, fused = _lora_model(weights)
    xin = x.detach().requires_grad_()
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda)

    def step() -> None:
        with autocast:
            ys = model(xin)
        torch.autograd.backward(ys, gs)

    out: dict[str, Any] = {"bf16_ms": _time(step, repeats)}
    for name, options in variants.items():
        fp8 = enable_fp8(fused, **options)
        assert not isinstance(fp8, str)
        out[f"{name}_ms"] = _time(step, repeats)
        calls = fp8.quantizer.calls
        step()
        out[f"{name}_quantizations"] = fp8.quantizer.calls - calls
        fp8.remove()
    return out


def _lora_layer(weight: torch.Tensor, x: torch.Tensor, g: torch.Tensor, repeats: int) -> dict[str, Any]:
    """The whole PEFT LoRA layer (rank 16, fp32 adapters, under autocast on the GPU) as the engine runs it: fused,
    with bf16 and with each FP8 variant's base matmuls; forward + backward."""
    timings = _lora_timings([weight], x, [g], repeats, VARIANTS)
    out = {f"lora_layer_{k}": v for k, v in timings.items() if k.endswith("_ms")}
    out["lora_layer_speedup"] = out["lora_layer_bf16_ms"] / out["lora_layer_fp8_ms"]
    out["lora_layer_speedup_first"] = out["lora_layer_bf16_ms"] / out["lora_layer_fp8_first_ms"]
    return out


def group(fin: int, outs: list[int], tokens: int, repeats: int = 20) -> dict[str, Any]:
    """(a2): fused LoRA layers taking one input, forward + backward: bf16, FP8 quantizing the input per layer, once
    (speed.fp8), and the first path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    weights = [(torch.randn(fout, fin, device=device) * fin**-0.5).to(dtype) for fout in outs]
    x = torch.randn(tokens, fin, device=device, dtype=dtype)
    gs = [(torch.randn(tokens, fout, device=device) * 1e-3).to(dtype) for fout in outs]
    variants = {"fp8_unshared": {"share_inputs": False}, "fp8": {}, "fp8_first": FIRST}
    out: dict[str, Any] = {"tokens": tokens, "in": fin, "outs": outs}
    out.update(_lora_timings(weights, x, gs, repeats, variants))
    out["speedup"] = out["bf16_ms"] / out["fp8_ms"]
    out["speedup_unshared"] = out["bf16_ms"] / out["fp8_unshared_ms"]
    out["speedup_first"] = out["bf16_ms"] / out["fp8_first_ms"]
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


# ---- (b) training through the engine ----


def train_run(args: argparse.Namespace, fp8: bool, scales: str = "row") -> dict[str, Any]:
    from benchmarks.speed.data import model_dir, write_data
    from benchmarks.speed.engine_run import StepTimer
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.train.engine import train

    side, text_tokens, max_length = (56, 24, 256) if args.smoke else (448, 768, 2048)
    model = model_dir(args.work, "qwen2_vl", args.arch)
    data = write_data(
        args.work / f"data-{args.arch}-{side}",
        model,
        "qwen2_vl",
        n=args.steps * args.batch,
        side=side,
        text_tokens=text_tokens,
        spread=False,
        max_length=max_length,
    )
    out = args.work / (f"run-fp8-{scales}" if fp8 else "run-bf16")
    shutil.rmtree(out, ignore_errors=True)
    config = VlmtuneConfig.model_validate(
        {
            "output_dir": str(out),
            "model": {"name_or_path": str(model), "random_init": True},
            "data": {
                "train_path": str(data),
                "check_before_training": False,
                "image_size": side,
                "max_length": max_length,
            },
            "method": {
                "name": "lora",
                "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all"},
            },
            "training": {
                "batch_size": args.batch,
                "max_steps": args.steps,
                "learning_rate": 2e-4,
                "optimizer": "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
                "logging_steps": 1,
                "save_steps": 100_000,
                "eval_steps": None,
                "report_to": ["none"],
                "warmup_steps": 0,
                "seed": 0,
            },
            "hardware": {
                "precision": "bf16",
                "gradient_checkpointing": False,
                "attn_implementation": "sdpa",
                "dataloader_workers": 0 if args.smoke else 2,
                "use_cpu": not torch.cuda.is_available(),
            },
            "speed": {"compile": args.compile, "fp8": fp8, "fp8_scales": scales},
        }
    )
    timer = StepTimer(warmup=min(3, args.steps - 1))
    _release_cached()  # the arm before this one left its blocks in the allocator's cache: each arm starts empty
    result = train(config, callbacks=[timer])
    events = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    start = next(e for e in events if e.get("event") == "start")
    losses = [e["loss"] for e in events if "loss" in e and "step" in e]
    shutil.rmtree(out, ignore_errors=True)
    return {"losses": losses, "speed": start["speed"], **timer.meter.summary()}


def _release_cached() -> None:
    """Hand the caching allocator's unused blocks back, so that this arm's peak reserved memory (StepTimer resets the
    peaks to what is reserved when it starts) and the preflight's free memory do not carry the previous arm's."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parity(bf16: list[float], fp8: list[float], runs: dict[bool, dict[str, Any]]) -> dict[str, Any]:
    steps = min(len(bf16), len(fp8))
    rel = [abs(fp8[i] - bf16[i]) / abs(bf16[i]) for i in range(steps)]
    tail = max(1, min(5, steps))
    tail_bf16, tail_fp8 = sum(bf16[steps - tail : steps]) / tail, sum(fp8[steps - tail : steps]) / tail
    speed = {}
    for key in ("tokens_per_second_median_step", "peak_allocated_gib", "peak_reserved_gib"):
        if key in runs[False] and key in runs[True]:
            speed[key] = {"bf16": runs[False][key], "fp8": runs[True][key]}
    ratio = None
    if "tokens_per_second_median_step" in speed:
        ratio = speed["tokens_per_second_median_step"]["fp8"] / speed["tokens_per_second_median_step"]["bf16"]
    return {
        "steps": steps,
        "final_loss_bf16": bf16[steps - 1] if steps else None,
        "final_loss_fp8": fp8[steps - 1] if steps else None,
        "final_rel_diff": rel[-1] if rel else None,
        "last5_mean_rel_diff": abs(tail_fp8 - tail_bf16) / abs(tail_bf16) if steps else None,
        "max_step_rel_diff": max(rel) if rel else None,
        "within_1pct": bool(rel) and rel[-1] <= 0.01,
        "fp8_speedup_median_step": ratio,
        **speed,
    }


def _device_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"


def _emit(path: Path, row: dict[str, Any]) -> None:
    line = json.dumps(row, default=str)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    shown = {k: v for k, v in row.items() if k not in ("losses", "speed")}
    print(json.dumps(shown, default=str), flush=True)
    if row.get("kind") == "train":
        print("  losses:", " ".join(f"{v:.4f}" for v in row["losses"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
