"""`vlmtune estimate [CONFIG] [section.field=value ...] [flags]`: peak GPU memory per GPU, term by term.

The training settings come from the same place as `vlmtune train` (preset, config file, flags, dotted overrides);
the estimate-only flags say how it runs (ZeRO stage, offload, GPUs) and on which GPU to give a verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "estimate the peak GPU memory of a training run (per GPU, term by term) and whether it fits a GPU"

# flag dest -> config field, applied as dotted overrides before the user's own overrides.
CONFIG_FLAGS = {
    "model": "model.name_or_path",
    "method": "method.name",
    "lora_r": "method.lora.rank",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "seq_len": "data.max_length",
    "image_size": "data.image_size",
    "min_pixels": "data.min_pixels",
    "max_pixels": "data.max_pixels",
    "image_root": "data.image_root",
    "precision": "hardware.precision",
    "gradient_checkpointing": "hardware.gradient_checkpointing",
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared with `vlmtune recommend`: where the training settings come from."""
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help="a YAML/JSON config file and/or dotted overrides such as method.lora.rank=32",
    )
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", help="start from a preset (see `vlmtune presets list`)")
    p.add_argument("--model", help="hub id from the built-in catalogue, or a local folder with config.json")
    p.add_argument(
        "--data", help="JSONL data set: size the longest batch it can produce (image sizes and text)"
    )
    p.add_argument("--image-root", "--image_root", dest="image_root",
                   help="data.image_root: the folder the data's relative image paths resolve against first")
    p.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=_positive, help="micro-batch per GPU"
    )
    p.add_argument(
        "--seq-len",
        "--max-length",
        dest="seq_len",
        type=_positive,
        help="tokens per sample, image tokens included (data.max_length)",
    )
    p.add_argument(
        "--image-size",
        dest="image_size",
        type=_positive,
        help="images fit in SIZE x SIZE (dynamic-resolution models: max pixels SIZE^2)",
    )
    p.add_argument("--min-pixels", dest="min_pixels", type=_positive)
    p.add_argument("--max-pixels", dest="max_pixels", type=_positive)
    p.add_argument(
        "--images-per-sample",
        dest="images_per_sample",
        type=int,
        help="images per sample without --data (default 1)",
    )
    p.add_argument(
        "--num-gpus", dest="num_gpus", type=_positive, help="data-parallel GPUs (default: the config's)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the breakdown as a picture")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmtune.cli.train_cmd import OFFLOAD_CHOICES, offload_name

    add_config_arguments(p)
    p.add_argument("--method", choices=["lora", "qlora", "full"])
    p.add_argument("--lora-r", "--lora_r", dest="lora_r", type=_positive)
    p.add_argument("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=_positive)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    p.add_argument(
        "--zero-stage",
        dest="zero_stage",
        type=int,
        choices=[0, 1, 2, 3],
        help="0: no DeepSpeed (DDP on several GPUs); 1-3: DeepSpeed ZeRO stage (default: the config's)",
    )
    p.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        type=offload_name,
        help="DeepSpeed offload to CPU RAM, as `train --offload` and distributed.offload: none, optimizer or "
        "optimizer_and_params (parameters too; ZeRO-3 only; `all`, the old spelling, is accepted for it); "
        "default: the config's",
    )
    p.add_argument(
        "--offload-ratio",
        dest="offload_ratio",
        type=float,
        help="ZeRO-3 partial optimizer offload: share of the optimizer in CPU RAM, (0, 1] (default: the config's)",
    )
    p.add_argument(
        "--gpu", help="GPU to judge the fit on, e.g. 'RTX 4090', A100-80GB, H100 (see `recommend --table`), or a "
                      "memory size such as 24GB"
    )
    p.add_argument(
        "--sweep",
        action="append",
        metavar="FIELD=V1,V2,...",
        help="estimate every combination of these values of a config field (repeatable; e.g. "
        "--sweep method.lora.rank=16,64,256 --sweep method.lora.target_modules=minimal,all) and print a table",
    )


def resolve(args: argparse.Namespace) -> Any:
    """The validated VlmtuneConfig from preset, file, flags and dotted overrides (as `vlmtune train` does)."""
    from vlmtune.cli.train_cmd import FLAG_FIELDS, resolve_config

    flags = [
        f"{field}={getattr(args, dest)}"
        for dest, field in CONFIG_FLAGS.items()
        if getattr(args, dest, None) is not None
    ]
    files = [i for i in args.items if "=" not in i]
    dotted = [i for i in args.items if "=" in i]
    shim = argparse.Namespace(
        items=files + flags + dotted,
        config=args.config,
        preset=args.preset,
        target_modules=None,
        flash_attn=False,
        use_4bit=False,
        use_lora=False,
        **dict.fromkeys(FLAG_FIELDS),
    )
    return resolve_config(shim)


def data_inputs(args: argparse.Namespace, inputs: Any, image_root: Any = None) -> tuple[Any, Any]:
    """Inputs updated with the worst batch of --data, and the data's batch shape (None without --data).
    `image_root`: the config's data.image_root (--image-root sets it)."""
    if not args.data:
        return inputs, None
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.memory.data_scan import scan_data

    spec = lookup_model(inputs.model)
    profile = scan_data(args.data, spec, image_root=image_root)
    shape = profile.batch(
        spec, inputs.batch_size, inputs.seq_len, inputs.image_size, inputs.min_pixels, inputs.max_pixels
    )
    note = "" if profile.exact_text else " (text tokens approximated: no tokenizer for this model offline)"
    shape_text = (
        f"Data       {args.data}: {len(profile.samples)} samples, {profile.images} images; tokens per "
        "sample "
        + ", ".join(f"{k} {v}" for k, v in shape.percentiles.items())
        + f"; {shape.over_limit} over max_length {inputs.seq_len}{note}"
    )
    return inputs.with_(
        seq_len=shape.seq_len,
        vit_patches_per_batch=shape.vit_patches,
        images_per_sample=shape.images_per_sample,
        image_tokens_per_sample=shape.image_tokens,
    ), (shape, shape_text, profile)


