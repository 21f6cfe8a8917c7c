"""The control API: one JSON object per line over a Unix domain socket in the state directory.

A request ``{"op": "jobs.show", "args": {"id": "j250314-101502-00"}}`` gets one reply line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``; a connection may carry
several requests. There is no TCP port: who may control the daemon is decided by the socket file's
mode (0660) and group. A bad request gets an error reply and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from axis_stream.errors import AxisError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20          # a request line longer than this is refused
MAX_REPLY_BYTES = 64 << 20           # the client refuses a longer reply
IDLE_TIMEOUT_S = 300.0               # a connection that sends nothing this long is closed
SOCKET_MODE = 0o660

Handler = Callable[[dict[str, Any]], Any]
_REQUIRED = object()


class DaemonNotRunning(AxisError):
    """Nothing listens on the control socket."""

    def __init__(self, socket_path: str | Path):
        self.socket_path = Path(socket_path)
        super().__init__(f"no daemon is listening on {self.socket_path}")


class RequestError(AxisError):
    """A request is malformed: not JSON, an unknown op, or missing or invalid arguments."""


def arg(args: dict[str, Any], name: str, kind: type, default: Any = _REQUIRED) -> Any:
    """Argument ``name`` of type ``kind`` from a request; RequestError when it is missing or mistyped."""
    value = args.get(name)
    if value is None:
        if default is _REQUIRED:
            raise RequestError(f"missing argument {name!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RequestError(f"argument {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def one_line(message: str) -> str:
    """Join a possibly multi-line message into one line (replies and job errors are one line)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class ControlServer:
    """Serves ``handlers`` (op name -> function of the args dict) on ``socket_path`` from a background thread."""

    def __init__(self, socket_path: Path, handlers: dict[str, Handler]):
        self.socket_path = Path(socket_path)
        self.handlers = dict(handlers)
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    def start(self) -> None:
        """Bind the socket (mode 0660, replacing a stale file nobody listens on) and serve in a thread."""
        _remove_stale_socket(self.socket_path)
        # Bind under a temporary name and rename, so the socket never exists with a wider mode.
        tmp = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            server = _UnixServer(str(tmp), _Connection)
        except OSError as exc:
            raise AxisError(f"{self.socket_path}: cannot create the control socket: {exc.strerror or exc}") from None
        try:
            os.chmod(tmp, SOCKET_MODE)
            os.replace(tmp, self.socket_path)
        except OSError:
            server.server_close()
            tmp.unlink(missing_ok=True)
            raise
        server.control = self
        self._server = server
        self._inode = self.socket_path.stat().st_ino
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="axis-control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.socket_path)

    def stop(self) -> None:
        """Stop serving and remove the socket file (only if it is still ours)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        try:
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self._server = None

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Answer one request line; never raises."""
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _refusal(f"malformed request: not JSON ({exc})")
        except RecursionError:
            return _refusal("malformed request: nested too deeply")
        if not isinstance(request, dict):
            return _refusal("malformed request: expected a JSON object with 'op' and 'args'")
        op, args = request.get("op"), request.get("args", {})
        if not isinstance(op, str):
            return _refusal("malformed request: 'op' must be a string")
        if not isinstance(args, dict):
            return _refusal(f"malformed request: 'args' of {op!r} must be an object")
        handler = self.handlers.get(op)
        if handler is None:
            return _refusal(f"unknown op {op!r}; known: {', '.join(sorted(self.handlers))}")
        try:
            result = handler(args)
            json.dumps(result)
        except AxisError as exc:
            return _refusal(f"{op}: {exc}" if isinstance(exc, RequestError) else str(exc))
        except Exception as exc:
            log.exception("control: op %s failed", op)
            return _refusal(f"internal error in {op}: {type(exc).__name__}: {exc}")
        return {"ok": True, "result": result}


def _refusal(message: str) -> dict[str, Any]:
    """The error reply to a request, logged once."""
    message = one_line(message)
    log.warning("control: refused a request: %s", message)
    return {"ok": False, "error": message}


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128     # the default 5 refuses connects (EAGAIN) when 20 clients call at once
    control: ControlServer


class _Connection(socketserver.StreamRequestHandler):
    """One client connection: read request lines, answer each with one reply line."""

    timeout = IDLE_TIMEOUT_S
    server: _UnixServer

    def handle(self) -> None:
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            except OSError:          # idle timeout or the client went away
                return
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
                if not self._skip_rest_of_line():
                    return
                reply = _refusal(f"request larger than {MAX_REQUEST_BYTES} bytes")
            elif not line.strip():
                continue
            else:
                reply = self.server.control.dispatch(line)
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                return

    def _skip_rest_of_line(self) -> bool:
        """Discard the rest of an oversized line (up to the reply cap); False when the client is gone."""
        skipped = 0
        while skipped < MAX_REPLY_BYTES:
            try:
                chunk = self.rfile.readline(1 << 16)
            except OSError:
                return False
            if not chunk:
                return False
            if chunk.endswith(b"\n"):
                return True
            skipped += len(chunk)
        return False


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a daemon that died; refuse if someone still listens or it is no socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AxisError(f"{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.info("removed stale control socket %s", path)
        return
    except OSError as exc:
        raise AxisError(f"{path}: cannot check whether another daemon listens on it: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise AxisError(f"{path}: another daemon is already listening on this control socket")


def request(socket_path: str | Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request to the daemon and return its ``result``.

    Raises DaemonNotRunning when nothing listens on ``socket_path``, and AxisError with the
    daemon's one-line message when it answers with an error.
    """
    socket_path = Path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(socket_path) from None
        except PermissionError:
            raise AxisError(f"{socket_path}: permission denied; the control socket is open to the daemon's "
                            "user and group only (mode 0660)") from None
        except OSError as exc:
            raise AxisError(f"{socket_path}: cannot connect: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise AxisError(f"{socket_path}: no reply to {op!r} within {timeout:g} s") from None
        except OSError as exc:
            raise AxisError(f"{socket_path}: connection failed during {op!r}: {exc.strerror or exc}") from None
    if not line.endswith(b"\n"):
        raise AxisError(f"{socket_path}: the daemon closed the connection without a complete reply to {op!r}")
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        raise AxisError(f"{socket_path}: the reply to {op!r} is not JSON") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise AxisError(f"{socket_path}: the reply to {op!r} is not a control-API reply")
    if not reply["ok"]:
        raise AxisError(str(reply.get("error") or f"{op} failed"))
    return reply.get("result")
