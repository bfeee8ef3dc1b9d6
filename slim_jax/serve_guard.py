"""What keeps bad clients from hurting the chat server (slim_jax/serve.py): limits on
bodies, time and connections, and the API key check.

- `ServerLimits`: the numbers, each a flag of `python -m slim_jax.serve`.
- `ConnectionGuard`: at most `max_connections` handler threads; one more connection gets a
  503 with `Retry-After` from a small pool of short-lived rejecter threads (and is simply
  closed when even those are busy), so a flood costs a bounded number of threads. A reaper
  thread closes a connection whose request head (request line and headers) has not
  arrived `request_timeout_s` after its first byte, with a 408: a client sending a byte a
  second holds its thread for that long, not forever.
- `read_body`: the body of a request, read against the same deadline (408) and refused
  above `max_body_bytes` before a byte of it is read (413).
- `authorized`: the `Authorization: Bearer` check, in constant time.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import socket
import threading
import time

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_REJECTERS = 16  # threads answering 503 to connections over the cap
REJECT_READ_S = 1.0  # how long a rejecter waits for the request it refuses
RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class ServerLimits:
  max_body_bytes: int = 4 << 20  # a 100-item history with long titles is ~50 KB
  request_timeout_s: float = 30.0  # request line + headers + body, from its first byte
  idle_timeout_s: float = 60.0  # a keep-alive connection with no request, or a stalled read
  max_connections: int = 64  # open connections with a handler thread
  max_queued_rows: int = 256  # rows waiting for the batcher; beyond: 503
  api_key: str | None = None  # every endpoint but /health requires it as a bearer token

  def __post_init__(self):
    for name in ("max_body_bytes", "request_timeout_s", "idle_timeout_s", "max_connections",
                 "max_queued_rows"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
  """OpenAI's error body, the one shape every error of the server has."""
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, reason: str, message: str, code: str,
                   extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
  """A complete HTTP/1.1 response with OpenAI's error body and `Connection: close`, for
  connections no handler serves (over the cap, a request head that timed out)."""
  body = json.dumps(error_body(message, "server_error" if status >= 500
                               else "invalid_request_error", None, code)).encode()
  head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
          f"Content-Length: {len(body)}", "Connection: close",
          *(f"{k}: {v}" for k, v in extra_headers)]
  return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY_RESPONSE = error_response(
    503, "Service Unavailable", "the server has as many connections open as it allows; "
    "retry after the Retry-After seconds", "server_busy",
    (("Retry-After", str(RETRY_AFTER_S)),))
HEAD_TIMEOUT_RESPONSE = error_response(
    408, "Request Timeout", "the request line and headers did not arrive in time",
    "request_timeout")


class ConnectionGuard:
  """Counts connections, refuses those over the cap, and times out slow request heads."""

  def __init__(self, limits: ServerLimits):
    self.limits = limits
    self._lock = threading.Lock()
    self.open = 0
    self._rejecters = 0
    self.rejected = 0  # connections answered 503 or closed for being over the cap
    self.head_timeouts = 0
    self._reading: dict[socket.socket, float] = {}  # connection -> head deadline
    self._stop = threading.Event()
    self._reaper = threading.Thread(target=self._reap, name="head-reaper", daemon=True)
    self._reaper.start()

  def admit(self, connection: socket.socket) -> bool:
    """True: the connection gets a handler (call `release` when it ends); False: it was
    refused and is handled here."""
    with self._lock:
      if self.open < self.limits.max_connections:
        self.open += 1
        return True
      self.rejected += 1
      if self._rejecters >= MAX_REJECTERS:
        _close(connection)
        return False
      self._rejecters += 1
    threading.Thread(target=self._reject, args=(connection,), daemon=True).start()
    return False

  def release(self) -> None:
    with self._lock:
      self.open -= 1

  def _reject(self, connection: socket.socket) -> None:
    """503 after reading what the client sent (so closing does not reset the connection
    before it reads the answer)."""
    try:
      connection.settimeout(REJECT_READ_S)
      deadline = time.monotonic() + REJECT_READ_S
      tail = b""  # the last bytes received, enough to see the end of the head
      while time.monotonic() < deadline:
        chunk = connection.recv(65536)
        if not chunk or b"\r\n\r\n" in tail + chunk:
          break
        tail = (tail + chunk)[-3:]
      connection.sendall(BUSY_RESPONSE)
      connection.shutdown(socket.SHUT_WR)
      while time.monotonic() < deadline and connection.recv(65536):
        pass
    except OSError:
      pass
    finally:
      _close(connection)
      with self._lock:
        self._rejecters -= 1

  def head_started(self, connection: socket.socket) -> None:
    with self._lock:
      self._reading[connection] = time.monotonic() + self.limits.request_timeout_s

  def head_done(self, connection: socket.socket) -> None:
    with self._lock:
      self._reading.pop(connection, None)

  def _reap(self) -> None:
    while not self._stop.wait(0.1):
      now = time.monotonic()
      with self._lock:
        late = [c for c, deadline in self._reading.items() if deadline < now]
        for connection in late:
          del self._reading[connection]
        self.head_timeouts += len(late)
      for connection in late:
        try:
          connection.settimeout(0.5)
          connection.sendall(HEAD_TIMEOUT_RESPONSE)
        except OSError:
          pass
        try:
          connection.shutdown(socket.SHUT_RDWR)  # the handler's read returns; it closes
        except OSError:
          pass

  def close(self) -> None:
    self._stop.set()