def estimate_args(args: argparse.Namespace, extra: list[str] = ()) -> tuple[Any, Any, Any]:
    """(config, breakdown, data shape or None) of the command line, with `extra` dotted overrides last (the CLI's
    and the studio's estimate)."""
    from vlmtune.errors import ConfigError
    from vlmtune.memory import estimate, inputs_from_config
    from vlmtune.memory.zero import check_plan

    offload = {"optimizer_and_params": "all"}.get(args.offload, args.offload)  # the estimator's own name
    try:
        config = resolve(argparse.Namespace(**{**vars(args), "items": [*args.items, *extra]}))
    except ConfigError as exc:  # report the parallelism problems in the same message
        raise ConfigError(
            exc.problems
            + check_plan(args.zero_stage or 0, offload or "none", args.num_gpus or 1, args.offload_ratio or 1.0),
            exc.source,
        ) from None
    inputs = inputs_from_config(
        config,
        zero_stage=args.zero_stage,
        offload=offload,
        offload_ratio=args.offload_ratio,
        num_gpus=args.num_gpus,
        gpu=args.gpu,
        images_per_sample=args.images_per_sample,
    )
    inputs, data = data_inputs(args, inputs, config.data.image_root)
    return config, estimate(inputs), data


def sweep_axes(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """`FIELD=V1,V2` items as (field, values); malformed ones refused together, naming the item."""
    from vlmtune.errors import ConfigError

    axes, problems = [], []
    for item in sweeps:
        field, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not field.strip() or not values:
            problems.append(f"--sweep {item!r}: write FIELD=V1,V2,... (e.g. method.lora.rank=16,32,64)")
        elif field.strip() in (f for f, _ in axes):
            problems.append(f"--sweep {field.strip()} is given twice: list all its values in one --sweep")
        else:
            axes.append((field.strip(), values))
    if problems:
        raise ConfigError(problems)
    return axes


def run_sweep(args: argparse.Namespace) -> int:
    """One estimate per combination of the --sweep values, as a table (or JSON rows)."""
    import itertools
    import json

    from vlmtune.memory.gpus import GIB

    axes = sweep_axes(args.sweep)
    rows = []
    for combo in itertools.product(*(values for _, values in axes)):
        settings = [f"{field}={value}" for (field, _), value in zip(axes, combo, strict=True)]
        _, b, _ = estimate_args(args, settings)
        rows.append((combo, b))
    if args.plot is not None:
        from vlmtune.memory.sweep_picture import render_sweep

        names = [field.rsplit(".", 1)[-1] for field, _ in axes]
        render_sweep([(", ".join(f"{n}={v}" for n, v in zip(names, combo, strict=True)), b) for combo, b in rows],
                     args.plot)
    if args.json:
        print(json.dumps([{"settings": dict(zip([f for f, _ in axes], combo, strict=True)), **b.to_dict()}
                          for combo, b in rows], indent=2, default=str))
        return 0
    head = [field for field, _ in axes] + ["trainable", "allocated", "reserved", "nvidia-smi", "peak at"]
    if args.gpu:
        head.append("verdict")
    table = [head]
    for combo, b in rows:
        line = [*combo, f"{b.trainable_params / 1e6:,.1f} M", f"{b.peak_allocated / GIB:.2f}",
                f"{b.peak_reserved / GIB:.2f}", f"{b.peak_total / GIB:.2f}", b.peak_phase]
        if args.gpu:
            line.append(b.verdict.status if b.verdict else "-")
        table.append(line)
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    first = rows[0][1]
    print(f"{first.model}: GiB per GPU, {first.inputs.num_gpus} GPU(s), ZeRO {first.inputs.zero_stage}, "
          f"offload {first.inputs.offload}")
    for n, r in enumerate(table):
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if args.plot is not None:
        print(f"picture: {args.plot}")
    return 0


def run(args: argparse.Namespace) -> int:
    import json

    if getattr(args, "sweep", None):
        return run_sweep(args)
    config, breakdown, data = estimate_args(args)
    if args.plot is not None:
        from vlmtune.memory.picture import render_breakdown

        render_breakdown(breakdown, args.plot)
    if args.json:
        out = breakdown.to_dict()
        if data:
            out["data"] = {
                "path": args.data,
                "samples": len(data[2].samples),
                "percentiles": data[0].percentiles,
                "over_max_length": data[0].over_limit,
                "exact_text_tokens": data[2].exact_text,
            }
        print(json.dumps(out, indent=2, default=str))
    else:
        print(breakdown.to_table())
        if data:
            print(data[1])
        if config.hardware.precision == "bf16" and breakdown.inputs.precision == "fp16" and breakdown.verdict:
            print(f"{breakdown.verdict.gpu} has no bf16: estimated in fp16, which `vlmtune train` uses there instead "
                  "(full fine-tuning then keeps fp32 master weights).")
        from vlmtune.memory.catalogue import lookup_model
        from vlmtune.support_matrix import untrainable_note

        untrainable = untrainable_note(lookup_model(breakdown.model).model_type, breakdown.model)
        if untrainable:
            print(f"note: {untrainable}.")
        if config.training.batch_size == "auto":
            print("training.batch_size=auto: estimated at micro-batch 1; `vlmtune train` picks the largest that fits "
                  "the visible GPU, and `vlmtune recommend --gpu NAME` shows it for a named card.")
        if args.plot is not None:
            print(f"picture: {args.plot}")
    return 0
