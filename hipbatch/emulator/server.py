"""LocalBatchServer: a stdlib HTTP/1.1 server on 127.0.0.1 that speaks enough of the OpenAI (files, batches,
chat), Anthropic (message batches, messages) and Gemini (files, batch mode, generateContent) APIs for the real
SDKs, with seeded fault injection.

Its control endpoints (/_emulator/stats|config|health, POST reset-stats|complete-all|config) need the server's
token (`Authorization: Bearer <token>` or `X-Emulator-Token: <token>`; LocalBatchServer.control_token) and
POSTs must be `Content-Type: application/json`, so a web page the user opens cannot drive them. Request
bodies over config.max_body_bytes get 413 before they are read."""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hipbatch.emulator.anthropic_api import AnthropicBackend
from hipbatch.emulator.common import (
    ApiError,
    Call,
    Core,
    Reply,
    is_unknown_model,
    json_reply,
    new_id,
    rfc3339,
)
from hipbatch.emulator.config import FAULT_KINDS, IN_PROCESS_ONLY, EmulatorConfig
from hipbatch.emulator.faults import BODY_FAULTS, cut_point, mangle
from hipbatch.emulator.gemini_api import GeminiBackend, check_google_key
from hipbatch.emulator.gemini_api import error_reply as gemini_error_reply
from hipbatch.emulator.openai_api import OpenAIBackend, retry_headers
from hipbatch.emulator.stats import EmulatorStats

log = logging.getLogger("hipbatch.emulator")

MODEL_CREATED = 1_735_689_600  # 2025-01-01, a fixed "release date" for every emulated model
ANTHROPIC_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
}
ANTHROPIC_ONLY_TYPES = {"not_found_error", "authentication_error", "api_error", "request_too_large"}
CONTROL_PREFIX = "/_emulator/"
CONTROL_MAX_BODY_BYTES = 1024 * 1024  # a config change is a few hundred bytes
TOKEN_RE = re.compile(r"^[!-~]{16,256}$")  # printable ASCII without spaces: it travels in a header
LINGER_SECONDS = 5.0  # after refusing an unread body, how long to swallow the rest so the client sees the answer
LINGER_IDLE_SECONDS = 0.5


