"""The OpenAI-compatible server: protocol and batching with a scripted generator, then the
real Flax LLaMA (tiny random weights, real tokenizer) behind the real `openai` client."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest

from llama_fixtures import smollm2_gguf, write_tiny_llama
from serve_fakes import FULL_TEXT, FakeGenerator, FakeSampling
from slim_jax import generator_loading, serve


@pytest.fixture
def fake_server():
  generator = FakeGenerator()
  server = serve.ChatServer(generator, "fake-model", max_batch_size=16, batch_window_ms=20,
                            max_seq_len=64, default_max_tokens=32, sampling_cls=FakeSampling)
  with server:
    yield server, generator


def client_for(server, **kw):
  return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, **kw)


def raw_post(server, path, body, headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  conn.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                 **(headers or {})})
  response = conn.getresponse()
  payload = response.read()
  conn.close()
  return response, payload


USER = [{"role": "user", "content": "history: Mario, Kirby"}]


# ----------------------------------------------------------------------------- protocol

def test_binds_localhost_and_lists_the_model(fake_server):
  server, _ = fake_server
  assert server.httpd.server_address[0] == "127.0.0.1"
  models = client_for(server).models.list()
  assert [m.id for m in models.data] == ["fake-model"]
  assert client_for(server).models.retrieve("fake-model").owned_by == "slim-jax"


def test_chat_completion_non_streaming(fake_server):
  server, generator = fake_server
  out = client_for(server).chat.completions.create(
      model="fake-model", messages=USER, max_tokens=4, temperature=0.7, top_p=0.9, seed=5)
  assert out.object == "chat.completion" and out.model == "fake-model"
  assert out.choices[0].message.role == "assistant"
  assert out.choices[0].message.content == "Step 1: likes RPGs."
  assert out.choices[0].finish_reason == "length"
  assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
      3, 4, 7)
  params = generator.sampling_seen[-1]
  assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (
      4, 0.7, 0.9, 5)


def test_default_max_tokens_and_stop(fake_server):
  server, generator = fake_server
  out = client_for(server).chat.completions.create(model="fake-model", messages=USER,
                                                   stop=["STOP"])
  assert out.choices[0].message.content == FULL_TEXT.split(" STOP")[0] + " "
  assert out.choices[0].finish_reason == "stop"
  assert generator.sampling_seen[-1].max_new_tokens == 32
  assert generator.sampling_seen[-1].stop == ("STOP",)


def test_streaming_matches_non_streaming(fake_server):
  server, _ = fake_server
  client = client_for(server)
  full = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=9)
  chunks = list(client.chat.completions.create(
      model="fake-model", messages=USER, max_tokens=9, stream=True,
      stream_options={"include_usage": True}))
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == full.choices[0].message.content
  assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
  finals = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert finals[-1] == "length" and set(finals[:-1]) == {None}
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_stream_never_shows_text_past_a_stop_sequence(fake_server):
  server, _ = fake_server
  chunks = list(client_for(server).chat.completions.create(
      model="fake-model", messages=USER, stream=True, stop=["Zelda STOP"]))
  text = "".join(c.choices[0].delta.content or "" for c in chunks)
  assert text == FULL_TEXT.split("Zelda STOP")[0]
  assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_wire_format_ends_with_done(fake_server):
  server, _ = fake_server
  response, payload = raw_post(server, "/v1/chat/completions", {
      "model": "fake-model", "messages": USER, "max_tokens": 3, "stream": True})
  assert response.status == 200
  assert response.getheader("Content-Type") == "text/event-stream"
  events = [e for e in payload.decode().split("\n\n") if e]
  assert all(e.startswith("data: ") for e in events)
  assert events[-1] == "data: [DONE]"
  first = json.loads(events[0][len("data: "):])
  assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_n_choices(fake_server):
  server, _ = fake_server
  out = client_for(server).chat.completions.create(model="fake-model", messages=USER, n=3,
                                                   max_tokens=2, seed=1)
  assert [c.index for c in out.choices] == [0, 1, 2]
  assert out.usage.completion_tokens == 6


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "fake-model", "messages": USER, "temperature": 3}, 400, "temperature",
     "invalid_value"),
    ({"model": "fake-model", "messages": USER, "top_p": "high"}, 400, "top_p", "invalid_type"),
    ({"model": "fake-model", "messages": []}, 400, "messages", "invalid_value"),
    ({"model": "fake-model"}, 400, "messages", "missing_required_parameter"),
    ({"messages": USER}, 400, "model", "missing_required_parameter"),
    ({"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    ({"model": "fake-model", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content", "invalid_type"),
    ({"model": "fake-model", "messages": USER, "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),
    ({"model": "fake-model", "messages": USER, "max_tokens": 62}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "fake-model", "messages": USER, "stop": [1]}, 400, "stop", "invalid_type"),
    ({"model": "fake-model", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools",
     "unsupported_parameter"),
    ({"model": "fake-model", "messages": USER, "n": 17}, 400, "n", "invalid_value"),
])
def test_invalid_requests_get_openai_error_bodies(fake_server, body, status, param, code):
  server, generator = fake_server
  response, payload = raw_post(server, "/v1/chat/completions", body)
  assert response.status == status
  error = json.loads(payload)["error"]
  assert set(error) == {"message", "type", "param", "code"}
  assert (error["param"], error["code"], error["type"]) == (param, code,
                                                             "invalid_request_error")
  assert error["message"]
  assert generator.batch_sizes == []  # nothing reached the model


def test_malformed_json_unknown_route_and_sdk_errors(fake_server):
  server, _ = fake_server
  response, payload = raw_post(server, "/v1/chat/completions", b"{not json")
  assert response.status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
  response, payload = raw_post(server, "/v1/completions", {"prompt": "x"})
  assert response.status == 404 and json.loads(payload)["error"]["code"] == "unknown_url"
  with pytest.raises(openai.BadRequestError) as info:
    client_for(server).chat.completions.create(model="fake-model", messages=USER,
                                               temperature=-1)
  assert info.value.param == "temperature"
  with pytest.raises(openai.NotFoundError):
    client_for(server).chat.completions.create(model="other", messages=USER)


# ----------------------------------------------------------------------------- batching

def test_concurrent_requests_share_batches():
  generator = FakeGenerator()
  # A wide window, so that a loaded test machine starting 16 threads slowly still batches.
  server = serve.ChatServer(generator, "fake-model", max_batch_size=16, batch_window_ms=200,
                            sampling_cls=FakeSampling).start()
  client = client_for(server)
  results = [None] * 16

  def ask(i):
    results[i] = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": f"user {i}"}],
        max_tokens=5)

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(r.choices[0].message.content == "Step 1: likes RPGs. Step" for r in results)
  assert sum(generator.batch_sizes) == 16
  assert len(generator.batch_sizes) <= 4 and max(generator.batch_sizes) >= 8
  assert server.batcher.largest_batch == max(generator.batch_sizes)
  server.shutdown()


def test_batches_never_exceed_the_limit():
  generator = FakeGenerator()
  with serve.ChatServer(generator, "m", max_batch_size=4, batch_window_ms=50,
                        sampling_cls=FakeSampling) as server:
    client = client_for(server)
    threads = [threading.Thread(target=lambda: client.chat.completions.create(
        model="m", messages=USER, max_tokens=2, n=3)) for _ in range(5)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert sum(generator.batch_sizes) == 15 and max(generator.batch_sizes) <= 4


def test_shutdown_finishes_requests_in_flight_then_refuses():
  generator = FakeGenerator(step_seconds=0.05)
  server = serve.ChatServer(generator, "m", sampling_cls=FakeSampling).start()
  result = {}

  def ask():
    result["out"] = client_for(server).chat.completions.create(model="m", messages=USER,
                                                               max_tokens=10)

  thread = threading.Thread(target=ask)
  thread.start()
  while not generator.batch_sizes:
    time.sleep(0.01)
  server.shutdown()  # while the request is decoding
  thread.join()
  assert result["out"].choices[0].finish_reason == "length"
  assert server.stopped.is_set()
  with pytest.raises(openai.APIConnectionError):
    client_for(server, timeout=2).chat.completions.create(model="m", messages=USER)


# ----------------------------------------------------------------------------- real model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
  """A tiny random LLaMA in Hugging Face format with SmolLM2's real tokenizer and template."""
  return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def llama_server(tiny_llama_dir):
  generator, name = generator_loading.load_generator(str(tiny_llama_dir), None, max_batch_size=8,
                                         max_seq_len=1024, dtype="float32")
  with serve.ChatServer(generator, name, max_batch_size=8, batch_window_ms=20,
                        max_seq_len=1024, default_max_tokens=24) as server:
    yield server


