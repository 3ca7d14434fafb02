"""`vlmtune recommend --gpu NAME [--num-gpus N] [--model M] [--data FILE]` and `vlmtune recommend --table`.

Searches method (lean QLoRA included), LoRA rank, loss chunk, ZeRO stage and offload, micro-batch and accumulation
(keeping the effective batch), gradient checkpointing and max pixels for the highest-throughput configuration that
fits with a safety margin, and writes it as a config file `vlmtune train` accepts: every recommended setting is a
field of it (the `distributed` section included), so `vlmtune train FILE --dry-run --gpu NAME` shows the same
estimate and `vlmtune train FILE` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.cli.estimate_cmd import add_config_arguments, data_inputs, resolve

if TYPE_CHECKING:
    from vlmtune.memory.recommend import Recommendation

HELP = "find the fastest configuration that fits a GPU and write it as a config file (or print a GPU table)"
DEFAULT_EFFECTIVE_BATCH = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--gpu", help="GPU name, e.g. 'RTX 4090', A100-80GB, H100, or a memory size such as 24GB "
                                 "(required unless --table)")
    p.add_argument(
        "--method",
        dest="search_method",
        choices=["auto", "lora", "qlora", "full"],
        default="auto",
        help="auto: LoRA or QLoRA, whichever is faster and fits; full fine-tuning only when asked",
    )
    p.add_argument(
        "--effective-batch",
        dest="effective_batch",
        type=int,
        help=f"samples per optimizer step (default: the config's, or {DEFAULT_EFFECTIVE_BATCH})",
    )
    p.add_argument(
        "--margin", type=float, default=0.10, help="fraction of GPU memory to leave free (default 0.10)"
    )
    p.add_argument(
        "--cpu-ram", dest="cpu_ram", type=float, help="GiB of CPU RAM offloading may use (default: any)"
    )
    p.add_argument(
        "--output", "-o", default="vlmtune-recommended.yaml", help="config file to write ('-': stdout)"
    )
    p.add_argument("--table", action="store_true", help="print the GPU x count table for the model instead")
    p.add_argument("--gpus", help="comma-separated GPUs for --table (default: the whole catalogue)")
    p.add_argument("--counts", default="1,2,4,8", help="GPU counts for --table (default 1,2,4,8)")


def _methods(choice: str) -> tuple[str, ...]:
    return ("lora", "qlora") if choice == "auto" else (choice,)


TEXT_ROOM = 256
"""Text tokens a recommendation leaves beside the images when the configured data.max_length is too short for them."""


def room_for_text(config: Any, base: Any) -> tuple[Any, Any, str | None]:
    """(config, inputs, why) with data.max_length raised where the images alone would fill it: the engine drops or cuts
    every such sample, so a recommendation at that length would train nothing (LLaVA-1.5's 336 px image is 576 tokens,
    the ultra_low_memory preset's max_length 512)."""
    from vlmtune.memory.activations import sample_image_tokens

    image_tokens = sample_image_tokens(base)
    if image_tokens + TEXT_ROOM // 2 <= base.seq_len:
        return config, base, None
    length = -(-(image_tokens + TEXT_ROOM) // 64) * 64
    why = (f"data.max_length raised from {base.seq_len} to {length}: the images of a sample alone take "
           f"{image_tokens} tokens for this model at image_size {config.data.image_size}, which would leave no room "
           "for text (such samples are dropped or cut); set data.max_length or data.image_size yourself to change it")
    config = config.model_copy(update={"data": config.data.model_copy(update={"max_length": length})})
    return config, base.with_(seq_len=length), why


def _search_inputs(args: argparse.Namespace) -> tuple[Any, Any, int, int | None, str | None]:
    """(config, estimator inputs, effective batch, CPU RAM bytes or None, why data.max_length was raised or None)
    of the command line."""
    from vlmtune.memory import inputs_from_config
    from vlmtune.memory.gpus import GIB

    config = resolve(args)
    base = inputs_from_config(config, num_gpus=args.num_gpus, images_per_sample=args.images_per_sample)
    config, base, raised = room_for_text(config, base)
    configured = base.batch_size * config.training.gradient_accumulation_steps
    effective = args.effective_batch or (configured if configured > 1 else DEFAULT_EFFECTIVE_BATCH)
    cpu_ram = int(args.cpu_ram * GIB) if args.cpu_ram is not None else None
    return config, base, effective, cpu_ram, raised


def recommendation(args: argparse.Namespace) -> tuple[Recommendation, Any]:
    """The recommended setting for `--gpu` and the resolved config it starts from (the CLI's and the studio's
    `recommend`); write it with `memory.advice.config_yaml(rec, config, name, train_path=args.data)`."""
    from vlmtune.memory import get_gpu
    from vlmtune.memory.recommend import recommend

    config, base, effective, cpu_ram, raised = _search_inputs(args)
    base, data = data_inputs(args, base, config.data.image_root)
    rec = recommend(
        base,
        get_gpu(args.gpu),
        base.num_gpus,
        effective,
        _methods(args.search_method),
        args.margin,
        profile=data[2] if data else None,
        max_cpu_ram=cpu_ram,
    )
    if raised:
        rec = dataclasses.replace(rec, reasons=(raised, *rec.reasons))
    return rec, config


def run(args: argparse.Namespace) -> int:
    import json

    from vlmtune.errors import ConfigError, VlmtuneError
    from vlmtune.memory import all_gpus, get_gpu
    from vlmtune.memory.advice import config_yaml, format_table, table

    if not args.table and not args.gpu:
        raise ConfigError(
            ["--gpu is required (or use --table); known GPUs: " + ", ".join(g.name for g in all_gpus())]
        )
    if args.table and args.plot is not None:
        raise ConfigError(["--plot draws the recommended setting's memory; drop it with --table (a table of GPUs)"])
    if args.table:
        config, base, effective, cpu_ram, raised = _search_inputs(args)
        if raised and not args.json:
            print(f"note: {raised}")
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
        if not counts or min(counts) < 1:
            raise ConfigError([f"--counts must list positive GPU counts, got {args.counts!r}"])
        gpus = [get_gpu(g) for g in args.gpus.split(",")] if args.gpus else list(all_gpus())
        recs = table(base, gpus, counts, effective, _methods(args.search_method), args.margin, cpu_ram)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "gpu": r.gpu.name,
                            "num_gpus": r.num_gpus,
                            "summary": r.describe(),
                            "inputs": r.best.inputs.to_dict() if r.best else None,
                            "peak_total": r.best.breakdown.peak_total if r.best else None,
                        }
                        for r in recs
                    ],
                    indent=2,
                    default=str,
                )
            )
        else:
            print(
                f"{base.model}: effective batch {effective}, sequence {base.seq_len}, margin {args.margin:.0%}"
            )
            print(format_table(recs))
        return 0
    rec, config = recommendation(args)
    if args.json:
        print(
            json.dumps(
                {
                    "summary": rec.describe(),
                    "considered": rec.considered,
                    "estimate": rec.best.breakdown.to_dict() if rec.best else None,
                },
                indent=2,
                default=str,
            )
        )
    else:
        print(f"{rec.num_gpus} x {rec.gpu.name}: {rec.describe()}")
        if rec.best:
            print(rec.best.breakdown.peak_summary())
        for reason in rec.reasons:
            print(f"why: {reason}")
        for note in rec.best.breakdown.notes if rec.best else ():
            print(f"note: {note}")
    if args.plot is not None:
        _plot(rec, args.plot, quiet=args.json)
    if rec.best is None:
        return 1
    from vlmtune.memory.catalogue import lookup_model
    from vlmtune.support_matrix import untrainable_note

    untrainable = untrainable_note(lookup_model(rec.best.inputs.model).model_type, rec.best.inputs.model)
    if untrainable:  # a config `vlmtune train` would refuse is not written
        raise VlmtuneError(f"{untrainable}; no config written. The estimate above is for planning only.")
    name = "THIS_FILE" if args.output == "-" else args.output
    train_path = args.data
    if args.output != "-":  # a config file's data paths are relative to the file (config/loader.relative_to_file)
        config, train_path = _paths_from(Path(args.output), config, args.data)
    text = config_yaml(rec, config, name, train_path=train_path)
    if args.output == "-":
        print(text, end="")
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        if not args.json:
            print(f"wrote {args.output} (every recommended setting is in it); check it with: vlmtune train "
                  f"{args.output} --dry-run --gpu \"{rec.gpu.name}\"; train with: vlmtune train {args.output}")
    return 0


