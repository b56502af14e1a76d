"""``ignore_eos`` (vLLM's extension): a request decodes ``max_tokens`` tokens whether or not EOS comes.

Benchmarks need it for equal work per request: four random adapters answer a fixed prompt with a different
number of tokens than the bare backbone, so requests per second alone would compare unequal work.
"""

from __future__ import annotations

import pytest
from helpers import job, make_adapter, run, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine
from fanlora.serving.scheduler import run_batch
from fanlora.serving.server import Limits, create_app

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("eos")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    eng = Engine.from_backbone(backbone, setting)
    eng.load("alpha", make_adapter(root / "alpha", tiny_llama, setting, 4, 8, 0))
    return eng


def _continuous(engine, **kw):
    j = job(engine, PROMPT, "alpha", max_tokens=8, **kw)
    run(ContinuousScheduler(engine, start=False), {0: [j]})
    return j


def _batch(engine, **kw):
    j = job(engine, PROMPT, "alpha", max_tokens=8, **kw)
    run_batch(engine, [j])
    engine.table.release(j.slot)
    return j


@pytest.mark.parametrize("serve", [_continuous, _batch], ids=["continuous", "batch"])
def test_ignore_eos_decodes_max_tokens_past_an_eos(engine, serve, monkeypatch):
    free = serve(engine)
    assert len(free.tokens) == 8, "the tiny model should not emit its real EOS in 8 tokens"
    eos = free.tokens[2]  # this greedy token becomes the EOS, for the tokenizer and for generate()'s default
    tok, old = engine.tokenizer, engine.tokenizer.eos_token
    monkeypatch.setattr(engine.model.generation_config, "eos_token_id", eos)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    try:
        assert tok.eos_token_id == eos
        stopped = serve(engine)
        kept = serve(engine, ignore_eos=True)
    finally:
        tok.eos_token = old
    assert stopped.tokens == free.tokens[: free.tokens.index(eos)] and stopped.reason == "stop"
    assert kept.tokens == free.tokens and kept.reason == "length"


def test_the_server_takes_ignore_eos_and_refuses_it_with_beams(engine):
    import openai

    srv, thread, port = serve_in_thread(create_app(engine, None, None, Limits(max_tokens=32)))
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        out = c.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="ignore_eos is not supported with beam search"):
            c.completions.create(
                model="alpha", prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True, "num_beams": 2}
            )
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
