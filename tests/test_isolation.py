"""One tenant's request or adapter never fails or changes another tenant's answers (hostile-tenant cases).

Each case failed before its fix: a tiny temperature failed every row of the batch; a NaN adapter (or an
overflow in one tenant's columns) corrupted the other rows of a mixed batch through the 0/1 mask; a reload
with disagreeing ranks was written into the live slot before its check failed; one rank-4096 module widened
every stack for good; malformed adapter files were plain-text 500s; unsupported OpenAI fields were ignored.
"""

from __future__ import annotations

import http.client
import json
import math
import shutil
import socket

import pytest
import torch
from helpers import WAIT, Gate, alone, in_thread, job, make_adapter, run, serve_in_thread, setting_for
from safetensors.torch import load_file, save_file

from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.generate import Decoding
from fanlora.serving import multilora
from fanlora.serving import sampling as sampling_module
from fanlora.serving.adapters import read_adapter
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine
from fanlora.serving.server import Limits, create_app

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def world(request, tmp_path_factory, tiny_llama):
    """The same hostile-tenant cases in float32 and in bfloat16 (the dtype GPUs serve in)."""
    root = tmp_path_factory.mktemp("isolation")
    backbone = load_backbone(str(tiny_llama), dtype=request.param)
    setting = setting_for(backbone)
    for i, name in enumerate(["alpha", "beta"]):
        make_adapter(root / "adapters" / name, tiny_llama, setting, 4, 8, i)
    engine = Engine.from_backbone(backbone, setting, max_rank=16)
    for name in ("alpha", "beta"):
        engine.load(name, root / "adapters" / name)
    gate = Gate(engine.model)
    limits = Limits(max_tokens=64, max_queue=8, max_batch=4)
    app = create_app(engine, root / "adapters", "key", limits)
    from fanlora.serving.server import TimedH11

    srv, thread, port = serve_in_thread(app, http=TimedH11)
    yield {"port": port, "app": app, "engine": engine, "gate": gate, "root": root, "setting": setting,
           "tiny": tiny_llama, "dtype": getattr(torch, request.param)}  # fmt: skip
    gate.open()
    srv.should_exit = True
    thread.join(timeout=10)


