"""`vlmtune train [CONFIG] [section.field=value ...] [flags]`.

Precedence, lowest first: preset, config file, compatibility flags, dotted overrides. A flag and a dotted override
(or two dotted overrides) that set one field to different values are refused as a contradiction, with the config's
own problems, rather than resolved by precedence: one command line should not say two things.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

HELP = "fine-tune a model (LoRA, QLoRA or full) from a config file, a preset, flags and dotted overrides"

# flag dest -> config field; the flags the original scripts accepted.
FLAG_FIELDS = {
    "output_dir": "output_dir",
    "lora_r": "method.lora.rank",
    "lora_alpha": "method.lora.alpha",
    "lora_dropout": "method.lora.dropout",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "model": "model.name_or_path",
    "train_data": "data.train_path",
    "val_data": "data.val_path",
    "image_root": "data.image_root",
    "max_steps": "training.max_steps",
    "epochs": "training.epochs",
    "learning_rate": "training.learning_rate",
    "memory_fraction": "hardware.memory_fraction",
    "num_gpus": "distributed.num_gpus",
    "num_nodes": "distributed.num_nodes",
    "hostfile": "distributed.hostfile",
    "master_addr": "distributed.master_addr",
    "master_port": "distributed.master_port",
}


OFFLOAD_CHOICES = ("none", "optimizer", "optimizer_and_params")
OFFLOAD_ALIASES = {"all": "optimizer_and_params"}
"""Old spellings still accepted: `estimate --offload all` before train and estimate shared one vocabulary."""


def offload_name(text: str) -> str:
    """--offload's value in distributed.offload's vocabulary (`all` -> `optimizer_and_params`)."""
    return OFFLOAD_ALIASES.get(text, text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG|KEY=VALUE",
                   help="a YAML/JSON config file and/or dotted overrides such as method.lora.rank=32")
    p.add_argument("--config", "--sft_config", "--sft-config", dest="config", help="YAML or JSON config file")
    p.add_argument("--preset", help="start from a preset (see `vlmtune presets list`)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir")
    p.add_argument("--model", help="hub id or local folder of the base model")
    p.add_argument("--train-data", "--train_data", dest="train_data")
    p.add_argument("--val-data", "--val_data", dest="val_data")
    p.add_argument("--image-root", "--image_root", "--image_folder", dest="image_root",
                   help="data.image_root: folder relative image paths resolve against (LLaVA's --image_folder)")
    p.add_argument("--lora_r", "--lora-r", dest="lora_r", type=int)
    p.add_argument("--lora_alpha", "--lora-alpha", dest="lora_alpha", type=float)
    p.add_argument("--lora_dropout", "--lora-dropout", dest="lora_dropout", type=float)
    p.add_argument("--target_modules", "--target-modules", dest="target_modules",
                   help="comma-separated module names (q_proj,v_proj,o_proj) or minimal|attention|all")
    p.add_argument("--flash_attn", "--flash-attn", dest="flash_attn", action="store_true",
                   help="use flash_attention_2 (needs the flash-attn package)")
    p.add_argument("--use-4bit", "--use_4bit", dest="use_4bit", action="store_true",
                   help="QLoRA: LoRA adapters on a 4-bit NF4 base (method.name=qlora). Like every flag it replaces the "
                        "preset's or config file's method, full included (the log says so); with --use-lora it is "
                        "QLoRA too; with an explicit method.name=lora or full override it is refused")
    p.add_argument("--use-lora", "--use_lora", dest="use_lora", action="store_true",
                   help="LoRA (method.name=lora); with --use-4bit or method.name=qlora: QLoRA")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    p.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps",
                   dest="gradient_accumulation_steps", type=int)
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--learning-rate", "--learning_rate", "--lr", dest="learning_rate", type=float)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in output_dir (or from the given checkpoint folder)")
    p.add_argument("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint", action="store_true",
                   help="with --resume: skip the check against the checkpoint's manifest and let DeepSpeed unpickle "
                        "any object in it (only for checkpoints from a source you trust, e.g. another tool)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an output_dir that holds files other than a vlmtune run's (none is deleted; "
                        "same-named files such as config.yaml are replaced)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit (values that come from the method's defaults say so)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the memory preflight of the config (estimate and fit) and exit: no weights load, no "
                        "process starts; against --gpu NAME or the visible GPU (e.g. a file `vlmtune recommend` wrote)")
    p.add_argument("--gpu", help="with --dry-run: the GPU to check against, by catalogue name (e.g. 'RTX 4090') or "
                                 "memory size (e.g. 24GB)")
    p.add_argument("--force", action="store_true",
                   help="train even when the memory estimate says the run does not fit the GPU (hardware.force_fit)")
    p.add_argument("--memory-fraction", "--memory_fraction", dest="memory_fraction", type=float,
                   help="cap this process at this fraction of the GPU's memory, as if on a smaller card")
    add_distributed_arguments(p)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (DeepSpeed; see docs/DISTRIBUTED.md)")
    g.add_argument("--num-gpus", "--num_gpus", dest="num_gpus", type=int,
                   help="processes (GPUs) per node; more than one starts them through torchrun or deepspeed")
    g.add_argument("--num-nodes", "--num_nodes", dest="num_nodes", type=int, help="nodes (needs --hostfile)")
    g.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (`host slots=N` per line)")
    g.add_argument("--master-addr", "--master_addr", dest="master_addr", help="address of the rank-0 node")
    g.add_argument("--master-port", "--master_port", dest="master_port", type=int, help="port of the rank-0 node")
    g.add_argument("--deepspeed", metavar="FILE", help="train with DeepSpeed using this JSON config")
    g.add_argument("--no-deepspeed", "--no_deepspeed", dest="no_deepspeed", action="store_true",
                   help="no DeepSpeed (several processes then run plain DDP)")
    g.add_argument("--zero-stage", "--zero_stage", dest="zero_stage", type=int, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage (implies DeepSpeed)")
    g.add_argument("--offload", choices=OFFLOAD_CHOICES, type=offload_name,
                   help="DeepSpeed offload to CPU RAM (implies DeepSpeed): none, optimizer or optimizer_and_params "
                        "(parameters too, ZeRO-3; `all` is accepted for it, as `estimate` used to spell it)")
    # The deepspeed launcher passes --local_rank=N to each process unless told otherwise; LOCAL_RANK is read instead.
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)


def flag_settings(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(flag, config field, value) for each compatibility flag given."""
    out = [("--" + dest.replace("_", "-"), field, str(getattr(args, dest)))
           for dest, field in FLAG_FIELDS.items() if getattr(args, dest, None) is not None]
    if args.target_modules:
        names = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        value = names[0] if len(names) == 1 and names[0] in ("minimal", "attention", "all") else "[" + ",".join(names) + "]"
        out.append(("--target-modules", "method.lora.target_modules", value))
    if args.flash_attn:
        out.append(("--flash-attn", "hardware.attn_implementation", "flash_attention_2"))
    if args.use_4bit:
        out.append(("--use-4bit", "method.name", "qlora"))
    elif args.use_lora:
        out.append(("--use-lora", "method.name", "lora"))
    if getattr(args, "force", False):
        out.append(("--force", "hardware.force_fit", "true"))
    return out + distributed_settings(args)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Map the compatibility flags onto dotted overrides of the typed config."""
    return [f"{field}={value}" for _, field, value in flag_settings(args)]


def distributed_settings(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    out = []
    if getattr(args, "deepspeed", None):
        out += [("--deepspeed", "distributed.engine", "deepspeed"),
                ("--deepspeed", "distributed.deepspeed_config", args.deepspeed)]
    if getattr(args, "zero_stage", None) is not None:
        out += [("--zero-stage", "distributed.engine", "deepspeed"),
                ("--zero-stage", "distributed.zero_stage", str(args.zero_stage))]
    if getattr(args, "offload", None) is not None:
        out += [("--offload", "distributed.offload", args.offload)]
        if args.offload != "none":
            out += [("--offload", "distributed.engine", "deepspeed")]
    if getattr(args, "no_deepspeed", False):
        out += [("--no-deepspeed", "distributed.engine", "none")]
    return out


_WHY = {
    "--use-4bit": " (--use-4bit means QLoRA, LoRA adapters on a 4-bit base; lora and full train 16-bit weights)",
}


def contradictions(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """Flags that cannot both hold, and a field set to two different values on one command line."""
    from vlmtune.config.reading import Refused, parse_value

    problems = []
    deepspeed, stage, offload = (getattr(args, k, None) for k in ("deepspeed", "zero_stage", "offload"))
    if getattr(args, "no_deepspeed", False):
        needing = [("--deepspeed", deepspeed), ("--zero-stage", stage is not None),
                   (f"--offload {offload}", offload not in (None, "none"))]
        problems += [f"--no-deepspeed contradicts {flag}, which trains with DeepSpeed: give one of them"
                     for flag, given in needing if given]
    elif deepspeed:
        problems += [f"{flag} does nothing with --deepspeed FILE: the file's zero_optimization section sets the "
                     "stage and offload; set them there, or drop --deepspeed to have vlmtune write the DeepSpeed "
                     "config" for flag, given in (("--zero-stage", stage is not None), ("--offload", offload)) if given]
    seen: dict[str, tuple[str, Any]] = {}
    for flag, field, value in flag_settings(args):
        if field != "distributed.engine":  # set by several DeepSpeed flags; their conflicts are named above
            seen.setdefault(field, (flag, parse_value(value)))
    for item in overrides:
        key, _, raw = item.partition("=")
        field = key.strip()
        try:
            value = parse_value(raw)
        except Refused:
            continue  # the loader reports it
        if field not in seen:
            seen[field] = (item, value)
            continue
        who, earlier = seen[field]
        if _same(earlier, value) or (who == "--use-lora" and value == "qlora"):
            continue
        if who.startswith("--"):
            problems.append(f"{_short(item)} contradicts {who}, which sets {field}={_short(earlier)}"
                            f"{_WHY.get(who, '')}: give {field} once")
        else:
            problems.append(f"{field} is given twice on the command line ({_short(who)}, then {_short(item)}): "
                            "give it once")
    return problems


def _names_a_field(item: str) -> bool:
    """`training.learning_rate` (no `=`, no such file): an override missing its value, not a config file."""
    from vlmtune.config.schema import VlmtuneConfig

    parts = item.split(".")
    return (len(parts) > 1 and parts[0] in VlmtuneConfig.model_fields and all(p.isidentifier() for p in parts)
            and not os.path.exists(item))


def _same(a: Any, b: Any) -> bool:
    """Equal as the config would read them (`1e-4` is a string to YAML 1.1 and 0.0001 to the schema)."""
    if a == b:
        return True
    try:
        return not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resolve_config(args: argparse.Namespace) -> Any:
    from vlmtune.config.loader import load_config
    from vlmtune.config.presets import preset_dict
    from vlmtune.errors import ConfigError

    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    valueless = [i for i in files if _names_a_field(i)]
    files = [i for i in files if i not in valueless]
    if args.config:
        files.insert(0, args.config)
    if len(files) > 1:
        raise ConfigError([f"give one config file, got {len(files)}: {', '.join(files)}"])
    base: dict[str, Any] = preset_dict(args.preset) if args.preset else {}
    path = files[0] if files else None
    problems = [f"'{i}' names a config field but gives no value: write {i}=VALUE" for i in valueless]
    problems += contradictions(args, overrides)
    config = load_config(path, flag_overrides(args) + overrides, base=base, problems=problems)
    _say_replaced_method(args, base, path, overrides)
    return config


def _say_replaced_method(args: argparse.Namespace, base: dict[str, Any], path: str | None, overrides: list[str]) -> None:
    """--use-4bit / --use-lora over a preset's or file's other method is precedence, but not a silent one."""
    from vlmtune.config.loader import read_mapping

    flag = "--use-4bit" if args.use_4bit else "--use-lora" if args.use_lora else None
    if flag is None or any(o.strip().startswith("method.name=") for o in overrides):
        return
    wanted = "qlora" if args.use_4bit else "lora"
    for where, data in (("the config file", read_mapping(path) if path else {}), (f"preset {args.preset}", base)):
        method = data.get("method")  # read and validated already
        name = method.get("name") if isinstance(method, dict) else None
        if name is not None:
            if name != wanted:
                log.info("%s: method.name %s (from %s) becomes %s", flag, name, where, wanted)
            return


def run(args: argparse.Namespace) -> int:
    import yaml

    from vlmtune.config.loader import config_to_dict

    config = resolve_config(args)
    if args.print_config:
        from vlmtune.config.method_defaults import derived_fields

        print(annotated(yaml.safe_dump(config_to_dict(config), sort_keys=False), derived_fields(config)), end="")
        return 0
    if args.dry_run:
        from vlmtune.train.dry_run import dry_run, report

        result = dry_run(config, args.gpu)
        print(report(result))
        return 0 if result.fits else 1
    if args.gpu:
        from vlmtune.errors import ConfigError

        raise ConfigError([f"--gpu {args.gpu} only applies with --dry-run (training runs on the GPU it finds); add "
                           "--dry-run to check the config against that GPU, or drop --gpu"])
    from vlmtune.train.launch import launch, should_launch

    if should_launch(config):
        return launch(config, train_arguments(args))
    from vlmtune.train.engine import train

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # progress and logs come from rank 0; other ranks report only errors
        logging.getLogger().setLevel(logging.ERROR)
    from vlmtune.train.interrupt import TrainingInterrupted

    try:
        result = train(config, resume=args.resume, trust_checkpoint=args.trust_checkpoint, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        exc.command = resume_command(args)
        raise
    if rank == 0:
        print(result.summary())
    return 0


def annotated(text: str, notes: dict[str, str]) -> str:
    """YAML from safe_dump with `# note` after the line of each dotted field in `notes` (block style, 2 spaces)."""
    path: list[str] = []
    lines = []
    for line in text.splitlines():
        key = line.strip().split(":", 1)[0]
        depth = (len(line) - len(line.lstrip(" "))) // 2
        if line.strip() and not line.lstrip().startswith("-") and ":" in line:
            path = [*path[:depth], key]
            note = notes.get(".".join(path))
            if note:
                line = f"{line}  # {note}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run from its newest intact checkpoint (a named one is dropped)."""
    import shlex

    rest, kept = train_arguments(args), []
    skip = False
    for i, arg in enumerate(rest):
        if skip:
            skip = False
        elif arg == "--resume":
            skip = isinstance(args.resume, str) and i + 1 < len(rest) and rest[i + 1] == args.resume
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["vlmtune", "train", *kept, "--resume"])


def train_arguments(args: argparse.Namespace) -> list[str]:
    """This command's own arguments (what follows `train`), for the processes the launcher starts."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    rest = argv[argv.index("train") + 1:] if "train" in argv else argv
    return [*rest, "--debug"] if getattr(args, "debug", False) and "--debug" not in rest else rest
