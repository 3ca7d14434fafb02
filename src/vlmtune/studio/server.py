"""The studio's HTTP server: the standard library's threading server, one static page, JSON endpoints.

Safe by default: it binds to 127.0.0.1; requests must name this server in their Host header (a page on another
site cannot reach it through DNS rebinding) and send JSON (a cross-site form cannot post here); every path lies in
the folders the user opened (`paths.Roots`); nothing from a data file is ever run (records are read as data by the
same reader as training)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import tempfile
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from vlmtune.errors import VlmtuneError
from vlmtune.studio import configure, data_view, export_view, try_it
from vlmtune.studio.paths import Roots, model_ref
from vlmtune.studio.runs import Runs

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
"""Largest request body (an uploaded image as base64 is the largest thing posted)."""
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Studio:
    """What the endpoints share: the opened folders, loaded processors and models, the runs."""

    def __init__(self, roots: Roots, host: str, port: int) -> None:
        self.roots, self.host, self.port = roots, host, port
        self.state_dir = Path(tempfile.mkdtemp(prefix="vlmtune-studio-"))
        self.processors = data_view.Processors()
        self.models = try_it.Models()
        self.runs = Runs(roots, self.state_dir)
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], Any]] = {
            ("GET", "/api/info"): self.info,
            ("GET", "/api/files"): lambda q: roots.listing(q.get("folder", ".")),
            ("GET", "/api/runs"): lambda q: {"runs": self.runs.listing()},
            ("GET", "/api/run"): lambda q: self.runs.detail(self.runs.run_folder(q.get("folder", ""))),
            ("POST", "/api/data/check"): self.data_check,
            ("POST", "/api/data/samples"): self.data_samples,
            ("POST", "/api/config/resolve"): lambda b: configure.resolve(self.form(b)),
            ("POST", "/api/config/estimate"): lambda b: configure.estimate(self.form(b)),
            ("POST", "/api/config/recommend"): lambda b: configure.recommend(self.form(b)),
            ("POST", "/api/config/save"): self.config_save,
            ("POST", "/api/train/start"): lambda b: self.runs.start(["train", *configure.items(self.form(b))]),
            ("POST", "/api/train/stop"): lambda b: self.runs.stop(self.runs.run_folder(b.get("folder", ""))),
            ("POST", "/api/train/resume"): lambda b: self.runs.start(
                self.runs.resume_argv(self.runs.run_folder(b.get("folder", "")))),
            ("POST", "/api/try/ask"): self.try_ask,
            ("POST", "/api/try/predict"): self.try_predict,
            ("POST", "/api/export"): self.export,
        }

    def info(self, _: dict[str, Any]) -> dict[str, Any]:
        from vlmtune import __version__

        return {"version": __version__, "roots": [str(r) for r in self.roots.folders], **configure.catalogue()}

    def form(self, body: dict[str, Any]) -> dict[str, Any]:
        form = body.get("form", body)
        if not isinstance(form, dict):
            raise VlmtuneError("form: expected an object with preset, settings and gpu")
        return form

    def data_check(self, body: dict[str, Any]) -> dict[str, Any]:
        file = self.roots.resolve(body.get("file", ""), "data file")
        return data_view.check(str(file), model_ref(self.roots, body.get("model", "")), body.get("preset", ""))

    def data_samples(self, body: dict[str, Any]) -> dict[str, Any]:
        file = self.roots.resolve(body.get("file", ""), "data file")
        model = model_ref(self.roots, body.get("model", ""))
        return data_view.samples(self.processors, str(file), model, body.get("preset", ""),
                                 int(body.get("start", 0)), min(int(body.get("count", 3)), 20))

    def config_save(self, body: dict[str, Any]) -> dict[str, Any]:
        path = configure.save(self.form(body), self.roots.resolve(body.get("path", ""), "save as"),
                              bool(body.get("overwrite")))
        return {"saved": self.roots.shown(path)}

    def _model_and_adapter(self, body: dict[str, Any]) -> tuple[str, str]:
        adapter = body.get("adapter", "")
        return (model_ref(self.roots, body.get("model", "")),
                str(self.roots.resolve(adapter, "adapter")) if adapter else "")

    def try_ask(self, body: dict[str, Any]) -> dict[str, Any]:
        model, adapter = self._model_and_adapter(body)
        images = [self.roots.resolve(p, "image") for p in body.get("image_paths", [])]
        images += [self._upload(u) for u in body.get("uploads", [])]
        prompt = str(body.get("prompt", "")).strip()
        if not prompt:
            raise VlmtuneError("question: type what to ask about the image")
        return try_it.ask(self.models, model, adapter, images, prompt, bool(body.get("compare", True)),
                          int(body.get("max_new_tokens", 64)))

    def _upload(self, upload: Any) -> Path:
        """An uploaded image (a data URL or base64), checked to decode as an image, kept in the studio's temp folder."""
        from vlmtune.data.images import open_image

        text = str(upload.get("data", "") if isinstance(upload, dict) else upload)
        try:
            raw = base64.b64decode(text.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise VlmtuneError("image: the upload is not base64 image data; pick the image file again") from None
        path = Path(tempfile.mkstemp(prefix="upload-", suffix=".img", dir=self.state_dir)[1])
        path.write_bytes(raw)
        try:
            open_image(path).save(io.BytesIO(), format="PNG")  # decodes within the size limit, or refuses
        except VlmtuneError:
            raise
        except Exception as exc:
            raise VlmtuneError(f"image: the uploaded file is not an image Pillow can read ({exc}); upload a PNG, "
                               "JPEG or WebP file") from None
        return path

    def try_predict(self, body: dict[str, Any]) -> dict[str, Any]:
        model, adapter = self._model_and_adapter(body)
        data = self.roots.resolve(body.get("data", ""), "data file")
        out = str(self.roots.resolve(body["out"], "predictions")) if body.get("out") else ""
        return try_it.predict_data(self.models, model, adapter, data, out, bool(body.get("overwrite")),
                                   int(body.get("max_new_tokens", 64)))

    def export(self, body: dict[str, Any]) -> dict[str, Any]:
        adapter = self.roots.resolve(body.get("adapter", ""), "adapter")
        out = self.roots.resolve(body.get("out", ""), "export folder")
        result = export_view.export(adapter, out, model_ref(self.roots, body.get("base", ""), "base model"),
                                    bool(body.get("overwrite")))
        return {**result, "out": self.roots.shown(Path(result["out"]))}


def make_handler(studio: Studio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "vlmtune-studio"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            if not self._host_ok():
                return self._send(HTTPStatus.FORBIDDEN, {"error": "this studio answers only requests addressed to "
                                                                  f"{studio.host}:{studio.port}"})
            if method == "GET" and url.path in STATIC:
                name, kind = STATIC[url.path]
                body = resources.files("vlmtune.studio").joinpath("static", name).read_bytes()
                return self._send_bytes(HTTPStatus.OK, body, kind)
            route = studio.routes.get((method, url.path))
            if route is None:
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no such page or endpoint: {method} {url.path}"})
            try:
                if method == "GET":
                    arg = {k: v[-1] for k, v in parse_qs(url.query).items()}
                else:
                    arg = self._json_body()
                result = route(arg)
            except VlmtuneError as exc:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                return self._send(HTTPStatus.BAD_REQUEST, {"error": f"{where}{exc.strerror or exc}"})
            except Exception as exc:  # a bug: the page says so, the terminal has the traceback
                log.error("studio: %s %s failed:\n%s", method, url.path, traceback.format_exc())
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  {"error": f"internal error ({type(exc).__name__}: {exc}); the traceback is in the "
                                            "terminal that runs `vlmtune studio`"})
            self._send(HTTPStatus.OK, result)

        def _host_ok(self) -> bool:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if studio.host in ("0.0.0.0", "::"):  # the user asked for every interface
                return True
            allowed = {studio.host.lower(), *(LOOPBACK if studio.host in LOOPBACK else ())}
            return host in allowed

        def _json_body(self) -> dict[str, Any]:
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                raise VlmtuneError("requests must send JSON (Content-Type: application/json)")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise VlmtuneError(f"the request is {length:,} bytes, over the studio's {MAX_BODY:,}; upload a "
                                   "smaller image")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as exc:
                raise VlmtuneError(f"the request is not valid JSON ({exc})") from None
            if not isinstance(body, dict):
                raise VlmtuneError("the request must be a JSON object")
            return body

        def _send(self, status: HTTPStatus, payload: Any) -> None:
            self._send_bytes(status, json.dumps(payload, default=str).encode("utf-8"), "application/json")

        def _send_bytes(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def make_server(roots: Roots, host: str = "127.0.0.1", port: int = 7860) -> tuple[ThreadingHTTPServer, Studio]:
    """The server bound to host:port (port 0: a free one), not yet serving; `serve_forever()` runs it."""
    studio = Studio(roots, host, port)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(studio))
    except OSError as exc:
        raise VlmtuneError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port, "
                           "e.g. --port 0 for any free one") from None
    server.daemon_threads = True
    studio.port = server.server_address[1]
    return server, studio