def _paths_from(config_file: Path, config: Any, data: str | None) -> tuple[Any, str | None]:
    """The data paths given on the command line (relative to the working directory) as the written file reads
    them: relative to its own folder."""
    import os

    from vlmtune.config.loader import DATA_PATH_FIELDS, local_relative

    folder = config_file.expanduser().resolve().parent

    def rel(value: Any) -> Any:
        if (parts := local_relative(None if value is None else str(value))) is None:
            return value
        return os.path.relpath(Path(parts[0]).expanduser().resolve(), folder) + parts[1]

    updates = {k: rel(getattr(config.data, k)) for k in DATA_PATH_FIELDS if getattr(config.data, k) is not None}
    config = config.model_copy(update={"data": config.data.model_copy(update=updates)}) if updates else config
    return config, rel(data)


def _plot(rec: Recommendation, path: Path, quiet: bool) -> None:
    """--plot FILE.png: the recommended setting's memory picture (as `estimate --plot`)."""
    from vlmtune.errors import VlmtuneError

    if rec.best is None:
        raise VlmtuneError(f"--plot {path}: nothing to draw, no setting fits {rec.num_gpus} x {rec.gpu.name} (see "
                           "the reasons above); try a larger GPU or more GPUs")
    from vlmtune.memory.picture import render_breakdown

    render_breakdown(rec.best.breakdown, path)
    if not quiet:
        print(f"picture: {path}")
