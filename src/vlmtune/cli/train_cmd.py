"""`vlmtune train [CONFIG] [section.field=value ...] [flags]`.

Precedence, lowest first: preset, config file, compatibility flags, dotted overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG|KEY=VALUE",
                   help="a YAML/JSON config file and/or dotted overrides such as method.lora.rank=32")
    p.add_argument("--config", "--sft_config", "--sft-config", dest="config", help="YAML or JSON config file")
    p.add_argument("--preset", help="start from a preset (see `vlmtune presets list`)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir")
    p.add_argument("--model", help="hub id or local folder of the base model")
    p.add_argument("--train-data", "--train_data", dest="train_data")
    p.add_argument("--val-data", "--val_data", dest="val_data")
    p.add_argument("--lora_r", "--lora-r", dest="lora_r", type=int)
    p.add_argument("--lora_alpha", "--lora-alpha", dest="lora_alpha", type=float)
    p.add_argument("--lora_dropout", "--lora-dropout", dest="lora_dropout", type=float)
    p.add_argument("--target_modules", "--target-modules", dest="target_modules",
                   help="comma-separated module names (q_proj,v_proj,o_proj) or minimal|attention|all")
    p.add_argument("--flash_attn", "--flash-attn", dest="flash_attn", action="store_true",
                   help="use flash_attention_2 (needs the flash-attn package)")
    p.add_argument("--use-4bit", "--use_4bit", dest="use_4bit", action="store_true", help="QLoRA (4-bit NF4)")
    p.add_argument("--use-lora", "--use_lora", dest="use_lora", action="store_true", help="LoRA")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    p.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps",
                   dest="gradient_accumulation_steps", type=int)
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--learning-rate", "--learning_rate", "--lr", dest="learning_rate", type=float)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in output_dir (or from the given checkpoint folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an output_dir that holds files other than a vlmtune run's (none is deleted; "
                        "same-named files such as config.yaml are replaced)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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
    g.add_argument("--offload", choices=("none", "optimizer", "optimizer_and_params"),
                   help="DeepSpeed offload to CPU RAM (implies DeepSpeed)")
    # The deepspeed launcher passes --local_rank=N to each process unless told otherwise; LOCAL_RANK is read instead.
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Map the compatibility flags onto dotted overrides of the typed config."""
    out = [f"{field}={getattr(args, dest)}" for dest, field in FLAG_FIELDS.items() if getattr(args, dest, None) is not None]
    if args.target_modules:
        names = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        value = names[0] if len(names) == 1 and names[0] in ("minimal", "attention", "all") else "[" + ",".join(names) + "]"
        out.append(f"method.lora.target_modules={value}")
    if args.flash_attn:
        out.append("hardware.attn_implementation=flash_attention_2")
    if args.use_4bit:
        out.append("method.name=qlora")
    elif args.use_lora:
        out.append("method.name=lora")
    if getattr(args, "force", False):
        out.append("hardware.force_fit=true")
    return out + distributed_overrides(args)


def distributed_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "deepspeed", None):
        out += ["distributed.engine=deepspeed", f"distributed.deepspeed_config={args.deepspeed}"]
    if getattr(args, "zero_stage", None) is not None:
        out += ["distributed.engine=deepspeed", f"distributed.zero_stage={args.zero_stage}"]
    if getattr(args, "offload", None) is not None:
        out += [f"distributed.offload={args.offload}"]
        if args.offload != "none":
            out += ["distributed.engine=deepspeed"]
    if getattr(args, "no_deepspeed", False):
        out += ["distributed.engine=none"]
    return out


def resolve_config(args: argparse.Namespace) -> Any:
    from vlmtune.config.loader import load_config
    from vlmtune.config.presets import preset_dict
    from vlmtune.errors import ConfigError

    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if args.config:
        files.insert(0, args.config)
    if len(files) > 1:
        raise ConfigError([f"give one config file, got {len(files)}: {', '.join(files)}"])
    base: dict[str, Any] = preset_dict(args.preset) if args.preset else {}
    return load_config(files[0] if files else None, flag_overrides(args) + overrides, base=base)


def run(args: argparse.Namespace) -> int:
    import yaml

    from vlmtune.config.loader import config_to_dict

    config = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    from vlmtune.train.launch import launch, should_launch

    if should_launch(config):
        return launch(config, train_arguments(args))
    from vlmtune.train.engine import train

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # progress and logs come from rank 0; other ranks report only errors
        logging.getLogger().setLevel(logging.ERROR)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if rank == 0:
        print(result.summary())
    return 0


def train_arguments(args: argparse.Namespace) -> list[str]:
    """This command's own arguments (what follows `train`), for the processes the launcher starts."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    rest = argv[argv.index("train") + 1:] if "train" in argv else argv
    return [*rest, "--debug"] if getattr(args, "debug", False) and "--debug" not in rest else rest
