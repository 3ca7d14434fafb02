#!/usr/bin/env bash
# Fetch the wheels Unsloth's speed-harness path needs on the GPU machine (no network there) into .whl-unsloth/, from
# the repo root (keep it out of git: "/.whl-unsloth/" in .git/info/exclude). Beyond what the GPU machine has (torch
# 2.11, transformers 5.17, peft 0.21, accelerate 1.15, triton, torchvision, ...) and what .whl/ carries
# (bitsandbytes 0.50.2, pydantic):
#   unsloth 2026.10.9 + unsloth_zoo 2026.10.9: the newest release; both pin transformers <=5.17.0 (the GPU machine's
#     exactly, so no transformers of its own) and torch <2.15
#   trl 1.15.0 (their pin: <=1.15.0), datasets 4.8.5 (<5, what trl 1.15 needs), dill 0.4.1, multiprocess 0.70.19
#     (datasets' own): all four are imported by `import unsloth`
# Left out, though named in their metadata: xformers (optional: without it Unsloth uses SDPA), torchao (only for FP8
# / QAT), cut_cross_entropy, tyro, hf_transfer, diffusers, json5, nest-asyncio, structlog, msgspec (none imported on
# the LoRA / QLoRA path). unsloth's wheel is 28.6 MB, 26 of them its `studio/` web app, which the library never
# imports: the copy kept here is the same wheel without studio/ (its RECORD rewritten to match), 2.2 MB, so that
# .whl/ (45.9 MB) and .whl-unsloth/ (about 7 MB) fit in one device call's 64 MiB with the working tree.
set -euo pipefail
dest=.whl-unsloth
../shared/device/wheels.sh "$dest" -- unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 \
  dill==0.4.1 multiprocess==0.70.19
python3 - "$dest"/unsloth-2026.10.9-py3-none-any.whl <<'EOF'
import os, sys, zipfile

path = sys.argv[1]
with zipfile.ZipFile(path) as zin:
    if not any(n.startswith("studio/") for n in zin.namelist()):
        sys.exit(0)  # already trimmed
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.startswith("studio/"):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"studio/"))
            zout.writestr(info, data)
os.replace(path + ".tmp", path)
EOF
ls -la "$dest"
du -sh "$dest"
