"""The completion routes of ``fanlora serve``: from an OpenAI request to its jobs, and back as its choices.

``POST /v1/completions`` takes a text, a list of texts, token ids or a list of token-id lists; with ``n`` each
prompt is sampled n times (sample i seeded with ``seed + i``, ``seed`` 0 when none is sent: repeatable — send
a seed for fresh samples); each (prompt, sample) is one :class:`fanlora.serving.jobs.Job` on the request's
adapter, all admitted together or none. ``echo`` puts the prompt first, with its logprobs when ``logprobs`` is
given (one forward over the prompt between two steps: :func:`fanlora.serving.logprobs.prompt_entries`), and
``max_tokens: 0`` then generates nothing — lm-evaluation-harness's log-likelihood route.
``POST /v1/chat/completions`` renders the messages with the chat template and runs one prompt the same way.
"""

from __future__ import annotations

import asyncio
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from fanlora.data.instruct import render
from fanlora.generate import Decoding, prompt_ids
from fanlora.serving.answers import Answer, Choice, stream_answer, whole_answer
from fanlora.serving.api import ApiError, ChatMessage, ChatRequest, CompletionRequest, Limits, SamplingRequest
from fanlora.serving.engine import Engine
from fanlora.serving.jobs import Closing, Job, QueueFull
from fanlora.serving.logprobs import prompt_entries
from fanlora.serving.tenants import Tenants

SAMPLING_EPS = 1e-5  # as vLLM: a smaller temperature is greedy (logits / 1e-40 overflow to inf)


def _decoding(req: SamplingRequest, sample: int = 0) -> Decoding:
    """How to decode sample ``sample`` of ``n``: with a seed (0 when none is sent), sample i uses seed + i."""
    if req.num_beams > 1:
        return Decoding("beam", num_beams=req.num_beams)
    if req.temperature < SAMPLING_EPS:
        return Decoding("greedy")
    seed = ((req.seed or 0) + sample) % 2**63
    return Decoding("sampling", temperature=req.temperature, top_p=req.top_p, seed=seed)


FULL = "at capacity (request queue full): retry later"


