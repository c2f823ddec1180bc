"""``dsmoe serve`` as its clients meet it: the openai client, lm-eval's local-completions, curl-like calls.

One ``dsmoe serve`` process (the tiny fixture, fp32) serves most tests; the demo model runs in-process
servers for the greedy comparison with ``dsmoe generate``, and small in-process servers cover the
full queue and the API key. Every server listens on a free loopback port.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from dsmoe import load
from dsmoe.loading import LoadOptions
from dsmoe.model.generate import SamplingSettings, stream_text
from dsmoe.serve import Server
from tests.cli_runner import run_cli

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "fixtures" / "tiny-deepseek"
DATA = SHARED / "evaldata"
DSMOE = Path(sys.executable).with_name("dsmoe")
START_TIMEOUT = 120  # the shared test machine can be slow to start torch
CONTEXT = 256  # the module server's --ctx-size (the tiny fixture has 512 positions): half the work for lm-eval

logging.getLogger("lm_eval").setLevel(logging.ERROR)


class CliServer:
    """``dsmoe serve ... --port 0`` in a subprocess; the URL comes from its start-up line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(DSMOE), "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append), daemon=True).start()
        try:
            line = self.out.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.stop()
            pytest.fail(f"dsmoe serve did not start: {''.join(self.err)}")
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _pump(stream, put) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            put(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server() -> Iterator[CliServer]:
    # One thread: on a shared two-core machine a second one mostly waits at OpenMP's barriers.
    running = CliServer("--model", str(TINY), "--dtype", "fp32", "--max-queue", "32", "--threads", "1",
                        "--ctx-size", str(CONTEXT))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny():
    return load(TINY, dtype="fp32")


@pytest.fixture(scope="module")
def hf_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(TINY), trust_remote_code=False)


def _client(url: str, key: str = "none") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _greedy(model, tokenizer, ids: list[int], n: int) -> str:
    """What the model itself decodes, with no server in between."""
    settings = SamplingSettings(max_new_tokens=n, stop_ids=model.config.eos_token_ids)
    return "".join(stream_text(model, tokenizer, ids, settings))


# ---------------------------------------------------------------------- the openai client


def test_openai_client_chat_completion(server, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reply = _client(server.url).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    # transformers renders the checkpoint's chat template on its own: the prompt we counted is that one.
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reply.usage.prompt_tokens == len(hf_tokenizer(rendered, add_special_tokens=False).input_ids)
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_assembles_to_the_non_streamed_reply(server):
    client = _client(server.url)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and len(text) > 0
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed


@pytest.mark.parametrize("top", [1, 3])
def test_completion_echo_logprobs_are_the_models(server, tiny, top):
    model, tokenizer = tiny
    # The second prompt shares the first's start: the server reuses what it scored, and must still be exact.
    for prompt in ("The capital of France is Paris.", "The capital of France is Rome, not Paris."):
        out = _client(server.url).completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                                     logprobs=top)
        (choice,) = out.choices
        ids = tokenizer.encode(prompt)
        direct = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # one plain forward pass, no cache
        got = choice.logprobs.token_logprobs
        assert choice.text == prompt and len(got) == len(ids) and got[0] is None
        for i in range(1, len(ids)):
            assert got[i] == pytest.approx(float(direct[i - 1, ids[i]]), abs=1e-4)
            # A dict keyed by token text: two ids that decode alike (an unfinished UTF-8 byte) share one key.
            best = sorted(choice.logprobs.top_logprobs[i].values(), reverse=True)
            expected = direct[i - 1].topk(top).values.tolist()
            assert best[0] == pytest.approx(expected[0], abs=1e-4) and 1 <= len(best) <= top
            assert all(any(abs(b - e) < 1e-4 for e in expected) for b in best)
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0


