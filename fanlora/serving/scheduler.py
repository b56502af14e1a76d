"""Batches concurrent requests onto the engine: a bounded queue and one worker thread that owns the model.

Requests that can share a ``generate`` call (same sampling settings) are taken together, up to ``max_batch``,
each row on its own adapter. ``transformers`` does the decoding; two small hooks into it do the serving part:
a streamer that hands each row's new token to its request as it is produced, and a per-row stopping criterion
that ends a row at its own ``max_tokens``, at a stop string, or as soon as its client has gone (its slot in
the batch stops costing anything but padding, and a finished batch frees the worker for the next one).
Beam search cannot stream in HF; beam requests are answered whole. What both schedulers share — jobs, their
bounded admission, the engine thread's calls — is :mod:`fanlora.serving.jobs`.

``max_queue`` bounds every request admitted but not yet decoding — in the queue or held back because its
sampling settings differ from the running batch's — so a full server answers 503 instead of growing a list.
Each job carries the adapter slot it was admitted on (pinned in the engine), so unloading an adapter never
fails another tenant's row in the same batch, nor its own already-admitted requests.
"""

from __future__ import annotations

import queue
import traceback
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from fanlora.generate import cut
from fanlora.serving.engine import Engine
from fanlora.serving.flags import DEFAULTS
from fanlora.serving.jobs import Admission, Extras, Job, accept, flush
from fanlora.serving.logprobs import entry
from fanlora.serving.sampling import Recorder, chain


class _Streamer(BaseStreamer):
    """Receives each decoding step's tokens for the whole batch; forwards each row's text delta."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos: int | None, recorder: Recorder | None = None) -> None:
        self.jobs, self.tok, self.eos, self.prompt_seen = jobs, tokenizer, eos, False
        self.recorder = recorder  # holds the scores this step's tokens were drawn from (logprobs)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for row, (job, token) in enumerate(zip(self.jobs, value.view(-1).tolist(), strict=True)):
            k = job.extras.logprobs
            if self.recorder is not None and k is not None and not job.finished and not job.cancelled:
                job.emit("logprobs", entry(self.recorder.scores[row], token, k))
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


class BatchScheduler(Admission):
    """``--scheduler batch``: one ``generate`` call per batch of requests with equal sampling settings."""

    def __init__(
        self, engine: Engine, max_queue: int = DEFAULTS["max_queue"], max_batch: int = DEFAULTS["max_batch"]
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue ({max_queue}) and max_batch ({max_batch}) must be ≥ 1")
        self._admission(engine, max_queue)
        self.max_batch = max_batch
        self.held: list[Job] = []  # taken from the queue but not yet batchable with the current key
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
        for job in batch:
            self._dequeued(job)
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
                    self._tick()
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
    recorder = None
    if not beam and jobs[0].extras != Extras():  # the jobs share their extras (Job.key)
        recorder = Recorder()
        if first.strategy == "sampling":  # the chain holds the warpers, in HF's order, before the recorder
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        kwargs["logits_processor"] = LogitsProcessorList([*chain(jobs[0], width, tok.eos_token_id), recorder])
    streamer = None if beam else _Streamer(jobs, tok, tok.eos_token_id, recorder)
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
