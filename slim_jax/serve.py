r"""An OpenAI-compatible chat server over the Flax LLaMA (and an optional LoRA adapter).

  python -m slim_jax.serve --model=PATH --port=8000 [--adapter=DIR] [--host=127.0.0.1]

PATH is anything `pretrained.load_llama` takes (a Hugging Face folder or a .gguf file);
DIR is a PEFT LoRA folder (`lora.load_peft`), e.g. the distilled student. The server is
how the offline teacher runs (experiments/teacher.py --teacher_base_url=http://HOST:PORT/v1)
and how the student is deployed.

Endpoints: GET /v1/models, GET /v1/models/{id}, GET /health, POST /v1/chat/completions
(non-streaming, and `stream: true` as server-sent events in OpenAI's chunk format ending
with `data: [DONE]`). Errors use OpenAI's body, {"error": {"message", "type", "param",
"code"}}, with 400 for invalid requests, 404 for unknown models and routes.

Concurrency: HTTP handlers run in threads and hand their rows to one `Batcher` thread
(slim_jax/batcher.py),
which owns the generator: it waits `batch_window_ms` after each request for another to
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
from slim_jax import generator_loading, quiet_logs

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs",
               "top_logprobs", "response_format", "audio", "modalities")


class APIError(Exception):
  """An error answered with OpenAI's error body."""

  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                   param, code)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


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
  # A client's concurrent requests (the teacher stage opens 16 at once) arrive together:
  # socketserver's default listen backlog of 5 refuses the rest, which then retry.
  request_queue_size = 128


class ChatServer:
  """The HTTP front: validates, tokenizes for limits, queues rows, writes OpenAI bodies."""

  def __init__(self, generator, model_name: str, *, host: str = "127.0.0.1", port: int = 0,
               max_batch_size: int = 16, batch_window_ms: float = 20.0,
               max_seq_len: int = 2048, default_max_tokens: int = 512, sampling_cls=None):
    self.generator = generator
    self.model_name = model_name
    self.max_seq_len = max_seq_len
    self.default_max_tokens = default_max_tokens
    self.created = int(time.time())
    self.batcher = batcher_lib.Batcher(generator, max_batch_size, batch_window_ms / 1000.0)
    self._busy = 0
    self._busy_lock = threading.Condition()
    self._draining = False
    self.stopped = threading.Event()
    self._thread: threading.Thread | None = None
    self._sampling_cls = sampling_cls
    self.httpd = _ThreadingHTTPServer((host, port), ChatHandler)
    self.httpd.chat_server = self
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
    text = self.generator.render_chat(messages)
    return len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])


class ChatHandler(http.server.BaseHTTPRequestHandler):
  """One HTTP connection's requests; the ChatServer it serves is `self.chat`."""
  protocol_version = "HTTP/1.1"
  server_version = "slim-jax"

  @property
  def chat(self) -> "ChatServer":
    return self.server.chat_server

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("%s %s", self.address_string(), format % args)

  # -- plumbing

  def _send_json(self, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    if self.chat._draining:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(data)

  def _send_error(self, error: APIError) -> None:
    self._send_json(error.status, error.body())

  def _read_json(self):
    length = self.headers.get("Content-Length")
    if length is None:
      raise APIError(411, "a Content-Length header is required")
    try:
      raw = self.rfile.read(int(length))
      return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise APIError(400, f"the request body is not valid JSON: {e}") from None

  def _handle(self, fn) -> None:
    self.chat._enter()
    try:
      fn()
    except APIError as e:
      self._send_error(e)
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
      self._send_json(200, {"status": "ok"})
    elif path == "/v1/chat/completions":
      raise APIError(405, "use POST for /v1/chat/completions")
    else:
      raise APIError(404, f"unknown path {path}; this server has /v1/models and "
                     "/v1/chat/completions", code="unknown_url")

  def _post(self) -> None:
    path = self.path.split("?")[0].rstrip("/")
    if path != "/v1/chat/completions":
      self.rfile.read(int(self.headers.get("Content-Length") or 0))  # keep the stream in step
      raise APIError(404, f"unknown path {path}; POST /v1/chat/completions",
                     code="unknown_url")
    with self.chat.batcher.arriving():
      body = self._read_json()
      if self.chat._draining:
        raise APIError(503, "the server is shutting down", type_="server_error")
      request = parse_chat_request(body, self.chat.model_name)
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
    if request.stream:
      self._stream(request, job, prompt_tokens, events)
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
  parser.add_argument("--verbosity", type=int, default=0,
                      help="1 or more: also the INFO lines of libraries (httpx, orbax, ...).")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  quiet_logs.quiet_library_logs(args.verbosity)
  generator, name = generator_loading.load_generator(args.model, args.adapter, args.max_batch_size,
                                   args.max_seq_len, args.dtype, args.pad_batches)
  server = ChatServer(generator, args.served_model_name or name, host=args.host,
                      port=args.port, max_batch_size=args.max_batch_size,
                      batch_window_ms=args.batch_window_ms, max_seq_len=args.max_seq_len,
                      default_max_tokens=args.default_max_tokens)

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
