"""`fanlora serve` as clients see it: a real uvicorn server on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
import pytest
from helpers import KEY, call, make_adapter, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.generate import Decoding
from fanlora.serving.engine import Engine
from fanlora.serving.jobs import Job
from fanlora.serving.scheduler import BatchScheduler
from fanlora.serving.server import Limits, create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("serve")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    adapters = root / "adapters"
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        make_adapter(adapters / name, tiny_llama, setting, 4, 8, i)
    other = setting_for(backbone, kinds=("Q", "D"))
    make_adapter(adapters / "misfit", tiny_llama, other, 4, 8, 9)
    engine = Engine.from_backbone(backbone, setting)
    app = create_app(engine, adapters, KEY, Limits(max_tokens=32, max_body_bytes=20_000, max_queue=8, max_batch=4))
    srv, thread, port = serve_in_thread(app)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def test_models_and_completions_through_the_openai_client(server):
    url, app = server
    c = client(url)
    assert {"base", "alpha", "beta", "gamma", "delta"} <= {m.id for m in c.models.list().data}
    out = c.completions.create(model="alpha", prompt="Hello there", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    engine = app.state.engine
    want = engine.generate(["Hello there"], ["alpha"], Decoding(), 5)[0]
    assert out.choices[0].text == want
    chat = c.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True
    )
    pieces = [ch.choices[0].delta.content or "" for ch in stream]
    whole = c.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert "".join(pieces) == whole.choices[0].message.content


def test_concurrent_requests_on_different_adapters_are_batched(server):
    url, app = server
    c = client(url)
    names = ["alpha", "beta", "gamma", "delta"]
    alone = {
        n: c.completions.create(model=n, prompt="Once upon", max_tokens=6, temperature=0).choices[0].text for n in names
    }
    scheduler = app.state.scheduler
    results: dict[str, str] = {}

    def ask(n: str) -> None:
        results[n] = c.completions.create(model=n, prompt="Once upon", max_tokens=6, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(n,)) for n in names * 2]
    with scheduler.lock:  # the worker waits while every request arrives, so they must share decoding steps
        scheduler.peak_rows = 0
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.waiting < len(threads) and time.monotonic() < deadline:
            threading.Event().wait(0.02)
    for t in threads:
        t.join()
    assert results == alone  # a mixed batch gives each row its own adapter's answer
    assert scheduler.peak_rows > 1  # requests were decoded together


def test_bad_requests_get_4xx_and_the_server_stays_up(server):
    url, _ = server
    assert call(url, "/health", key=None)[0] == 200
    assert call(url, "/v1/models", key=None)[0] == 401
    assert call(url, "/v1/models", key="wrong")[0] == 401
    status, body = call(url, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "alpha" in body["error"]["message"]
    status, body = call(url, "/v1/completions", {"model": "../adapters/alpha", "prompt": "x"})
    assert status == 404
    status, body = call(url, "/v1/completions", b"{not json")
    assert status == 400
    status, body = call(url, "/v1/completions", {"model": "alpha", "prompt": 3, "max_tokens": "many"})
    assert status == 400
    status, body = call(url, "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 33})
    assert status == 400 and "limit of 32" in body["error"]["message"]
    status, body = call(url, "/v1/completions", {"model": "alpha", "prompt": "word " * 600, "max_tokens": 8})
    assert status == 400 and "context limit" in body["error"]["message"]
    status, body = call(url, "/v1/completions", {"model": "alpha", "prompt": "x" * 30_000})
    assert status == 413
    status, body = call(url, "/v1/completions", {"model": "misfit", "prompt": "x"})
    assert status == 400 and "outside this engine's setting" in body["error"]["message"]
    status, _ = call(
        url, "/v1/completions", {"model": "alpha", "prompt": "still up", "max_tokens": 2, "temperature": 0}
    )
    assert status == 200


def test_a_client_that_leaves_mid_stream_has_its_row_cancelled(server):
    url, app = server
    c = client(url)
    scheduler = app.state.scheduler
    before = scheduler.cancelled
    stream = c.completions.create(model="gamma", prompt="Count:", max_tokens=32, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while scheduler.cancelled == before and time.monotonic() < deadline:  # bounded wait for the worker
        threading.Event().wait(0.02)
    assert scheduler.cancelled == before + 1, "the row of a client that left was never cancelled"
    out = c.completions.create(model="gamma", prompt="Next", max_tokens=3, temperature=0)
    assert out.choices[0].text == app.state.engine.generate(["Next"], ["gamma"], Decoding(), 3)[0]


def test_a_cancelled_row_stops_at_the_next_step_and_the_others_continue(server):
    import asyncio

    _, app = server
    scheduler, tok = BatchScheduler(app.state.engine), app.state.engine.tokenizer  # the batch path (--scheduler batch)

    class Leaving(Job):
        def emit(self, kind, value):  # the client goes away right after its first token
            if kind == "text":
                self.cancelled = True

    class Staying(Job):
        def emit(self, kind, value):
            pass

    loop = asyncio.new_event_loop()
    ids = tok("Count with me:", add_special_tokens=False)["input_ids"]
    engine = app.state.engine
    leaving = Leaving(ids, "alpha", Decoding(), 30, [], loop, slot=engine.table.acquire("alpha"))
    staying = Staying(ids, "beta", Decoding(), 30, [], loop, slot=engine.table.acquire("beta"))
    with scheduler.lock:
        scheduler._run([leaving, staying])
    engine.table.release(leaving.slot)
    engine.table.release(staying.slot)
    loop.close()
    assert len(leaving.tokens) == 1 and leaving.finished is None
    assert len(staying.tokens) == 30 and staying.finished == "length"


@pytest.mark.e2e
def test_fanlora_serve_binds_loopback_and_answers(tmp_path, tiny_llama):
    import subprocess
    import sys

    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    setting.write(tmp_path / "setting.json")
    make_adapter(tmp_path / "adapters" / "one", tiny_llama, setting, 4, 8, 0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fanlora",
            "serve",
            "--setting",
            str(tmp_path / "setting.json"),
            "--adapter-dir",
            str(tmp_path / "adapters"),
            "--backbone",
            str(tiny_llama),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**__import__("os").environ, "FANLORA_API_KEY": ""},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:") and "one" in line
        url = line.split()[2].removesuffix("/v1")
        assert call(url, "/health", key=None)[0] == 200
        status, body = call(url, "/v1/completions", {"model": "one", "prompt": "Hi", "max_tokens": 2}, key=None)
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
        proc.terminate()  # SIGTERM: an idle server drains at once and exits 0 (uvicorn alone re-raised it: -15)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait(timeout=30)


def scrape(url: str, key: str | None = KEY) -> dict[str, float]:
    """``/metrics`` parsed by prometheus_client's own text parser: sample name{labels} → value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()))] = s.value
    return out


