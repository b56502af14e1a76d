"""The official ``openai`` SDK against a live ``fanlora serve``, through every field the server supports, on both
schedulers; every refused field is a 400 that names it.

Before this suite the server refused ``n`` > 1, ``logprobs``/``top_logprobs``, ``echo``, list and token-id prompts,
the penalties and vLLM's ``top_k``/``min_p``/``repetition_penalty``/``min_tokens`` (400 "not supported" or
"unrecognized request argument"): every test below failed.
"""

from __future__ import annotations

import openai
import pytest
import torch
from helpers import KEY, make_adapter, serve_in_thread, setting_for

from fanlora.backbone import load_backbone
from fanlora.generate import prompt_ids
from fanlora.serving.engine import Engine
from fanlora.serving.server import Limits, create_app

PROMPT = "Once upon a time"


@pytest.fixture(scope="module", params=["continuous", "batch"])
def served(request, tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("sdk")
    backbone = load_backbone(str(tiny_llama))
    setting = setting_for(backbone)
    make_adapter(root / "adapters" / "alpha", tiny_llama, setting, 4, 8, 3)
    engine = Engine.from_backbone(backbone, setting)
    limits = Limits(max_tokens=32, max_queue=16, max_batch=4, scheduler=request.param)
    app = create_app(engine, root / "adapters", KEY, limits)
    srv, thread, port = serve_in_thread(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    yield client, app
    srv.should_exit = True
    thread.join(timeout=10)


def reference(app, ids: list[int], steps: int, adapter: str = "alpha") -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation of ``ids`` by full forwards (no KV cache) on the adapter, with each step's
    log-probabilities: what the served logprobs must equal."""
    engine, scheduler = app.state.engine, app.state.scheduler

    def run():
        tokens, logprobs = list(ids), []
        for _ in range(steps):
            x = torch.tensor([tokens])
            lp = torch.log_softmax(engine.logits(x, torch.ones_like(x), [adapter])[0, -1].float(), -1)
            logprobs.append(lp)
            tokens.append(int(lp.argmax()))
        return tokens[len(ids) :], logprobs

    return scheduler.on_engine(run)


def ids_of(app, text: str) -> list[int]:
    return prompt_ids(app.state.engine.tokenizer, text)


def test_completion_logprobs_are_the_models_and_echo_gives_the_prompts(served):
    client, app = served
    ids = ids_of(app, PROMPT)
    out = client.completions.create(model="alpha", prompt=ids, max_tokens=5, temperature=0, logprobs=3, echo=True,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert out.choices[0].text.startswith(PROMPT) and "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    tokens, steps = reference(app, ids, 5)
    full = ids + tokens
    x = torch.tensor([full[:-1]])
    engine = app.state.engine
    prompt_lp = app.state.scheduler.on_engine(
        lambda: torch.log_softmax(engine.logits(x, torch.ones_like(x), ["alpha"])[0].float(), -1)
    )
    for i in range(1, len(full)):  # prompt tokens: the model's own logprob of each next prompt token
        want = float(prompt_lp[i - 1, full[i]])
        assert abs(lp.token_logprobs[i] - want) < 1e-4, (i, lp.token_logprobs[i], want)
    for j, step in enumerate(steps):  # generated tokens: the greedy token, best of its top 3, as a full forward
        got = lp.top_logprobs[len(ids) + j]
        assert abs(lp.token_logprobs[len(ids) + j] - float(step.max())) < 1e-4
        assert len(got) == 3 and max(got.values()) == lp.token_logprobs[len(ids) + j]


def test_lm_eval_loglikelihood_request_shape(served):
    """What lm-eval's local-completions sends for a log-likelihood: token ids, echo, logprobs 1, max_tokens 1 —
    and max_tokens 0 (prompt only)."""
    client, app = served
    ids = ids_of(app, PROMPT)
    one = client.completions.create(model="alpha", prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True,
                                    seed=1234)  # fmt: skip
    none = client.completions.create(model="alpha", prompt=[ids], max_tokens=0, logprobs=1, echo=True)
    a, b = one.choices[0].logprobs, none.choices[0].logprobs
    assert len(a.token_logprobs) == len(ids) + 1 and len(b.token_logprobs) == len(ids)
    assert a.token_logprobs[: len(ids)] == b.token_logprobs and none.usage.completion_tokens == 0
    assert none.choices[0].text == PROMPT and none.choices[0].finish_reason == "length"


def test_chat_logprobs_and_top_logprobs(served):
    client, _ = served
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="alpha", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 4 == out.usage.completion_tokens
    for item in content:
        assert item.bytes == list(item.token.encode()) and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == item.logprob >= item.top_logprobs[1].logprob  # greedy: the best
    assert "".join(i.token for i in content) == out.choices[0].message.content
    plain = client.chat.completions.create(model="alpha", messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


def test_n_samples_are_independent_and_reproducible_with_a_seed(served):
    client, _ = served
    ask = dict(model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    first, again = client.completions.create(n=3, **ask), client.completions.create(n=3, **ask)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert first.usage.completion_tokens == 24 and first.usage.prompt_tokens == again.usage.prompt_tokens
    assert texts[1] == client.completions.create(**{**ask, "seed": 8}).choices[0].text  # sample i: seed + i


def test_list_and_token_id_prompts_answer_as_single_requests(served):
    client, app = served
    ask = dict(model="alpha", max_tokens=5, temperature=0)
    single = [client.completions.create(prompt=p, **ask).choices[0].text for p in (PROMPT, "Hello")]
    both = client.completions.create(prompt=[PROMPT, "Hello"], n=2, **ask)
    by_index = {c.index: c.text for c in both.choices}
    assert by_index == {0: single[0], 1: single[0], 2: single[1], 3: single[1]}  # index = prompt × n + sample
    by_ids = client.completions.create(prompt=[ids_of(app, PROMPT), ids_of(app, "Hello")], **ask)
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == single


def test_a_stream_of_several_choices_equals_the_whole_answer(served):
    client, _ = served
    ask = dict(model="alpha", prompt=[PROMPT, "Hello"], max_tokens=6, temperature=0, logprobs=1,
               extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**ask)
    texts: dict[int, str] = {}
    logprobs: dict[int, list] = {}
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **ask):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
        usage = chunk.usage
    assert texts == {c.index: c.text for c in whole.choices}
    assert logprobs == {c.index: c.logprobs.token_logprobs for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens == 12


def repeats(tokens: list[str]) -> bool:
    return len(set(tokens)) < len(tokens)


def test_penalties_and_vllm_sampling_fields(served):
    client, _ = served
    ask = dict(model="alpha", prompt=PROMPT, max_tokens=12, logprobs=0)
    greedy = client.completions.create(temperature=0, extra_body={"ignore_eos": True}, **ask).choices[0]
    assert repeats(greedy.logprobs.tokens), "precondition: a random tiny model's greedy text repeats tokens"
    for field in ("presence_penalty", "frequency_penalty"):  # a strong penalty: no output token twice
        out = client.completions.create(temperature=0, extra_body={"ignore_eos": True}, **{field: 2.0}, **ask)
        assert not repeats(out.choices[0].logprobs.tokens), field
    out = client.completions.create(temperature=0, extra_body={"ignore_eos": True, "repetition_penalty": 10.0}, **ask)
    assert out.choices[0].text != greedy.text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # only the best token survives: sampling is greedy
        out = client.completions.create(temperature=1.0, seed=3, extra_body={"ignore_eos": True, **extra}, **ask)
        assert out.choices[0].text == greedy.text, extra
        assert all(lp == 0.0 for lp in out.choices[0].logprobs.token_logprobs)  # the distribution sampled from
    stop = greedy.logprobs.tokens[1]  # the second token's text: a stop string met at once
    early = client.completions.create(temperature=0, stop=[stop], **ask)
    late = client.completions.create(temperature=0, stop=[stop], extra_body={"min_tokens": 6}, **ask)
    assert early.usage.completion_tokens < 6 <= late.usage.completion_tokens


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("logit_bias", {"1": 5}, "logit_bias"), ("best_of", 2, "best_of"), ("suffix", "x", "suffix"),
     ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),
     ("response_format", {"type": "json_object"}, "response_format"), ("n", 17, "n"), ("logprobs", 21, "logprobs"),
     ("top_k", -2, "top_k"), ("min_p", 1.5, "min_p"), ("min_tokens", 40, "min_tokens")],
)  # fmt: skip
def test_each_refused_field_is_a_400_naming_it(served, field, value, named):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, extra_body={field: value})
    assert named in caught.value.message


def test_chat_refusals_name_the_field(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": [image]}])
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="alpha", prompt=[10**9], max_tokens=2)


def test_models_retrieve(served):
    client, _ = served
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
