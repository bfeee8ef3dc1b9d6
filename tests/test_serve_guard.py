"""The server's limits against bad clients, each status code on the wire: 401 without the
key, 408 for slow heads and bodies, 413 for big bodies, 503 with Retry-After when the
connections or the queue are full, 400 for template errors; one failing row fails only its
request; a client that leaves mid-stream frees its row; /health tells the truth."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest

from serve_fakes import BAD_TEMPLATE, POISON, FakeGenerator, FakeSampling
from slim_jax import serve, serve_guard

USER = [{"role": "user", "content": "history: Mario, Kirby"}]
BODY = json.dumps({"model": "fake-model", "messages": USER, "max_tokens": 4}).encode()


def make_server(generator=None, batch_window_ms=20.0, **limits):
  return serve.ChatServer(generator or FakeGenerator(), "fake-model", max_batch_size=16,
                          batch_window_ms=batch_window_ms, max_seq_len=4096,
                          default_max_tokens=32, sampling_cls=FakeSampling,
                          limits=serve_guard.ServerLimits(**limits))


def post(server, body=BODY, headers=None, path="/v1/chat/completions"):
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
  conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                 **(headers or {})})
  response = conn.getresponse()
  payload = response.read()
  conn.close()
  return response, json.loads(payload)


def raw_socket(server) -> socket.socket:
  sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
  return sock


def read_response(sock) -> tuple[int, dict, bytes]:
  """(status, headers, body) of one response on a raw socket, read until it closes."""
  data = b""
  while True:
    try:
      chunk = sock.recv(65536)
    except ConnectionResetError:
      break
    if not chunk:
      break
    data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  lines = head.decode().split("\r\n")
  headers = dict(line.split(": ", 1) for line in lines[1:])
  return int(lines[0].split()[1]), headers, body


def test_the_api_key_is_required_everywhere_but_health():
  with make_server(api_key="s3cret-key") as server:
    response, body = post(server)
    assert response.status == 401 and body["error"]["code"] == "invalid_api_key"
    response, _ = post(server, headers={"Authorization": "Bearer wrong"})
    assert response.status == 401
    response, _ = post(server, headers={"Authorization": "Basic s3cret-key"})
    assert response.status == 401
    client = openai.OpenAI(base_url=server.base_url, api_key="s3cret-key", max_retries=0)
    out = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=4)
    assert out.choices[0].message.content == "Step 1: likes RPGs."
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
  assert serve_guard.authorized("Bearer k", "k") and not serve_guard.authorized(None, "k")
  assert serve_guard.authorized(None, None)


def test_binding_beyond_loopback_without_a_key_warns(caplog):
  assert serve_guard.warn_if_exposed("0.0.0.0", None)
  assert "without --api_key" in caplog.text
  assert not serve_guard.warn_if_exposed("0.0.0.0", "k")
  assert not serve_guard.warn_if_exposed("127.0.0.1", None)


def test_a_body_over_the_limit_is_refused_unread():
  with make_server(max_body_bytes=1000) as server:
    sock = raw_socket(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 50000000\r\n\r\n" + b"{" * 100)
    status, headers, body = read_response(sock)
    assert status == 413 and headers["Connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_too_large"
    for length in (b"-1", b"abc"):
      sock = raw_socket(server)
      sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: " + length
                   + b"\r\n\r\n")
      assert read_response(sock)[0] == 400
    assert post(server)[0].status == 200  # the server is fine


def test_a_slow_body_gets_408_and_delays_only_itself():
  with make_server(request_timeout_s=1.0, batch_window_ms=20) as server:
    sock = raw_socket(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    result = {}

    def trickle():
      start = time.monotonic()
      try:
        for _ in range(20):
          time.sleep(0.25)
          sock.sendall(b" ")
      except OSError:
        pass
      result["status"] = read_response(sock)[0]
      result["seconds"] = time.monotonic() - start
    thread = threading.Thread(target=trickle)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert post(server)[0].status == 200
    assert time.monotonic() - start < 0.8  # not held up by the slow body
    thread.join(10)
    assert result["status"] == 408 and result["seconds"] < 3


def test_a_truncated_body_is_a_400():
  with make_server() as server:
    sock = raw_socket(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\"")
    sock.shutdown(socket.SHUT_WR)
    status, _, body = read_response(sock)
    assert status == 400 and json.loads(body)["error"]["code"] == "truncated_body"


def test_a_slow_head_gets_408_and_an_idle_connection_is_closed():
  with make_server(request_timeout_s=1.0, idle_timeout_s=1.5) as server:
    sock = raw_socket(server)
    start = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
    try:
      for byte in b"X-Slow: " + b"a" * 20:
        time.sleep(0.2)
        sock.sendall(bytes([byte]))
    except OSError:
      pass
    status, _, _ = read_response(sock)
    assert status == 408 and time.monotonic() - start < 3
    idle = raw_socket(server)
    start = time.monotonic()
    assert idle.recv(1) == b""  # closed by the server, no request ever sent
    assert 1.0 < time.monotonic() - start < 4
    assert server.guard.head_timeouts == 1


def test_connections_over_the_cap_get_503_with_retry_after():
  with make_server(max_connections=2) as server:
    holders = [raw_socket(server) for _ in range(2)]
    time.sleep(0.2)  # both admitted, their handlers waiting for a request
    response, body = post(server)
    assert response.status == 503 and response.getheader("Retry-After") == "1"
    assert body["error"]["code"] == "server_busy"
    holders[0].close()
    time.sleep(0.3)
    assert post(server)[0].status == 200
    holders[1].close()
    assert server.guard.rejected == 1


def test_a_full_queue_gets_503_with_retry_after():
  generator = FakeGenerator(step_seconds=0.1)  # 12 words: a batch takes 1.2 s
  slow = json.dumps({"model": "fake-model", "messages": USER, "max_tokens": 12}).encode()
  with make_server(generator, max_queued_rows=1) as server:
    results = []

    def one():
      results.append(post(server, slow))
    first = threading.Thread(target=one)
    first.start()
    time.sleep(0.3)  # decoding: the queue is empty again
    second = threading.Thread(target=one)
    second.start()
    time.sleep(0.2)  # waiting for the first batch: one queued row
    response, body = post(server)
    assert response.status == 503 and response.getheader("Retry-After") == "1"
    assert body["error"]["code"] == "queue_full"
    first.join()
    second.join()
    assert [r.status for r, _ in results] == [200, 200]


def test_a_template_error_is_a_400():
  with make_server() as server:
    bad = json.dumps({"model": "fake-model", "max_tokens": 4, "messages": [
        {"role": "user", "content": BAD_TEMPLATE}]}).encode()
    response, body = post(server, bad)
    assert response.status == 400 and body["error"]["code"] == "invalid_messages"
    assert "Conversation roles must alternate" in body["error"]["message"]


def test_a_failing_row_fails_only_its_own_request():
  generator = FakeGenerator()
  with make_server(generator, batch_window_ms=300) as server:
    bodies = [BODY, json.dumps({"model": "fake-model", "max_tokens": 4, "messages": [
        {"role": "user", "content": POISON}]}).encode(), BODY]
    results = [None] * 3

    def one(i):
      results[i] = post(server, bodies[i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert [r.status for r, _ in results] == [200, 500, 200]
    assert results[0][1]["choices"][0]["message"]["content"] == "Step 1: likes RPGs."


def test_a_client_leaving_mid_stream_frees_its_row():
  generator = FakeGenerator(step_seconds=0.01, words=["word"] * 400)
  with make_server(generator) as server:
    sock = raw_socket(server)
    body = json.dumps({"model": "fake-model", "messages": USER, "max_tokens": 400,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"word" not in received:  # decoding has started: the row is in a batch
      received += sock.recv(4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset: the next write fails
    deadline = time.monotonic() + 60
    while not generator.steps_run and time.monotonic() < deadline:
      time.sleep(0.05)
    assert generator.steps_run and generator.steps_run[0] < 200  # not all 400 steps
    assert post(server)[0].status == 200


def test_health_reports_the_batcher_and_the_queue():
  with make_server(max_queued_rows=7) as server:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    health = json.loads(response.read())
    assert response.status == 200 and health["status"] == "ok" and health["batcher_alive"]
    assert health["queued_rows"] == 0 and health["max_queued_rows"] == 7
    assert health["open_connections"] == 1
    server.batcher.stop()  # the batcher is gone: not healthy
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 503 and json.loads(response.read())["batcher_alive"] is False
