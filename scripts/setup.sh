#!/usr/bin/env bash
# Set up vlmtune in ./.venv.   usage: bash scripts/setup.sh [dev]
#   dev: also the test tools and the optional QLoRA (bitsandbytes), DeepSpeed and datasets (pyarrow) dependencies.
# DeepSpeed ships only a source release; DS_BUILD_OPS=0 installs it without compiling its ops (the few a run needs
# compile on first use, cached in TORCH_EXTENSIONS_DIR).
# Torch is installed first and pinned, so that nothing pulls a multi-GB CUDA build by accident on a CPU machine.
# On a GPU machine, choose your CUDA build: VLMTUNE_TORCH="torch==2.11.0" bash scripts/setup.sh
# Tested versions are pinned in constraints.txt (override with VLMTUNE_CONSTRAINTS=/dev/null).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${VLMTUNE_TORCH:-torch==2.13.0}
constraints=${VLMTUNE_CONSTRAINTS:-constraints.txt}
extras=""
[[ ${1:-} == dev ]] && extras="[dev,qlora,deepspeed,datasets]"

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" install "$torch_spec" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" || { echo "setup: torch did not install ($torch_spec)" >&2; exit 1; }
DS_BUILD_OPS=0 "${pip[@]}" install -c "$constraints" -e ".$extras" 2>&1 | grep -v "is ignored" || true
.venv/bin/vlmtune --help >/dev/null || { echo "setup: vlmtune did not install" >&2; exit 1; }
echo "vlmtune is set up in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