def test_completion_from_token_ids_greedy_equals_the_model(server, tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode("Once upon a time")
    out = _client(server.url).completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert out.choices[0].text == _greedy(model, tokenizer, ids, 10)


# ---------------------------------------------------------------------- the same answers as the CLI


@pytest.fixture(scope="module")
def demo():
    return load(Path(__file__).resolve().parents[1] / "demo")


@pytest.mark.threads(1)
def test_greedy_through_the_server_equals_dsmoe_generate(demo, capsys):
    prompt = "a small animal that"
    cli = run_cli(capsys, "generate", prompt, "-n", "24")
    assert cli.code == 0, cli.err
    model, tokenizer = demo
    server = Server(model, tokenizer, model_name="demo", port=0)
    server.start()
    try:
        out = _client(server.url).completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0)
    finally:
        server.stop()
    assert cli.out == out.choices[0].text + "\n" and out.choices[0].text.strip()


@pytest.mark.threads(1)
def test_chat_that_extends_the_last_one_reuses_the_kv_cache(demo):
    model, tokenizer = demo
    server = Server(model, tokenizer, model_name="demo", port=0)
    server.start()
    try:
        client = _client(server.url)
        first = [{"role": "user", "content": "What is a cat?"}]
        reply = client.chat.completions.create(model="demo", messages=first, max_tokens=16, temperature=0)
        before = _metric(server.url, "dsmoe_prompt_tokens_reused_total")
        second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                          {"role": "user", "content": "And a dog?"}]
        again = client.chat.completions.create(model="demo", messages=second, max_tokens=16, temperature=0)
        reused = _metric(server.url, "dsmoe_prompt_tokens_reused_total") - before
    finally:
        server.stop()
    # All of the first exchange (prompt and reply, bar the reply's last token) came from the cache.
    assert reused >= reply.usage.prompt_tokens + reply.usage.completion_tokens - 1
    assert again.usage.prompt_tokens > reused


# ---------------------------------------------------------------------- lm-eval, a peer client


@pytest.mark.threads(1)
def test_lm_eval_local_completions_scores_mmlu_as_dsmoe_eval_does(server, tiny):
    """lm-eval's own API model, tokenizing with transformers, against ``dsmoe eval``'s runner.

    Its windows are one token shorter than its max_length (one is kept for the token it asks
    for), and ours one longer than max_length (the last token is predicted, not fed): the pair
    max_length=CONTEXT for it and CONTEXT - 2 for ours reads the very same tokens, and fits the context.
    It sends 16 prompts per request, as a list of token lists.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from dsmoe.evals import DsmoeLM
    from dsmoe.evals.runner import EvalSettings, build, plan, run, task_manager

    settings = EvalSettings(model=str(TINY), tasks=["mmlu"], limit=2, data_dir=str(DATA), cache_dir=None, load=LoadOptions(dtype="fp32"))
    manager = task_manager(["mmlu"])
    rows = plan(settings, manager)
    build(rows, settings, manager)
    model, tokenizer = tiny
    ours = run(DsmoeLM(model=model, tokenizer=tokenizer, max_length=CONTEXT - 2), settings, rows, manager)
    peer_model = LocalCompletionsAPI(
        model="tiny", base_url=f"{server.url}/v1/completions", tokenizer=str(TINY), tokenizer_backend="huggingface",
        add_bos_token=True, max_length=CONTEXT, max_retries=1, batch_size=16,
    )
    peer = simple_evaluate(model=peer_model, tasks=[r.built for r in rows], limit=2, log_samples=True,
                           bootstrap_iters=0, task_manager=manager)
    compared = 0
    for task, samples in ours.samples.items():
        theirs = {s["doc_id"]: s for s in peer["samples"][task]}
        for sample in samples:
            mine = [float(r[0][0]) for r in sample["resps"]]
            other = [float(r[0][0]) for r in theirs[sample["doc_id"]]["resps"]]
            assert other == pytest.approx(mine, abs=2e-4), (task, sample["doc_id"])
            compared += len(mine)
    assert compared == 57 * 2 * 4  # every subject, two questions, four choices
    assert peer["results"]["mmlu"]["acc,none"] == pytest.approx(ours.record["lm_eval"]["results"]["mmlu"]["acc,none"])


# ---------------------------------------------------------------------- many clients


@pytest.mark.threads(1)
def test_sixteen_concurrent_streams_all_get_their_own_answer(server, tiny):
    model, tokenizer = tiny
    prompts = [f"Story number {i}: once" for i in range(16)]
    expected = [_greedy(model, tokenizer, tokenizer.encode(p), 8) for p in prompts]
    _client(server.url).completions.create(model="tiny", prompt="warm up", max_tokens=4)
    rss_before = psutil.Process(server.proc.pid).memory_info().rss
    got: dict[int, str] = {}

    def stream(i: int) -> None:
        chunks = _client(server.url).completions.create(model="tiny", prompt=prompts[i], max_tokens=8,
                                                        temperature=0, stream=True)
        got[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(16)] == expected
    rss_after = psutil.Process(server.proc.pid).memory_info().rss
    assert rss_after - rss_before < 32 * 2**20, (rss_before, rss_after)


CLIENT = """
import sys, httpx
body = {"prompt": "Once", "max_tokens": 250, "temperature": 0, "stream": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=120) as response:
    for line in response.iter_lines():
        if line.startswith("data: "):
            print("streaming", flush=True)
