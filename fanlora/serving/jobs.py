"""Requests as the schedulers see them, and what every scheduler does the same way.

A :class:`Job` is one request: its prompt ids, adapter slot (pinned at admission), decoding settings and the
events it sends back to its HTTP handler. :class:`Admission` is the part the batch scheduler
(:mod:`fanlora.serving.scheduler`) and the continuous one (:mod:`fanlora.serving.continuous`) share: bounded
admission (503 past ``--max-queue``), a drain that admits nothing more, the engine thread's calls (adapter loads
run between two steps) and the release of every finished job's pin. :class:`Scheduler` is the surface the
server and the tenants use, whichever scheduler runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fanlora.generate import Decoding, cut
from fanlora.serving.engine import Engine
from fanlora.serving.flags import DEFAULTS


class QueueFull(Exception):
    """The bounded queue is full: the server answers 503."""


class Closing(QueueFull):
    """The server is draining for shutdown: it admits nothing more (503)."""


@dataclass(frozen=True)
class Extras:
    """What a request asks beyond :class:`fanlora.generate.Decoding` (the defaults ask for nothing)."""

    top_k: int = 0  # vLLM's: keep the k most likely tokens (0: all)
    min_p: float = 0.0  # vLLM's: drop tokens below min_p × the most likely one's probability
    repetition_penalty: float = 1.0  # vLLM's (HF's): divide the logits of prompt and output tokens (>1: fewer)
    presence_penalty: float = 0.0  # OpenAI's: minus this from the logit of every token already output
    frequency_penalty: float = 0.0  # OpenAI's: minus this × how often each token was output
    min_tokens: int = 0  # vLLM's: no EOS and no stop string before this many tokens
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives

    @property
    def shapes(self) -> bool:
        """Whether a greedy row's scores change (the penalties and min_tokens do; the warpers do not)."""
        return self.repetition_penalty != 1.0 or bool(
            self.presence_penalty or self.frequency_penalty or self.min_tokens
        )


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None
    decoding: Decoding
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(
        default_factory=asyncio.Queue
    )  # ("logprobs", Entry), ("text", delta) … ("done", reason) | ("error", msg)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: str | None = None  # "stop" | "length" once the row is done
    cancelled: bool = False  # the client went away
    started: float = field(default_factory=time.monotonic)
    slot: int = 0  # the engine slot pinned for this job at admission (0: the bare backbone)
    ignore_eos: bool = False  # EOS does not end the job: it decodes max_tokens tokens (or up to a stop string)
    first_token: float | None = None  # monotonic time of its first token (time to first token, /metrics)
    extras: Extras = field(default_factory=lambda: Extras())  # penalties, filters, logprobs (sampling.chain)

    def key(self) -> tuple:
        d = self.decoding
        return (
            d.strategy,
            d.temperature,
            d.top_p,
            d.num_beams,
            d.seed if d.strategy == "sampling" else 0,
            self.ignore_eos,  # one generate() call stops rows at EOS for all its rows or for none
            self.extras,  # one generate() call runs one processor chain
        )

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def accept(job: Job, token: int, tokenizer: Any, eos: int | None) -> None:
    """One new token for ``job``: end it at EOS, a stop string or ``max_tokens``; send its text delta.

    Both schedulers call this for every decoded token, so a request's stream is the same whichever runs it.
    """
    if job.finished or job.cancelled:
        return
    early = len(job.tokens) < job.extras.min_tokens  # EOS is masked then (sampling.chain); stop strings wait too
    if token == eos and not job.ignore_eos and not early:
        job.finished = "stop"
        return
    job.tokens.append(token)
    if job.first_token is None:
        job.first_token = time.monotonic()
    text = tokenizer.decode(job.tokens, skip_special_tokens=True)
    if job.stop and len(job.tokens) >= job.extras.min_tokens and any(s in text for s in job.stop):
        text, job.finished = cut(text, job.stop), "stop"
    elif len(job.tokens) >= job.max_tokens:
        job.finished = "length"
    if text.endswith("\ufffd") and not job.finished:  # half of a multi-byte character: wait
        return
    if len(text) > len(job.sent):
        job.emit("text", text[len(job.sent) :])
        job.sent = text


def flush(job: Job, tokenizer: Any) -> None:
    """Send what the stream held back (half a multi-byte character at the end), then the finish reason."""
    full = cut(tokenizer.decode(job.tokens, skip_special_tokens=True), job.stop)
    if len(full) > len(job.sent):
        job.emit("text", full[len(job.sent) :])
        job.sent = full
    job.emit("done", job.finished or ("length" if len(job.tokens) >= job.max_tokens else "stop"))


T = TypeVar("T")


