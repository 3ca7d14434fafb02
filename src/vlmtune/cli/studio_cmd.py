"""`vlmtune studio [DIR ...] [--host 127.0.0.1] [--port 7860]`: the local web app (docs/STUDIO.md)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

HELP = "a local web app: check data, fit a configuration to a GPU, train, watch, try and export the result"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="*", type=Path, metavar="DIR",
                   help="folders the studio may read and write (default: the current folder); the first is where "
                        "relative paths start and runs are trained from")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 lets anyone on the "
                        "network in, with the same rights as you)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")


def run(args: argparse.Namespace) -> int:
    from vlmtune.studio.paths import Roots
    from vlmtune.studio.server import LOOPBACK, make_server

    roots = Roots.of(args.folders)
    os.chdir(roots.home)  # relative paths in forms mean what they would to a CLI started in the first folder
    server, studio = make_server(roots, args.host, args.port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"vlmtune studio: http://{shown}:{studio.port}/  (folders: {roots.describe()}; Ctrl-C to stop)", flush=True)
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can read and train on the "
              "opened folders; use the default --host 127.0.0.1 unless you mean that", flush=True)
    _stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping: runs started here save a checkpoint first", flush=True)
    finally:
        server.server_close()
        studio.runs.stop_all()
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM, as a service manager stops it) both end the studio the same way: runs it
    started save a checkpoint first. Set explicitly: a background job of a script inherits SIGINT ignored, and Python
    then leaves it ignored (the studio would not stop, and runs it starts would inherit the ignore)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
