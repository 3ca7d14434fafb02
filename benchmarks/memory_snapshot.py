"""Print the GPU memory snapshots a run wrote (VLMTUNE_MEMORY_SNAPSHOT=FILE.jsonl) as Markdown tables.

    python3 benchmarks/memory_snapshot.py FILE.jsonl [FILE.jsonl ...]
Each line is one step's summary by call site (src/vlmtune/train/memory_snapshot.py); the raw .pickle is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmtune.train.memory_snapshot import format_markdown


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    missing = 0
    for path in parser.parse_args().files:
        print(f"## {path}\n")
        if not path.is_file():
            print(f"{path}: no snapshot file (the run ended before a snapshot step, or CUDA was not used)\n")
            missing += 1
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print(format_markdown(records) if records else f"{path}: empty\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
