"""The GPU path: the engine, the continuous scheduler with its paged pool and prefix cache, shape backbones and
the timing/memory meters, in bfloat16 on a CUDA device.

Marked ``cuda``: skipped where there is no GPU, run by ``scripts/gpu-check.sh`` on a lent one. Its CPU
rehearsal (``GPU_CHECK_DEVICE=cpu``) sets ``FANLORA_TEST_DEVICE=cpu`` and runs these same tests on the CPU, so
the script and the tests cannot rot between the rare days a GPU is lent.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import BF16_LOGITS, alone, assert_same_answer, job, make_adapter, run, setting_for
from peft import PeftModel

from fanlora.backbone import load_backbone
from fanlora.latency.rss import peak_memory
from fanlora.latency.timing import decode_seconds, sharing
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine

DEVICE = torch.device(os.environ.get("FANLORA_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def gpu(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("cuda")
    setting = setting_for(load_backbone(str(tiny_llama)))
    adapters = {n: make_adapter(root / n, tiny_llama, setting, r, 8, s) for n, r, s in (("a", 4, 1), ("b", 8, 2))}
    engine = Engine.from_backbone(load_backbone(str(tiny_llama), "bfloat16", device=DEVICE), setting)
    for name, path in adapters.items():
        engine.load(name, path)
    return engine, adapters


def test_the_engine_runs_on_the_device_and_equals_peft_there(gpu, tiny_llama):
    engine, adapters = gpu
    assert {p.device.type for p in engine.model.parameters()} == {DEVICE.type}
    assert all(m.A.device.type == DEVICE.type for m in engine.modules.values())
    tok = engine.tokenizer
    tok.padding_side = "right"
    batch = {k: v.to(DEVICE) for k, v in tok(["hello there", "the sea is"], return_tensors="pt", padding=True).items()}
    mask = batch["attention_mask"].bool()
    got = engine.logits(batch["input_ids"], batch["attention_mask"], ["a", "b"])
    for row, name in enumerate(["a", "b"]):
        model = load_backbone(str(tiny_llama), "bfloat16", device=DEVICE).model
        peft = PeftModel.from_pretrained(model, str(adapters[name])).eval()
        with torch.no_grad():
            want = peft(**batch, use_cache=False).logits
        assert (got[row] - want[row])[mask[row]].abs().max() < BF16_LOGITS


def test_continuous_batching_with_paged_kv_and_prefix_cache_on_the_device(gpu):
    engine, _ = gpu
    prompts = ["Once upon a time, in a land far away, " * 4, "The capital of France is", "Count: one, two,", "Hi"]
    specs = [(p, a) for p, a in zip(prompts, ["a", None, "b", "a"], strict=True)]
    scheduler = ContinuousScheduler(engine, max_batch=3, start=False, prefix_cache_mb=4)
    jobs = [job(engine, p, a, max_tokens=10, ignore_eos=True) for p, a in specs]
    again = job(engine, prompts[0], "a", max_tokens=10, ignore_eos=True)  # a prefix-cache hit
    run(scheduler, {0: jobs[:2], 2: jobs[2:], 6: [again]})
    assert scheduler.peak_rows > 1 and scheduler.kv.keys and scheduler.kv.keys[0].device.type == DEVICE.type
    assert scheduler.prefix.hits >= 1
    for (p, a), j in zip(specs, jobs, strict=True):
        assert_same_answer(engine, j, alone(engine, lambda p=p, a=a: job(engine, p, a, max_tokens=10, ignore_eos=True)))
    assert_same_answer(engine, again, jobs[0])


def test_a_shape_backbone_is_built_on_the_device_in_bf16(tiny_llama):
    probe = load_backbone(f"shape:{tiny_llama / 'config.json'}", "bfloat16", device=DEVICE, random_ok=True)
    assert {(p.device.type, p.dtype) for p in probe.model.parameters()} == {(DEVICE.type, torch.bfloat16)}
    assert probe.identity["device"].startswith(DEVICE.type)


def test_timing_and_memory_meters_work_on_the_device(gpu):
    engine, _ = gpu
    ids = torch.tensor([engine.tokenizer("a b c d e f g", add_special_tokens=False)["input_ids"]])
    engine.use(["a"])
    with peak_memory(DEVICE) as mem:
        seconds = decode_seconds(engine.model, ids, 4, 3, engine.tokenizer.eos_token_id)
    assert seconds > 0 and mem.mb >= 0
    if DEVICE.type == "cuda":
        assert mem.peak > mem.start  # beam search allocated something on the device


def test_a_sharing_copy_holds_no_second_copy_of_the_weights(tiny_llama):
    probe = load_backbone(str(tiny_llama), "bfloat16", device=DEVICE)
    copy = sharing(probe)
    assert copy.model is not probe.model
    assert {p.data_ptr() for p in copy.model.parameters()} == {p.data_ptr() for p in probe.model.parameters()}