"""


def test_a_killed_client_frees_the_server_within_a_second(server):
    nxt = httpx.Client(base_url=server.url, timeout=60)
    nxt.get("/health")  # connected before the clock starts
    generated = _metric(server.url, "dsmoe_completion_tokens_total")
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "streaming"
    finally:
        client.kill()
        client.wait()
    killed = time.perf_counter()
    out = nxt.post("/v1/completions", json={"prompt": "Next", "max_tokens": 1})
    # Had it run on, the 250-token generation would hold the worker for seconds.
    assert time.perf_counter() - killed < 1.0, "".join(server.err[-3:])
    assert out.json()["choices"][0]["finish_reason"] == "length"
    assert _metric(server.url, "dsmoe_requests_total", endpoint="/v1/completions", status="499") >= 1
    # What the worker decoded for the killed client, cancelled generations included: a few, not 250.
    assert _metric(server.url, "dsmoe_completion_tokens_total") - generated - 1 < 125


@pytest.mark.threads(1)
def test_a_full_queue_answers_429_and_shutdown_ends_what_is_in_flight(tiny):
    model, tokenizer = tiny
    server = Server(model, tokenizer, model_name="tiny", port=0, max_queue=1)
    server.start()
    events: list[str] = []
    waiting: dict[str, object] = {}
    started = threading.Event()

    def running() -> None:  # takes the worker (ignore_eos: a sampled end of text would free it early)
        body = {"prompt": "Once", "max_tokens": 500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    def queued() -> None:  # waits behind it
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Twice", "max_tokens": 5}, timeout=60)
        waiting.update(status=response.status_code, body=response.json())

    first = threading.Thread(target=running)
    first.start()
    try:
        assert started.wait(60)
        second = threading.Thread(target=queued)
        second.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Thrice"}, timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        _assert_error_shape(refused.json(), "queue")
    finally:
        server.stop()
        first.join(30)
    second.join(30)
    # The running stream ends with an error event (no [DONE]); the waiting request gets a 503.
    assert "[DONE]" not in events and "shutting down" in json.loads(events[-1])["error"]["message"]
    assert waiting["status"] == 503
    _assert_error_shape(waiting["body"], "shutting down")


# ---------------------------------------------------------------------- errors


def _assert_error_shape(body: dict, fragment: str) -> None:
    error = body["error"]
    assert set(error) >= {"message", "type", "code"} and isinstance(error["type"], str)
    assert fragment.lower() in error["message"].lower(), error["message"]
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "8"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": 3}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "role"),
    ("/v1/completions", json.dumps({"prompt": "word " * 600}).encode(), 400, "context"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', 400, f"exceeds the context of {CONTEXT}"),
    ("/v1/completions", b'{"prompt": [1, 2, 99999]}', 400, "vocabulary"),
    ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "n=1"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x" ' + b" " * (9 * 2**20) + b"}", 413, "limit"),
    ("/v1/nothing", b"{}", 404, "not found"),
])
def test_error_status_and_shape(server, path, body, status, fragment):
    response = httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    _assert_error_shape(response.json(), fragment)


def test_a_prompt_too_long_says_both_lengths(server, hf_tokenizer):
    prompt = "word " * 600
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt}, timeout=60)
    n = len(hf_tokenizer(prompt, add_special_tokens=True).input_ids)
    assert response.status_code == 400
    assert f"the prompt is {n} tokens and the context holds {CONTEXT}" in response.json()["error"]["message"]


@pytest.mark.threads(1)
def test_api_key_is_required_and_checked(tiny):
    model, tokenizer = tiny
    server = Server(model, tokenizer, model_name="tiny", port=0, api_key="s3cret")
    server.start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401
            _assert_error_shape(response.json(), "API key")
        assert httpx.get(f"{server.url}/health").status_code == 200
        models = _client(server.url, key="s3cret").models.list()
        assert [m.id for m in models.data] == ["tiny"]
    finally:
        server.stop()


def test_serving_beyond_loopback_needs_a_key(capsys):
    result = run_cli(capsys, "serve", "--host", "0.0.0.0")
    assert result.code == 1 and "--api-key" in result.err


# ---------------------------------------------------------------------- metrics


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_count_requests_and_tokens(server, hf_tokenizer):
    prompt = "Counting tokens for the metrics"
    before = _metric(server.url, "dsmoe_prompt_tokens_total")
    _client(server.url).completions.create(model="tiny", prompt=prompt, max_tokens=3)
    assert _metric(server.url, "dsmoe_prompt_tokens_total") - before == len(hf_tokenizer(prompt).input_ids)
    assert _metric(server.url, "dsmoe_queue_depth") == 0
    assert _metric(server.url, "dsmoe_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert _metric(server.url, "dsmoe_tokens_per_second") > 0


@pytest.mark.threads(1)
def test_metrics_show_the_expert_cache(tiny):
    from dsmoe.offload import Budgets, OffloadOptions, load_offloaded, store_of

    model, tokenizer, _ = load_offloaded(TINY, OffloadOptions(Budgets(expert_cache=4)), dtype="fp32")
    server = Server(model, tokenizer, model_name="tiny", port=0, store=store_of(model))
    server.start()
    try:
        _client(server.url).completions.create(model="tiny", prompt="experts at work", max_tokens=4)
        hits = _metric(server.url, "dsmoe_expert_cache_hits_total", tier="cpu")
        misses = _metric(server.url, "dsmoe_expert_cache_misses_total", tier="cpu")
    finally:
        server.stop()
    stats = store_of(model).stats
    assert (hits, misses) == (stats.hits(), stats.misses()) and misses > 0


# ---------------------------------------------------------------------- last: stopping the module's server


def test_sigterm_stops_the_server_and_releases_the_port(server):
    """Runs last in this file: it stops the module's server (the fixture's own stop then finds it gone)."""
    lines: list[str] = []
    body = {"prompt": "a", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not lines and line.startswith("data: "):
                server.proc.send_signal(signal.SIGTERM)
            if line:
                lines.append(line)
    code = server.stop()
    assert code in (0, -signal.SIGTERM), "".join(server.err)
    assert "data: [DONE]" not in lines and "shutting down" in lines[-1]
    with socket.create_server(("127.0.0.1", server.port)):
        pass  # the port is free again
