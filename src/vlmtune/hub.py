"""Hugging Face Hub ids as models: resolved to a folder of the local HF cache through `huggingface_hub`.

Every loader (family detection, processor, model, DeepSpeed config, predict, export) goes through `model_folder`:
a local folder is returned as it is; a hub id (`owner/name`, with `model.revision` a branch, tag or commit) is
downloaded into the standard cache (`HF_HOME` / `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`, its progress bars) and
its snapshot folder returned, so `from_pretrained` then reads files only. `HF_HUB_OFFLINE=1` reads the cache alone.

Before downloading, one request with a short timeout (`api/models/{id}/revision/{rev}`, no retries) asks the hub
for the revision's commit: an unreachable hub is a message within seconds, and a model already in the cache is used
from there (as transformers does), instead of each file's 25 s of retries.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 8.0
"""Seconds the first request to the hub may take before vlmtune says it is unreachable."""

_WEIGHT_FORMATS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot")
_NOT_NEEDED = ("*.md", ".gitattributes", "original/*", "onnx/*", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.mp4")


def is_hub_id(name_or_path: str) -> bool:
    """`owner/name` that is not a path on this machine (nor written like one)."""
    text = str(name_or_path)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    owner, name = text.split("/")
    return bool(owner) and bool(name) and " " not in text


def model_folder(name_or_path: str | Path, revision: str | None = None, field: str = "model.name_or_path") -> Path:
    """The local folder of a model: the path itself, or the cache snapshot of a hub id at `revision`."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() or not is_hub_id(text):
        return path
    return _snapshot(text, revision, field, *_where())


def hub_file(repo_id: str, filename: str, revision: str | None = None, field: str = "model.name_or_path") -> Path:
    """One file of a hub model (e.g. config.json for family detection) without downloading the weights."""
    from huggingface_hub import hf_hub_download

    # By name, not commit: the library then records the branch's commit in the cache (refs/), which offline use reads.
    commit, _ = _revision(repo_id, revision, field, *_where())
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or "main", local_files_only=commit is None))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one message naming the model
        raise _download_error(repo_id, revision, field, exc) from exc


def in_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether the cache holds the hub model's config.json at `revision` (no network)."""
    return _cached(repo_id, revision or "main")


def _where() -> tuple[str, bool, str]:
    """(endpoint, offline, cache folder) as huggingface_hub has them now: the key of what is remembered."""
    from huggingface_hub import constants

    return constants.ENDPOINT, bool(constants.HF_HUB_OFFLINE), str(constants.HF_HUB_CACHE)


@lru_cache(maxsize=32)
def _revision(repo_id: str, revision: str | None, field: str, endpoint: str, offline: bool,
              cache: str) -> tuple[str | None, tuple[str, ...]]:
    """The revision's commit and file names from the hub, or (None, ()) to read the cache (offline, or the hub
    unreachable and the model cached). Raises a VlmtuneError for an unknown model or revision, or an unreachable hub and no cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    if offline:
        if not _cached(repo_id, rev):
            raise VlmtuneError(
                f"model '{repo_id}'{_at(revision)} ({field}) is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE=1 "
                f"forbids downloading it. Unset HF_HUB_OFFLINE to download it, or fetch it where the hub is "
                f"reachable (`hf download {repo_id}{_rev_flag(revision)}`) and copy the cache, or set {field} to a "
                "local folder.")
        return None, ()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=rev, timeout=PROBE_TIMEOUT_S)
    except RevisionNotFoundError as exc:
        raise VlmtuneError(
            f"model '{repo_id}' has no revision '{rev}' on {endpoint} (model.revision): give a branch, tag or commit "
            "of that repository, or unset model.revision for its main branch.") from exc
    except GatedRepoError as exc:
        raise VlmtuneError(
            f"model '{repo_id}' ({field}) is gated on {endpoint}: accept its terms on the model page, then log in "
            "with `hf auth login` (or set HF_TOKEN).") from exc
    except RepositoryNotFoundError as exc:
        raise VlmtuneError(
            f"no model '{repo_id}' on {endpoint} ({field}): check the id for typos (owner/name, as on the model "
            "page); a private model needs `hf auth login` (or HF_TOKEN); a local folder must exist.") from exc
    except (HfHubHTTPError, OSError, *_transport_errors()) as exc:
        if _cached(repo_id, rev):
            log.warning("the Hugging Face Hub (%s) is unreachable (%s); using %s from the local cache",
                        endpoint, _short(exc), repo_id)
            return None, ()
        raise VlmtuneError(
            f"cannot reach the Hugging Face Hub at {endpoint} to download '{repo_id}'{_at(revision)} ({field}): "
            f"{_short(exc)}. Check the network or proxy (HTTPS_PROXY), set HF_ENDPOINT to a mirror you can reach, or "
            f"download it where the hub is reachable (`hf download {repo_id}{_rev_flag(revision)}`) and copy the "
            f"cache (HF_HOME), or set {field} to a local folder.") from exc
    return info.sha, tuple(f.rfilename for f in info.siblings or [])


@lru_cache(maxsize=32)
def _snapshot(repo_id: str, revision: str | None, field: str, endpoint: str, offline: bool, cache: str) -> Path:
    from huggingface_hub import snapshot_download

    commit, names = _revision(repo_id, revision, field, endpoint, offline, cache)
    ignore = list(_NOT_NEEDED)
    if any(n.endswith(".safetensors") for n in names):
        ignore += _WEIGHT_FORMATS  # the same weights in older formats: never downloaded twice
    try:
        folder = snapshot_download(repo_id, revision=revision or "main", local_files_only=commit is None,
                                   ignore_patterns=ignore)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one message naming the model
        raise _download_error(repo_id, revision, field, exc) from exc
    if commit is not None:
        log.info("model %s%s: commit %s in %s", repo_id, _at(revision), commit[:12], folder)
    return Path(folder)


def _cached(repo_id: str, revision: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def _download_error(repo_id: str, revision: str | None, field: str, exc: Exception) -> VlmtuneError:
    from huggingface_hub.errors import EntryNotFoundError

    if isinstance(exc, EntryNotFoundError) and "config.json" in str(exc):
        return VlmtuneError(f"model '{repo_id}'{_at(revision)} ({field}) has no config.json: it is not a "
                            "transformers model; give the id of a checkpoint written by save_pretrained.")
    return VlmtuneError(
        f"downloading '{repo_id}'{_at(revision)} ({field}) from the Hugging Face Hub failed: {_short(exc)}. Run the "
        "command again (finished files stay in the cache), or download it with "
        f"`hf download {repo_id}{_rev_flag(revision)}`.")


def _transport_errors() -> tuple[type[Exception], ...]:
    try:
        import httpx2

        return (httpx2.TransportError,)
    except ImportError:  # older huggingface_hub releases use httpx
        import httpx

        return (httpx.TransportError,)


def _at(revision: str | None) -> str:
    return f" at revision '{revision}'" if revision else ""


def _rev_flag(revision: str | None) -> str:
    return f" --revision {revision}" if revision else ""


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."