def test_llama_server_greedy_answers_match_the_generator(llama_server):
  server = llama_server
  client = client_for(server, timeout=300)
  messages = [{"role": "user", "content": "Which games does a Zelda fan like?"}]
  out = client.chat.completions.create(model=server.model_name, messages=messages,
                                       max_tokens=12, temperature=0)
  direct = server.generator.chat([messages], sampling=server._sampling_cls(max_new_tokens=12))
  assert out.choices[0].message.content == direct[0].text
  assert out.usage.completion_tokens == direct[0].completion_tokens
  assert out.usage.prompt_tokens == direct[0].prompt_tokens
  streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
      model=server.model_name, messages=messages, max_tokens=12, temperature=0, stream=True))
  assert streamed == direct[0].text


def test_teacher_rationales_end_to_end_through_the_openai_client(llama_server, tmp_path):
  from slim_jax.data import prepare
  from slim_jax.teacher import client as teacher_client
  from slim_jax.teacher import prompts, rationales
  server = llama_server
  dataset = prepare.prepare_or_load("synthetic", None, str(tmp_path / "work"))
  users = [0, 7, 19, 33, 101, 250]
  requests = [(u, prompts.build_messages(dataset, u, max_history=4)) for u in users]
  out = str(tmp_path / "work" / "rationales" / "teacher.jsonl")
  config = teacher_client.ClientConfig(base_url=server.base_url, model=server.model_name,
                                       max_tokens=16, concurrency=6, timeout=300, seed=0)
  batches_before = server.batcher.batches
  stats = teacher_client.collect(requests, out, config, api_key=None)
  assert (stats.users_done, stats.users_failed, stats.retries) == (6, 0, 0)
  assert server.batcher.batches - batches_before < 6  # the six requests shared batches
  records = rationales.read(out)
  assert sorted(r["user_id"] for r in records) == users
  for record in records:
    assert record["messages"] == dict(requests)[record["user_id"]]
    assert record["model"] == server.model_name and record["response"]
    assert 0 < record["usage"]["completion_tokens"] <= 16
    assert record["usage"]["prompt_tokens"] > 50
  again = teacher_client.collect(requests, out, config, api_key=None)
  assert (again.requests, again.users_skipped) == (0, 6)