def request(port: int, method: str, path: str, body: bytes | dict | None = None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json", "Authorization": "Bearer key", **(headers or {})}
        conn.request(method, path, data, sent)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def complete(port: int, model: str, prompt: str = "Once upon a time", **extra) -> tuple[int, dict]:
    return request(port, "POST", "/v1/completions",
                   {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra})  # fmt: skip


def text_of(port: int, model: str) -> str:
    status, body = complete(port, model)
    assert status == 200, body
    return body["choices"][0]["text"]


# --- sampling -------------------------------------------------------------------------------------------
def test_the_cases_run_in_the_dtype_they_say(world):
    engine = world["engine"]
    ids = engine.tokenizer(["Once upon a time"], return_tensors="pt")
    assert engine.logits(ids["input_ids"], ids["attention_mask"], ["alpha"]).dtype == world["dtype"]
    assert all(m.A.dtype == world["dtype"] for m in engine.modules.values())  # the adapter stacks too


def test_a_tiny_temperature_is_greedy_not_an_overflow(world):
    port = world["port"]
    status, body = complete(world["port"], "alpha", temperature=1e-40, seed=3)
    assert status == 200 and body["choices"][0]["text"] == text_of(port, "alpha")


def test_a_row_whose_sampling_fails_ends_alone(world, monkeypatch):
    engine = world["engine"]
    sampling = Decoding("sampling", temperature=0.8, seed=5)
    mine = [job(engine, p, a, sampling) for p, a in (("The capital of France is", "alpha"), ("Hi", "beta"))]
    expected = [alone(engine, lambda j=j: job(engine, "The capital of France is" if j.adapter == "alpha" else "Hi",
                                               j.adapter, sampling)).text for j in mine]  # fmt: skip
    bad = job(engine, "Count with me: one, two,", "alpha", sampling)
    real = sampling_module._choose

    def failing(logits, row, eos):
        if row.job is bad:
            raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
        return real(logits, row, eos)

    monkeypatch.setattr(sampling_module, "_choose", failing)
    run(ContinuousScheduler(engine, start=False), {0: [mine[0], bad, mine[1]]})
    assert bad.reason == "sampling failed for this request (its next-token scores were not finite)"
    assert [j.text for j in mine] == expected and all(j.reason in ("stop", "length") for j in mine)


# --- adapters -------------------------------------------------------------------------------------------
def broken(world, name: str, change) -> str:
    """A copy of adapter alpha under ``name``, with ``change(folder)`` applied."""
    folder = world["root"] / "adapters" / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(world["root"] / "adapters" / "alpha", folder)
    change(folder)
    return name


def edit_tensors(fn):
    def change(folder):
        tensors = load_file(str(folder / WEIGHTS))
        save_file(fn(tensors), str(folder / WEIGHTS))

    return change


def edit_config(fn):
    def change(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_bytes(fn(cfg))

    return change


def first_pair(tensors, fn_a=None, fn_b=None):
    key_a = next(k for k in sorted(tensors) if "lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    if fn_a:
        tensors[key_a] = fn_a(tensors[key_a])
    if fn_b:
        tensors[key_b] = fn_b(tensors[key_b])
    return tensors


MALFORMED = {
    "nan": (edit_tensors(lambda t: first_pair(t, lambda a: a.index_fill(1, torch.tensor([0]), math.nan))),
            "NaN or infinite"),
    "truncated": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:200]), "not a readable safetensors"),
    "nested": (lambda f: (f / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    "latin1": (lambda f: (f / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "x": "\\xe9\xe9"}'),
               "not UTF-8"),
    "list": (edit_config(lambda c: b"[1, 2]"), "not an object"),
    "alpha-string": (edit_config(lambda c: json.dumps({**c, "lora_alpha": "16"}).encode()), "lora_alpha"),
    "rank0": (edit_tensors(lambda t: first_pair(t, lambda a: a[:0], lambda b: b[:, :0])), "rank 0"),
    "ranks-disagree": (edit_tensors(lambda t: first_pair(t, lambda a: torch.cat([a, a]))), "must agree"),
    "huge-rank": (edit_tensors(lambda t: first_pair(t, lambda a: a.repeat(8, 1), lambda b: b.repeat(1, 8))),
                  "over this server's --max-lora-rank 16"),
    "int-weights": (edit_tensors(lambda t: first_pair(t, lambda a: a.to(torch.int32))), "not a 2-D float"),
    "overflow": (edit_config(lambda c: json.dumps({**c, "lora_alpha": 1e308}).encode()), "overflows"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_adapter_is_a_400_with_its_reason(world, case):
    change, reason = MALFORMED[case]
    name = broken(world, f"bad-{case}", change)
    status, body = request(world["port"], "POST", "/v1/load_lora_adapter", {"lora_name": name})
    assert status == 400 and reason in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"
    status, body = complete(world["port"], name)  # loaded on first use: the same 400, never a 500
    assert status == 400 and reason in body["error"]["message"]


def test_a_refused_reload_leaves_the_served_adapter_as_it_was(world):
    port = world["port"]
    before = text_of(port, "alpha")
    staged = broken(world, "staged", lambda f: None)
    assert text_of(port, staged) == before  # the same weights under another name
    folder = world["root"] / "adapters" / staged
    edit_tensors(lambda t: first_pair(t, lambda a: torch.cat([a, a])))(folder)  # ranks now disagree
    status, body = request(port, "POST", "/v1/load_lora_adapter", {"lora_name": staged})
    assert status == 400 and "must agree" in body["error"]["message"]
    assert text_of(port, staged) == before


@pytest.mark.parametrize("run_tokens", [0, 10**9], ids=["runs", "stacked"])
def test_a_nan_in_one_slot_never_reaches_the_other_rows(world, run_tokens, monkeypatch):
    monkeypatch.setattr(multilora, "MIN_RUN_TOKENS", run_tokens)
    engine = world["engine"]
    engine.load("alpha", world["root"] / "adapters" / "alpha")
    engine.load("beta", world["root"] / "adapters" / "beta")
    ids = engine.tokenizer(["Once upon a time", "Once upon a time"], return_tensors="pt")
    clean = engine.logits(ids["input_ids"], ids["attention_mask"], ["alpha", "beta"])
    slot = engine.table.slots["beta"]
    saved = {n: (m.A[slot].clone(), m.B[slot].clone()) for n, m in engine.modules.items()}
    try:
        for m in engine.modules.values():  # as if beta's factors overflowed at run time
            m.A[slot] = math.inf
            m.refresh()
        mixed = engine.logits(ids["input_ids"], ids["attention_mask"], ["alpha", "beta"])
        assert torch.isfinite(mixed[0]).all() and torch.equal(mixed[0], clean[0])
    finally:
        for n, m in engine.modules.items():
            m.A[slot], m.B[slot] = saved[n]
            m.refresh()


def test_the_stacks_shrink_when_the_widest_adapter_leaves(world):
    engine = world["engine"]
    engine.load("alpha", world["root"] / "adapters" / "alpha")
    base_rank, base_slots = engine.rank, next(iter(engine.modules.values())).A.shape[0]
    wide = world["root"] / "wide"
    if not wide.exists():
        make_adapter(wide, world["tiny"], world["setting"], 16, 16, 7)
    engine.load("wide", wide)
    assert engine.rank == 16
    engine.unload("wide")
    first = next(iter(engine.modules.values()))
    assert engine.rank == base_rank and first.A.shape[2] == base_rank and first.A.shape[0] <= base_slots
    # a request pinned on the wide adapter ends after its unload: the release may come from any thread, so the
    # stacks are swapped only where the model's owner runs (before the next forward), never under a forward
    engine.load("wide", wide)
    pinned = engine.table.acquire("wide")
    engine.unload("wide")
    engine.table.release(pinned)
    assert first.A.shape[2] == 16 and engine.rank == 16  # not yet: no tensor swapped from the releasing thread
    engine.use_slots([0])
    assert next(iter(engine.modules.values())).A.shape[2] == base_rank == engine.rank
    with pytest.raises(UserError, match="over this server's --max-lora-rank 8"):
        read_adapter(wide, max_rank=8)


# --- the wire format ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("logit_bias", {"1": 5}), ("best_of", 2), ("suffix", "x"), ("tools", [{"type": "function"}]),
     ("response_format", {"type": "json_object"})],
)  # fmt: skip
def test_an_unimplemented_openai_field_is_a_400_naming_it(world, field, value):
    status, body = complete(world["port"], "base", **{field: value})
    assert status == 400 and repr(field) in body["error"]["message"] and "not supported" in body["error"]["message"]


def test_neutral_values_and_harmless_fields_are_accepted(world):
    status, _ = complete(world["port"], "base", logprobs=None, echo=False, presence_penalty=0, best_of=1, user="u1")
    assert status == 200
    status, body = complete(world["port"], "base", made_up=1)
    assert status == 400 and "unrecognized request argument 'made_up'" in body["error"]["message"]


def test_an_empty_stop_string_is_ignored(world):
    status, body = complete(world["port"], "base", stop="")
    assert status == 200 and body["choices"][0]["text"] == text_of(world["port"], "base")
    assert len(body["choices"][0]["text"]) > 1


def test_roles_are_checked(world):
    body = {"model": "base", "max_tokens": 4, "messages": [{"role": "tool", "content": "hi"}]}
    status, reply = request(world["port"], "POST", "/v1/chat/completions", body)
    assert status == 400 and "messages.0.role" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [("POST", "/v1/completions", b"{not json", 400), ("POST", "/v1/completions", b"[1]", 400),
     ("GET", "/v1/nowhere", None, 404), ("DELETE", "/v1/models", None, 405)],
)  # fmt: skip
def test_every_error_has_openais_shape(world, method, path, body, status):
    got, reply = request(world["port"], method, path, body)
    assert got == status and set(reply) == {"error"} and {"message", "type", "code"} <= set(reply["error"])


def test_the_bearer_scheme_is_case_insensitive(world):
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, _ = request(world["port"], "GET", "/v1/models", headers={"Authorization": f"{scheme} key"})
        assert status == 200
    status, _ = request(world["port"], "GET", "/v1/models", headers={"Authorization": "Basic key"})
    assert status == 401


def test_a_client_that_trickles_its_headers_is_cut_off(world, monkeypatch):
    from fanlora.serving.server import TimedH11

    monkeypatch.setattr(TimedH11, "header_timeout", 0.3)
    with socket.create_connection(("127.0.0.1", world["port"]), timeout=WAIT) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert sock.recv(100) == b""  # the server closed the connection (recv waits at most WAIT)


def test_a_body_that_never_arrives_is_a_408(world, monkeypatch):
    from fanlora.serving import api

    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.3)
    guard = world["app"].middleware_stack
    while guard is not None and not isinstance(guard, api.Guard):
        guard = getattr(guard, "app", None)
    monkeypatch.setattr(guard, "body_timeout", 0.3)
    with socket.create_connection(("127.0.0.1", world["port"]), timeout=WAIT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key\r\n"
                     b"Content-Length: 100\r\n\r\n{")  # fmt: skip
        reply = b""
        while b'"error"' not in reply and (chunk := sock.recv(4000)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'"error"' in reply


# --- graceful shutdown ----------------------------------------------------------------------------------
def test_sigterm_drains_running_streams_and_refuses_new_requests(tmp_path, tiny_llama):
    import signal
    import threading
    import time

    from fanlora.serving.server import DrainingServer

    backbone = load_backbone(str(tiny_llama))
    engine = Engine.from_backbone(backbone, setting_for(backbone))
    gate = Gate(engine.model)
    app = create_app(engine, None, "key", Limits(max_tokens=64, drain_seconds=30))
    srv, server_thread, port = serve_in_thread(app, lambda config: DrainingServer(config, app.state.scheduler, 30))

    def stream() -> list[str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True}
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps(body),
            {"Authorization": "Bearer key", "Content-Type": "application/json"},
        )
        lines = [line for line in conn.getresponse().read().decode().splitlines() if line.startswith("data: ")]
        conn.close()
        return lines

    gate.armed = True
    thread, box = in_thread(stream)
    gate.wait_entered()  # the stream's row is in a forward pass
    srv.handle_exit(signal.SIGTERM, None)
    deadline = time.monotonic() + WAIT
    while not app.state.scheduler.closed and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    status, body = complete(port, "base")
    assert status == 503 and "shutting down" in body["error"]["message"]
    assert request(port, "GET", "/health")[0] == 503
    gate.open()
    thread.join(WAIT)
    lines = box["result"]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    server_thread.join(WAIT)
    assert not server_thread.is_alive()  # uvicorn stopped once the drain was over