def _close(connection: socket.socket) -> None:
  try:
    connection.close()
  except OSError:
    pass


class BodyError(Exception):
  """A request body that cannot be read: (status, message, code)."""

  def __init__(self, status: int, message: str, code: str):
    super().__init__(message)
    self.status, self.message, self.code = status, message, code


def body_length(header: str | None, limits: ServerLimits) -> int:
  """The Content-Length, checked before anything is read."""
  if header is None:
    raise BodyError(411, "a Content-Length header is required", "length_required")
  try:
    length = int(header)
  except ValueError:
    length = -1
  if length < 0:
    raise BodyError(400, f"Content-Length must be a non-negative integer, got {header!r}",
                    "invalid_content_length")
  if length > limits.max_body_bytes:
    raise BodyError(413, f"the request body is {length} bytes; this server takes at most "
                    f"{limits.max_body_bytes} (--max_body_bytes)", "request_too_large")
  return length


def read_body(rfile, connection: socket.socket, length: int, deadline: float,
              idle_timeout_s: float) -> bytes:
  """`length` bytes of body, all before `deadline` (408 otherwise); a body that ends early
  is a 400. Restores the connection's idle timeout afterwards."""
  chunks, remaining = [], length
  try:
    while remaining:
      left = deadline - time.monotonic()
      if left <= 0:
        raise BodyError(408, f"the request body did not arrive in time ({length - remaining} "
                        f"of {length} bytes)", "request_timeout")
      connection.settimeout(min(left, idle_timeout_s))
      try:
        chunk = rfile.read1(min(remaining, 1 << 16))
      except TimeoutError:  # the deadline, or a stall as long as the idle timeout
        raise BodyError(408, f"the request body did not arrive in time ({length - remaining} "
                        f"of {length} bytes)", "request_timeout") from None
      if not chunk:
        raise BodyError(400, f"the request body ended after {length - remaining} of "
                        f"{length} bytes", "truncated_body")
      chunks.append(chunk)
      remaining -= len(chunk)
  finally:
    try:
      connection.settimeout(idle_timeout_s)
    except OSError:
      pass
  return b"".join(chunks)


def authorized(header: str | None, api_key: str | None) -> bool:
  """Whether `Authorization: Bearer <key>` matches, compared in constant time."""
  if api_key is None:
    return True
  scheme, _, given = (header or "").partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"),
                                                            api_key.encode("utf-8"))


def warn_if_exposed(host: str, api_key: str | None) -> bool:
  """Logs a warning for a non-loopback bind without a key; returns whether it warned."""
  if api_key is None and host not in LOOPBACK_HOSTS:
    logging.warning("serving on %s without --api_key: anyone who can reach this address can "
                    "use the model. Pass --api_key_env=NAME (or --api_key) to require a key.",
                    host)
    return True
  return False