def test_a_seeded_sampled_answer_does_not_depend_on_its_batch(llama_server):
  """What makes run_slim's teacher stage reproducible: a seeded, sampled answer is the same
  whether its request was batched alone or with others of other lengths (other padding,
  another shared prefix), so neither the sampling keys nor the float32 numerics depend on
  the batch. (With SmolLM2 in bfloat16 they do: see --teacher_dtype.)"""
  server = llama_server
  client = client_for(server, timeout=300)
  questions = ["Which games does a Zelda fan like?", "history: Mario, Kirby",
               "A user watched Heat, Ronin and The Insider, in that order. What next?",
               "Name one film.", "Recommend a board game for two players who like trains."]

  def ask(question):
    out = client.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": question}],
        max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    return out.choices[0].message.content

  alone = [ask(q) for q in questions]
  batches_before = server.batcher.batches
  threads, together = [], [None] * len(questions)
  for i, question in enumerate(questions):
    threads.append(threading.Thread(target=lambda i=i, q=question: together.__setitem__(
        i, ask(q))))
    threads[-1].start()
  for thread in threads:
    thread.join()
  assert server.batcher.batches - batches_before < len(questions)  # they shared batches
  assert together == alone


def test_cli_with_an_adapter_serves_then_stops_gracefully_on_sigterm(
    tiny_llama_dir, llama_server, tmp_path):
  import jax
  from slim_jax.convert import pretrained
  from slim_jax.models import lora
  _, params, _ = pretrained.load_llama(str(tiny_llama_dir))
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  adapter = lora.init_lora(params, spec, jax.random.PRNGKey(0))
  adapter = jax.tree.map(lambda x: x + 0.5, adapter)  # b starts at zero: make it matter
  lora.save_peft(str(tmp_path / "adapter"), adapter, spec)
  messages = [{"role": "user", "content": "Which games does a Zelda fan like?"}]
  base = client_for(llama_server, timeout=300).chat.completions.create(
      model=llama_server.model_name, messages=messages, max_tokens=8, temperature=0)

  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  process = subprocess.Popen(
      [sys.executable, "-m", "slim_jax.serve", f"--model={tiny_llama_dir}", "--port=0",
       f"--adapter={tmp_path / 'adapter'}", "--max_seq_len=256", "--max_batch_size=4"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = process.stdout.readline()
    assert line.startswith("serving "), process.stderr.read()
    base_url = line.split(" at ")[1].strip()
    assert base_url.startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=300)
    name = client.models.list().data[0].id
    assert name == os.path.basename(tiny_llama_dir)
    adapted = client.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                             temperature=0)
    assert adapted.choices[0].message.content != base.choices[0].message.content
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=client.chat.completions.create(
        model=name, messages=USER, max_tokens=64)))
    thread.start()
    time.sleep(1.0)  # the request is in flight (compiling, then decoding)
    process.send_signal(signal.SIGTERM)
    thread.join()
    assert result["out"].usage.completion_tokens > 0  # finished despite the signal
    assert process.wait(timeout=60) == 0
    assert "SIGTERM" in process.stderr.read()
    with pytest.raises(openai.APIConnectionError):
      client.models.list()
  finally:
    if process.poll() is None:
      process.kill()


