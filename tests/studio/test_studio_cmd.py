"""`vlmtune studio` as a user starts it: prints its address, serves the page and the API, stops on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request

import pytest


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# inherited: SIGINT as a shell leaves it (default) and as a script's background job gets it (ignored; Python then
# keeps it ignored unless the program sets it)
@pytest.mark.parametrize("stop, inherited", [(signal.SIGINT, "default"), (signal.SIGINT, "ignored"),
                                             (signal.SIGTERM, "default")],
                         ids=["ctrl-c", "ctrl-c-sigint-ignored-by-the-parent", "kill"])
def test_studio_command_serves_and_stops_on_ctrl_c_or_kill(tmp_path, stop, inherited):
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "studio", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read()
        base = match.group(0)
        with urllib.request.urlopen(base, timeout=30) as res:
            assert b"vlmtune studio" in res.read()
        with urllib.request.urlopen(base + "api/info", timeout=30) as res:
            assert json.loads(res.read())["roots"] == [str(tmp_path.resolve())]
    finally:
        proc.send_signal(stop)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the studio did not stop within 60 s of {stop.name}: {proc.communicate()}")
    assert proc.returncode == 0, err
    assert "stopping: runs started here save a checkpoint first" in out
    assert "Traceback" not in err


def test_a_folder_that_does_not_exist_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlmtune.cli", "studio", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "is not a folder" in result.stderr and "Traceback" not in result.stderr
