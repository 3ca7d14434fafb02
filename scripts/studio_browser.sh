#!/usr/bin/env bash
# The studio's browser tests (tests/studio/test_browser.py) in headless Chromium, writing a screenshot of each page
# to docs/studio/ (override: STUDIO_SCREENSHOTS=DIR).   usage: bash scripts/studio_browser.sh [pytest args]
# Installs what it needs when missing: the OS's Chromium (Debian/Ubuntu: apt-get install chromium) and the Python
# `playwright` package into the project's Python (PYTHON, default .venv/bin/python). Playwright drives the system
# Chromium through executable_path; its own browser downloads (`playwright install`) are never used.
# CI without a browser still runs the same pages through their HTTP endpoints (tests/studio/test_api.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
find_chromium() { command -v chromium || command -v chromium-browser || command -v google-chrome || true; }
chromium=${STUDIO_CHROMIUM:-$(find_chromium)}
if [[ -z $chromium ]]; then
  if ! command -v apt-get >/dev/null; then
    echo "studio_browser: no Chromium found and no apt-get to install one; install Chromium and set" \
         "STUDIO_CHROMIUM=/path/to/chromium" >&2
    exit 2
  fi
  sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
  echo "studio_browser: installing Chromium (apt-get install chromium)"
  $sudo apt-get install -y chromium >/dev/null || { $sudo apt-get update >/dev/null && $sudo apt-get install -y chromium >/dev/null; }
  chromium=$(find_chromium)
fi
if ! "$python" -c "import playwright" 2>/dev/null; then
  echo "studio_browser: installing playwright (pip; no browser download)"
  "$python" -m pip install -q playwright
fi
export STUDIO_CHROMIUM=$chromium
export STUDIO_SCREENSHOTS=$(realpath -m "${STUDIO_SCREENSHOTS:-docs/studio}")
echo "studio_browser: $("$chromium" --version 2>/dev/null || echo "$chromium"); screenshots -> $STUDIO_SCREENSHOTS"
"$python" -m pytest -q -p no:cacheprovider tests/studio/test_browser.py "$@"
# Keep the committed pictures small: 256-colour palette PNGs.
"$python" - "$STUDIO_SCREENSHOTS" <<'PY'
import sys
from pathlib import Path
from PIL import Image

for path in sorted(Path(sys.argv[1]).glob("*.png")):
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")
PY