def test_cli_refuses_to_serve_when_the_given_parent_is_not_its_parent():
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "slim_jax.serve", "--model=/nonexistent", "--exit_with_parent=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert f"--exit_with_parent=1: this server's parent is pid {os.getpid()}" in done.stderr


PARENT = """
import os, subprocess, sys, time
server = subprocess.Popen([sys.executable, "-m", "slim_jax.serve", "--model=" + sys.argv[1],
                           "--port=0", "--max_seq_len=256", "--max_batch_size=2",
                           "--exit_with_parent=" + str(os.getpid())],
                          stdout=subprocess.PIPE, text=True)
print(server.pid, server.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_cli_server_exits_when_its_parent_is_killed(tiny_llama_dir):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tiny_llama_dir)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)
  server_pid = None
  try:
    pid, line = parent.stdout.readline().split(" ", 1)
    server_pid = int(pid)
    assert line.startswith("serving "), line
    parent.kill()  # SIGKILL: the parent runs no cleanup
    parent.wait()

    def gone():
      try:
        return psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
      except psutil.NoSuchProcess:
        return True

    deadline = time.monotonic() + 60
    while not gone():
      assert time.monotonic() < deadline, "the server outlived its SIGKILLed parent"
      time.sleep(0.2)
  finally:
    if parent.poll() is None:
      parent.kill()
    if server_pid is not None and psutil.pid_exists(server_pid):
      psutil.Process(server_pid).kill()


@pytest.mark.slow
def test_smollm2_answers_a_teacher_prompt():
  generator, name = generator_loading.load_generator(smollm2_gguf(), None, 2, 1024, "float32")
  with serve.ChatServer(generator, name, max_seq_len=1024) as server:
    out = client_for(server, timeout=600).chat.completions.create(
        model=name, max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": "Name three Nintendo games."}])
  text = out.choices[0].message.content
  assert out.choices[0].finish_reason in ("stop", "length") and len(text.split()) >= 3


def test_a_burst_of_clients_is_accepted_without_retries(fake_server):
  # 64 clients connecting at once (the teacher stage opens 16 the moment the server is
  # up): with socketserver's default backlog of 5, some connections were refused.
  server, _ = fake_server
  errors = []

  def ask():
    try:
      openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0).chat.completions.create(
          model="fake-model", messages=USER, max_tokens=2)
    except openai.APIError as e:
      errors.append(repr(e))
  threads = [threading.Thread(target=ask) for _ in range(64)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[:3]
