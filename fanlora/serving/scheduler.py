"""Batches concurrent requests onto the engine: a bounded queue and one worker thread that owns the model.

Requests that can share a ``generate`` call (same sampling settings) are taken together, up to ``max_batch``,
each row on its own adapter. ``transformers`` does the decoding; two small hooks into it do the serving part:
a streamer that hands each row's new token to its request as it is produced, and a per-row stopping criterion
that ends a row at its own ``max_tokens``, at a stop string, or as soon as its client has gone (its slot in
the batch stops costing anything but padding, and a finished batch frees the worker for the next one).
Beam search cannot stream in HF; beam requests are answered whole.

``max_queue`` bounds every request admitted but not yet decoding — in the queue or held back because its
sampling settings differ from the running batch's — so a full server answers 503 instead of growing a list.
Each job carries the adapter slot it was admitted on (pinned in the engine), so unloading an adapter never
fails another tenant's row in the same batch, nor its own already-admitted requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from fanlora.generate import Decoding, cut
from fanlora.serving.engine import Engine


class QueueFull(Exception):
    """The bounded queue is full: the server answers 503."""


class Closing(QueueFull):
    """The server is draining for shutdown: it admits nothing more (503)."""


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None
    decoding: Decoding
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", delta) … ("done", reason) | ("error", msg)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: str | None = None  # "stop" | "length" once the row is done
    cancelled: bool = False  # the client went away
    started: float = field(default_factory=time.monotonic)
    slot: int = 0  # the engine slot pinned for this job at admission (0: the bare backbone)
    ignore_eos: bool = False  # EOS does not end the job: it decodes max_tokens tokens (or up to a stop string)
    first_token: float | None = None  # monotonic time of its first token (time to first token, /metrics)

    def key(self) -> tuple:
        d = self.decoding
        return (
            d.strategy,
            d.temperature,
            d.top_p,
            d.num_beams,
            d.seed if d.strategy == "sampling" else 0,
            self.ignore_eos,  # one generate() call stops rows at EOS for all its rows or for none
        )

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def accept(job: Job, token: int, tokenizer: Any, eos: int | None) -> None:
    """One new token for ``job``: end it at EOS, a stop string or ``max_tokens``; send its text delta.

    Both schedulers call this for every decoded token, so a request's stream is the same whichever runs it.
    """
    if job.finished or job.cancelled:
        return
    if token == eos and not job.ignore_eos:
        job.finished = "stop"
        return
    job.tokens.append(token)
    if job.first_token is None:
        job.first_token = time.monotonic()
    text = tokenizer.decode(job.tokens, skip_special_tokens=True)
    if job.stop and any(s in text for s in job.stop):
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


class _Streamer(BaseStreamer):
    """Receives each decoding step's tokens for the whole batch; forwards each row's text delta."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos: int | None) -> None:
        self.jobs, self.tok, self.eos, self.prompt_seen = jobs, tokenizer, eos, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.view(-1).tolist(), strict=True):
            accept(job, token, self.tok, self.eos)

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = [bool(j.finished or j.cancelled) for j in self.jobs]
        if input_ids.shape[0] != len(done):  # beams: each job's rows together
            per = input_ids.shape[0] // len(done)
            done = [d for d in done for _ in range(per)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


T = TypeVar("T")


class Admission:
    """What both schedulers share: the bounded admission of pinned jobs, their release once done, and the
    engine thread's calls.

    Subclasses set ``engine``, ``queue``, ``max_queue``, ``waiting``, ``_count``, ``running``, ``cancelled``,
    ``lock``, ``thread`` and ``calls``; their worker runs :meth:`_run_calls` under ``lock`` between two steps and
    skips the ``None`` that :meth:`on_engine` puts in ``queue`` to wake it.
    """

    closed = False  # set by close(): nothing more is admitted
    metrics: Any = None  # a fanlora.serving.metrics.ServerMetrics, told of every finished job and forward
    abort_reason: str | None = None  # set by abort_all(): every job still admitted ends with this reason

    def submit(self, job: Job) -> None:
        """Admit ``job`` (its slot already pinned) or raise QueueFull; a refused job's pin is released."""
        with self._count:
            closed = self.closed
            full = self.waiting >= self.max_queue
            if not full and not closed:
                self.waiting += 1
        if closed or full:
            self.engine.release(job.slot)
            raise Closing if closed else QueueFull
        self.queue.put_nowait(job)

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
        self.engine.release(job.slot)
        if self.metrics is not None:
            self.metrics.finished(job, time.monotonic())


class Scheduler(Admission):
    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int = 16) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue ({max_queue}) and max_batch ({max_batch}) must be ≥ 1")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.queue: queue.Queue[Job | None] = queue.Queue()  # None: a wake-up for a call
        self.calls: queue.Queue = queue.Queue()  # (fn, future): work for the engine thread (on_engine)
        self.lock = threading.Lock()  # adapter loads and batches never overlap
        self.held: list[Job] = []  # taken from the queue but not yet batchable with the current key
        self.waiting = 0  # admitted, not yet decoding: in the queue or held (bounded by max_queue)
        self._count = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="fanlora-engine", daemon=True)
        self.running = True
        self.batches = 0
        self.cancelled = 0  # jobs whose client left before they finished
        self.current: list[Job] = []  # the batch being decoded
        self.peak_rows = 0  # the most requests decoded together so far
        self.thread.start()

    def _take(self) -> list[Job]:
        first = self.held.pop(0) if self.held else self.queue.get()
        if first is None:  # a wake-up: the loop runs the engine calls
            return []
        batch = [first]
        beam = first.decoding.strategy == "beam"
        pool, self.held = self.held, []
        while True:
            try:
                pool.append(self.queue.get_nowait())
            except queue.Empty:
                break
        pool = [job for job in pool if job is not None]
        for job in pool:
            fits = not beam and len(batch) < self.max_batch and job.key() == first.key()
            (batch if fits else self.held).append(job)
        with self._count:
            self.waiting -= len(batch)
        for job in batch:
            if job.cancelled:  # its client left while it waited: never decoded
                job.emit("done", "cancelled")
                self._finish(job)
            elif self.abort_reason:  # the drain timed out before this job's turn
                job.finished = self.abort_reason
                job.emit("done", self.abort_reason)
                self._finish(job)
        return [j for j in batch if not j.cancelled and not j.finished]

    def abort_all(self, reason: str = "abort") -> None:
        """End every admitted job at its next step with what it has decoded and ``reason`` as finish reason."""
        self.abort_reason = reason
        for job in list(self.current):  # the running generate() stops them at its next step
            job.finished = job.finished or reason

    def _work(self) -> None:
        while self.running:
            jobs: list[Job] = []
            try:
                with self.lock:
                    self._run_calls()
                jobs = self._take()
                if jobs:
                    with self.lock:
                        self.current = jobs
                        self._run(jobs)
            except Exception:  # the worker survives; the batch's clients get the error, the log its details
                traceback.print_exc()
                for job in jobs:
                    job.emit("error", "internal error in a decoding step (the server's log has the details): retry")
            finally:
                self.current = []
                for job in jobs:
                    self._finish(job)

    def _run(self, jobs: list[Job]) -> None:
        self.peak_rows = max(self.peak_rows, len(jobs))
        run_batch(self.engine, jobs)
        self.batches += 1