class Admission:
    """What both schedulers share: the bounded admission of pinned jobs, their release once done, and the
    engine thread's calls.

    A subclass calls :meth:`_admission` first in its ``__init__`` (the state is declared there), gives its worker
    ``_work``, runs :meth:`_run_calls` under ``lock`` between two steps and skips the ``None`` that
    :meth:`on_engine` puts in ``queue`` to wake it.
    """

    closed = False  # set by close(): nothing more is admitted
    metrics: Any = None  # a fanlora.serving.metrics.ServerMetrics, told of every finished job and forward
    abort_reason: str | None = None  # set by abort_all(): every job still admitted ends with this reason
    team: Any = None  # a fanlora.serving.team.AdaptiveTeam (serve --threads auto): ticked between two steps

    def _admission(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.queue: queue.Queue[Job | None] = queue.Queue()  # None: a wake-up for a call
        self.calls: queue.Queue = queue.Queue()  # (fn, future): work for the engine thread (on_engine)
        self.lock = threading.Lock()  # held for a step: adapter loads and forwards never overlap
        self._since: dict[int, float] = {}  # id of each job admitted, not yet decoding (≤ max_queue) → since when
        self._count = threading.Lock()  # guards _since and closed
        self.wait_limit = DEFAULTS[
            "overload_seconds"
        ]  # a job that waits longer for a row counts as late; /ready says overloaded
        self.late = 0  # jobs that waited longer than wait_limit before they got a row
        self.running = True
        self.batches = 0  # forwards (continuous) or generate calls (batch) run
        self.cancelled = 0  # jobs whose client left before they finished
        self.thread = threading.Thread(target=self._work, name="fanlora-engine", daemon=True)

    def _work(self) -> None:
        raise NotImplementedError

    def submit(self, job: Job) -> None:
        """Admit ``job`` (its slot already pinned) or raise QueueFull; a refused job's pin is released."""
        with self._count:
            closed = self.closed
            full = len(self._since) >= self.max_queue
            if not full and not closed:
                self._since[id(job)] = job.started
        if closed or full:
            self.engine.table.release(job.slot)
            raise Closing if closed else QueueFull
        self.queue.put_nowait(job)

    @property
    def waiting(self) -> int:
        """Jobs admitted and not yet decoding (preempted ones again included)."""
        return len(self._since)

    def _queued(self, job: Job) -> None:
        """``job`` waits for a row again (preempted)."""
        with self._count:
            self._since[id(job)] = time.monotonic()

    def _dequeued(self, job: Job) -> None:
        """``job`` got a row (or ended before it did); one that waited past ``wait_limit`` is counted late."""
        with self._count:
            since = self._since.pop(id(job), None)
        if since is not None and time.monotonic() - since > self.wait_limit:
            self.late += 1

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting admitted job has waited for a row (0: none waits). Never takes ``lock``."""
        with self._count:
            oldest = min(self._since.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def stop(self) -> None:
        self.running = False

    def on_engine(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (an adapter load or unload) on the engine's thread between two steps; its result or its
        exception come back here. Without a running worker (tests drive ``iterate`` themselves) it runs here,
        under ``lock``.

        Why not under ``lock`` in the caller's thread, as before: every thread that runs a multi-threaded torch
        op keeps an OpenMP team of its own; with more of them than CPUs a forward's hundreds of small parallel
        regions get slower (likely libgomp's throttled spinning: it stops spinning once it manages more threads
        than CPUs, so each region waits for a wake-up). Measured (2 cores, 8 clients, four adapters on the AB
        setting; docs/measured.md, "One thread for torch"): with the backbone set up on the main thread and
        adapter loads on a worker thread, a decoding forward took 134 ms on base and 8 % more with the adapters;
        with no torch team but the engine thread's, 91 ms and 1 % more."""
        if threading.current_thread() is self.thread:
            return fn()  # already between two steps, holding the lock
        if not self.thread.is_alive():
            with self.lock:
                return fn()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.calls.put((fn, done))
        self.queue.put_nowait(None)  # wakes a worker waiting for a job
        while True:
            try:
                return done.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if not self.thread.is_alive() and done.cancel():  # the worker stopped before taking it
                    with self.lock:
                        return fn()

    def _tick(self) -> None:
        """Between two steps, on the engine thread: let the adaptive team look at the machine."""
        if self.team is not None:
            self.team.tick()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self.calls.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():  # its caller ran it itself (the worker had stopped)
                continue
            try:
                done.set_result(fn())
            except BaseException as exc:  # the caller gets it; the engine thread goes on
                done.set_exception(exc)

    def close(self) -> None:
        """Admit nothing more (a drain for shutdown has begun); admitted jobs go on."""
        with self._count:
            self.closed = True

    def busy(self) -> bool:
        """Whether any admitted job has not finished yet."""
        return self.waiting > 0 or bool(self.current)

    def _finish(self, job: Job) -> None:
        """Every admitted job passes here exactly once: its slot pin is released."""
        if job.cancelled:
            self.cancelled += 1
        self.engine.table.release(job.slot)
        if self.metrics is not None:
            self.metrics.finished(job, time.monotonic())


class Scheduler(Protocol):
    """What the server, the tenants and the drain ask of a scheduler (both schedulers are :class:`Admission`)."""

    engine: Engine
    closed: bool
    batches: int
    metrics: Any
    waiting: int
    wait_limit: float
    late: int

    def submit(self, job: Job) -> None: ...
    def on_engine(self, fn: Callable[[], T]) -> T: ...
    def close(self) -> None: ...
    def busy(self) -> bool: ...
    def oldest_wait(self) -> float: ...
    def abort_all(self, reason: str = "abort") -> None: ...
    def stop(self) -> None: ...
