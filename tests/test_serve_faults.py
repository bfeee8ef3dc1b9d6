"""The real server (a tiny Flax LLaMA with SmolLM2's tokenizer) under load and abuse, on
loopback, bounded in requests and seconds: 50 well-formed clients while others send
oversized, truncated and slow bodies, slow heads, invalid JSON, unknown models, messages
the chat template rejects, and leave mid-stream. Every well-formed request gets the
generator's own answer, none waits past the timeouts, the server ends healthy with nothing
queued and its memory bounded. Run with -s for the figures."""

from __future__ import annotations

import collections
import http.client
import json
import select
import socket
import threading
import time

import pytest

from llama_fixtures import write_tiny_llama
from slim_jax import generate, generator_loading, serve, serve_guard

WELL_FORMED = 50
MAX_TOKENS = 6
PROMPTS = [f"Which games does a fan of series {i} like next?" for i in range(5)]
# A chat template that refuses what many real ones refuse: a conversation opened by the
# assistant.
REFUSE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations must "
          "start with a user or system message') }}{% endif %}")


def rss_mb() -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  folder = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_faults"))
  generator, name = generator_loading.load_generator(folder, None, max_batch_size=16,
                                                     max_seq_len=256, dtype="float32",
                                                     pad_batches=True)
  generator.tokenizer.chat_template = REFUSE + generator.tokenizer.chat_template
  limits = serve_guard.ServerLimits(max_body_bytes=64 << 10, request_timeout_s=2.0,
                                    idle_timeout_s=3.0, max_connections=48,
                                    max_queued_rows=64)
  with serve.ChatServer(generator, name, max_batch_size=16, batch_window_ms=20,
                        max_seq_len=256, default_max_tokens=MAX_TOKENS,
                        limits=limits) as chat:
    yield chat


def body_for(server, content, **extra) -> bytes:
  return json.dumps({"model": server.model_name, "max_tokens": MAX_TOKENS, "temperature": 0,
                     "messages": [{"role": "user", "content": content}], **extra}).encode()


def post(server, body: bytes, timeout=60) -> tuple[int, dict, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
  try:
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read())
  finally:
    conn.close()


def raw(server, data: bytes, *, then=None) -> int:
  """Sends `data` on a fresh connection, runs `then(sock)`, returns the status (0: none)."""
  sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
  try:
    sock.sendall(data)
    if then is not None:
      then(sock)
    reply = b""
    while b"\r\n" not in reply:
      chunk = sock.recv(4096)
      if not chunk:
        break
      reply += chunk
    return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0
  except OSError:
    return 0
  finally:
    sock.close()


def head(length: int) -> bytes:
  return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
          f"\r\nContent-Length: {length}\r\n\r\n").encode()


def test_well_formed_clients_are_served_while_others_misbehave(server):
  expected = {p: c.text for p, c in zip(PROMPTS, server.generator.chat(
      [[{"role": "user", "content": p}] for p in PROMPTS],
      sampling=generate.SamplingParams(max_new_tokens=MAX_TOKENS)))}
  for status, _, _ in [post(server, body_for(server, p)) for p in PROMPTS]:  # compile
    assert status == 200
  rss_before = rss_mb()
  start = time.monotonic()
  outcomes = collections.Counter()
  waits, wrong, lock = [], [], threading.Lock()

  def well_formed(i):
    prompt = PROMPTS[i % len(PROMPTS)]
    began = time.monotonic()
    for _ in range(20):
      status, headers, body = post(server, body_for(server, prompt))
      if status != 503:
        break
      with lock:
        outcomes["503 busy, retried"] += 1
      time.sleep(float(headers.get("Retry-After", "1")))
    with lock:
      waits.append(time.monotonic() - began)
      outcomes[f"well-formed {status}"] += 1
      if status != 200 or body["choices"][0]["message"]["content"] != expected[prompt]:
        wrong.append((prompt, status, body))

  def trickle(sock, data: bytes):
    """A byte every half second, until the server answers."""
    for byte in data:
      if select.select([sock], [], [], 0.5)[0]:
        return
      sock.sendall(bytes([byte]))

  slow_body = lambda sock: trickle(sock, b" " * 8)  # noqa: E731
  slow_head = lambda sock: trickle(sock, b"X-Slow: aaaaaaaa")  # noqa: E731

  def leave_mid_stream(sock):
    sock.recv(64)  # the stream started
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

  long_stream = body_for(server, PROMPTS[0], stream=True, max_tokens=200)
  faults = {
      "oversized body": lambda: raw(server, head(1 << 20) + b"{" * 1000),
      "truncated body": lambda: raw(server, head(400) + b'{"model": "x"',
                                    then=lambda s: s.shutdown(socket.SHUT_WR)),
      "slow body": lambda: raw(server, head(100) + b"{", then=slow_body),
      "slow head": lambda: raw(server, b"POST /v1/chat/completions HTTP/1.1\r\n",
                               then=slow_head),
      "invalid JSON": lambda: post(server, b"{not json")[0],
      "unknown model": lambda: post(server, body_for(server, "hi").replace(
          server.model_name.encode(), b"no-such-model"))[0],
      "template error": lambda: post(server, json.dumps({
          "model": server.model_name, "messages": [{"role": "assistant", "content": "hi"}]
      }).encode())[0],
      "left mid-stream": lambda: raw(server, head(len(long_stream)) + long_stream,
                                     then=leave_mid_stream),
  }
  want = {"oversized body": {413}, "truncated body": {400}, "slow body": {408},
          "slow head": {408}, "invalid JSON": {400}, "unknown model": {404},
          "template error": {400}, "left mid-stream": {200, 0}}

  def faulty(kind):
    status = faults[kind]()
    with lock:
      outcomes[f"{kind} {status}"] += 1
      if status not in want[kind] | {503}:
        wrong.append((kind, status, None))

  threads = [threading.Thread(target=well_formed, args=(i,)) for i in range(WELL_FORMED)]
  threads += [threading.Thread(target=faulty, args=(kind,)) for kind in faults
              for _ in range(4)]
  for i in range(0, len(threads), 2):  # interleave the kinds
    threads[i].start()
  for i in range(1, len(threads), 2):
    threads[i].start()
  for t in threads:
    t.join(120)
  seconds = time.monotonic() - start
  health = json.loads(_get(server, "/health"))
  growth = rss_mb() - rss_before
  print(f"\n{WELL_FORMED} well-formed requests in {seconds:.1f} s; longest wait "
        f"{max(waits):.2f} s; outcomes {dict(sorted(outcomes.items()))}; batches "
        f"{server.batcher.batches}, largest {server.batcher.largest_batch}; RSS growth "
        f"{growth:.0f} MB; head timeouts {server.guard.head_timeouts}, connections refused "
        f"{server.guard.rejected}")
  assert not any(t.is_alive() for t in threads)
  assert not wrong, wrong[:5]
  assert outcomes["well-formed 200"] == WELL_FORMED
  assert max(waits) < 30  # nothing waits on a misbehaving client
  assert health["status"] == "ok" and health["queued_rows"] == 0
  assert growth < 300


def _get(server, path) -> bytes:
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
  try:
    conn.request("GET", path)
    return conn.getresponse().read()
  finally:
    conn.close()