def test_a_drain_that_runs_out_of_time_ends_every_row_with_its_text_and_abort(world):
    from helpers import Recorded

    engine = world["engine"]
    scheduler = ContinuousScheduler(engine, start=False, max_batch=2)
    running = [job(engine, "Once upon a time", "alpha", max_tokens=40), job(engine, "Hi", None, max_tokens=40)]
    waiting = job(engine, "The capital of France is", "beta", max_tokens=40)
    for j in [*running, waiting]:
        scheduler.submit(j)
    for _ in range(3):
        with scheduler.lock:
            scheduler.iterate()
    assert scheduler.busy() and isinstance(waiting, Recorded) and not waiting.log
    scheduler.close()
    scheduler.abort_all("abort")
    assert not scheduler.busy() and all(j.reason == "abort" for j in [*running, waiting])
    assert all(j.text for j in running) and waiting.text == ""
    assert all(not n for n in engine.table.pins.values())  # every pin released


def test_an_internal_error_is_a_500_in_openais_shape_without_internals(world, monkeypatch):
    from fanlora.serving import server

    def broken(self):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.Tenants, "known", broken)
    status, body = request(world["port"], "GET", "/v1/models")
    assert status == 500 and body["error"]["type"] == "server_error" and "secret" not in body["error"]["message"]
