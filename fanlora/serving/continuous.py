"""Iteration-level ("continuous") batching: rows join and leave the running batch at every decoding step.

One worker thread owns the model. Each iteration it (1) drops the rows that finished, were cancelled or hit
their ``max_tokens``, (2) admits waiting requests up to ``max_batch`` and prefills them — short prompts
together in one left-padded forward, a prompt longer than ``prefill_chunk`` tokens alone in chunks of that size,
one chunk per iteration, so the rows already decoding advance between its chunks — and (3) runs one decoding
step for every running row, each on its own adapter slot, temperature, top-p, seed and stop conditions.

The batch's KV cache is ``transformers``' ``DynamicCache`` with left padding: a joining row's cache is padded
on the left to the running length (or the running rows' to its) and concatenated along the batch; a leaving
row is removed with ``index_select``; columns that are padding in every row are trimmed. Each row's
``position_ids`` count only its real tokens, so a row decodes exactly as it would alone.

Why not ``transformers``' ``ContinuousBatchingManager`` (``generate_batch``, paged ``sdpa_paged`` cache): it
runs on this CPU, but (a) it runs the model in its own thread from its own batch layout, so the engine's adapter
routing — which must travel with each step's rows — never reaches it (measured: adapter requests came back
with the bare backbone's text), (b) it samples every row from one global random stream, so a seeded request's
text would depend on which requests shared its steps, and (c) it has no per-request stop strings or
cancellation hooks. This loop is small and keeps all three: routing is set in the worker thread right before
each forward; every sampling request has its own ``torch.Generator`` seeded from its ``seed``; sampling uses
HF's own ``TemperatureLogitsWarper`` / ``TopPLogitsWarper``.

Adapter routing: at a decoding step every row holds one token, so the engine's per-row slots are per-token
slots (its mixed path gathers each token's factors and runs two batched products, no loop over adapters; slot
0, the bare backbone, contributes nothing). A prefill forward routes each prompt's tokens by its row. Prefill
and decode tokens are not packed into one forward (that needs a varlen/paged attention kernel); chunking bounds
how long a long prompt stalls the decoders instead.

Beam search keeps the batch path (:func:`fanlora.serving.scheduler.run_batch`): a beam request runs whole,
between two iterations, and the decoding rows wait for it.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from fanlora.serving.batch import Batch
from fanlora.serving.engine import Engine
from fanlora.serving.prefix import PrefixCache, hit_group, prefix_inputs
from fanlora.serving.scheduler import Admission, Job, QueueFull, accept, flush, run_batch

__all__ = ["ContinuousScheduler", "QueueFull"]


@dataclass
class _Row:
    job: Job
    length: int  # real tokens in the cache: the next token's position
    token: int = -1  # the last sampled token, fed at the next step
    generator: torch.Generator | None = None


@dataclass
class _Partial:
    """A long prompt being prefilled chunk by chunk in its own cache (batch of one)."""

    job: Job
    cache: DynamicCache
    done: int = 0  # prompt tokens already in the cache


def _generator(job: Job) -> torch.Generator | None:
    if job.decoding.strategy != "sampling":
        return None
    g = torch.Generator()
    g.manual_seed(job.decoding.seed)
    return g


def sample(logits: torch.Tensor, row: _Row) -> int:
    """One seeded sample from one row's logits [1, vocab]; ValueError when they give no distribution."""
    d = row.job.decoding
    scores = TemperatureLogitsWarper(d.temperature)(None, logits.float())
    if d.top_p < 1.0:
        scores = TopPLogitsWarper(d.top_p)(None, scores)
    probs = F.softmax(scores, dim=-1)
    if not torch.isfinite(probs).all() or not probs.sum() > 0:
        raise ValueError("the next-token distribution is not finite")
    return int(torch.multinomial(probs, 1, generator=row.generator))