class BodyTooLarge(Exception):
    """A request body over the server's cap (raised before the body, or the chunk that passes the cap, is read)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} > {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class Route:
    """One endpoint: method, path pattern, stats name, provider ("openai", "anthropic", "gemini" or "either")."""

    method: str
    pattern: re.Pattern[str]
    name: str
    provider: str
    download: bool = False  # a results download: the "truncate" and download_fault faults apply to it


def _route(method: str, path: str, name: str, provider: str, download: bool = False) -> Route:
    return Route(method, re.compile("^" + path + "$"), name, provider, download)


ROUTES: tuple[Route, ...] = (
    _route("POST", r"/v1/files", "openai.files.create", "openai"),
    _route("GET", r"/v1/files", "openai.files.list", "openai"),
    _route("GET", r"/v1/files/([^/]+)", "openai.files.retrieve", "openai"),
    _route("DELETE", r"/v1/files/([^/]+)", "openai.files.delete", "openai"),
    _route("GET", r"/v1/files/([^/]+)/content", "openai.files.content", "openai", download=True),
    _route("POST", r"/v1/batches", "openai.batches.create", "openai"),
    _route("GET", r"/v1/batches", "openai.batches.list", "openai"),
    _route("GET", r"/v1/batches/([^/]+)", "openai.batches.retrieve", "openai"),
    _route("POST", r"/v1/batches/([^/]+)/cancel", "openai.batches.cancel", "openai"),
    _route("POST", r"/v1/chat/completions", "openai.chat.completions", "openai"),
    _route("POST", r"/v1/messages/batches", "anthropic.batches.create", "anthropic"),
    _route("GET", r"/v1/messages/batches", "anthropic.batches.list", "anthropic"),
    _route("GET", r"/v1/messages/batches/([^/]+)", "anthropic.batches.retrieve", "anthropic"),
    _route("DELETE", r"/v1/messages/batches/([^/]+)", "anthropic.batches.delete", "anthropic"),
    _route("POST", r"/v1/messages/batches/([^/]+)/cancel", "anthropic.batches.cancel", "anthropic"),
    _route(
        "GET",
        r"/v1/messages/batches/([^/]+)/results",
        "anthropic.batches.results",
        "anthropic",
        download=True,
    ),
    _route("POST", r"/v1/messages", "anthropic.messages", "anthropic"),
    _route("GET", r"/v1/models/(.+)", "models.retrieve", "either"),
    _route("POST", r"/upload/v1beta/files", "gemini.files.upload", "gemini"),
    _route("GET", r"/v1beta/files/([^/:]+)", "gemini.files.get", "gemini"),
    _route("DELETE", r"/v1beta/files/([^/:]+)", "gemini.files.delete", "gemini"),
    _route("GET", r"/v1beta/files/([^/:]+):download", "gemini.files.download", "gemini", download=True),
    _route("POST", r"/v1beta/models/([^/:]+):batchGenerateContent", "gemini.batches.create", "gemini"),
    _route("GET", r"/v1beta/batches", "gemini.batches.list", "gemini"),
    _route("GET", r"/v1beta/batches/([^/:]+)", "gemini.batches.get", "gemini"),
    _route("DELETE", r"/v1beta/batches/([^/:]+)", "gemini.batches.delete", "gemini"),
    _route("POST", r"/v1beta/batches/([^/:]+):cancel", "gemini.batches.cancel", "gemini"),
    _route("POST", r"/v1beta/models/([^/:]+):generateContent", "gemini.generate_content", "gemini"),
    _route("GET", r"/v1beta/models/([^/:]+)", "gemini.models.get", "gemini"),
)
GEMINI_PATHS = ("/v1beta/", "/upload/v1beta/")  # unknown URLs under these get Google's error shape


def error_reply(err: ApiError, provider: str) -> Reply:
    """`err` in the provider's error shape."""
    if provider == "gemini":
        return gemini_error_reply(err)
    if provider == "anthropic":
        kind = err.type
        if kind not in ANTHROPIC_ONLY_TYPES and err.status in ANTHROPIC_STATUS_TYPES:
            kind = ANTHROPIC_STATUS_TYPES[err.status]
        request_id = new_id("req_")
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": kind, "message": err.message},
            "request_id": request_id,
        }
        headers = {"request-id": request_id}
    else:
        kind = "invalid_request_error" if err.type in ANTHROPIC_ONLY_TYPES else err.type
        if err.status >= 500 and kind == "invalid_request_error":
            kind = "server_error"
        body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
        headers = {"x-request-id": new_id("req_")}
    headers.update(err.headers)
    return json_reply(body, status=err.status, headers=headers)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    emulator: LocalBatchServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients that hang up (including after an injected fault) are normal here, not errors
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: without it each reply waits ~40 ms
    server_version = "hipbatch-emulator"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr log."""

    def setup(self) -> None:
        super().setup()
        self.server.emulator._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.emulator._track(self.connection, add=False)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests get a JSON error too, then the connection closes."""
        self.close_connection = True
        body = {
            "error": {
                "message": message or explain or "Bad request",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        try:
            self._write(json_reply(body, status=code))
        except OSError:
            pass

    def _serve(self) -> None:
        emulator = self.server.emulator
        parts = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        refusal = emulator._refuse_unread(self.command, parts.path, headers)
        if refusal is not None:
            self._refuse(refusal)
            return
        try:
            body = self._read_body(emulator._body_limit(parts.path))
        except BodyTooLarge as exc:
            self._refuse(emulator._too_large(self.command, parts.path, headers, exc))
            return
        except (ValueError, OSError):
            self.send_error(400, "Could not read the request body.")
            return
        try:
            call = Call(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query, keep_blank_values=True),
                headers=headers,
                body=body,
            )
            reply = emulator._respond(call)
        except Exception:  # a bug must still answer, never hang the client
            log.exception("emulator handler failed for %s %s", self.command, self.path)
            reply = error_reply(
                ApiError(
                    500,
                    "The emulator failed while handling this request.",
                    type="server_error",
                    code="server_error",
                ),
                "openai",
            )
        if reply is None:  # injected "drop": hang up without a word
            self.close_connection = True
            return
        try:
            self._write(reply)
        except OSError:
            self.close_connection = True

    def _read_body(self, limit: int) -> bytes:
        """The request body; BodyTooLarge before reading past `limit` bytes (Content-Length or chunk sizes)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise ValueError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size < 0:
                    raise ValueError("negative chunk size")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise BodyTooLarge(total, limit)
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise ValueError("connection closed inside a chunk")
                chunks.append(chunk)
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > limit:
            raise BodyTooLarge(length, limit)
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise ValueError("connection closed inside the body")
        return data

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if reply.cut_at is not None:  # injected "cut": part of the promised body, then hang up
            self.close_connection = True
            self.wfile.write(reply.body[: reply.cut_at])
            self.wfile.flush()
            return
        self.wfile.write(reply.body)
        self.wfile.flush()

    def _refuse(self, reply: Reply) -> None:
        """Answer without reading the body, then swallow what the client still sends (bounded) and hang up:
        closing at once would reset the connection and the client would never see the answer."""
        self.close_connection = True
        try:
            self._write(reply)
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_IDLE_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and self.rfile.read1(1 << 16):
                pass
        except OSError:  # including the idle timeout
            pass


class LocalBatchServer:
    """Local OpenAI + Anthropic + Gemini batch server for tests and demos; bound at construction, served by start().

    `control_token` guards the /_emulator/ endpoints (default: a fresh random one, read it back from
    `server.control_token`); `control=False` turns them off. In-process users need neither: they use
    `server.config`, `server.stats` and `server.complete_all()` directly."""

    def __init__(
        self,
        port: int = 0,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        control_token: str | None = None,
        control: bool = True,
    ) -> None:
        if control_token is not None and not TOKEN_RE.match(control_token):
            raise ValueError("--control-token needs 16 to 256 printable ASCII characters without spaces")
        self.control_token = control_token if control_token is not None else secrets.token_urlsafe(32)
        self.control_enabled = control
        self.stats = EmulatorStats()
        self.core = Core(config or EmulatorConfig(), self.stats)
        self.openai = OpenAIBackend(self.core)
        self.anthropic = AnthropicBackend(self.core)
        self.gemini = GeminiBackend(self.core)
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.emulator = self
        bound_host, bound_port = self._httpd.server_address[:2]
        self.host = "127.0.0.1" if bound_host in ("0.0.0.0", "") else str(bound_host)
        self.port = int(bound_port)
        self.url = f"http://{self.host}:{self.port}"
        self.openai_base_url = self.url + "/v1"
        self.anthropic_base_url = self.url
        self.gemini_base_url = self.url  # GOOGLE_GEMINI_BASE_URL: the SDK adds /v1beta/... itself
        self.core.base_url = self.url
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closed = False
        self._handlers: dict[str, Callable[[Call], Reply]] = {
            "openai.files.create": self.openai.create_file,
            "openai.files.list": self.openai.list_files,
            "openai.files.retrieve": self.openai.retrieve_file,
            "openai.files.delete": self.openai.delete_file,
            "openai.files.content": self.openai.file_content,
            "openai.batches.create": self.openai.create_batch,
            "openai.batches.list": self.openai.list_batches,
            "openai.batches.retrieve": self.openai.retrieve_batch,
            "openai.batches.cancel": self.openai.cancel_batch,
            "openai.chat.completions": self.openai.chat_completion,
            "anthropic.batches.create": self.anthropic.create_batch,
            "anthropic.batches.list": self.anthropic.list_batches,
            "anthropic.batches.retrieve": self.anthropic.retrieve_batch,
            "anthropic.batches.delete": self.anthropic.delete_batch,
            "anthropic.batches.cancel": self.anthropic.cancel_batch,
            "anthropic.batches.results": self.anthropic.results,
            "anthropic.messages": self.anthropic.create_message,
            "models.retrieve": self._model,
            "gemini.files.upload": self.gemini.upload,
            "gemini.files.get": self.gemini.get_file,
            "gemini.files.delete": self.gemini.delete_file,
            "gemini.files.download": self.gemini.download,
            "gemini.batches.create": self.gemini.create_batch,
            "gemini.batches.list": self.gemini.list_batches,
            "gemini.batches.get": self.gemini.get_batch,
            "gemini.batches.delete": self.gemini.delete_batch,
            "gemini.batches.cancel": self.gemini.cancel_batch,
            "gemini.generate_content": self.gemini.generate_content,
            "gemini.models.get": self.gemini.get_model,
        }

    # ---- lifecycle ---------------------------------------------------------------------------------------

    @property
    def config(self) -> EmulatorConfig:
        """The live configuration; mutate it (or assign a new one) between test phases."""
        return self.core.config

    @config.setter
    def config(self, value: EmulatorConfig) -> None:
        self.core.config = value

    def start(self) -> LocalBatchServer:
        """Serve in a background daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"hipbatch-emulator-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, hang up open keep-alive connections and release the port."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve in the foreground until interrupted (Ctrl-C returns normally)."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self._closed = True
            self._httpd.server_close()

    def __enter__(self) -> LocalBatchServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def banner(self, show_token: bool = True) -> str:
        """What `hipbatch emulator` prints at start: the environment to point clients here, the control token."""
        lines = [
            f"hipbatch emulator on {self.url}",
            f"  OPENAI_BASE_URL={self.openai_base_url} OPENAI_API_KEY=test",
            f"  ANTHROPIC_BASE_URL={self.anthropic_base_url} ANTHROPIC_API_KEY=test",
            f"  GOOGLE_GEMINI_BASE_URL={self.gemini_base_url} GEMINI_API_KEY=test",
        ]
        if self.control_enabled:
            token = self.control_token if show_token else "<the token you gave>"
            change = """'{"download_fault": "short"}'"""
            lines += [
                f"Control endpoints need the token {token}, e.g.:",
                f"  curl -H 'Authorization: Bearer {token}' {self.url}/_emulator/stats",
                f"  curl -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d {change} "
                f"{self.url}/_emulator/config",
            ]
        else:
            lines.append("Control endpoints off (--no-control).")
        return "\n".join([*lines, "Ctrl-C to stop."])

    def control_headers(self) -> dict[str, str]:
        """Headers a control request needs: the token and the JSON content type."""
        return {"Authorization": f"Bearer {self.control_token}", "Content-Type": "application/json"}

    def complete_all(self) -> None:
        """Move every unfinished batch of every provider to its final state now."""
        self.openai.complete_all()
        self.anthropic.complete_all()
        self.gemini.complete_all()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ---- dispatch ----------------------------------------------------------------------------------------

    def _refuse_unread(self, method: str, path: str, headers: dict[str, str]) -> Reply | None:
        """The answer to a control request refused before its body is read (off, token, content type), or None."""
        if not path.startswith(CONTROL_PREFIX):
            return None
        if not self.control_enabled:
            self.stats.refuse("control_off")
            return error_reply(
                ApiError(404, "The emulator's control endpoints are off (started with --no-control)."), "openai"
            )
        auth = headers.get("authorization", "")
        given = headers.get("x-emulator-token", "").strip() or (
            auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        )
        if not given:
            self.stats.refuse("control_no_token")
            err = ApiError(
                401,
                "The emulator's control endpoints need its token (printed when it starts): send "
                "'Authorization: Bearer <token>' or 'X-Emulator-Token: <token>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return error_reply(err, "openai")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.control_token.encode("utf-8")):
            self.stats.refuse("control_bad_token")
            return error_reply(ApiError(403, "Wrong emulator control token."), "openai")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if method != "GET" and media_type != "application/json":
            self.stats.refuse("control_not_json")
            return error_reply(
                ApiError(415, "Control requests other than GET must be sent as Content-Type: application/json."),
                "openai",
            )
        return None

    def _body_limit(self, path: str) -> int:
        """Largest request body accepted on `path`."""
        limit = self.config.max_body_bytes
        return min(limit, CONTROL_MAX_BODY_BYTES) if path.startswith(CONTROL_PREFIX) else limit

    def _too_large(self, method: str, path: str, headers: dict[str, str], exc: BodyTooLarge) -> Reply:
        """413 for a body over the cap, in the shape of the provider the path belongs to."""
        self.stats.refuse("body_too_large")
        err = ApiError(
            413,
            f"Request body is over {exc.limit} bytes (at least {exc.size}); this server accepts at most {exc.limit}.",
            type="request_too_large",
        )
        return error_reply(err, self._provider(self._match(method, path)[0], headers, path))

    @staticmethod
    def _provider(route: Route | None, headers: dict[str, str], path: str) -> str:
        """Whose conventions an answer follows: the route's, or by header for routes both providers share."""
        provider = route.provider if route else "either"
        if route is None and path.startswith(GEMINI_PATHS):
            provider = "gemini"
        if provider == "either":
            provider = "anthropic" if "anthropic-version" in headers else "openai"
        return provider

    def _respond(self, call: Call) -> Reply | None:
        """The answer to one request, or None to drop the connection."""
        if call.path.startswith(CONTROL_PREFIX):
            return self._internal(call)
        route, params, path_known = self._match(call.method, call.path)
        provider = self._provider(route, call.headers, call.path)
        call.provider = provider
        call.params = params
        route_name = route.name if route else "unknown"
        self.stats.hit(route_name)
        fault = self._draw_fault(route_name)
        if fault == "truncate" and not (route and route.download):
            fault = "500"  # only downloads can be cut
        if fault is not None and fault not in FAULT_KINDS:
            fault = "500"
        if fault in ("429", "500"):
            return self._fault_reply(fault, provider)
        if fault == "drop":
            self.stats.fault("drop")
            return None
        try:
            if route is None:
                if path_known:
                    raise ApiError(405, f"Method {call.method} is not allowed on {call.path}.")
                raise ApiError(404, f"Unknown request URL: {call.method} {call.path}.", type="not_found_error")
            self._check_auth(call)
            reply = self._handlers[route.name](call)
        except ApiError as err:
            reply = error_reply(err, provider)
        if route is not None and route.download and reply.status == 200:
            self.stats.download(route.name)
            reply = self._download_fault(call, reply)
        id_header = "request-id" if provider == "anthropic" else "x-request-id"
        reply.headers.setdefault(id_header, new_id("req_"))
        if fault == "truncate":
            cut = self._cut(reply.body) if reply.status == 200 else None
            if cut is None:
                return self._fault_reply("500", provider)
            self.stats.fault("truncate")
            reply.body = cut
        if fault == "drop_after":
            self.stats.fault("drop_after")
            return None
        return reply

    @staticmethod
    def _match(method: str, path: str) -> tuple[Route | None, tuple[str, ...], bool]:
        known = False
        for route in ROUTES:
            found = route.pattern.match(path)
            if found:
                if route.method == method:
                    return route, tuple(unquote(group) for group in found.groups()), True
                known = True
        return None, (), known

    def _check_auth(self, call: Call) -> None:
        auth = call.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if call.provider == "gemini":
            check_google_key(call)
        elif call.provider == "anthropic":
            if not bearer and not call.headers.get("x-api-key", "").strip():
                raise ApiError(
                    401,
                    "Missing credentials: send an x-api-key or an Authorization: Bearer header.",
                    type="authentication_error",
                )
        elif not bearer:
            raise ApiError(401, "Missing API key", code="invalid_api_key")
        if self.core.faults.key_rotated():
            if call.provider == "anthropic":
                raise ApiError(
                    401,
                    "invalid x-api-key (rotated: injected by the emulator's auth_after)",
                    type="authentication_error",
                )
            raise ApiError(
                401,
                "Incorrect API key provided (rotated: injected by the emulator's auth_after).",
                code="invalid_api_key",
            )

    def _download_fault(self, call: Call, reply: Reply) -> Reply:
        """`reply` (a download) changed by the configured download fault, if it is due for this target."""
        target = "/".join(call.params)
        faults = self.core.faults
        kind = faults.peek(BODY_FAULTS | {"gone"}, target, reply.fault_key)
        if kind is None:
            return reply
        if kind == "gone":
            message = (
                f"No such object: {target}; its results are no longer available (injected: download_fault='gone')."
            )
            changed = error_reply(ApiError(404, message, type="not_found_error", param="id"), call.provider)
        elif kind == "cut":
            at = cut_point(reply.body)
            if at is None:
                return reply
            changed = replace(reply, cut_at=at)
        else:
            body = mangle(kind, reply.body)
            if body is None:
                return reply
            changed = replace(reply, body=body)
        return changed if faults.take(kind, target) else reply

    def _draw_fault(self, route_name: str) -> str | None:
        cfg = self.config
        if cfg.fault_rate <= 0 or not cfg.fault_kinds:
            return None
        if cfg.fault_routes is not None and route_name not in cfg.fault_routes:
            return None
        with self.core.lock:
            if self.core.rng.random() >= cfg.fault_rate:
                return None
            return self.core.rng.choice(list(cfg.fault_kinds))

    def _fault_reply(self, kind: str, provider: str) -> Reply:
        self.stats.fault(kind)
        # a retry hint on both kinds keeps the SDKs' automatic retries fast in tests
        headers = retry_headers(self.config.retry_after_ms)
        if kind == "429":
            err = ApiError(
                429,
                "Rate limit reached (injected by the emulator).",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers=headers,
            )
        else:
            err = ApiError(
                500,
                "The server had an error while processing your request (injected by the emulator).",
                type="server_error",
                code="server_error",
                headers=headers,
            )
        return error_reply(err, provider)

    def _cut(self, body: bytes) -> bytes | None:
        """`body` cut strictly inside a line (a proper, non-empty prefix of it), or None if impossible."""
        if len(body) < 2:
            return None

        def inside(pos: int) -> bool:
            return body[pos - 1 : pos] != b"\n" and body[pos : pos + 1] != b"\n"

        with self.core.lock:
            start = self.core.rng.randint(1, len(body) - 1)
        for pos in (*range(start, len(body)), *range(start - 1, 0, -1)):
            if inside(pos):
                return body[:pos]
        return None

    def _model(self, call: Call) -> Reply:
        name = call.params[0]
        if not self.config.models_route:  # the answer of a server that has no such route (OpenAI's own words)
            if call.provider == "anthropic":
                raise ApiError(404, "Not Found", type="not_found_error")
            raise ApiError(404, f"Invalid URL (GET /v1/models/{name})", type="invalid_request_error")
        if is_unknown_model(name):
            if call.provider == "anthropic":
                raise ApiError(404, f"model: {name}", type="not_found_error")
            raise ApiError(404, f"The model `{name}` does not exist", code="model_not_found", param="model")
        return json_reply(
            {
                "id": name,
                "object": "model",
                "type": "model",
                "created": MODEL_CREATED,
                "created_at": rfc3339(MODEL_CREATED),
                "display_name": name,
                "owned_by": "hipbatch-emulator",
                "lifecycle": "active",
            }
        )

    def _internal(self, call: Call) -> Reply:
        """GET stats|config|health, POST reset-stats|complete-all|config (JSON fields to change)."""
        action = (call.method, call.path.removeprefix("/_emulator/").strip("/"))
        if action == ("GET", "stats"):
            return json_reply(self.stats.as_dict())
        if action == ("POST", "reset-stats"):
            self.stats.reset()
            return json_reply({"ok": True})
        if action == ("POST", "complete-all"):
            self.complete_all()
            return json_reply({"ok": True})
        if action == ("GET", "config"):
            return json_reply(self.config.as_dict())
        if action == ("POST", "config"):
            try:
                changes = json.loads(call.body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("send a JSON object of the config fields to change")
                locked = sorted(IN_PROCESS_ONLY & set(changes))
                if locked:
                    message = f"{', '.join(locked)} can only be set in-process (LocalBatchServer config), not here."
                    return error_reply(ApiError(403, message), "openai")
                self.config.update(changes)
            except (ValueError, TypeError, AttributeError) as exc:
                return error_reply(ApiError(400, str(exc)), "openai")
            return json_reply(self.config.as_dict())
        if action == ("GET", "health"):
            return json_reply({"ok": True, "url": self.url})
        return error_reply(ApiError(404, f"Unknown emulator control URL: {call.method} {call.path}."), "openai")
