"""Prefix caching: a request whose prompt starts from cached KV gives exactly the tokens it gives without the
cache — greedy and seeded sampling, mixed adapters, a reload between two requests with one prefix, and eviction
under a small limit."""

from __future__ import annotations

import pytest
import torch
from helpers import alone, assert_same_answer, job, make_adapter, run, setting_for

from fanlora.backbone import load_backbone
from fanlora.generate import Decoding
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine
from fanlora.serving.prefix import PrefixCache

SYSTEM = "You are a helpful assistant. Answer briefly and politely, in one sentence. " * 2
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Say hi."]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def setup(tmp_path_factory, tiny_llama, request):
    root = tmp_path_factory.mktemp("prefix")
    backbone = load_backbone(str(tiny_llama), dtype=request.param)
    setting = setting_for(backbone)
    eng = Engine.from_backbone(backbone, setting)
    paths = {name: make_adapter(root / name, tiny_llama, setting, 4, 8, i) for i, name in enumerate("abc")}
    for name in ("a", "b"):
        eng.load(name, paths[name])
    return eng, paths


def _cached(eng, **kw):
    return ContinuousScheduler(eng, start=False, prefix_cache_mb=16, **kw)


def test_cached_prefixes_give_the_same_tokens_on_mixed_adapters(setup):
    eng, _ = setup
    sampling = Decoding("sampling", temperature=0.9, top_p=0.9, seed=5)
    specs = [(q, adapter, dec) for q in QUESTIONS for adapter, dec in (("a", None), ("b", sampling), (None, None))]
    scheduler = _cached(eng, max_batch=3)
    jobs = [job(eng, SYSTEM + q, a, d, 8) for q, a, d in specs]
    run(scheduler, {i: [j] for i, j in enumerate(jobs)})  # one arrival per iteration: later ones hit
    cache = scheduler.prefix
    assert cache.hits >= len(specs) - 3 and cache.tokens_reused >= cache.hits * cache.block
    for (q, a, d), j in zip(specs, jobs, strict=True):
        plain = alone(eng, lambda q=q, a=a, d=d: job(eng, SYSTEM + q, a, d, 8))
        assert_same_answer(eng, j, plain)


def test_a_prefix_belongs_to_one_adapter_load(setup):
    eng, paths = setup
    scheduler = _cached(eng)
    first = job(eng, SYSTEM + QUESTIONS[0], "a", None, 8)
    run(scheduler, {0: [first]})
    assert scheduler.prefix.bytes > 0
    eng.load("a", paths["c"])  # a reload: other weights under the same name
    again = job(eng, SYSTEM + QUESTIONS[0], "a", None, 8)
    hits = scheduler.prefix.hits
    run(scheduler, {0: [again]})
    assert scheduler.prefix.hits == hits  # nothing computed under the old weights was reused
    assert again.tokens == alone(eng, lambda: job(eng, SYSTEM + QUESTIONS[0], "a", None, 8)).tokens
    eng.load("a", paths["a"])


def test_eviction_keeps_the_cache_under_its_limit_and_answers_unchanged():
    cache = PrefixCache(limit_bytes=3 * 2 * 4 * 16 * 4, block=4)  # room for three one-layer blocks
    keys = [torch.arange(4 * 16 * 4, dtype=torch.float32).view(1, 4, 16, 4)]
    ids = list(range(16))
    cache.store((1, 1), ids, keys, keys, 0)
    assert cache.bytes <= cache.limit and len(cache._leaves()) == 1  # four blocks stored, the deepest evicted
    n, k, _ = cache.lookup((1, 1), ids)
    assert n == 12 and torch.equal(k[0], keys[0][:, :, :12])  # a chain is cut from its end, never its middle
    cache.store((1, 1), [99, *ids[1:]], keys, keys, 0)  # another first block: the least recently used go
    assert cache.bytes <= cache.limit and cache.lookup((1, 1), [99, *ids[1:]])[0] > 0
    assert cache.lookup((1, 2), ids)[0] == 0  # another load of slot 1: a miss
    cache.drop({(0, 0)})
    assert cache.bytes == 0 and not cache.roots


def test_small_limit_under_load_gives_the_same_tokens(setup):
    eng, _ = setup
    scheduler = ContinuousScheduler(eng, start=False, prefix_cache_mb=0.01)  # a few blocks: constant eviction
    jobs = [job(eng, SYSTEM + q, a, None, 6) for q in QUESTIONS for a in ("a", "b")]
    run(scheduler, {i: [j] for i, j in enumerate(jobs)})
    assert scheduler.prefix.bytes <= scheduler.prefix.limit
    for j, (q, a) in zip(jobs, [(q, a) for q in QUESTIONS for a in ("a", "b")], strict=True):
        assert_same_answer(eng, j, alone(eng, lambda q=q, a=a: job(eng, SYSTEM + q, a, None, 6)))


def test_the_server_flag_reaches_the_scheduler_and_is_checked(setup):
    from fanlora.errors import UserError
    from fanlora.serving.api import Limits
    from fanlora.serving.server import create_app

    eng, _ = setup
    app = create_app(eng, None, None, Limits(prefix_cache_mb=8))
    assert app.state.scheduler.prefix.limit == 8 * 2**20
    app.state.scheduler.stop()
    plain = create_app(eng, None, None, Limits(prefix_cache_mb=0)).state.scheduler
    plain.stop()
    assert plain.prefix is None  # 0: off
    assert Limits().prefix_cache_mb == 64  # on by default, as measured
    with pytest.raises(UserError, match=r"--prefix-cache-mb -1\.0 must be between 0"):
        Limits(prefix_cache_mb=-1).check()


def test_hits_that_arrive_together_share_one_forward_of_their_remainders(setup):
    eng, _ = setup
    scheduler = _cached(eng, max_batch=9)
    warm = [job(eng, SYSTEM + QUESTIONS[0], a, None, 4) for a in ("a", "b", None)]
    run(scheduler, {i: [j] for i, j in enumerate(warm)})
    widths = []
    forward = scheduler._forward
    scheduler._forward = lambda ids, *rest: (widths.append(ids.shape[1]), forward(ids, *rest))[1]
    specs = [(q, a) for q in QUESTIONS[1:] for a in ("a", "b", None)]  # remainders of different lengths
    jobs = [job(eng, SYSTEM + q, a, None, 6) for q, a in specs]
    before = scheduler.prefix.tokens_reused
    run(scheduler, {0: jobs})
    reused = scheduler.prefix.tokens_reused - before
    assert reused >= len(jobs) * scheduler.prefix.block  # every one started after a cached block
    assert widths[0] == sum(len(j.prompt_ids) for j in jobs) - reused  # all remainders, one forward, no padding
    for (q, a), j in zip(specs, jobs, strict=True):
        assert_same_answer(eng, j, alone(eng, lambda q=q, a=a: job(eng, SYSTEM + q, a, None, 6)))