def test_metrics_are_scraped_in_prometheus_format_and_count_requests_per_tenant(server):
    url, _ = server
    before = scrape(url)
    c = client(url)
    for model in ("alpha", "alpha", "base"):
        c.completions.create(
            model=model, prompt="Count: one", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
    after = scrape(url)
    key = "fanlora_requests_total[finish=length][model=alpha]"
    assert after[key] - before.get(key, 0) == 2
    ttft = "fanlora_time_to_first_token_seconds_count[model=alpha]"
    assert after[ttft] - before.get(ttft, 0) == 2
    assert after["fanlora_request_seconds_count[model=base]"] >= 1
    assert after["fanlora_batched_tokens_count"] > before.get("fanlora_batched_tokens_count", 0)
    assert after["fanlora_requests_waiting"] == 0 and after["fanlora_requests_running"] == 0
    assert after["fanlora_kv_blocks[state=free]"] + after["fanlora_kv_blocks[state=used]"] > 0
    assert after["fanlora_adapters_resident"] >= 1 and after["fanlora_adapter_loads_total"] >= 1
    assert "fanlora_preemptions_total" in after and "fanlora_adapter_evictions_total" in after
    assert after["fanlora_adapters_host"] >= 1  # the parsed adapters kept for a reload
    with pytest.raises(Exception, match="401"):
        scrape(url, key=None)  # behind the API key, like every route but /health


def test_the_sdks_current_fields_are_served(server):
    url, _ = server
    c = client(url)
    hi = [{"role": "user", "content": "Hi"}]
    out = c.chat.completions.create(model="alpha", messages=hi, max_completion_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.usage.completion_tokens == 3
    usage, eos = {"include_usage": True}, {"ignore_eos": True}
    stream = c.chat.completions.create(model="beta", messages=hi, max_tokens=4, temperature=0, stream=True,
                                       stream_options=usage, extra_body=eos)  # fmt: skip
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4 and all(ch.usage is None for ch in chunks[:-1])
    parts = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Very brief."}]
    new = [{"role": "developer", "content": parts}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    old = [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "Hi"}]
    answers = [c.chat.completions.create(model="alpha", max_tokens=5, temperature=0, messages=m) for m in (new, old)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


def test_bad_chat_content_is_a_400_naming_the_problem(server):
    url, _ = server
    surrogate = b'{"model": "base", "messages": [{"role": "user", "content": "x\\udfff"}]}'
    status, body = call(url, "/v1/chat/completions", surrogate)
    assert status == 400 and "surrogate" in body["error"]["message"]
    image = {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    status, body = call(url, "/v1/chat/completions", image)
    assert status == 400 and "image_url" in body["error"]["message"]
    no_stream = {"model": "base", "prompt": "Hi", "stream_options": {"include_usage": True}}
    status, body = call(url, "/v1/completions", no_stream)
    assert status == 400 and "stream_options" in body["error"]["message"]


def test_ready_says_overloaded_while_a_request_waits_past_the_limit_and_metrics_count_it(server):
    """Before: no /ready, and nothing told a load balancer that the queue could not drain."""
    url, app = server
    scheduler = app.state.scheduler
    limit, late = scheduler.wait_limit, scheduler.late
    assert call(url, "/ready", key=None) == (200, {"status": "ready", "waiting": 0, "oldest_wait_seconds": 0.0})
    scheduler.wait_limit = 1e-6  # any wait is too long
    try:
        with scheduler.lock:  # the worker cannot take the request: it waits
            worker = threading.Thread(target=call, args=(url, "/v1/completions", {"model": "alpha", "prompt": "x"}))
            worker.start()
            deadline = time.monotonic() + 30
            while scheduler.waiting == 0 and time.monotonic() < deadline:
                threading.Event().wait(0.01)
            status, body = call(url, "/ready", key=None)
            assert status == 503 and body["status"] == "overloaded" and body["waiting"] == 1
        worker.join(timeout=60)
        assert call(url, "/ready", key=None)[0] == 200 and scheduler.late == late + 1
        metrics = urllib.request.urlopen(
            urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        )
        assert f"fanlora_requests_late_total {late + 1}.0" in metrics.read().decode()
    finally:
        scheduler.wait_limit = limit


def test_serve_defaults_are_defined_once():
    """The flags, Limits and the schedulers agree (before: the continuous scheduler's prefix cache defaulted to
    0 MiB where the flag and Limits said 64)."""
    import inspect

    from fanlora.cli import build_parser
    from fanlora.serving.continuous import ContinuousScheduler

    args = build_parser().parse_args(["serve", "--setting", "s.json"])
    limits = Limits()
    for field in Limits.model_fields:
        if hasattr(args, field):
            assert getattr(args, field) == getattr(limits, field), field
    for name, p in inspect.signature(ContinuousScheduler).parameters.items():
        if name in Limits.model_fields:
            assert p.default == getattr(limits, name), name
    for name, p in inspect.signature(BatchScheduler).parameters.items():
        if name in Limits.model_fields:
            assert p.default == getattr(limits, name), name