class Completions:
    """What the two completion routes share: the checks, the pins, the jobs and their admission."""

    def __init__(self, tenants: Tenants, limits: Limits) -> None:
        self.tenants, self.limits = tenants, limits
        self.engine, self.scheduler = tenants.engine, tenants.scheduler
        self.context = getattr(self.engine.model.config, "max_position_embeddings", 2048)

    def check(self, req: SamplingRequest, ids: list[int]) -> None:
        limits, context = self.limits, self.context
        if not ids:
            raise ApiError(400, "the prompt is empty: send at least one token of text")
        if req.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {req.max_tokens} is over this server's limit of {limits.max_tokens}")
        if len(ids) + req.max_tokens > context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                f"limit of {context} tokens",
            )
        kv = getattr(self.scheduler, "max_positions", None)
        if kv is not None and len(ids) + req.max_tokens > kv:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) would need more KV cache than this "
                f"server's --kv-cache-mb holds ({kv} positions): send a shorter prompt or fewer max_tokens",
            )
        if req.num_beams > 1 and req.stream:
            raise ApiError(400, "beam search cannot stream: drop stream or num_beams")
        if req.num_beams > 1 and req.ignore_eos:
            raise ApiError(400, "ignore_eos is not supported with beam search: drop ignore_eos or num_beams")

    async def run(self, req: SamplingRequest, prompts: list[list[int]], chat: bool, request: Request, echo: list[str]):
        """Check, pin one slot per job, build the choices, admit every job (or none), answer."""
        if self.scheduler.closed:
            raise ApiError(503, "the server is shutting down: retry on another replica", "server_error")
        for ids in prompts:
            self.check(req, ids)
        count = len(prompts) * req.n
        if count > self.limits.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts × n {req.n} is more than this server's --max-queue")
        adapter, slot = await asyncio.to_thread(self.tenants.admit, req.model)
        pins = [slot] + [self.engine.table.pin(slot) for _ in range(count - 1)]  # one per job, released by its job
        try:
            choices = await self.choices(req, prompts, echo, adapter, slot)
        except BaseException:
            for pinned in pins:
                self.engine.table.release(pinned)
            raise
        for pinned in pins[sum(c.job is not None for c in choices) :]:  # choices with no job (max_tokens 0)
            self.engine.table.release(pinned)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        answer = Answer(rid, req.model, chat, self.engine.tokenizer, req.logprob_count() is not None,
                        sum(map(len, prompts)), include_usage)  # fmt: skip
        self.submit([c.job for c in choices if c.job is not None])
        if req.stream:
            return StreamingResponse(stream_answer(choices, answer), media_type="text/event-stream")
        return await whole_answer(choices, answer, request)

    async def choices(self, req: SamplingRequest, prompts: list[list[int]], echo: list[str], adapter: str | None,
                      slot: int) -> list[Choice]:  # fmt: skip
        """One choice per prompt and sample: its job on ``slot`` (none at max_tokens 0), for echo the prompt's text
        and (with logprobs) its entries, computed by one forward per prompt between two steps."""
        loop, k, stop, extras = asyncio.get_running_loop(), req.logprob_count(), list(req.stop or []), req.extras()
        choices = []
        for p, ids in enumerate(prompts):
            entries = []
            if echo and k is not None:
                run = lambda ids=ids: prompt_entries(self.engine, ids, slot, k)  # noqa: E731
                entries = await asyncio.to_thread(self.scheduler.on_engine, run)
            for i in range(req.n):
                job = None
                if req.max_tokens:
                    job = Job(ids, adapter, _decoding(req, i), req.max_tokens, stop, loop, slot=slot,
                              ignore_eos=req.ignore_eos, extras=extras)  # fmt: skip
                choices.append(Choice(p * req.n + i, job, echo[p] if echo else "", entries))
        return choices

    def submit(self, jobs: list[Job]) -> None:
        """Admit every job of a request, or none: on a refusal the admitted ones are cancelled (503)."""
        for i, job in enumerate(jobs):
            try:
                self.scheduler.submit(job)  # a refused job's pin is released by submit
            except QueueFull as exc:
                for admitted in jobs[:i]:
                    admitted.cancelled = True
                for later in jobs[i + 1 :]:
                    self.engine.table.release(later.slot)
                why = "shutting down: retry on another replica" if isinstance(exc, Closing) else FULL
                raise ApiError(503, f"the server is {why}", "server_error") from None


def install_completion_routes(app: FastAPI, tenants: Tenants, limits: Limits) -> None:
    routes, engine = Completions(tenants, limits), tenants.engine

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts, texts = await asyncio.to_thread(_prompt_ids, engine, req.prompt)
        return await routes.run(req, prompts, False, request, texts if req.echo else [])

    def chat_ids(messages: list[ChatMessage]) -> list[int]:
        text = render(engine.tokenizer, [m.rendered() for m in messages], generation_prompt=True)
        return prompt_ids(engine.tokenizer, text)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await routes.run(req, [await asyncio.to_thread(chat_ids, req.messages)], True, request, [])


def _prompt_ids(engine: Engine, prompts: list[str] | list[list[int]]) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids (text tokenised as ``fanlora evaluate`` does, ids checked against the vocabulary)
    and its text (token ids decoded)."""
    vocab = engine.model.get_input_embeddings().num_embeddings
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            ids.append(prompt_ids(engine.tokenizer, p))
            texts.append(p)
        elif max(p) >= vocab:
            raise ApiError(400, f"token id {max(p)} is outside this model's vocabulary of {vocab}")
        else:
            ids.append(list(p))
            texts.append(engine.tokenizer.decode(p))
    return ids, texts
