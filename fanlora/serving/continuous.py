"""Iteration-level ("continuous") batching: rows join and leave the running batch at every decoding step.

One worker thread owns the model. Each iteration it (1) drops the rows that finished, were cancelled or hit
their ``max_tokens``, (2) admits waiting requests up to ``max_batch`` rows (a prompt whose first blocks are in
the prefix cache starts after them), and (3) runs **one packed forward** of at most ``max_batched_tokens``
tokens: every decoding row's next token, then prompt tokens of the rows still prefilling, shared max-min fairly
across tenants and then prompts (:mod:`fanlora.serving.fairness`: a long prompt takes several iterations, the
decoding rows advance between its chunks, and one tenant's burst never holds another's first token), flattened
into one sequence without padding. Each row then samples on its own adapter slot, temperature, top-p, seed and
stop conditions; a prompt's first token is sampled in the iteration that completes it.

The KV lives in :class:`fanlora.serving.paged.PagedKV`: blocks of one pool per layer, a 4-D mask that lets each
token see only its own row's earlier positions, and position ids per token — so a row decodes exactly as it
would alone, and joining or leaving rows copy no cache. Packing the prefill into the decoding step was measured
first (``benchmarks/packed_prefill.py``: one paged forward of 8 decoding tokens and a 64-token chunk is 1.15×
faster than the two forwards it replaces; the bound for one forward of the same positions is 1.36×).

Why not ``transformers``' ``ContinuousBatchingManager`` (``generate_batch``, paged ``sdpa_paged`` cache): it
runs on this CPU, but (a) it runs the model in its own thread from its own batch layout, so the engine's adapter
routing — which must travel with each step's rows — never reaches it (measured: adapter requests came back
with the bare backbone's text), (b) it samples every row from one global random stream, so a seeded request's
text would depend on which requests shared its steps, and (c) it has no per-request stop strings or
cancellation hooks. This loop is small and keeps all three: routing is set in the worker thread right before
each forward; every sampling request has its own ``torch.Generator`` seeded from its ``seed``; sampling uses
HF's own ``TemperatureLogitsWarper`` / ``TopPLogitsWarper``.

Adapter routing is per token: a packed forward's tokens carry the slot of the row they belong to, packed
grouped by slot, so a prefill chunk's long run takes its own adapter's update alone and the decoding rows' short
runs one stacked, masked product (:mod:`fanlora.serving.multilora`); slot 0, the bare backbone, adds nothing.

Beam search keeps the batch path (:func:`fanlora.serving.scheduler.run_batch`): a beam request runs whole,
between two iterations, and the decoding rows wait for it.
"""

from __future__ import annotations

import queue
import traceback
from dataclasses import dataclass

import torch

from fanlora.serving import fairness
from fanlora.serving.engine import Engine
from fanlora.serving.flags import DEFAULTS
from fanlora.serving.jobs import Admission, Job, QueueFull, flush
from fanlora.serving.paged import INITIAL_BLOCKS, PagedKV, give_back_memory
from fanlora.serving.prefix import PrefixCache
from fanlora.serving.sampling import ROW_FAILED, generator_for, pick, take
from fanlora.serving.scheduler import run_batch

__all__ = ["ContinuousScheduler", "QueueFull"]


@dataclass(eq=False)  # a row is its own key in the KV pool
class _Row:
    job: Job
    length: int = 0  # tokens in the KV pool: the next token's position
    token: int = -1  # the last sampled token, fed at the next step
    generator: torch.Generator | None = None
    replay: list[int] | None = None  # after a preemption: prompt + tokens fed so far, recomputed before decoding

    @property
    def context(self) -> list[int]:
        """The tokens that must be in the KV pool before this row (re)starts decoding."""
        return self.job.prompt_ids if self.replay is None else self.replay

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.context)


