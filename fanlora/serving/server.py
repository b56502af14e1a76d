"""``fanlora serve``: an OpenAI-compatible HTTP server over the multi-tenant engine (FastAPI + uvicorn).

Routes: ``GET /health`` (never guarded), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream``), and vLLM's ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter``. A request's ``model`` is ``base`` (the backbone alone) or an adapter name; an
adapter is a sub-directory of ``--adapter-dir`` and is loaded on first use. Names are matched against a
strict pattern and resolved inside that directory, so no name reaches outside it; weights load only from
safetensors. Errors use OpenAI's JSON shape: 400 bad request, 401 missing/wrong API key, 404 unknown model
(with the known names), 413 body too large, 503 queue full.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from fanlora.errors import UserError
from fanlora.generate import Decoding, prompt_ids
from fanlora.serving.engine import Engine
from fanlora.serving.scheduler import Job, QueueFull, Scheduler

BASE = "base"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Limits(BaseModel):
    max_tokens: int = 512  # per request
    max_body_bytes: int = 1_000_000
    max_queue: int = 64
    max_batch: int = 16


class _Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    num_beams: int = Field(1, ge=1, le=8)  # extension (vLLM had use_beam_search): beam search, answered whole


class CompletionRequest(_Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None  # must be the adapter directory's own sub-directory of that name


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(
    engine: Engine, adapter_dir: str | Path | None, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    limits = limits or Limits()
    root = Path(adapter_dir).resolve() if adapter_dir else None
    scheduler = Scheduler(engine, limits.max_queue, limits.max_batch)
    context = getattr(engine.model.config, "max_position_embeddings", 2048)
    app = FastAPI(title="fanlora", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.engine = scheduler, engine

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health":
            if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"
                )
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limits.max_body_bytes:
                return _error(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes}")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    def known() -> list[str]:
        on_disk = sorted(p.name for p in root.iterdir() if p.is_dir() and NAME.match(p.name)) if root else []
        return sorted({BASE, *engine.adapters, *on_disk})

    def adapter_path(name: str) -> Path:
        if not NAME.match(name) or root is None:
            raise ApiError(404, f"unknown model {name!r}: known models are {', '.join(known())}", "not_found_error")
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_dir():
            raise ApiError(404, f"unknown model {name!r}: known models are {', '.join(known())}", "not_found_error")
        return path

    def ensure_loaded(name: str) -> str | None:
        if name == BASE:
            return None
        if name not in engine.adapters:
            path = adapter_path(name)
            try:
                with scheduler.lock:
                    engine.load(name, path)
            except UserError as exc:
                raise ApiError(400, f"adapter {name!r} refused: {exc}") from None
        return name

    app.state.known = known

    @app.get("/health")
    async def health():
        return {"status": "ok", "batches": scheduler.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fanlora"} for m in known()]}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: AdapterRequest):
        path = adapter_path(body.lora_name)
        if body.lora_path is not None and Path(body.lora_path).resolve() != path:
            raise ApiError(400, "lora_path must be the adapter directory's sub-directory named lora_name")
        try:
            with scheduler.lock:
                engine.load(body.lora_name, path)
        except UserError as exc:
            raise ApiError(400, f"adapter {body.lora_name!r} refused: {exc}") from None
        return {"loaded": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: AdapterRequest):
        if body.lora_name not in engine.adapters:
            raise ApiError(404, f"adapter {body.lora_name!r} is not loaded", "not_found_error")
        with scheduler.lock:
            engine.unload(body.lora_name)
        return {"unloaded": body.lora_name}

    async def run(req: _Sampling, ids: list[int], chat: bool):
        if req.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {req.max_tokens} is over this server's limit of {limits.max_tokens}")
        if len(ids) + req.max_tokens > context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                f"limit of {context} tokens",
            )
        adapter = ensure_loaded(req.model)
        if req.num_beams > 1:
            if req.stream:
                raise ApiError(400, "beam search cannot stream: drop stream or num_beams")
            decoding = Decoding("beam", num_beams=req.num_beams)
        elif req.temperature == 0:
            decoding = Decoding("greedy")
        else:
            decoding = Decoding("sampling", temperature=req.temperature, top_p=req.top_p, seed=req.seed or 0)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        job = Job(ids, adapter, decoding, req.max_tokens, stop, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is at capacity (request queue full): retry later", "server_error") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(job, rid, req.model, chat), media_type="text/event-stream")
        return await _whole(job, rid, req.model, chat, len(ids))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await run(req, prompt_ids(engine.tokenizer, req.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        from fanlora.data.instruct import render

        text = render(engine.tokenizer, [m.model_dump() for m in req.messages], generation_prompt=True)
        return await run(req, prompt_ids(engine.tokenizer, text), chat=True)

    return app


async def _collect(job: Job) -> tuple[str, str]:
    parts = []
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            parts.append(value)
        elif kind == "error":
            raise ApiError(500, value, "server_error")
        else:
            return "".join(parts), value


async def _whole(job: Job, rid: str, model: str, chat: bool, n_prompt: int) -> dict[str, Any]:
    try:
        text, reason = await _collect(job)
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    usage = {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(job.tokens),
        "total_tokens": n_prompt + len(job.tokens),
    }
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


async def _stream(job: Job, rid: str, model: str, chat: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant"} if first else {}
            if delta:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": reason}
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk(value, None)
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error', 'code': 500}})}\n\n"
                break
            else:
                yield chunk(None, value)
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): its row stops at the next decoding step
        job.cancelled = True


def serve(
    setting: str | Path,
    adapter_dir: str | Path | None,
    backbone: str | None,
    host: str,
    port: int,
    api_key: str | None,
    limits: Limits,
) -> None:
    """Load the backbone, wrap the setting's modules, load every adapter found, and serve until interrupted."""
    import uvicorn

    from fanlora.backbone import load_backbone
    from fanlora.setting import Setting

    s = Setting.read(setting)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise UserError(
            f"adapter directory {adapter_dir} does not exist: give the folder holding one folder per adapter"
        )
    engine = Engine.from_backbone(load_backbone(backbone or s.backbone.get("source", "embedded")), s)
    app = create_app(engine, adapter_dir, api_key, limits)
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") from None
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    bound = sock.getsockname()[1]
    print(f"serving on http://{host}:{bound}/v1 (models: {', '.join(app.state.known())})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
