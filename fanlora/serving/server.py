"""``fanlora serve``: an OpenAI-compatible HTTP server over the multi-tenant engine (FastAPI + uvicorn).

Routes: ``GET /health`` (never guarded), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream``), and vLLM's ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter``. A request's ``model`` is ``base`` (the backbone alone) or an adapter name; an
adapter is a sub-directory of ``--adapter-dir`` and is loaded on first use. Names are matched against a
strict pattern and resolved inside that directory, so no name reaches outside it; weights load only from
safetensors. Errors use OpenAI's JSON shape: 400 bad request, 401 missing/wrong API key, 404 unknown model
(with the known names), 413 body too large (counted as the bytes arrive, so a chunked body is capped too),
503 queue full.

Nothing that blocks runs on the event loop: tokenising, loading and unloading adapters (which wait for the
running batch) go to worker threads, so /health and every other client stay responsive. A client that
disconnects, streaming or not, has its row cancelled at the next decoding step.
"""

from __future__ import annotations

import asyncio
import hmac
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

from fanlora.data.instruct import render
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
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1)
    num_beams: int = Field(1, ge=1, le=8)  # extension (vLLM had use_beam_search): beam search, answered whole


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)


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


class _BodyLimit:
    """ASGI middleware: read at most ``max_bytes`` of a request body, however it is sent (chunked or not).

    The body is read here, before the route parses it; past the limit the client gets 413 and the rest is
    never read. Starlette has no such cap of its own (it trusts Content-Length or reads everything).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                response = _error(413, f"request body is over the limit of {self.max_bytes} bytes")
                return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: http.disconnect when the client goes away

        await self.app(scope, replay, send)


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

    expected = f"Bearer {api_key}".encode() if api_key else None
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)  # inner: auth (below) is checked first

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health":
            sent = request.headers.get("authorization", "").encode()
            if expected is not None and not hmac.compare_digest(sent, expected):
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

    def load(name: str, path: Path) -> None:  # in a worker thread: waits for the running batch
        try:
            with scheduler.lock:
                engine.load(name, path)
        except UserError as exc:
            raise ApiError(400, f"adapter {name!r} refused: {exc}") from None

    def admit(name: str) -> tuple[str | None, int]:
        """(adapter, pinned slot) for a request's model, loading the adapter on first use (worker thread)."""
        if name == BASE:
            return None, 0
        for _ in range(3):  # an unload may slip in between the load and the pin: load again
            if name not in engine.adapters:
                load(name, adapter_path(name))
            try:
                return name, engine.acquire(name)
            except UserError:
                continue
        raise ApiError(503, f"adapter {name!r} is being loaded and unloaded concurrently: retry", "server_error")

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
        await asyncio.to_thread(load, body.lora_name, path)
        return {"loaded": body.lora_name}

    def unload(name: str) -> None:
        try:
            with scheduler.lock:
                engine.unload(name)
        except UserError:
            raise ApiError(404, f"adapter {name!r} is not loaded", "not_found_error") from None

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: AdapterRequest):
        await asyncio.to_thread(unload, body.lora_name)
        return {"unloaded": body.lora_name}

    async def run(req: _Sampling, ids: list[int], chat: bool, request: Request):
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
        if req.num_beams > 1 and req.stream:
            raise ApiError(400, "beam search cannot stream: drop stream or num_beams")
        adapter, slot = await asyncio.to_thread(admit, req.model)
        if req.num_beams > 1:
            decoding = Decoding("beam", num_beams=req.num_beams)
        elif req.temperature == 0:
            decoding = Decoding("greedy")
        else:
            decoding = Decoding("sampling", temperature=req.temperature, top_p=req.top_p, seed=req.seed or 0)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        job = Job(ids, adapter, decoding, req.max_tokens, stop, asyncio.get_running_loop(), slot=slot)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is at capacity (request queue full): retry later", "server_error") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(job, rid, req.model, chat), media_type="text/event-stream")
        return await _whole(job, rid, req.model, chat, len(ids), request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        ids = await asyncio.to_thread(prompt_ids, engine.tokenizer, req.prompt)
        return await run(req, ids, False, request)

    def chat_ids(messages: list[ChatMessage]) -> list[int]:
        text = render(engine.tokenizer, [m.model_dump() for m in messages], generation_prompt=True)
        return prompt_ids(engine.tokenizer, text)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await run(req, await asyncio.to_thread(chat_ids, req.messages), True, request)

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


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when its (non-streaming) client goes away: nobody would read the answer."""
    while not job.finished and not job.cancelled:
        message = await request.receive()  # after the body, the next message is http.disconnect
        if message["type"] == "http.disconnect":
            job.cancelled = True
            return


async def _whole(job: Job, rid: str, model: str, chat: bool, n_prompt: int, request: Request) -> dict[str, Any]:
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        text, reason = await _collect(job)
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    finally:
        watcher.cancel()
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


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_options(host: str, port: int, api_key: str | None, limits: Limits) -> None:
    """Refuse options that cannot work or that silently open the server; warn when it is open to a network."""
    import sys

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: give 0..65535 (0: any free port)")
    for flag, value in (
        ("--max-tokens", limits.max_tokens),
        ("--max-queue", limits.max_queue),
        ("--max-batch", limits.max_batch),
    ):
        if value < 1:
            raise UserError(f"{flag} {value} must be ≥ 1")
    if api_key is not None and not api_key:
        raise UserError("--api-key is empty, which would turn authentication off: give a key, or drop the flag")
    if api_key is None and not _loopback(host):
        print(
            f"warning: serving on {host} WITHOUT an API key: anyone who can reach this address can use the "
            "server; pass --api-key (or set FANLORA_API_KEY)",
            file=sys.stderr,
            flush=True,
        )


def serve(
    setting: str | Path,
    adapter_dir: str | Path | None,
    backbone: str | None,
    host: str,
    port: int,
    api_key: str | None,
    limits: Limits,
) -> None:
    """Load the backbone, wrap the setting's modules, and serve until interrupted (adapters load on first use)."""
    import uvicorn

    from fanlora.backbone import load_backbone
    from fanlora.setting import Setting

    check_serve_options(host, port, api_key, limits)
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