class ContinuousScheduler(Admission):
    """The server's default scheduler; the surface of :class:`fanlora.serving.jobs.Scheduler`."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int = DEFAULTS["max_queue"],
        max_batch: int = DEFAULTS["max_batch"],
        max_batched_tokens: int = DEFAULTS["max_batched_tokens"],
        start: bool = True,
        prefix_cache_mb: float = DEFAULTS["prefix_cache_mb"],
        kv_blocks: int | None = None,
    ) -> None:
        """``start=False`` leaves the worker thread unstarted: the caller runs :meth:`iterate` itself (tests).
        ``prefix_cache_mb`` > 0 keeps prompt-prefix KV per adapter load (:mod:`fanlora.serving.prefix`).
        ``kv_blocks`` bounds the paged pool (None: unbounded); see :meth:`_make_room`."""
        if max_queue < 1 or max_batch < 1 or max_batched_tokens <= max_batch or prefix_cache_mb < 0:
            raise ValueError(
                f"max_queue ({max_queue}), max_batch ({max_batch}) must be ≥ 1, max_batched_tokens "
                f"({max_batched_tokens}) > max_batch, prefix_cache_mb ≥ 0"
            )
        self._admission(engine, max_queue)
        self.max_batch, self.max_batched_tokens = max_batch, max_batched_tokens
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.kv_blocks = kv_blocks
        self.kv = self._pool()
        #: the most positions one request may hold (prompt + max_tokens): more could never fit (400)
        self.max_positions = kv_blocks * self.kv.block if kv_blocks else None
        self.paused: list[_Row] = []  # decoding rows preempted for KV space: they rejoin first, recomputed
        self.rows: list[_Row] = []  # prefilling or decoding, in arrival order
        self.new: list[Job] = []  # taken from the queue, waiting for a row
        self.peak_rows = 0  # the most rows in one forward
        self.positions = 0  # token positions computed, summed over forwards
        self.preempted = 0  # rows given back to the waiting list: for a tenant holding no row, or for KV space
        self.device = next(engine.model.parameters()).device
        if start:
            self.thread.start()

    @property
    def current(self) -> list[Job]:
        return [r.job for r in self.rows]

    # --- the loop ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while self.running:
            if not self.rows and not self.new:  # nothing to do: wait for a request (bounded, so stop() is seen)
                try:
                    job = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if job is not None:
                    self.new.append(job)
            try:
                with self.lock:
                    self._tick()
                    self._run_calls()
                    self.iterate()
            except Exception:  # the worker survives; every row and waiting prompt gets the error
                traceback.print_exc()  # the operator's log has the details; clients get no internals
                self._fail("internal error in a decoding step (the server's log has the details): retry")

    def iterate(self) -> None:
        """One iteration: drop finished rows, admit, one packed forward."""
        self._drop()
        self._admit()
        self._join()
        self._step()
        self._drop()

    def _admit(self) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.new.append(job)
        keep = []
        for job in self.new:
            if job.cancelled:  # its client left while it waited: never decoded
                self._dequeued(job)
                job.emit("done", "cancelled")
                self._finish(job)
            elif job.decoding.strategy == "beam":  # the batch path, whole, between two steps
                self._dequeued(job)
                try:
                    run_batch(self.engine, [job])
                except Exception as exc:
                    job.emit("error", f"{type(exc).__name__}: {exc}")
                self._finish(job)
            else:
                keep.append(job)
        self.new = keep

    def _join(self) -> None:
        """Give waiting jobs rows up to ``max_batch`` — preempted rows first, then the tenant holding fewest rows;
        when all are taken, a tenant holding none may preempt another's prompt (:mod:`~fanlora.serving.fairness`);
        nothing joins whose prompt's KV blocks do not fit beside what the prefilling rows still need. A cached
        prefix goes into the pool."""
        if self.prefix is not None and self.new:
            self.prefix.drop(self.engine.table.live_keys())
        while self.paused and len(self.rows) < self.max_batch and self._fits(self.paused[0].context):
            self.rows.append(self.paused.pop(0))
            self._dequeued(self.rows[-1].job)
        while self.new and not self.paused:
            held: dict[int, int] = {}
            for r in self.rows:
                held[r.job.slot] = held.get(r.job.slot, 0) + 1
            i = fairness.next_to_join([j.slot for j in self.new], held)
            job = self.new[i]
            if len(self.rows) >= self.max_batch:
                prefilling = [r for r in self.rows if r.prefilling]
                gone = fairness.victim(prefilling, {r: r.job.slot for r in prefilling}, held, job.slot)
                if gone is None:
                    break
                self._preempt(gone)  # its job goes back to the front of the waiting list
                i += 1
            if not self._fits(job.prompt_ids):
                break
            del self.new[i]
            self._dequeued(job)
            row = _Row(job, generator=generator_for(job))
            if self.prefix is not None:
                n, keys, values = self.prefix.lookup(self.engine.table.key(job.slot), job.prompt_ids)
                if n:
                    self.kv.put(row, keys, values)
                    row.length = n
            self.rows.append(row)

    def _segments(self) -> list[tuple[_Row, int, list[int]]]:
        """This forward's (row, position of its first new token, new tokens): every decoding row's last token,
        then the rest of ``max_batched_tokens`` as prompt tokens, water-filled across tenants and their prompts;
        packed grouped by adapter slot (a stable sort), so each adapter's update runs once over its tokens."""
        out = [(r, r.length, [r.token]) for r in self.rows if not r.prefilling]
        prefilling = [r for r in self.rows if r.prefilling]
        need = {r: len(r.context) - r.length for r in prefilling}
        tenant = {r: r.job.slot for r in prefilling}
        shares = fairness.fair_shares(prefilling, tenant, need, self.max_batched_tokens - len(out))
        for row in prefilling:
            if shares[row]:
                out.append((row, row.length, row.context[row.length : row.length + shares[row]]))
        return sorted(out, key=lambda segment: segment[0].job.slot)

    def _fits(self, context: list[int]) -> bool:
        """Whether a row holding ``context`` (+ one token) fits beside the blocks the prefilling rows still need."""
        if self.kv_blocks is None:
            return True
        owed = sum(self.kv.missing(r, len(r.context) + 1) for r in self.rows if r.prefilling)
        return self.kv.blocks_for(len(context) + 1) <= self.kv.available() - owed

    def _make_room(self) -> list[tuple[_Row, int, list[int]]]:
        """This forward's segments, after preempting the newest rows until their KV blocks fit the bound (a
        request that could never fit alone was refused at admission, so the oldest row always fits)."""
        segments = self._segments()
        while len(self.rows) > 1 and sum(self.kv.missing(r, p + len(n)) for r, p, n in segments) > self.kv.available():
            self._preempt(self.rows[-1])
            segments = self._segments()
        return segments

    def _step(self) -> None:
        segments = self._make_room()
        if not segments:
            return
        mask = self.kv.plan([(row, past, len(new)) for row, past, new in segments])
        ids = torch.tensor([[t for _, _, new in segments for t in new]])
        positions = torch.cat([torch.arange(past, past + len(new)) for _, past, new in segments])[None]
        slots = [row.job.slot for row, _, new in segments for _ in new]
        ends = torch.tensor([len(new) for _, _, new in segments]).cumsum(0) - 1
        done = [i for i, (row, past, new) in enumerate(segments) if past + len(new) >= len(row.context)]
        replayed = [segments[i][0] for i in done if segments[i][0].replay is not None]
        sampled = [i for i in done if segments[i][0].replay is None]  # a replayed row has its next token
        logits = self._forward(ids, mask, positions, slots, ends[sampled])
        self.batches += 1
        self.positions += ids.shape[1]
        if self.metrics is not None:
            self.metrics.forward(ids.shape[1])
        self.peak_rows = max(self.peak_rows, len(segments))
        completed = [row for row, past, _ in (segments[i] for i in sampled) if past < len(row.job.prompt_ids)]
        for row, past, new in segments:
            row.length = past + len(new)
        for row in replayed:
            row.replay = None
        if self.prefix is not None:  # prompts completed in this forward: their whole blocks to the prefix cache
            for row in completed:
                self._store(row)
        rows = [segments[i][0] for i in sampled]
        tok = self.engine.tokenizer
        for row, picked in zip(rows, pick(logits, rows, tok.eos_token_id), strict=True):
            row.token = 0 if picked is None else picked[0]  # a failed row is dropped before it feeds again
            take(row.job, picked, tok)

    def _store(self, row: _Row) -> None:
        prompt, block = row.job.prompt_ids, self.prefix.block
        whole = len(prompt) // block * block
        key = self.engine.table.key(row.job.slot)
        if whole and self.prefix.peek(key, [*prompt, 0]) < whole:  # (peek leaves one token to prefill)
            keys, values = self.kv.get(row, whole)
            self.prefix.store(key, prompt, keys, values, 0)

    @torch.no_grad()
    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, slots: list[int], keep: torch.Tensor
    ) -> torch.Tensor:
        """Logits [len(keep), vocab] at the packed positions ``keep``, every token on its row's slot."""
        self.engine.use_slots(slots)
        dev = self.device
        out = self.engine.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            cache=self.kv,
            use_cache=True,
            logits_to_keep=keep.to(dev),
        )
        return out.logits[0].float().cpu()

    def abort_all(self, reason: str = "abort") -> None:
        """End every admitted job now (a drain ran out of time): each gets what it decoded and ``reason``."""
        with self.lock:  # between two iterations: every admitted job is taken out and ended here
            jobs = [r.job for r in self.rows]
            waiting = list(self.new)
            while True:
                try:
                    waiting.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            waiting = [job for job in waiting if job is not None]
            self.rows, self.new, self.kv = [], [], self._pool()
            waiting += [r.job for r in self.paused]
            self.paused = []
            tok = self.engine.tokenizer
            for job in waiting:
                self._dequeued(job)
            for job in jobs + waiting:
                if job.finished != ROW_FAILED:
                    job.finished = job.finished or reason
                    flush(job, tok)
                self._finish(job)

    def busy(self) -> bool:
        return self.waiting > 0 or bool(self.rows) or bool(self.new)

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def _drop(self) -> None:
        gone = [r for r in self.rows if r.job.finished or r.job.cancelled]
        if not gone:
            return
        tok = self.engine.tokenizer
        for row in gone:
            job = row.job
            if job.cancelled and not job.finished:
                job.emit("done", "cancelled")
            elif job.finished != ROW_FAILED:
                flush(job, tok)
            self._finish(job)
            self.kv.release(row)
        self.rows = [r for r in self.rows if r not in gone]
        if not self.rows and not self.paused and self.kv.capacity > INITIAL_BLOCKS:  # idle: the memory goes back
            self.kv = self._pool()
            give_back_memory()

    def _pool(self) -> PagedKV:
        return PagedKV(max_blocks=self.kv_blocks)

    def _preempt(self, row: _Row) -> None:
        """Take ``row`` out and recompute it later. A prompt that has sampled nothing goes back to the front of
        the waiting list as a job; a decoding row waits whole (its sampler and tokens kept) and, when it rejoins,
        what it had fed is prefilled again before it decodes on — so no answer changes."""
        self.kv.release(row)
        self.rows.remove(row)
        if row.prefilling and row.replay is None:
            self.new.insert(0, row.job)
        else:  # a row preempted again while it is replaying keeps the whole context it must recompute
            if row.replay is None:
                row.replay = (row.job.prompt_ids + row.job.tokens)[: row.length]
            row.length = 0
            self.paused.insert(0, row)
        self._queued(row.job)
        self.preempted += 1

    def _fail(self, message: str) -> None:
        jobs = [r.job for r in self.rows]
        jobs += [r.job for r in self.paused]
        self.rows, self.paused, self.kv = [], [], self._pool()
        for job in jobs:
            job.emit("error", message)
            self._finish(job)