def pick(logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
    """The next token of each row from its last-position logits [rows, vocab]: argmax, or a seeded sample.

    A row whose logits or sampling fail gets None and is ended alone by the caller: one request's numbers
    never fail its neighbours in the batch."""
    greedy = logits.argmax(-1).tolist()
    out: list[int | None] = []
    for i, row in enumerate(rows):
        if not torch.isfinite(logits[i]).all():
            out.append(None)
        elif row.generator is None:
            out.append(greedy[i])
        else:
            try:
                out.append(sample(logits[i : i + 1], row))
            except (ValueError, RuntimeError):
                out.append(None)
    return out


ROW_FAILED = "error"  # a job's ``finished`` when its own row failed: it already got its error event


def take(job: Job, token: int | None, tokenizer: object) -> None:
    """Hand ``token`` to ``job``, or end the job alone when its row failed."""
    if token is None:
        if not job.finished and not job.cancelled:
            job.emit("error", "sampling failed for this request (its next-token scores were not finite)")
            job.finished = ROW_FAILED
        return
    accept(job, token, tokenizer, tokenizer.eos_token_id)


class ContinuousScheduler(Admission):
    """The server's default scheduler; same surface as :class:`fanlora.serving.scheduler.Scheduler`."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int = 64,
        max_batch: int = 16,
        prefill_chunk: int = 256,
        start: bool = True,
        prefix_cache_mb: float = 0.0,
    ) -> None:
        """``start=False`` leaves the worker thread unstarted: the caller runs :meth:`iterate` itself (tests).
        ``prefix_cache_mb`` > 0 keeps prompt-prefix KV per adapter load (:mod:`fanlora.serving.prefix`)."""
        if max_queue < 1 or max_batch < 1 or prefill_chunk < 1 or prefix_cache_mb < 0:
            raise ValueError(
                f"max_queue ({max_queue}), max_batch ({max_batch}), prefill_chunk must be ≥ 1, prefix_cache_mb ≥ 0"
            )
        self.engine, self.max_queue, self.max_batch, self.prefill_chunk = engine, max_queue, max_batch, prefill_chunk
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.queue: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()  # held for one iteration: adapter loads happen between steps
        self.waiting = 0  # admitted, not yet decoding (bounded by max_queue)
        self._count = threading.Lock()
        self.batch = Batch()
        self.new: list[Job] = []  # taken from the queue, waiting for prefill
        self.partial: _Partial | None = None
        self.starting: list[Job] = []  # being prefilled in this iteration
        self.running = True
        self.batches = 0  # decoding steps run (a step is one batch here)
        self.peak_rows = 0  # the most rows decoded in one step
        self.cancelled = 0
        self.device = next(engine.model.parameters()).device
        self.thread = threading.Thread(target=self._work, name="fanlora-engine", daemon=True)
        if start:
            self.thread.start()

    @property
    def current(self) -> list[Job]:
        return [r.job for r in self.batch.rows]

    # --- the loop ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while self.running:
            idle = not self.batch.rows and not self.new and self.partial is None
            if idle:  # nothing to do: wait for a request (bounded, so stop() is seen)
                try:
                    self.new.append(self.queue.get(timeout=0.1))
                except queue.Empty:
                    continue
            try:
                with self.lock:
                    self.iterate()
            except Exception:  # the worker survives; every row and waiting prompt gets the error
                traceback.print_exc()  # the operator's log has the details; clients get no internals
                self._fail("internal error in a decoding step (the server's log has the details): retry")

    def iterate(self) -> None:
        """One iteration: drop finished rows, admit and prefill, one decoding step."""
        self._drop()
        self._admit()
        self._prefill()
        self._drop()  # rows whose first token already ended them
        if self.batch.rows:
            self._decode()
            self._drop()

    def _admit(self) -> None:
        while True:
            try:
                self.new.append(self.queue.get_nowait())
            except queue.Empty:
                break
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

    def _prefill(self) -> None:
        room = self.max_batch - len(self.batch.rows)
        if self.partial is not None:
            if room > 0:
                self._chunk()
            return
        if self.prefix is not None and self.new and room > 0 and self._from_prefix(room):
            return
        group: list[Job] = []
        for job in self.new:  # FIFO; the prompts of one forward hold ≤ prefill_chunk tokens with padding
            n = len(job.prompt_ids)
            if len(group) == room:
                break
            if n > self.prefill_chunk:
                group = group or [job]  # alone, in chunks
                break
            if group and (len(group) + 1) * max(n, *(len(j.prompt_ids) for j in group)) > self.prefill_chunk:
                break
            if group and self.prefix is not None and self._cached(job):
                break  # it starts from the cache next iteration
            group.append(job)
        if not group:
            return
        for job in group:
            self.new.remove(job)
            self._dequeued(job)
        self.starting = group  # failed with the batch if their prefill raises
        if len(group) == 1 and len(group[0].prompt_ids) > self.prefill_chunk:
            self.partial = _Partial(group[0], DynamicCache(config=self.engine.model.config))
            self._chunk()
            return
        width = max(len(j.prompt_ids) for j in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(group):
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        cache = DynamicCache(config=self.engine.model.config)
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, [j.slot for j in group])
        rows = [_Row(j, len(j.prompt_ids), generator=_generator(j)) for j in group]
        self._start(rows, logits, cache, mask)
        self.starting = []

    def _chunk(self) -> None:
        part = self.partial
        prompt = part.job.prompt_ids
        end = min(part.done + self.prefill_chunk, len(prompt))
        ids = torch.tensor([prompt[part.done : end]])
        mask = torch.ones(1, end, dtype=torch.long)
        positions = torch.arange(part.done, end).unsqueeze(0)
        logits = self._forward(ids, mask, positions, part.cache, [part.job.slot])
        part.done = end
        if end == len(prompt):
            self.partial = None
            self._start([_Row(part.job, end, generator=_generator(part.job))], logits, part.cache, mask)

    def _cached(self, job: Job) -> bool:
        return self.prefix.peek(self.engine.slot_key(job.slot), job.prompt_ids) > 0

    def _from_prefix(self, room: int) -> bool:
        """Prefill the first waiting prompts that start with the same number of cached tokens on their adapters
        (one forward for their remainders), or a long one alone in chunks; False when the first one misses."""
        self.prefix.drop(self.engine.live_keys())
        n, hits = hit_group(self.prefix, self.engine.slot_key, self.new, room, self.prefill_chunk)
        if not hits:
            return False
        for job, _, _ in hits:
            self.new.remove(job)
            self._dequeued(job)
        self.starting = [h[0] for h in hits]
        config = self.engine.model.config
        if len(hits) == 1 and len(hits[0][0].prompt_ids) - n > self.prefill_chunk:
            self.partial = _Partial(hits[0][0], prefix_inputs(config, n, hits)[0], done=n)
            self._chunk()
            return True
        cache, ids, mask, positions = prefix_inputs(config, n, hits)
        logits = self._forward(ids, mask, positions, cache, [job.slot for job, _, _ in hits])
        self._start([_Row(job, len(job.prompt_ids), generator=_generator(job)) for job, _, _ in hits], logits, cache,
                    mask)  # fmt: skip
        self.starting = []
        return True

    def _start(self, rows: list[_Row], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Sample each prefilled row's first token, send it, and add the rows to the running batch (their
        prompts' whole blocks go to the prefix cache first)."""
        if self.prefix is not None:
            for i, row in enumerate(rows):
                real = mask[i].nonzero().squeeze(1)  # the prompt's columns: left padding and gaps left out
                keys = [layer.keys[i : i + 1].index_select(2, real) for layer in cache.layers]
                values = [layer.values[i : i + 1].index_select(2, real) for layer in cache.layers]
                self.prefix.store(self.engine.slot_key(row.job.slot), row.job.prompt_ids, keys, values, 0)
        tok = self.engine.tokenizer
        for row, token in zip(rows, pick(logits, rows), strict=True):
            row.token = 0 if token is None else token  # a failed row is dropped before it feeds again
            take(row.job, token, tok)
        self.batch.join(rows, cache, mask)

    def _decode(self) -> None:
        batch, tok = self.batch, self.engine.tokenizer
        rows = batch.rows
        self.peak_rows = max(self.peak_rows, len(rows))
        ids = torch.tensor([[r.token] for r in rows])
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], 1)
        positions = torch.tensor([[r.length] for r in rows])
        logits = self._forward(ids, mask, positions, batch.cache, [r.job.slot for r in rows])
        batch.mask = mask
        self.batches += 1
        for row, token in zip(rows, pick(logits, rows), strict=True):
            row.length += 1
            row.token = 0 if token is None else token  # a failed row is dropped before it feeds again
            take(row.job, token, tok)

    @torch.no_grad()
    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, slots: list[int]
    ) -> torch.Tensor:
        """Logits at each row's last position, every row on its slot (routing set in this thread)."""
        self.engine.use_slots(slots)
        dev = self.device
        out = self.engine.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float().cpu()

    def abort_all(self, reason: str = "abort") -> None:
        """End every admitted job now (a drain ran out of time): each gets what it decoded and ``reason``."""
        with self.lock:  # between two iterations: every admitted job is taken out and ended here
            jobs = [r.job for r in self.batch.rows] + ([self.partial.job] if self.partial else [])
            waiting = list(self.new)
            while True:
                try:
                    waiting.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self.batch, self.partial, self.new, self.starting = Batch(), None, [], []
            tok = self.engine.tokenizer
            for job in waiting:
                self._dequeued(job)
            for job in jobs + waiting:
                if job.finished != ROW_FAILED:
                    job.finished = job.finished or reason
                    flush(job, tok)
                self._finish(job)

    def busy(self) -> bool:
        return self.waiting > 0 or bool(self.batch.rows) or self.partial is not None or bool(self.new)

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def _drop(self) -> None:
        rows = self.batch.rows
        gone = [i for i, r in enumerate(rows) if r.job.finished or r.job.cancelled]
        if not gone:
            return
        tok = self.engine.tokenizer
        for i in gone:
            job = rows[i].job
            if job.cancelled and not job.finished:
                job.emit("done", "cancelled")
            elif job.finished != ROW_FAILED:
                flush(job, tok)
            self._finish(job)
        self.batch.keep([i for i in range(len(rows)) if i not in set(gone)])

    def _dequeued(self, job: Job) -> None:
        with self._count:
            self.waiting -= 1

    def _fail(self, message: str) -> None:
        jobs = [r.job for r in self.batch.rows] + ([self.partial.job] if self.partial else [])
        jobs += [j for j in self.starting if j not in jobs]
        self.batch, self.partial, self.starting = Batch(), None, []
        for job in jobs:
            job.emit("error", message)
            self._finish(job)
