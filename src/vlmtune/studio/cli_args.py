"""The studio's actions as CLI command lines: parsed by the CLI's own parser and handed to the command's functions,
so what a page shows as 'the equivalent command' is what it ran."""

from __future__ import annotations

import argparse
import shlex
from typing import NoReturn

from vlmtune.errors import VlmtuneError


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print and exit
        raise _Refused(message)


def parse(argv: list[str]) -> argparse.Namespace:
    """`vlmtune ARGV` parsed as the CLI parses it; a bad flag or value is a VlmtuneError naming it."""
    from vlmtune.cli import main

    parser = main.build_parser()
    for p in [parser, *main.subparsers(parser)]:
        p.__class__ = _Parser
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [e for e in extra if e.startswith("-") or not hasattr(args, "items")]
        if stray:
            raise _Refused(f"unrecognized arguments: {' '.join(stray)}")
    except _Refused as exc:
        raise VlmtuneError(f"`{command_text(argv)}`: {exc}") from None
    if extra:  # positionals after flags, as the CLI takes them
        args.items = [*args.items, *extra]
    args.argv = list(argv)
    return args


def command_text(argv: list[str]) -> str:
    return shlex.join(["vlmtune", *argv])
