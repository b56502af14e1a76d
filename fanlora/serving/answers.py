"""How the jobs of one request become OpenAI's response: a whole answer, or one server-sent-event stream.

A request may have several choices — ``n`` samples of each prompt of a list, index ``prompt × n + sample`` as
vLLM numbers them — each its own :class:`fanlora.serving.jobs.Job`; a choice may start with its prompt
(``echo``, with the prompt's logprobs when asked) and, at ``max_tokens: 0``, have no job at all. Streams of
several choices are merged as they come, each chunk naming its choice's index.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from fanlora.serving.api import ApiError, error
from fanlora.serving.jobs import Job
from fanlora.serving.logprobs import Entry, chat_logprobs, completion_logprobs


@dataclass
class Choice:
    index: int
    job: Job | None  # None: nothing to generate (echo with max_tokens 0)
    echo: str = ""  # the prompt's text, sent first (echo)
    echo_entries: list[Entry] = field(default_factory=list)  # the prompt's logprobs (echo with logprobs)


@dataclass
class Answer:
    """What every choice of one response shares."""

    rid: str
    model: str
    chat: bool
    tokenizer: Any
    logprobs: bool  # whether the request asked for them (each choice then carries its own)
    prompt_tokens: int  # summed over the request's prompts (not over n, as OpenAI counts)
    include_usage: bool = False  # streams: one more chunk with the usage and no choices (stream_options)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def envelope(self, choices: list[dict], obj: str | None = None) -> dict[str, Any]:
        return {"id": self.rid, "object": obj or self.object, "created": int(time.time()), "model": self.model,
                "choices": choices}  # fmt: skip

    def usage(self, choices: list[Choice]) -> dict[str, int]:
        done = sum(len(c.job.tokens) for c in choices if c.job is not None)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def logprobs_of(self, entries: list[Entry], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries, self.tokenizer)
        return completion_logprobs(entries, self.tokenizer, offset)


async def collect(job: Job) -> tuple[str, str, list[Entry]]:
    """A job's whole text, finish reason and logprobs entries."""
    parts, entries = [], []
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            parts.append(value)
        elif kind == "logprobs":
            entries.append(value)
        elif kind == "error":
            raise ApiError(500, value, "server_error")
        else:
            return "".join(parts), value, entries


async def _gone(request: Request) -> None:
    """Returns when the (non-streaming) client goes away: after the body the next message is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def whole_answer(choices: list[Choice], answer: Answer, request: Request) -> dict[str, Any] | JSONResponse:
    """The whole answer — or, when the client leaves first, nothing: its jobs are cancelled and this handler ends
    at once instead of waiting for events that a dropped job never sends."""
    jobs = [c.job for c in choices if c.job is not None]
    watcher = asyncio.create_task(_gone(request))
    collected = asyncio.gather(*(collect(job) for job in jobs))
    try:
        await asyncio.wait({watcher, collected}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        for job in jobs:
            job.cancelled = True
        raise
    finally:
        watcher.cancel()
    if not collected.done():
        collected.cancel()
        for job in jobs:
            job.cancelled = True
        return error(499, "client closed the request", "client_closed")  # nobody reads it
    results = iter(collected.result())  # an error in any job raises here: the handler answers it
    body = []
    for c in choices:
        text, reason, entries = next(results) if c.job is not None else ("", "length", [])
        out: dict[str, Any] = {"index": c.index, "finish_reason": reason}
        logprobs = answer.logprobs_of(c.echo_entries + entries, 0)
        if answer.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = c.echo + text
        out["logprobs"] = logprobs
        body.append(out)
    return {**answer.envelope(body), "usage": answer.usage(choices)}


def _chunk(answer: Answer, c: Choice, text: str, reason: str | None, logprobs: Any, first: bool = False) -> str:
    if answer.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": c.index, "delta": delta, "finish_reason": reason}
    else:
        choice = {"index": c.index, "text": text, "finish_reason": reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    obj = "chat.completion.chunk" if answer.chat else "text_completion"
    return f"data: {json.dumps(answer.envelope([choice], obj))}\n\n"


async def _events(jobs: dict[int, Job]) -> Any:
    """Every job's events as they come, as (choice index, kind, value), until each has finished."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        while True:
            kind, value = await job.events.get()
            await merged.put((index, kind, value))
            if kind in ("done", "error"):
                return

    tasks = [asyncio.create_task(pump(i, job)) for i, job in jobs.items()]
    running = len(tasks)
    try:
        while running:
            index, kind, value = await merged.get()
            running -= kind in ("done", "error")
            yield index, kind, value
    finally:
        for task in tasks:
            task.cancel()


async def stream_answer(choices: list[Choice], answer: Answer):
    """Server-sent events as OpenAI's: per choice a first chunk (chat: the role; echo: the prompt), a chunk per
    text delta carrying the logprobs of the tokens since the last one, a last chunk with the finish reason; with
    ``include_usage`` a chunk with the usage and no choices before [DONE]."""
    by_index = {c.index: c for c in choices}
    offset = {c.index: 0 for c in choices}  # completions' text_offset: characters sent so far per choice
    pending: dict[int, list[Entry]] = {c.index: [] for c in choices}

    def send(c: Choice, text: str, reason: str | None, entries: list[Entry], first: bool = False) -> str:
        logprobs = answer.logprobs_of(entries, offset[c.index]) if entries or (first and answer.logprobs) else None
        offset[c.index] += len(text)
        return _chunk(answer, c, text, reason, logprobs, first)

    try:
        for c in choices:
            if answer.chat or c.echo:
                yield send(c, c.echo, None, c.echo_entries, first=True)
            if c.job is None:
                yield send(c, "", "length", [])
        async for index, kind, value in _events({c.index: c.job for c in choices if c.job is not None}):
            c = by_index[index]
            if kind == "logprobs":
                pending[index].append(value)
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error', 'code': 500}})}\n\n"
                break
            else:
                entries, pending[index] = pending[index], []
                yield send(c, value, None, entries) if kind == "text" else send(c, "", value, entries)
        if answer.include_usage:
            last = answer.envelope([], "chat.completion.chunk" if answer.chat else None)
            yield f"data: {json.dumps({**last, 'usage': answer.usage(choices)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): its rows stop at the next decoding step
        for c in choices:
            if c.job is not None:
                c.job.cancelled = True
