#!/usr/bin/env bash
# Set up vlmtune in ./.venv.   usage: bash scripts/setup.sh [--dry-run] [dev]
#   dev: also the test tools and the optional QLoRA (bitsandbytes), DeepSpeed and datasets (pyarrow) dependencies.
#   --dry-run: print which PyTorch build would be installed and the pip commands, change nothing.
# PyTorch is installed first, and the build is chosen for this machine (it says which and why):
#   - a torch wheel in pip's local wheel folders (find-links) wins when one matches;
#   - no NVIDIA GPU (nvidia-smi finds none): the CPU build from PyTorch's CPU index (PyPI's default torch is the
#     CUDA build: a 500 MB wheel plus several GB of NVIDIA libraries a CPU machine cannot use);
#   - an NVIDIA GPU: the CUDA build for the newest CUDA the driver runs (nvidia-smi's "CUDA Version"), from
#     PyTorch's index for that CUDA (cu126 / cu128 / cu130).
# Override: VLMTUNE_TORCH="torch==2.11.0" (the requirement) and/or VLMTUNE_TORCH_INDEX=URL (where pip looks first).
# DeepSpeed ships only a source release; DS_BUILD_OPS=0 installs it without compiling its ops (the few a run needs
# compile on first use, cached in TORCH_EXTENSIONS_DIR).
# Tested versions are pinned in constraints.txt (override with VLMTUNE_CONSTRAINTS=/dev/null).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${VLMTUNE_TORCH:-torch==2.13.0}
constraints=${VLMTUNE_CONSTRAINTS:-constraints.txt}
extras="" dry_run=0
for arg in "$@"; do
  case $arg in
    dev) extras="[dev,qlora,deepspeed,datasets]" ;;
    --dry-run) dry_run=1 ;;
    *) echo "setup: unknown argument '$arg' (usage: bash scripts/setup.sh [--dry-run] [dev])" >&2; exit 2 ;;
  esac
done
pytorch_index=${VLMTUNE_PYTORCH_INDEX_BASE:-https://download.pytorch.org/whl}

cuda_variant() {  # the PyTorch CUDA build for the newest CUDA the driver runs, e.g. 12.8 -> cu128
  local version major minor
  version=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)
  [[ -n $version ]] || return 1
  major=${version%%.*} minor=${version#*.}
  if (( major > 13 || (major == 13 && minor >= 0) )); then echo cu130
  elif (( major == 12 && minor >= 8 )); then echo cu128
  elif (( major == 12 && minor >= 6 )); then echo cu126
  else echo "old:$version"; fi
}

local_torch_wheel() {  # a wheel for the requirement in pip's configured local wheel folders, without the network
  local tmp found=1
  tmp=$(mktemp -d)
  "$python" -m pip download -q --no-index --no-deps --disable-pip-version-check -d "$tmp" "$torch_spec" \
    >/dev/null 2>&1 && found=0
  rm -rf "$tmp"
  return $found
}

torch_args=("$torch_spec")
if [[ -n ${VLMTUNE_TORCH_INDEX:-} ]]; then
  why="VLMTUNE_TORCH_INDEX"
  torch_args+=(--index-url "$VLMTUNE_TORCH_INDEX" --extra-index-url https://pypi.org/simple)
elif [[ -n ${VLMTUNE_TORCH:-} ]]; then
  why="VLMTUNE_TORCH (pip's default indexes)"
elif [[ ${VLMTUNE_LOCAL_WHEELS:-1} == 1 ]] && local_torch_wheel; then
  why="a matching wheel in pip's local wheel folder"
elif ! variant=$(cuda_variant); then
  why="CPU build: no NVIDIA GPU found (nvidia-smi)"
  torch_args+=(--index-url "$pytorch_index/cpu" --extra-index-url https://pypi.org/simple)
elif [[ $variant == old:* ]]; then
  echo "setup: the NVIDIA driver runs CUDA ${variant#old:}; $torch_spec needs CUDA 12.6 or newer. Update the driver," \
       "or pick an older build: VLMTUNE_TORCH='torch==<version>' VLMTUNE_TORCH_INDEX=$pytorch_index/cu118" >&2
  exit 1
else
  why="CUDA build $variant: the NVIDIA driver runs CUDA $(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
  torch_args+=(--index-url "$pytorch_index/$variant" --extra-index-url https://pypi.org/simple)
fi

if (( dry_run )); then
  echo "setup (dry run): PyTorch: $why"
  echo "would run: pip install ${torch_args[*]}"
  echo "would run: pip install -c $constraints -e .$extras"
  exit 0
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: PyTorch: $why"
  "${pip[@]}" install "${torch_args[@]}" 2>&1 | grep -v "is ignored" || true
  if ! .venv/bin/python -c "import torch" 2>/dev/null && [[ " ${torch_args[*]} " == *" --index-url "* ]]; then
    echo "setup: WARNING: that index did not answer; installing $torch_spec from PyPI instead, which is the CUDA" \
         "build (about 3 GB with its NVIDIA libraries). To keep a CPU build, set VLMTUNE_TORCH_INDEX to a reachable" \
         "mirror of $pytorch_index/cpu and run setup again." >&2
    "${pip[@]}" install "$torch_spec" 2>&1 | grep -v "is ignored" || true
  fi
fi
.venv/bin/python -c "import torch" || { echo "setup: torch did not install (${torch_args[*]})" >&2; exit 1; }
DS_BUILD_OPS=0 "${pip[@]}" install -c "$constraints" -e ".$extras" 2>&1 | grep -v "is ignored" || true
.venv/bin/vlmtune --help >/dev/null || { echo "setup: vlmtune did not install" >&2; exit 1; }
echo "vlmtune is set up in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
