"""Export page: `vlmtune export --adapter DIR --out DIR`, merge_adapter with the CLI's output-folder rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.studio.cli_args import command_text, parse


def export(adapter: Path, out: Path, base: str = "", overwrite: bool = False) -> dict[str, Any]:
    from vlmtune.export.merge import merge_adapter

    argv = ["export", "--adapter", str(adapter), "--out", str(out), *(["--base", base] if base else []),
            *(["--overwrite"] if overwrite else [])]
    args = parse(argv)
    written = merge_adapter(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    files = sorted(p.name for p in Path(written).iterdir() if not p.name.startswith("."))
    return {"command": command_text(argv), "out": str(written), "files": files}
