r"""An OpenAI-compatible chat server over the Flax LLaMA (and an optional LoRA adapter).

  python -m slim_jax.serve --model=PATH --port=8000 [--adapter=DIR] [--host=127.0.0.1]

PATH is anything `pretrained.load_llama` takes (a Hugging Face folder or a .gguf file);
DIR is a PEFT LoRA folder (`lora.load_peft`), e.g. the distilled student. The server is
how the offline teacher runs (experiments/teacher.py --teacher_base_url=http://HOST:PORT/v1)
and how the student is deployed.

Endpoints: GET /v1/models, GET /v1/models/{id}, GET /health (the batcher alive, the queue
depth, open connections), POST /v1/chat/completions (non-streaming, and `stream: true` as
server-sent events in OpenAI's chunk format ending with `data: [DONE]`). Errors use
OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for invalid requests
and chat-template errors, 401 without the `--api_key` (every endpoint but /health), 404
for unknown models and routes, 408 for requests that do not arrive within
`--request_timeout`, 413 for bodies over `--max_body_bytes`, 503 with `Retry-After` when
`--max_connections` or `--max_queued_rows` are reached (slim_jax/serve_guard.py).

Concurrency: HTTP handlers run in threads, read and parse their whole body, then hand
their rows to one `Batcher` thread (slim_jax/batcher.py), which owns the generator (a slow
client therefore delays only itself): it waits `batch_window_ms` after each request for another to
arrive, and while handler threads are still parsing requests (at most a second or ten
windows in all, whichever is longer), then decodes up to `max_batch_size` rows in one batched,
jitted `Generator.chat` call. Sixteen clients therefore cost about one decode, not sixteen.

Shutdown: SIGTERM or SIGINT stops accepting connections, lets requests in flight finish
(up to --drain_seconds), then exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid

from slim_jax import batcher as batcher_lib
from slim_jax import generator_loading, quiet_logs, serve_guard

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs",
               "top_logprobs", "response_format", "audio", "modalities")


class APIError(Exception):
  """An error answered with OpenAI's error body."""

  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: tuple[tuple[str, str], ...] = (), close: bool = False):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                   param, code)
    self.headers = headers
    self.close = close  # the connection cannot go on (the body was not read)

  def body(self) -> dict:
    return serve_guard.error_body(self.message, self.type, self.param, self.code)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A validated /v1/chat/completions request."""
  messages: list[dict]
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  stop: tuple[str, ...]
  n: int
  seed: int | None
  stream: bool
  include_usage: bool


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
  value = body.get(name)
  if value is None:
    return default
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                   f"{json.dumps(value)}", param=name, code="invalid_type")
  if not low <= value <= high:
    raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name,
                   code="invalid_value")
  return value


def _content(message: dict, index: int) -> str:
  content = message.get("content")
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
    texts = []
    for part in content:
      if not (isinstance(part, dict) and part.get("type") == "text"
              and isinstance(part.get("text"), str)):
        raise APIError(400, f"messages[{index}].content: only text parts are supported",
                       param=f"messages[{index}].content", code="invalid_value")
      texts.append(part["text"])
    return "".join(texts)
  raise APIError(400, f"messages[{index}].content must be a string or a list of text parts",
                 param=f"messages[{index}].content", code="invalid_type")


def parse_chat_request(body, model_name: str) -> ChatRequest:
  """Validates a request body like OpenAI does; raises APIError naming the bad parameter."""
  if not isinstance(body, dict):
    raise APIError(400, "the request body must be a JSON object")
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise APIError(400, "you must provide a model parameter", param="model",
                   code="missing_required_parameter")
  if model != model_name:
    raise APIError(404, f"the model '{model}' does not exist; this server serves "
                   f"'{model_name}' (see GET /v1/models)", type_="invalid_request_error",
                   param="model", code="model_not_found")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise APIError(400, "'messages' must be a non-empty array", param="messages",
                   code="invalid_value" if isinstance(messages, list) else
                   "missing_required_parameter")
  clean = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]",
                     code="invalid_type")
    role = message.get("role")
    if role == "developer":
      role = "system"
    if role not in ROLES:
      raise APIError(400, f"messages[{i}].role is {json.dumps(role)}; expected one of "
                     f"{', '.join(ROLES)}", param=f"messages[{i}].role", code="invalid_value")
    clean.append({"role": role, "content": _content(message, i)})
  for name in UNSUPPORTED:
    if body.get(name) not in (None, False, [], {"type": "text"}):
      raise APIError(400, f"'{name}' is not supported by this server", param=name,
                     code="unsupported_parameter")
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  if max_tokens is not None:
    max_tokens = _number({param: max_tokens}, param, None, 1, 1 << 30, integer=True)
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
    stop = tuple(stop)
  else:
    raise APIError(400, "'stop' must be a string or an array of strings", param="stop",
                   code="invalid_type")
  if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
    raise APIError(400, f"'stop' takes 1 to {MAX_STOP_SEQUENCES} non-empty strings",
                   param="stop", code="invalid_value")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise APIError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise APIError(400, "'stream_options' must be an object", param="stream_options",
                   code="invalid_type")
  seed = body.get("seed")
  if seed is not None:
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
  return ChatRequest(
      messages=clean, max_tokens=max_tokens,
      temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
      top_p=max(float(_number(body, "top_p", 1.0, 0.0, 1.0)), 1e-6),  # 0: the top token
      top_k=int(_number(body, "top_k", 0, 0, 1 << 30, integer=True)),
      stop=stop, n=int(_number(body, "n", 1, 1, 128, integer=True)), seed=seed,
      stream=stream, include_usage=bool(options.get("include_usage", False)))


# ----------------------------------------------------------------------------- HTTP

class _ThreadingHTTPServer(http.server.ThreadingHTTPServer):
  """One thread per admitted connection, at most `guard.limits.max_connections`."""
  # A client's concurrent requests (the teacher stage opens 16 at once) arrive together:
  # socketserver's default listen backlog of 5 refuses the rest, which then retry.
  request_queue_size = 128
  guard: serve_guard.ConnectionGuard

  def process_request(self, request, client_address):
    if self.guard.admit(request):
      super().process_request(request, client_address)

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self.guard.release()

  def handle_error(self, request, client_address):
    logging.debug("connection from %s ended with an error", client_address, exc_info=True)


class ChatServer:
  """The HTTP front: validates, tokenizes for limits, queues rows, writes OpenAI bodies."""

  def __init__(self, generator, model_name: str, *, host: str = "127.0.0.1", port: int = 0,
               max_batch_size: int = 16, batch_window_ms: float = 20.0,
               max_seq_len: int = 2048, default_max_tokens: int = 512, sampling_cls=None,
               limits: serve_guard.ServerLimits = serve_guard.ServerLimits()):
    self.generator = generator
    self.model_name = model_name
    self.max_seq_len = max_seq_len
    self.default_max_tokens = default_max_tokens
    self.limits = limits
    self.created = int(time.time())
    self.batcher = batcher_lib.Batcher(generator, max_batch_size, batch_window_ms / 1000.0,
                                       limits.max_queued_rows)
    self._busy = 0
    self._busy_lock = threading.Condition()
    self._draining = False
    self.stopped = threading.Event()
    self._thread: threading.Thread | None = None
    self._sampling_cls = sampling_cls
    self.httpd = _ThreadingHTTPServer((host, port), ChatHandler)
    self.httpd.chat_server = self
    self.httpd.guard = self.guard = serve_guard.ConnectionGuard(limits)
    serve_guard.warn_if_exposed(host, limits.api_key)
    self.httpd.daemon_threads = True  # idle keep-alive connections must not block exit

  @property
  def port(self) -> int:
    return self.httpd.server_address[1]

  @property
  def base_url(self) -> str:
    host = self.httpd.server_address[0]
    return f"http://{host}:{self.port}/v1"

  # -- lifecycle

  def serve_forever(self) -> None:
    self.httpd.serve_forever(poll_interval=0.1)

  def start(self) -> "ChatServer":
    """Serves from a background thread (tests, benchmarks)."""
    self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
    self._thread.start()
    return self

  def shutdown(self, drain_seconds: float = 30.0) -> None:
    """Stops accepting, waits for requests in flight, stops the batcher. Idempotent."""
    if self._draining:
      return
    self._draining = True
    self.httpd.shutdown()  # returns once serve_forever has left its loop
    deadline = time.monotonic() + drain_seconds
    with self._busy_lock:
      while self._busy and time.monotonic() < deadline:
        self._busy_lock.wait(timeout=0.1)
      if self._busy:
        logging.warning("shutting down with %d requests still running", self._busy)
    self.httpd.server_close()
    self.guard.close()
    self.batcher.stop()
    if self._thread is not None:
      self._thread.join()
    self.stopped.set()

  def __enter__(self) -> "ChatServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.shutdown()

  def _enter(self) -> None:
    with self._busy_lock:
      self._busy += 1

  def _leave(self) -> None:
    with self._busy_lock:
      self._busy -= 1
      self._busy_lock.notify_all()

  # -- endpoints

  def models(self) -> dict:
    return {"object": "list", "data": [self.model_card()]}

  def model_card(self) -> dict:
    return {"id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "slim-jax"}

  def health(self) -> tuple[int, dict]:
    alive = self.batcher.alive
    status = "batcher_stopped" if not alive else "draining" if self._draining else "ok"
    return (200 if status == "ok" else 503), {
        "status": status,
        "batcher_alive": alive, "queued_rows": self.batcher.queued_rows,
        "max_queued_rows": self.limits.max_queued_rows,
        "open_connections": self.guard.open, "max_connections": self.limits.max_connections,
        "batches": self.batcher.batches, "rows": self.batcher.rows}

  def prepare(self, request: ChatRequest) -> tuple[batcher_lib.Job, int]:
    """The job for a validated request and its prompt length; checks the context window."""
    if self._sampling_cls is None:
      from slim_jax import generate  # pylint: disable=import-outside-toplevel
      self._sampling_cls = generate.SamplingParams
    prompt_tokens = self.count_prompt_tokens(request.messages)
    room = self.max_seq_len - prompt_tokens
    if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
      asked = request.max_tokens or 1
      raise APIError(400, f"this model's maximum context length is {self.max_seq_len} tokens; "
                     f"the messages take {prompt_tokens} and {asked} more were requested. "
                     "Shorten the messages or lower max_tokens.", param="messages",
                     code="context_length_exceeded")
    max_new = request.max_tokens or min(self.default_max_tokens, room)
    seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little")
    sampling = [self._sampling_cls(
        max_new_tokens=max_new, temperature=request.temperature, top_k=request.top_k,
        top_p=request.top_p, stop=request.stop, seed=seed + i) for i in range(request.n)]
    job = batcher_lib.Job(conversations=[request.messages] * request.n, sampling=sampling, on_text=None)
    return job, prompt_tokens

  def count_prompt_tokens(self, messages: list[dict]) -> int:
    try:
      return len(self.generator.chat_ids(messages))
    except Exception as e:  # pylint: disable=broad-except
      if _is_template_error(e):
        raise APIError(400, f"the model's chat template rejects these messages: {e}",
                       param="messages", code="invalid_messages") from None
      raise


def _is_template_error(error: Exception) -> bool:
  """A Jinja error raised while rendering (a template's raise_exception, a bad role order)."""
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return isinstance(error, jinja2.TemplateError)


class ChatHandler(http.server.BaseHTTPRequestHandler):
  """One HTTP connection's requests; the ChatServer it serves is `self.chat`."""
  protocol_version = "HTTP/1.1"
  server_version = "slim-jax"

  @property
  def chat(self) -> "ChatServer":
    return self.server.chat_server

  def setup(self) -> None:
    self.timeout = self.server.chat_server.limits.idle_timeout_s  # applied by setup()
    super().setup()

  def handle_one_request(self) -> None:
    """Waits up to the idle timeout for a request to start, then gives its head (request
    line and headers) until the request timeout to arrive (ConnectionGuard's reaper)."""
    try:
      started = self.rfile.peek(1)
    except (TimeoutError, OSError):
      self.close_connection = True
      return
    if not started:
      self.close_connection = True
      return
    self._request_started = time.monotonic()
    self.chat.guard.head_started(self.connection)
    try:
      super().handle_one_request()
    except OSError:  # the reaper closed a late head, or the client went away
      self.close_connection = True
    finally:
      self.chat.guard.head_done(self.connection)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("%s %s", self.address_string(), format % args)

  # -- plumbing

  def _send_json(self, status: int, payload: dict, headers=(), close: bool = False) -> None:
    data = json.dumps(payload).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for name, value in headers:
      self.send_header(name, value)
    if self.chat._draining or close:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(data)

  def _send_error(self, error: APIError) -> None:
    self._send_json(error.status, error.body(), error.headers, error.close)

  def _read_json(self):
    """The body as JSON, read whole (within the request timeout, at most max_body_bytes)."""
    limits = self.chat.limits
    try:
      length = serve_guard.body_length(self.headers.get("Content-Length"), limits)
      raw = serve_guard.read_body(self.rfile, self.connection, length,
                                  self._request_started + limits.request_timeout_s,
                                  limits.idle_timeout_s)
    except serve_guard.BodyError as e:
      raise APIError(e.status, e.message, code=e.code, close=True) from None
    try:
      return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise APIError(400, f"the request body is not valid JSON: {e}",
                     code="invalid_json") from None

  def _check_key(self, path: str) -> None:
    if path == "/health" or serve_guard.authorized(self.headers.get("Authorization"),
                                                   self.chat.limits.api_key):
      return
    raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                   code="invalid_api_key", close=True)

  def _handle(self, fn) -> None:
    self.chat.guard.head_done(self.connection)
    self.chat._enter()
    try:
      self._check_key(self.path.split("?")[0].rstrip("/"))
      fn()
    except APIError as e:
      try:
        self._send_error(e)
      except OSError:
        self.close_connection = True
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("internal error")
      self._send_error(APIError(500, f"internal server error: {type(e).__name__}",
                                type_="server_error"))
    finally:
      self.chat._leave()

  # -- routes

  def do_GET(self):  # noqa: N802
    self._handle(self._get)

  def do_POST(self):  # noqa: N802
    self._handle(self._post)

  def _get(self) -> None:
    path = self.path.split("?")[0].rstrip("/")
    if path == "/v1/models":
      self._send_json(200, self.chat.models())
    elif path == f"/v1/models/{self.chat.model_name}":
      self._send_json(200, self.chat.model_card())
    elif path.startswith("/v1/models/"):
      raise APIError(404, f"the model '{path[len('/v1/models/'):]}' does not exist",
                     param="model", code="model_not_found")
    elif path == "/health":
      self._send_json(*self.chat.health())
    elif path == "/v1/chat/completions":
      raise APIError(405, "use POST for /v1/chat/completions")
    else:
      raise APIError(404, f"unknown path {path}; this server has /v1/models and "
                     "/v1/chat/completions", code="unknown_url")

  def _post(self) -> None:
    path = self.path.split("?")[0].rstrip("/")
    if path != "/v1/chat/completions":
      raise APIError(404, f"unknown path {path}; POST /v1/chat/completions",
                     code="unknown_url", close=True)  # its body is not read
    body = self._read_json()  # before joining a batch: a slow body delays only itself
    if self.chat._draining:
      raise APIError(503, "the server is shutting down", type_="server_error")
    request = parse_chat_request(body, self.chat.model_name)
    with self.chat.batcher.arriving():
      job, prompt_tokens = self.chat.prepare(request)
      events: queue.Queue = queue.Queue()
      if request.stream:
        job.on_text = lambda index, text: events.put((index, text))
      try:
        self.chat.batcher.submit(job)
      except batcher_lib.TooManyRows as e:
        raise APIError(400, str(e), param="n", code="invalid_value") from None
      except batcher_lib.Stopping:
        raise APIError(503, "the server is shutting down", type_="server_error") from None
      except batcher_lib.QueueFull as e:
        raise APIError(503, f"the server is busy: {e}; retry after the Retry-After seconds",
                       type_="server_error", code="queue_full",
                       headers=(("Retry-After", str(serve_guard.RETRY_AFTER_S)),)) from None
    if request.stream:
      try:
        self._stream(request, job, prompt_tokens, events)
      except OSError:  # the client went away: its rows stop at the next decode chunk
        job.cancelled.set()
        self.close_connection = True
    else:
      job.done.wait()
      if job.error is not None:
        raise APIError(500, f"generation failed: {type(job.error).__name__}: {job.error}",
                       type_="server_error")
      self._send_json(200, _completion_body(self.chat.model_name, job.completions,
                                            prompt_tokens))

  def _write_chunk(self, data: bytes) -> None:
    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    self.wfile.flush()

  def _stream(self, request: ChatRequest, job: batcher_lib.Job, prompt_tokens: int,
              events: queue.Queue) -> None:
    """Writes a submitted job's text as it arrives in `events` (its `on_text`)."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()
    stream_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def send(choices, usage=None, with_usage=False):
      chunk = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
               "model": self.chat.model_name, "system_fingerprint": None, "choices": choices}
      if request.include_usage:
        chunk["usage"] = usage
      self._write_chunk(b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")

    for index in range(request.n):
      send([{"index": index, "delta": {"role": "assistant", "content": ""},
             "logprobs": None, "finish_reason": None}])
    # The generator's callback streams only text that cannot grow into a stop string
    # (generate._Row.take_stream_text); the final flush sends what it held back.
    sent = [""] * request.n

    def flush(index: int, text: str) -> None:
      if text:
        sent[index] += text
        send([{"index": index, "delta": {"content": text}, "logprobs": None,
               "finish_reason": None}])

    while not job.done.is_set() or not events.empty():
      try:
        index, text = events.get(timeout=0.05)
      except queue.Empty:
        continue
      flush(index, text)
    if job.error is not None:
      error = APIError(500, f"generation failed: {type(job.error).__name__}",
                       type_="server_error")
      self._write_chunk(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
    else:
      for index, completion in enumerate(job.completions):
        final = completion.text
        flush(index, final[len(sent[index]):] if final.startswith(sent[index]) else "")
        send([{"index": index, "delta": {}, "logprobs": None,
               "finish_reason": completion.finish_reason}])
      if request.include_usage:
        send([], usage=_usage(job.completions, prompt_tokens))
    self._write_chunk(b"data: [DONE]\n\n")
    self._write_chunk(b"")  # the terminating zero-length chunk
    if self.chat._draining:
      self.close_connection = True


def _usage(completions, prompt_tokens: int) -> dict:
  prompt_tokens = completions[0].prompt_tokens if completions else prompt_tokens
  completion_tokens = sum(c.completion_tokens for c in completions)
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _completion_body(model_name: str, completions, prompt_tokens: int) -> dict:
  return {
      "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
      "created": int(time.time()), "model": model_name, "system_fingerprint": None,
      "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                   "logprobs": None, "finish_reason": c.finish_reason}
                  for i, c in enumerate(completions)],
      "usage": _usage(completions, prompt_tokens),
  }


# ----------------------------------------------------------------------------- CLI

def exit_with_parent(pid: int) -> None:
  """SIGTERM this process when its parent `pid` dies, even by SIGKILL (Linux
  PR_SET_PDEATHSIG; elsewhere a warning). Set here, after exec, rather than in the parent's
  `preexec_fn`, which is unsafe in a multithreaded parent such as a JAX process."""
  if not sys.platform.startswith("linux"):
    logging.warning("--exit_with_parent=%d: only Linux can tie a server to its parent; it "
                    "will outlive a killed parent here", pid)
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  if os.getppid() != pid:  # the parent died before the line above, or is another process
    sys.exit(f"--exit_with_parent={pid}: this server's parent is pid {os.getppid()}, not "
             f"{pid} (which has exited or never started this server); not serving")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m slim_jax.serve",
      description="OpenAI-compatible chat server over the Flax LLaMA.")
  parser.add_argument("--model", required=True,
                      help="Hugging Face LLaMA folder or .gguf file (pretrained.load_llama).")
  parser.add_argument("--adapter", default=None, help="PEFT LoRA folder to apply.")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Address to bind; 0.0.0.0 exposes the server to the network.")
  parser.add_argument("--port", type=int, default=8000, help="Port; 0 picks a free one.")
  parser.add_argument("--served_model_name", default=None,
                      help="Model id clients send (default: the model file or folder name).")
  parser.add_argument("--max_batch_size", type=int, default=16)
  parser.add_argument("--max_seq_len", type=int, default=2048,
                      help="Prompt plus completion tokens per row.")
  parser.add_argument("--batch_window_ms", type=float, default=20.0,
                      help="How long a batch waits after each request for the next one "
                      f"(at most {batcher_lib.MAX_GATHER_S:g} s or {batcher_lib.MAX_WINDOWS} windows in all, "
                      "whichever is longer).")
  parser.add_argument("--default_max_tokens", type=int, default=512,
                      help="Completion length when a request gives no max_tokens.")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--pad_batches", action="store_true",
                      help="Pad every batch to --max_batch_size rows: one compiled shape "
                      "instead of one per power of two (fewer compilations on CPU).")
  parser.add_argument("--drain_seconds", type=float, default=30.0,
                      help="On SIGTERM/SIGINT, how long requests in flight may finish.")
  parser.add_argument("--exit_with_parent", type=int, default=None, metavar="PID",
                      help="Linux: get SIGTERM when process PID (this server's parent) dies, "
                      "even by SIGKILL; exit at once if PID is not the parent. Pipelines "
                      "that start their own server pass their pid.")
  parser.add_argument("--verbosity", type=int, default=0,
                      help="1 or more: also the INFO lines of libraries (httpx, orbax, ...).")
  limits = serve_guard.ServerLimits()
  parser.add_argument("--max_body_bytes", type=int, default=limits.max_body_bytes,
                      help="Largest request body; larger ones get 413.")
  parser.add_argument("--request_timeout", type=float, default=limits.request_timeout_s,
                      help="Seconds a request (line, headers and body) may take to arrive "
                      "from its first byte; slower ones get 408.")
  parser.add_argument("--idle_timeout", type=float, default=limits.idle_timeout_s,
                      help="Seconds an idle keep-alive connection, or a stalled read, is kept.")
  parser.add_argument("--max_connections", type=int, default=limits.max_connections,
                      help="Open connections served at once; more get 503 with Retry-After.")
  parser.add_argument("--max_queued_rows", type=int, default=limits.max_queued_rows,
                      help="Rows waiting for a batch; more get 503 with Retry-After.")
  parser.add_argument("--api_key_env", default=None,
                      help="Name of an environment variable holding the API key every "
                      "endpoint but /health then requires (Authorization: Bearer).")
  parser.add_argument("--api_key", default=None,
                      help="The API key itself (visible to other users in the process list: "
                      "prefer --api_key_env).")
  args = parser.parse_args(argv)
  if args.exit_with_parent is not None:
    exit_with_parent(args.exit_with_parent)
  api_key = args.api_key
  if args.api_key_env:
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
      parser.error(f"--api_key_env={args.api_key_env}: that environment variable is not set "
                   "or empty")
  try:
    limits = serve_guard.ServerLimits(
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
        idle_timeout_s=args.idle_timeout, max_connections=args.max_connections,
        max_queued_rows=args.max_queued_rows, api_key=api_key)
  except ValueError as e:
    parser.error(str(e))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  quiet_logs.quiet_library_logs(args.verbosity)
  generator, name = generator_loading.load_generator(args.model, args.adapter, args.max_batch_size,
                                   args.max_seq_len, args.dtype, args.pad_batches)
  server = ChatServer(generator, args.served_model_name or name, host=args.host,
                      port=args.port, max_batch_size=args.max_batch_size,
                      batch_window_ms=args.batch_window_ms, max_seq_len=args.max_seq_len,
                      default_max_tokens=args.default_max_tokens, limits=limits)

  def stop(signum, frame):  # pylint: disable=unused-argument
    logging.info("received %s: finishing requests in flight, then exiting",
                 signal.Signals(signum).name)
    threading.Thread(target=server.shutdown, args=(args.drain_seconds,), daemon=True).start()

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  # Tests and scripts wait for this line to know the port.
  print(f"serving {server.model_name} at {server.base_url}", flush=True)
  server.serve_forever()
  server.stopped.wait()  # shutdown() runs in its own thread: wait for the drain to end
  logging.info("stopped")


if __name__ == "__main__":
  main(sys.argv[1:])
