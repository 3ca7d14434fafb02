"""`vlmtune` command line: one module per subcommand, heavy imports inside each command.

User mistakes (VlmtuneError) print a one-paragraph message and exit non-zero; `--debug` shows the traceback. A file
system error that reaches here (a path that cannot be read or written: permissions, a full or read-only disk, a name
too long) is the user's to fix too, and reads the same way, exit 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from vlmtune.cli import (
    checkpoints_cmd,
    data_cmd,
    demo_cmd,
    estimate_cmd,
    export_cmd,
    families_cmd,
    predict_cmd,
    presets_cmd,
    quiet,
    recommend_cmd,
    studio_cmd,
    tiny_cmd,
    train_cmd,
)
from vlmtune.errors import VlmtuneError

MODEL_COMMANDS = {"train", "predict", "export", "demo", "data", "tiny-model", "studio"}
"""Commands that import transformers anyway (quiet.configure sets its logging up front for them)."""

COMMANDS = {
    "train": train_cmd,
    "data": data_cmd,
    "presets": presets_cmd,
    "families": families_cmd,
    "tiny-model": tiny_cmd,
    "demo": demo_cmd,
    "predict": predict_cmd,
    "export": export_cmd,
    "checkpoints": checkpoints_cmd,
    "estimate": estimate_cmd,
    "recommend": recommend_cmd,
    "studio": studio_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    from vlmtune import __version__

    parser = argparse.ArgumentParser(prog="vlmtune", description="Fine-tune vision-language models.")
    parser.add_argument("--version", action="version", version=f"vlmtune {__version__}",
                        help="print the version and exit")
    _common_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    for p in subparsers(parser):  # --debug / --verbose anywhere: before the command, after it, after its action
        _common_flags(p, argparse.SUPPRESS)
        _help_from_config(p)
    return parser


def _help_from_config(p: argparse.ArgumentParser) -> None:
    """A flag that sets a config field and has no help of its own shows the field's docstring (written once, in
    config/schema.py), e.g. `--lora_r: sets method.lora.rank: LoRA rank ...`."""
    fields = {}
    for module in COMMANDS.values():
        fields.update(getattr(module, "FLAG_FIELDS", {}), **getattr(module, "CONFIG_FLAGS", {}))
    for action in p._actions:
        if action.help is None and action.dest in fields:
            doc = _field_doc(fields[action.dest])
            action.help = f"sets {fields[action.dest]}" + (f": {doc}" if doc else "")


def _field_doc(path: str) -> str:
    from vlmtune.config.loader import field_info

    info = field_info(path)
    text = " ".join((info.description or "").split()) if info is not None else ""
    return text.replace("%", "%%")


def _common_flags(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--debug", action="store_true", default=default, help="show Python tracebacks for errors")
    p.add_argument("--verbose", action="store_true", default=default,
                   help="also show other libraries' warnings and progress notes (hidden by default)")


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (`data check`) included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):
                found += [p, *subparsers(p)]
    return found


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The deepest subcommand parser named in argv (`vlmtune data check ...` -> the `data check` parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, arg in enumerate(argv):
                if arg in action.choices:
                    return _command_parser(action.choices[arg], argv[i + 1:])
    return parser


def _suggest(flag: str, parser: argparse.ArgumentParser) -> str:
    import difflib

    name = flag.split("=", 1)[0].replace("_", "-")
    forms = {o.replace("_", "-") for a in parser._actions for o in a.option_strings if o.startswith("--")}
    first = name[2:].split("-")[0]  # `--lora-rank`: the --lora-* flags first, not --local-rank
    kin = [o for o in forms if o[2:].split("-")[0] == first]
    close = difflib.get_close_matches(name, kin, n=1, cutoff=0.5) or difflib.get_close_matches(
        name, sorted(forms), n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    # Positionals after flags (`train --preset x a.b=1`) land in `extra`; only commands with `items` take them.
    stray = [e for e in extra if e.startswith("-") or not hasattr(args, "items")]
    if stray:
        command = _command_parser(parser, given)  # its usage, not the top-level one
        hints = "".join(_suggest(s, command) for s in stray if s.startswith("--"))
        command.error(f"unrecognized arguments: {' '.join(stray)}{hints}")
    if extra:
        args.items = [*args.items, *extra]
    args.argv = given  # `train` hands it to the processes it launches
    return args


def _rank_prefix() -> str:
    """`[rank N] ` inside a multi-process run, so an error says which process it came from."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    return f"[rank {rank}] " if world and int(world) > 1 and rank is not None else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The engine logs its decisions (precision, parameter counts, data-check summary) through `logging`; other
    # libraries' notes are hidden unless --verbose (quiet.py).
    quiet.configure(args.verbose, args.debug, loads_models=args.command in MODEL_COMMANDS)
    try:
        return int(args._run(args) or 0)
    except VlmtuneError as exc:
        if args.debug:
            raise
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug or exc.filename is None or exc.errno not in _USER_ERRNOS:
            raise
        print(f"{_rank_prefix()}error: {_os_message(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 2


_USER_ERRNOS = {
    errno.EACCES: "permission denied: check the permissions of the path, or choose another",
    errno.EPERM: "operation not permitted: check the permissions of the path, or choose another",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder where a file was expected",
    errno.ENAMETOOLONG: "the path is too long for the file system (a name can have at most 255 bytes)",
    errno.ENOSPC: "no space left on the disk: free some space or choose another output_dir",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another output_dir",
    errno.EROFS: "the file system is read-only: choose another output_dir",
    errno.ELOOP: "a symbolic link loop in the path",
}


def _os_message(exc: OSError) -> str:
    path = str(exc.filename)
    shown = path if len(path) <= 200 else f"{path[:100]}...{path[-60:]}"
    return f"{shown}: {_USER_ERRNOS[exc.errno]}"


if __name__ == "__main__":
    sys.exit(main())