def run_batch(engine: Engine, jobs: list[Job]) -> None:
    """Decode ``jobs`` together in one ``generate`` call, each row on its pinned slot, until every row is done.

    The batch scheduler's whole path; the continuous scheduler uses it for beam search, which HF cannot stream.
    """
    tok = engine.tokenizer
    first = jobs[0].decoding
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, j in enumerate(jobs):
        ids[row, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
        mask[row, width - len(j.prompt_ids) :] = 1
    engine.use_slots([j.slot for j in jobs])
    kwargs = first.generate_kwargs()
    if first.strategy == "sampling":
        torch.manual_seed(first.seed)
    beam = first.strategy == "beam"
    streamer = None if beam else _Streamer(jobs, tok, tok.eos_token_id)
    device = next(engine.model.parameters()).device
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(j.max_tokens for j in jobs),
            pad_token_id=pad,
            eos_token_id=None if jobs[0].ignore_eos else tok.eos_token_id,  # a batch shares it (Job.key)
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_RowsDone(jobs)]),
            **kwargs,
        )
    for row, j in enumerate(jobs):
        if beam:
            new = out[row, width:].tolist()
            new = [t for t in new if t not in (pad, tok.eos_token_id)][: j.max_tokens]
            text = tok.decode(new, skip_special_tokens=True)
            j.tokens = new
            j.finished = "length" if len(new) >= j.max_tokens else "stop"
            if j.stop and any(s in text for s in j.stop):
                text, j.finished = cut(text, j.stop), "stop"
            j.emit("text", text)
            j.sent = text
            j.emit("done", j.finished)
        else:
            flush(j, tok)
