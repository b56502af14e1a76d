"""Faults found by probing `fanlora serve` as a hostile or unlucky client: each test failed before its fix.

A :class:`Gate` on the model's forward pass holds a batch mid-decode, so the tests order events with
semaphores instead of sleeping.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import pytest
from helpers import WAIT, Gate, call, fail, in_thread, make_adapter, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.generate import Decoding
from fanlora.serving import api as server_module
from fanlora.serving.engine import Engine
from fanlora.serving.jobs import Job, QueueFull
from fanlora.serving.scheduler import BatchScheduler
from fanlora.serving.server import Limits, check_serve_options, create_app


class Recorded(Job):
    """A job outside the HTTP layer: events are kept in a list."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, object]] = []
        self.done = threading.Event()

    def emit(self, kind, value) -> None:
        self.seen.append((kind, value))
        if kind in ("done", "error"):
            self.done.set()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("faults")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        make_adapter(root / "adapters" / name, tiny_llama, setting, 4, 8, i)
    engine = Engine.from_backbone(backbone, setting)
    gate = Gate(engine.model)
    app = create_app(
        engine, root / "adapters", "key", Limits(max_tokens=64, max_body_bytes=20_000, max_queue=8, max_batch=4)
    )
    srv, thread, port = serve_in_thread(app)
    yield {"port": port, "app": app, "engine": engine, "gate": gate, "root": root, "server": srv}
    gate.open()
    srv.should_exit = True
    thread.join(timeout=10)


def post(port: int, path: str, body: dict, timeout: float = WAIT) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json", "Authorization": "Bearer key"}
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def health(port: int, timeout: float = 5) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def test_loading_an_adapter_never_blocks_the_event_loop(world, monkeypatch):
    engine, port = world["engine"], world["port"]
    started, finish = threading.Event(), threading.Event()
    real_install = engine.install

    def slow_install(name, adapter):  # an adapter that takes long to load
        started.set()
        assert finish.wait(WAIT)
        real_install(name, adapter)

    monkeypatch.setattr(engine, "install", slow_install)
    thread, box = in_thread(post, port, "/v1/load_lora_adapter", {"lora_name": "beta"})
    assert started.wait(WAIT)
    try:
        assert health(port) == 200  # answered while the load is still running
    finally:
        finish.set()
        thread.join(WAIT)
    assert box["result"][0] == 200 and "beta" in engine.adapters


