"""Adapter residency: at most --max-loras adapters in the engine's preallocated slots (least recently used idle one
evicted, a load written in place), parsed adapters in a bounded host cache, and every answer unchanged."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import KEY, call, make_adapter, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.generate import Decoding
from fanlora.serving.engine import Engine
from fanlora.serving.server import Limits, create_app
from fanlora.serving.slots import SlotsBusy

NAMES = ["alpha", "beta", "gamma", "delta", "eps"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("residency")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    for i, name in enumerate(NAMES):
        make_adapter(root / "adapters" / name, tiny_llama, setting, 4 + i % 2 * 2, 8, i)
    reference = Engine.from_backbone(load_backbone(str(tiny_llama)), setting)  # unbounded: every adapter loaded
    for name in NAMES:
        reference.load(name, root / "adapters" / name)
    want = {n: reference.generate(["Once upon a time"], [n], Decoding(), 6)[0] for n in NAMES}
    return {"root": root, "tiny": tiny_llama, "setting": setting, "want": want}


def bounded_engine(world, max_loras: int) -> Engine:
    return Engine.from_backbone(load_backbone(str(world["tiny"])), world["setting"], max_loras=max_loras)


def test_the_least_recently_used_idle_adapter_is_evicted_and_loads_write_in_place(world):
    engine = bounded_engine(world, 2)
    adapters = world["root"] / "adapters"
    engine.load("alpha", adapters / "alpha")
    engine.load("beta", adapters / "beta")
    engine.table.release(engine.table.acquire("alpha"))  # alpha used last: beta is the least recently used
    engine.load("gamma", adapters / "gamma")
    assert engine.adapters == ["alpha", "gamma"] and engine.table.evictions == 1
    assert all(m.A.shape[0] == 4 for m in engine.modules.values())  # max_loras + slot 0 + one spare
    held = [engine.table.acquire("alpha"), engine.table.acquire("gamma")]
    with pytest.raises(SlotsBusy):
        engine.load("delta", adapters / "delta")  # every resident adapter is in use
    for slot in held:
        engine.table.release(slot)
    engine.load("delta", adapters / "delta")
    for name in engine.adapters:
        assert engine.generate(["Once upon a time"], [name], Decoding(), 6)[0] == world["want"][name]


def test_a_load_costs_the_same_however_many_are_loaded(world):
    engine = bounded_engine(world, 4)
    adapters = world["root"] / "adapters"
    for name in NAMES[:4]:
        engine.load(name, adapters / name)
    shapes = {n: tuple(m.A.shape) for n, m in engine.modules.items()}
    before = {n: m.Af.data_ptr() for n, m in engine.modules.items()}
    engine.load("eps", adapters / "eps")  # evicts one, writes its slot: no stack is reallocated
    assert {n: tuple(m.A.shape) for n, m in engine.modules.items()} == shapes
    assert {n: m.Af.data_ptr() for n, m in engine.modules.items()} == before
    for m in engine.modules.values():  # the side-by-side copy agrees with the stacks
        slots, _, rank = m.A.shape
        assert torch.equal(m.Af, m.A[1:].permute(1, 0, 2).reshape(m.in_features, (slots - 1) * rank))


def test_a_server_with_two_slots_serves_five_tenants_with_unchanged_answers(world):
    engine = bounded_engine(world, 2)
    app = create_app(engine, world["root"] / "adapters", KEY, Limits(max_tokens=16, max_loras=2, max_cpu_loras=3))
    srv, thread, port = serve_in_thread(app)
    url = f"http://127.0.0.1:{port}"
    tenants = app.state.tenants
    try:
        for name in ["alpha", "beta", "alpha", "gamma", "delta", "alpha", "eps", "beta", "alpha", "gamma"]:
            body = {"model": name, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
            status, out = call(url, "/v1/completions", body)
            assert status == 200 and out["choices"][0]["text"] == world["want"][name]
            assert len(engine.adapters) <= 2 and len(tenants.host.items) <= 3
        assert engine.table.evictions >= 5
        os.symlink("/tmp", world["root"] / "adapters" / "outside")
        (world["root"] / "adapters" / "empty").mkdir()
        status, models = call(url, "/v1/models", None)
        ids = {m["id"] for m in models["data"]}
        assert set(NAMES) <= ids and "outside" not in ids and "empty" not in ids  # only folders that would load
        status, one = call(url, "/v1/models/alpha", None)
        assert status == 200 and one["id"] == "alpha" and one["object"] == "model"
        assert call(url, "/v1/models/empty", None)[0] == 404
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
