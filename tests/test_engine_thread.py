"""All torch work of a running server happens on its engine thread (why: ``Admission.on_engine``)."""

from __future__ import annotations

import threading

import pytest
from helpers import KEY, call, make_adapter, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine
from fanlora.serving.server import Limits, create_app


@pytest.mark.parametrize("scheduler", ["continuous", "batch"])
def test_adapter_loads_and_unloads_run_on_the_engine_thread(tmp_path, tiny_llama, scheduler):
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    make_adapter(tmp_path / "alpha", tiny_llama, setting, 4, 8, 0)
    make_adapter(tmp_path / "misfit", tiny_llama, setting_for(backbone, kinds=("Q", "D")), 4, 8, 9)
    engine = Engine.from_backbone(backbone, setting)
    seen: list[str] = []
    for name in ("install", "unload"):  # install: what a load by name runs once the folder is read
        original = getattr(engine, name)

        def record(*args, _original=original, **kwargs):
            seen.append(threading.current_thread().name)
            return _original(*args, **kwargs)

        setattr(engine, name, record)
    app = create_app(engine, tmp_path, KEY, Limits(max_tokens=8, scheduler=scheduler))
    srv, thread, port = serve_in_thread(app)
    url = f"http://127.0.0.1:{port}"
    try:
        status, body = call(url, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 2})
        assert status == 200, body
        assert call(url, "/v1/unload_lora_adapter", {"lora_name": "alpha"})[0] == 200
        assert call(url, "/v1/load_lora_adapter", {"lora_name": "alpha"})[0] == 200
        status, body = call(url, "/v1/load_lora_adapter", {"lora_name": "misfit"})  # refused on the engine thread
        assert status == 400 and "refused" in body["error"]["message"], body
        status, body = call(url, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 2})
        assert status == 200, body  # the engine thread survived the refusal
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
    assert seen == ["fanlora-engine"] * 4


def test_on_engine_without_a_worker_runs_in_place_and_raises_what_fn_raises(tiny_llama):
    backbone = load_backbone(str(tiny_llama))
    scheduler = ContinuousScheduler(Engine.from_backbone(backbone, setting_for(backbone)), start=False)
    assert scheduler.on_engine(lambda: threading.current_thread().name) == threading.current_thread().name
    with pytest.raises(ZeroDivisionError):
        scheduler.on_engine(lambda: 1 / 0)
    assert not scheduler.lock.locked()


def test_on_engine_runs_a_call_in_place_when_the_worker_stopped_before_taking_it(tiny_llama):
    backbone = load_backbone(str(tiny_llama))
    scheduler = ContinuousScheduler(Engine.from_backbone(backbone, setting_for(backbone)))
    scheduler.stop()
    scheduler.thread.join(timeout=10)

    class StopsAfterTheCheck:  # alive when on_engine looks, gone before it would take the call
        looks = 0

        def is_alive(self) -> bool:
            self.looks += 1
            return self.looks == 1

    scheduler.thread = StopsAfterTheCheck()
    seen: list[str] = []
    caller = threading.Thread(target=lambda: seen.append(scheduler.on_engine(lambda: "ran")), daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert not caller.is_alive() and seen == ["ran"]  # no caller left waiting forever