def wait_for(condition, what: str) -> None:
    """Poll a condition the server makes true from another thread; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        threading.Event().wait(0.02)


def test_a_non_streaming_client_that_disconnects_has_its_job_cancelled(world):
    port, gate, scheduler = world["port"], world["gate"], world["app"].state.scheduler
    before = scheduler.cancelled
    admitted: list[Job] = []
    real_submit = scheduler.submit
    scheduler.submit = lambda job: (real_submit(job), admitted.append(job))
    gate.armed = True
    try:
        blocker, _ = in_thread(post, port, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 3})
        gate.wait_entered()  # the worker is busy: the next request waits in the queue
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        body = {"model": "base", "prompt": "Count:", "max_tokens": 60, "temperature": 0}
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps(body),
            {"Content-Type": "application/json", "Authorization": "Bearer key"},
        )
        wait_for(lambda: len(admitted) == 2, "the second request was never admitted")
        conn.close()  # the client leaves before its answer
        wait_for(lambda: admitted[1].cancelled, "the disconnect was never noticed")
    finally:
        scheduler.submit = real_submit
        gate.open()
    blocker.join(WAIT)
    wait_for(lambda: scheduler.cancelled == before + 1, "the cancelled job was not dropped")
    assert admitted[1].tokens == []  # dropped from the queue: none of its 60 tokens was computed
    # and its handler ended too (a handler left waiting for a dropped job would hold the server's shutdown)
    wait_for(lambda: not world["server"].server_state.tasks, "a request handler is still running")


def test_unloading_an_adapter_fails_no_admitted_request(world):
    port, gate, engine, scheduler = world["port"], world["gate"], world["engine"], world["app"].state.scheduler
    req = {"prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    alone = {m: post(port, "/v1/completions", {"model": m, **req})[1]["choices"][0]["text"] for m in ("alpha", "base")}
    admitted = threading.Semaphore(0)
    real_submit = scheduler.submit

    def counting_submit(job):
        real_submit(job)
        admitted.release()

    scheduler.submit = counting_submit
    gate.armed = True
    try:
        blocker, _ = in_thread(post, port, "/v1/completions", {"model": "gamma", **req})
        assert admitted.acquire(timeout=WAIT)
        gate.wait_entered()  # gamma's batch is decoding
        threads = [in_thread(post, port, "/v1/completions", {"model": m, **req}) for m in ("alpha", "base")]
        for _ in threads:
            assert admitted.acquire(timeout=WAIT)  # both admitted, waiting for the next batch
        engine.unload("alpha")  # the operator unloads alpha while its request waits
    finally:
        scheduler.submit = real_submit
        gate.open()
    blocker.join(WAIT)
    for (thread, box), model in zip(threads, ("alpha", "base"), strict=True):
        thread.join(WAIT)
        status, body = box["result"]
        assert status == 200, body
        assert body["choices"][0]["text"] == alone[model]
    assert "alpha" not in engine.adapters


def test_max_queue_bounds_queued_and_held_requests(world, tiny_llama):
    engine = Engine.from_backbone(load_backbone(str(tiny_llama)), world["engine"].setting)
    gate = Gate(engine.model)
    scheduler = BatchScheduler(engine, max_queue=2, max_batch=1)
    loop = asyncio.new_event_loop()
    ids = engine.tokenizer("Hello", add_special_tokens=False)["input_ids"]

    def job(seed: int | None) -> Recorded:
        decoding = Decoding() if seed is None else Decoding("sampling", seed=seed)
        return Recorded(ids, None, decoding, 1, [], loop)

    gate.armed = True
    jobs = [job(None)]
    try:
        scheduler.submit(jobs[0])
        gate.wait_entered()  # the first job decodes; nothing waits
        jobs += [job(None), job(1)]  # two settings: the second will be held while the first runs
        for j in jobs[1:]:
            scheduler.submit(j)
        with pytest.raises(QueueFull):
            scheduler.submit(job(None))
        gate.step()
        gate.wait_entered()  # job 1 decodes, job 2 is held back: one request still waits
        jobs.append(job(None))
        scheduler.submit(jobs[-1])
        with pytest.raises(QueueFull):
            scheduler.submit(job(None))
        assert scheduler.waiting == 2
    finally:
        gate.open()
    for j in jobs:
        assert j.done.wait(WAIT) and j.seen[-1][0] == "done"
    loop.close()
    with pytest.raises(ValueError):
        BatchScheduler(engine, max_queue=0)


def test_a_chunked_body_is_capped_as_it_arrives(world):
    conn = http.client.HTTPConnection("127.0.0.1", world["port"], timeout=WAIT)
    prompt = "word " * 40_000
    payload = json.dumps({"model": "base", "prompt": prompt, "max_tokens": 1}).encode()

    def chunks():
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    try:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer key"}
        conn.request("POST", "/v1/completions", chunks(), headers, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        assert "limit of 20000 bytes" in json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()


def test_out_of_range_seed_and_empty_prompt_are_400(world):
    port = world["port"]
    status, body = post(port, "/v1/completions", {"model": "base", "prompt": "Hi", "seed": 2**64, "temperature": 1})
    assert status == 400 and "seed" in body["error"]["message"]
    status, body = post(port, "/v1/completions", {"model": "base", "prompt": ""})
    assert status == 400 and "prompt" in body["error"]["message"]
    assert health(port) == 200


def test_the_api_key_is_compared_in_constant_time(world, monkeypatch):
    calls = []
    real = server_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server_module.hmac, "compare_digest", spy)
    conn = http.client.HTTPConnection("127.0.0.1", world["port"], timeout=WAIT)
    conn.request("GET", "/v1/models", headers={"Authorization": "Bearer kez"})
    assert conn.getresponse().status == 401
    conn.close()
    assert calls and calls[-1] == (b"kez", b"key")  # the token alone: the scheme is matched case-insensitively


def test_serve_refuses_an_empty_key_and_warns_when_open_beyond_loopback(tmp_path, capsys):
    limits = Limits()
    with pytest.raises(UserError, match="empty"):
        check_serve_options("127.0.0.1", 8000, "", limits)
    check_serve_options("0.0.0.0", 8000, None, limits)
    assert "WITHOUT an API key" in capsys.readouterr().err
    check_serve_options("127.0.0.1", 8000, None, limits)
    check_serve_options("0.0.0.0", 8000, "k", limits)
    assert capsys.readouterr().err == ""
    setting = tmp_path / "missing-setting.json"
    assert "empty" in fail(capsys, ["serve", "--setting", str(setting), "--api-key", ""])
    assert "--port 70000" in fail(capsys, ["serve", "--setting", str(setting), "--port", "70000"])
    assert "--max-queue 0" in fail(capsys, ["serve", "--setting", str(setting), "--max-queue", "0"])
    assert "--max-batched-tokens 0 must exceed --max-batch" in fail(
        capsys, ["serve", "--setting", str(setting), "--prefill-chunk", "0"]
    )
    assert "invalid choice" in fail(capsys, ["serve", "--setting", str(setting), "--scheduler", "fifo"])


def test_the_scheduler_is_continuous_by_default_and_batch_on_request(world):
    from fanlora.serving.continuous import ContinuousScheduler

    engine = world["engine"]
    assert isinstance(create_app(engine, None).state.scheduler, ContinuousScheduler)
    assert type(create_app(engine, None, limits=Limits(scheduler="batch")).state.scheduler) is BatchScheduler


def test_a_request_that_could_never_fit_the_kv_cache_is_a_400_naming_the_flag(world, tmp_path, capsys):
    engine = world["engine"]
    app = create_app(engine, None, None, Limits(max_tokens=64, kv_cache_mb=0.01))  # a few blocks of the tiny model
    positions = app.state.scheduler.max_positions
    assert positions is not None and positions < 64
    srv, thread, port = serve_in_thread(app)
    try:
        body = {"model": "base", "prompt": "Hello there", "max_tokens": positions, "temperature": 0}
        status, out = call(f"http://127.0.0.1:{port}", "/v1/completions", body, key=None)
        assert status == 400 and "--kv-cache-mb" in out["error"]["message"]
        body["max_tokens"] = 2
        assert call(f"http://127.0.0.1:{port}", "/v1/completions", body, key=None)[0] == 200
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        app.state.scheduler.stop()  # its engine thread: the module's other server shares the engine
    assert "--kv-cache-mb -1" in fail(capsys, ["serve", "--setting", str(tmp_path / "s.json"), "--kv-cache-mb", "-1"])
