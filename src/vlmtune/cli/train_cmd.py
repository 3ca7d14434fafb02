"""`vlmtune train [CONFIG] [section.field=value ...] [flags]`.

Precedence, lowest first: preset, config file, compatibility flags, dotted overrides.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


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
    from vlmtune.train.engine import train

    result = train(config, resume=args.resume)
    print(result.summary())
    return 0
