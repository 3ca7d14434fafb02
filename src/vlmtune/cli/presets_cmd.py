"""`vlmtune presets list|show NAME`."""

from __future__ import annotations

import argparse

HELP = "list the presets or show one (its target hardware, launch command and every resolved field)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show"],
                   help="list: every preset and what it targets; show NAME: that preset's whole config")
    p.add_argument("name", nargs="?", help="preset name (for show)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from vlmtune.config.loader import config_to_dict
    from vlmtune.config.presets import list_presets, load_preset, preset_header
    from vlmtune.errors import ConfigError

    if args.action == "list":
        for name in list_presets():
            first = preset_header(name).splitlines()
            target = next((ln for ln in first if ln.startswith("Targets:")), "")
            print(f"{name:18s} {target.removeprefix('Targets: ')}")
        return 0
    if not args.name:
        raise ConfigError([f"`presets show` needs a preset name; available: {', '.join(list_presets())}"])
    print(preset_header(args.name))
    print()
    print(yaml.safe_dump(config_to_dict(load_preset(args.name)), sort_keys=False), end="")
    return 0
