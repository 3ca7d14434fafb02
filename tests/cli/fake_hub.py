"""A local HTTP server speaking the part of the Hugging Face Hub's protocol that downloads use, for tests.

    with FakeHub({"tiny/qwen2-vl": {"main": folder}}) as hub:     # repo -> revision (branch/tag) -> folder
        env = hub.env(tmp_path)        # HF_ENDPOINT at the server, HF_HOME in tmp_path
        subprocess.run([... "vlmtune", "train", "--model", "tiny/qwen2-vl", ...], env=env)

Served as huggingface_hub asks for them (huggingface_hub/hf_api.py, file_download.py, _snapshot_download.py):
- `GET api/models/{repo}/revision/{rev}`: `sha` (the commit) and `siblings` (file names);
- `GET api/models/{repo}/tree/{rev}?recursive=...`: one page of `{"type": "file", "path", "size", "oid"}`;
- `HEAD|GET {repo}/resolve/{rev}/{file}`: the bytes, with `X-Repo-Commit`, `ETag` and `Content-Length`, which
  `get_hf_file_metadata` reads;
- errors as the hub sends them: 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound.
A revision is a branch or tag name or its commit (40 hex digits, derived from the folder's content). Every request
is recorded in `hub.requests` as (method, path).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def _commit_of(folder: Path) -> str:
    digest = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]]) -> None:
        self.repos: dict[str, dict[str, tuple[str, Path]]] = {}
        for repo, revisions in repos.items():
            refs = {}
            for name, folder in revisions.items():
                commit = _commit_of(Path(folder))
                refs[name] = refs[commit] = (commit, Path(folder))
            self.repos[repo] = refs
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def commit(self, repo: str, revision: str = "main") -> str:
        return self.repos[repo][revision][0]

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """The environment of a process that uses this hub: HF_ENDPOINT here, HF_HOME under `home`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        return {**env, "HF_ENDPOINT": self.endpoint, "HF_HOME": str(home / "hf-home"),
                "HF_HUB_DISABLE_TELEMETRY": "1", **extra}

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo, kind, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                    found = self._find(repo, rev)
                    if found:
                        commit, folder = found
                        files = sorted(p for p in folder.rglob("*") if p.is_file())
                        if kind == "revision":
                            data = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                                    "siblings": [{"rfilename": str(f.relative_to(folder))} for f in files]}
                        else:
                            data = [{"type": "file", "path": str(f.relative_to(folder)), "size": f.stat().st_size,
                                     "oid": hashlib.sha1(f.read_bytes()).hexdigest()} for f in files]
                        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    found = self._find(repo, rev)
                    if found:
                        commit, folder = found
                        file = folder / name
                        if not file.is_file():
                            self._error(404, "EntryNotFound", f"{name} not found")
                            return
                        data = file.read_bytes()
                        etag = hashlib.sha256(data).hexdigest()
                        self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                               "Content-Type": "application/octet-stream"}, body)
                else:
                    self._error(404, "RepoNotFound", "not found")

            def _find(self, repo: str, rev: str) -> tuple[str, Path] | None:
                if repo not in hub.repos:
                    self._error(404, "RepoNotFound", f"Repository {repo} not found")
                    return None
                if rev not in hub.repos[repo]:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return None
                return hub.repos[repo][rev]

            def _error(self, status: int, code: str, message: str) -> None:
                data = json.dumps({"error": message}).encode()
                self._send(status, data, {"X-Error-Code": code, "X-Error-Message": message,
                                          "Content-Type": "application/json"}, True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
