"""Test doubles for the teacher stage: a small dataset and a fault-injecting chat server.

`FaultServer` speaks just enough of the OpenAI chat-completions API for the real `openai`
client. A `plan(key, attempt)` callable picks, per request, what the server does: answer,
429 with Retry-After, 429 insufficient_quota, 500, answer too slowly or cut by max_tokens,
send malformed JSON, drop the connection, or refuse the key (echoing it, as careless
endpoints do). Every request is logged with the
prompt's user message (`key`), the attempt number and the time, so tests can count
requests per user and check waits.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import socket
import threading
import time

import numpy as np

from slim_jax.data import raw
from slim_jax.data.dataset import Item, SequenceDataset


def make_dataset(num_users: int = 12, num_items: int = 40, seed: int = 0) -> SequenceDataset:
  """Users with 5..12 interactions over items with unique, searchable titles."""
  rng = np.random.default_rng(seed)
  items = []
  for i in range(1, num_items + 1):
    title, brand, categories = f"Gadget-{i:03d}-title", f"Brand{i % 5}", ("Electronics", f"Cat{i % 7}")
    items.append(Item(item_id=i, raw_id=f"B{i:05d}", title=title, brand=brand,
                      categories=categories, text=raw.describe((
                          ("Title", title), ("Brand", brand), ("Categories", categories)))))
  sequences, timestamps = [], []
  for _ in range(num_users):
    length = int(rng.integers(5, 13))
    sequences.append(rng.choice(np.arange(1, num_items + 1), size=length,
                                replace=False).astype(np.int32))
    timestamps.append(np.sort(rng.integers(1_000_000, 2_000_000, size=length)).astype(np.int64))
  return SequenceDataset(items=items, user_raw_ids=[f"U{u}" for u in range(num_users)],
                         sequences=sequences, timestamps=timestamps, name="fake")


def rationale_for(key: str) -> str:
  digest = abs(hash(key)) % 1000
  return (f"Step 1: The user likes gadgets ({digest}).\nStep 2: Brand1; Cat3.\n"
          "Step 3: 1. Gadget-001-title\n2. Gadget-002-title")


@dataclasses.dataclass
class Request:
  key: str  # the last user message of the prompt
  attempt: int  # 1 for the first request with this key
  action: str
  time: float
  authorization: str


class FaultServer:
  """A threaded HTTP server on 127.0.0.1 with per-request scripted faults."""

  def __init__(self, plan=None, slow_seconds: float = 1.0, secret_echo: bool = False):
    self.plan = plan or (lambda key, attempt: "ok")
    self.slow_seconds = slow_seconds
    self.secret_echo = secret_echo
    self.log: list[Request] = []
    self._attempts = collections.Counter()
    self._lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # keep test output quiet
        pass

      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        auth = self.headers.get("Authorization", "")
        with server._lock:
          server._attempts[key] += 1
          attempt = server._attempts[key]
          action = server.plan(key, attempt)
          server.log.append(Request(key, attempt, action, time.monotonic(), auth))
        server.respond(self, action, body, key, auth)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def __enter__(self) -> "FaultServer":
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()

  def requests_per_key(self) -> collections.Counter:
    return collections.Counter(r.key for r in self.log)

  def respond(self, handler, action: str, body: dict, key: str, auth: str) -> None:
    def send(status: int, payload: bytes, headers=()):
      handler.send_response(status)
      handler.send_header("Content-Type", "application/json")
      handler.send_header("Content-Length", str(len(payload)))
      for name, value in headers:
        handler.send_header(name, value)
      handler.end_headers()
      try:
        handler.wfile.write(payload)
        handler.wfile.flush()
      except (BrokenPipeError, ConnectionResetError):
        pass

    def error(status: int, message: str, headers=()):
      send(status, json.dumps({"error": {"message": message, "type": "test_error",
                                         "param": None, "code": None}}).encode(), headers)

    if action == "429":
      error(429, "rate limited", [("Retry-After", "1")])
    elif action == "429ms":
      error(429, "rate limited", [("retry-after-ms", "50")])
    elif action == "500":
      echo = f" (got Authorization: {auth})" if self.secret_echo else ""
      error(500, "internal error" + echo)
    elif action == "400":
      error(400, "context too long")
    elif action == "quota":
      send(429, json.dumps({"error": {"message": "You exceeded your current quota",
                                      "type": "insufficient_quota", "param": None,
                                      "code": "insufficient_quota"}}).encode())
    elif action == "401":
      error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}")
    elif action == "malformed":
      send(200, b'{"id": "x", "choices": [{"message": ')
    elif action == "drop":
      handler.close_connection = True
      try:
        handler.connection.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
    else:
      if action == "slow":
        time.sleep(self.slow_seconds)
      text = rationale_for(key)
      payload = {
          "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
          "model": body["model"],
          "choices": [{"index": 0, "finish_reason": "length" if action == "cut" else "stop",
                       "message": {"role": "assistant", "content": text}}],
          "usage": {"prompt_tokens": len(key) // 4, "completion_tokens": len(text) // 4,
                    "total_tokens": len(key) // 4 + len(text) // 4},
      }
      send(200, json.dumps(payload).encode())
