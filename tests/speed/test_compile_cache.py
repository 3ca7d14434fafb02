"""The persistent compile cache (speed/compile_cache.py): its folder and key, a user's own settings first, the
environment set before anything compiles, and nothing written outside the chosen folder. CPU only."""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmtune.speed import compile_cache
from vlmtune.speed.compile_cache import INDUCTOR, TRITON, cache_key, default_root, persistent_compile_cache


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_key_names_the_versions_and_the_gpu(monkeypatch):
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    key = cache_key("cpu")
    assert key.startswith("torch" + torch.__version__.replace("+", "_")) and key.endswith(f"-cpu-{py}")
    assert "/" not in key and "+" not in key
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(compile_cache, "_triton_version", lambda: "3.5.1")
    assert cache_key("cuda:0") == f"torch{torch.__version__.replace('+', '_')}-triton3.5.1-cuda12.8-sm90-{py}"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "-sm86-" in cache_key("cuda")  # another GPU generation: another folder


def test_folder_follows_xdg_cache_home(tmp_path):
    assert default_root({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": "/h"}) == tmp_path / "xdg/vlmtune/compile"
    assert default_root({"HOME": str(tmp_path)}) == tmp_path / ".cache/vlmtune/compile"
    # a relative XDG_CACHE_HOME is invalid by the XDG spec: ignored
    assert default_root({"XDG_CACHE_HOME": "rel", "HOME": str(tmp_path)}) == tmp_path / ".cache/vlmtune/compile"


def test_sets_both_caches_under_the_folder_and_restores(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    cache = persistent_compile_cache("cpu", env, root=default_root(env))
    folder = tmp_path / "xdg/vlmtune/compile" / cache_key("cpu")
    assert cache.folder == folder and folder.is_dir()
    assert env[INDUCTOR] == str(folder / "inductor") and env[TRITON] == str(folder / "triton")
    assert str(folder) in cache.reason and "12 s instead of 38" in cache.reason
    assert _files(tmp_path) <= {folder, *folder.parents}  # made the folder, nothing else
    cache.remove()
    assert INDUCTOR not in env and TRITON not in env


def test_a_users_own_settings_are_kept(tmp_path):
    env = {"HOME": str(tmp_path), INDUCTOR: "/mine/inductor"}
    cache = persistent_compile_cache("cpu", env)
    assert cache.folder is None and env == {"HOME": str(tmp_path), INDUCTOR: "/mine/inductor"}
    assert f"{INDUCTOR}=/mine/inductor (kept)" in cache.reason
    assert not (tmp_path / ".cache").exists()
    cache.remove()
    assert env[INDUCTOR] == "/mine/inductor"
    # Triton's alone: inductor's goes to the persistent folder, Triton's stays the user's
    env = {"HOME": str(tmp_path), TRITON: "/mine/triton"}
    cache = persistent_compile_cache("cpu", env, root=default_root(env))
    assert env[TRITON] == "/mine/triton" and env[INDUCTOR].startswith(str(tmp_path / ".cache/vlmtune/compile"))
    assert f"{TRITON}=/mine/triton (kept)" in cache.reason
    cache.remove()
    assert env == {"HOME": str(tmp_path), TRITON: "/mine/triton"}


def test_a_folder_that_cannot_be_made_says_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env: dict[str, str] = {}
    why = persistent_compile_cache("cpu", env, root=blocker / "below")
    assert isinstance(why, str) and "could not be made" in why and INDUCTOR in why
    assert env == {}


def test_set_before_compiling_and_logged(monkeypatch, tmp_path, tiny_model_dir, caplog):
    """apply_speed with speed.compile: the variables point at the folder when torch.compile is called (mocked:
    nothing compiles), the log says where, nothing is written outside the folder, and remove() restores them."""
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed

    for name in (INDUCTOR, TRITON):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(compile_cache, "default_root", lambda env: tmp_path / "cache")
    seen: list[tuple[str | None, str | None]] = []

    def fake_compile(fn, *args, **kwargs):
        seen.append((os.environ.get(INDUCTOR), os.environ.get(TRITON)))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))},
                                           "hardware": {"precision": "fp32"}, "speed": {"compile": True}})
    family = get_family("qwen2_vl")
    model = get_method(config.method.name).load_and_prepare(config, family)
    seen.clear()
    before = _files(tmp_path)
    with caplog.at_level(logging.INFO, logger="vlmtune.speed"):
        setup = apply_speed(model, config, family)
    folder = tmp_path / "cache" / cache_key("cpu")
    try:
        assert "compile" in setup.active and "compile_cache" in setup.active
        assert seen and set(seen) == {(str(folder / "inductor"), str(folder / "triton"))}
        assert f"compile cache: {folder}" in caplog.text
        assert all(p == folder or folder in p.parents or p in folder.parents for p in _files(tmp_path) - before)
    finally:
        setup.remove()
    assert INDUCTOR not in os.environ and TRITON not in os.environ


def test_no_cache_when_nothing_compiles(monkeypatch, tmp_path, tiny_model_dir):
    from vlmtune.config.schema import VlmtuneConfig
    from vlmtune.families import get_family
    from vlmtune.methods import get_method
    from vlmtune.speed import apply_speed

    monkeypatch.setattr(compile_cache, "default_root", lambda env: tmp_path / "cache")
    config = VlmtuneConfig.model_validate({"model": {"name_or_path": str(tiny_model_dir("qwen2_vl"))},
                                           "hardware": {"precision": "fp32"}})  # auto: eager on the CPU
    family = get_family("qwen2_vl")
    setup = apply_speed(get_method(config.method.name).load_and_prepare(config, family), config, family)
    setup.remove()
    assert "compile_cache" not in setup.summary()["active"] and not (tmp_path / "cache").exists()


_COMPILE = """
import os, torch
from vlmtune.speed.compile_cache import persistent_compile_cache
cache = persistent_compile_cache("cpu")
print(cache.folder)
f = torch.compile(lambda x: (x.sin() * 2).relu())
f(torch.randn(64))
"""


@pytest.mark.slow
def test_a_real_compilation_writes_only_into_the_folder(tmp_path):
    """inductor on the CPU (a C++ compiler builds the kernel) in a fresh process: its files land in the persistent
    folder, not in the temporary directory where inductor keeps them by default. The one exception is torch's:
    the CPU backend's precompiled C++ headers go to the temporary directory whatever TORCHINDUCTOR_CACHE_DIR says
    (torch._inductor.codecache._HEADER_DIR, fixed at import); GPU kernels (Triton) do not use them."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler for inductor's CPU kernels")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "TMPDIR": str(tmp)}
    for name in (INDUCTOR, TRITON):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "xdg/vlmtune/compile"
    assert any(p.is_file() for p in (folder / "inductor").rglob("*"))
    outside = {p.relative_to(tmp).parts[:2] for p in tmp.rglob("*") if len(p.relative_to(tmp).parts) > 1}
    assert outside <= {(f"torchinductor_{getpass.getuser()}", "precompiled_headers")}, outside
