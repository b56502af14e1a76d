"""``fanlora serve``: an OpenAI-compatible HTTP server over the multi-tenant engine (FastAPI + uvicorn).

Routes: ``GET /health`` (never guarded), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream``), and vLLM's ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter``. A request's ``model`` is ``base`` (the backbone alone) or an adapter name; an
adapter is a sub-directory of ``--adapter-dir`` and is loaded on first use. Names are matched against a
strict pattern and resolved inside that directory, so no name reaches outside it; weights load only from
safetensors. Errors use OpenAI's JSON shape: 400 bad request, 401 missing/wrong API key, 404 unknown model
(with the known names), 413 body too large (counted as the bytes arrive, so a chunked body is capped too),
503 queue full.

Requests go to the continuous scheduler (:mod:`fanlora.serving.continuous`: rows join and leave the batch at
every decoding step) unless ``Limits.scheduler`` is ``"batch"`` (:mod:`fanlora.serving.scheduler`).

Nothing that blocks runs on the event loop: tokenising goes to worker threads, and adapter loads and unloads
are handed to the engine's thread (run between two steps; a worker thread waits for them), so /health and
every other client stay responsive. A client that
disconnects, streaming or not, has its row cancelled at the next decoding step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from fanlora import dist
from fanlora.backbone import load_backbone
from fanlora.errors import UserError
from fanlora.serving.api import (
    HEADER_TIMEOUT,
    AdapterRequest,
    ApiError,
    Guard,
    Limits,
    error,
)
from fanlora.serving.completions import install_completion_routes
from fanlora.serving.continuous import ContinuousScheduler
from fanlora.serving.engine import Engine
from fanlora.serving.jobs import Scheduler
from fanlora.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fanlora.serving.metrics import ServerMetrics
from fanlora.serving.paged import block_bytes, default_cache_mb
from fanlora.serving.scheduler import BatchScheduler
from fanlora.serving.team import AdaptiveTeam
from fanlora.serving.tenants import Tenants
from fanlora.setting import Setting


def _install_guards(app: FastAPI, api_key: str | None, limits: Limits) -> None:
    """The API key and body cap (:class:`Guard`), and OpenAI-shaped 4xx for our own and pydantic's errors."""
    app.add_middleware(Guard, api_key=api_key, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error(400, f"{where or 'body'}: {message}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug: the log has it, the client gets the shape
        traceback.print_exception(exc)
        return error(500, "internal server error (the server's log has the details)", "server_error")


def _install_adapter_routes(app: FastAPI, tenants: Tenants) -> None:
    @app.get("/health")
    async def health():
        if tenants.scheduler.closed:  # draining for shutdown: a load balancer should send no more
            return error(503, "the server is shutting down", "server_error")
        return {"status": "ok", "batches": tenants.scheduler.batches}

    @app.get("/ready")
    async def ready():  # readiness, for a load balancer: 503 while draining or while the queue cannot drain
        scheduler = tenants.scheduler
        waited, waiting = scheduler.oldest_wait(), scheduler.waiting
        body = {"waiting": waiting, "oldest_wait_seconds": round(waited, 3)}
        if scheduler.closed:
            return JSONResponse({"status": "shutting down", **body}, status_code=503)
        if waited > scheduler.wait_limit:
            return JSONResponse({"status": "overloaded", **body}, status_code=503)
        return {"status": "ready", **body}

    @app.get("/v1/models")
    async def models():
        names = await asyncio.to_thread(tenants.known)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fanlora"} for m in names]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id not in await asyncio.to_thread(tenants.known):
            raise ApiError(404, f"unknown model {model_id!r}: GET /v1/models lists them", "not_found_error")
        return {"id": model_id, "object": "model", "owned_by": "fanlora"}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: AdapterRequest):
        path = await asyncio.to_thread(tenants.path, body.lora_name)
        if body.lora_path is not None and Path(body.lora_path).resolve() != path:
            raise ApiError(400, "lora_path must be the adapter directory's sub-directory named lora_name")
        await asyncio.to_thread(tenants.load, body.lora_name, path)
        return {"loaded": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: AdapterRequest):
        await asyncio.to_thread(tenants.unload, body.lora_name)
        return {"unloaded": body.lora_name}


def create_app(
    engine: Engine, adapter_dir: str | Path | None, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The server's app over ``engine``: guards, the adapter routes, the completion routes."""
    limits = limits or Limits()
    kv_said = "unbounded (batch scheduler)"
    if limits.scheduler == "batch":
        scheduler: Scheduler = BatchScheduler(engine, limits.max_queue, limits.max_batch)
    else:
        mb = limits.kv_cache_mb if limits.kv_cache_mb is not None else default_cache_mb()
        per_block = block_bytes(engine.model.config, next(engine.model.parameters()).dtype)
        scheduler = ContinuousScheduler(
            engine,
            limits.max_queue,
            limits.max_batch,
            limits.max_batched_tokens,
            prefix_cache_mb=limits.prefix_cache_mb,
            kv_blocks=max(1, int(mb * 2**20 // per_block)),
        )
        kv_said = f"{mb:.0f} MiB = {scheduler.max_positions} token positions (--kv-cache-mb)"
    scheduler.wait_limit = limits.overload_seconds
    tenants = Tenants(engine, scheduler, adapter_dir, limits.max_cpu_loras)
    scheduler.metrics = metrics = ServerMetrics(scheduler, engine, tenants.host)
    app = FastAPI(title="fanlora", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.engine, app.state.known = scheduler, engine, tenants.known
    app.state.metrics, app.state.tenants, app.state.kv_said = metrics, tenants, kv_said

    @app.get("/metrics")
    async def prometheus() -> Response:  # reads attributes only: never waits for the engine
        return Response(metrics.text(), media_type=METRICS_CONTENT_TYPE)

    _install_guards(app, api_key, limits)
    _install_adapter_routes(app, tenants)
    install_completion_routes(app, tenants, limits)
    return app


def drain(scheduler: Scheduler, seconds: float) -> bool:
    """Admit nothing more, let admitted requests finish for at most ``seconds``, then end the rest (each gets
    its text so far, finish reason ``abort``, and streams their final chunk and ``[DONE]``). True if all finished."""
    scheduler.close()
    deadline = time.monotonic() + seconds
    while scheduler.busy() and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    finished = not scheduler.busy()
    if not finished:
        scheduler.abort_all("abort")
    return finished


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before it stops: on SIGTERM (or Ctrl-C) the scheduler closes (503 for
    new requests), running requests finish for up to ``drain_seconds``, and only then does uvicorn stop and
    the process exit 0. uvicorn alone stops at once and cuts streams after its grace period. A second signal
    stops at once."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_seconds: float):
        super().__init__(config)
        self.scheduler, self.drain_seconds, self.draining = scheduler, drain_seconds, False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        threading.Thread(target=self._drain, name="fanlora-drain", daemon=True).start()

    def _drain(self) -> None:
        drain(self.scheduler, self.drain_seconds)
        self.should_exit = True


class TimedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a limit on how long a request's headers may take to arrive: without
    it a client that trickles header bytes (slowloris) holds a connection open for ever."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection has the same limit

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expire(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


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
    limits.check()
    if api_key is not None and not api_key:
        raise UserError("--api-key is empty, which would turn authentication off: give a key, or drop the flag")
    if api_key is None and not _loopback(host):
        print(
            f"warning: serving on {host} WITHOUT an API key: anyone who can reach this address can use the "
            "server; pass --api-key (or set FANLORA_API_KEY)",
            file=sys.stderr,
            flush=True,
        )


def load_engine(
    s: Setting, backbone: str | None, max_rank: int, max_loras: int | None = None, dtype: str = "float32",
    device: str | None = "auto",
) -> Engine:  # fmt: skip
    """The backbone the setting was made for (or ``backbone``), loaded with the setting's own module map — so a
    backbone that needs a map (GPT-2's packed Conv1D, OPT) serves without one on the command line. A ``shape:``
    backbone (random weights, for load tests) takes the setting's pattern mapped by layer fraction."""
    name = backbone or s.backbone.get("source", "embedded")
    model = load_backbone(name, dtype, dict(s.module_paths), device, random_ok=True)
    return Engine.from_backbone(model, s.fitted_to(model), max_rank, max_loras)


def serve(
    setting: str | Path,
    adapter_dir: str | Path | None,
    backbone: str | None,
    host: str,
    port: int,
    api_key: str | None,
    limits: Limits,
    dtype: str = "float32",
    device: str | None = "auto",
) -> None:
    """Load the backbone, wrap the setting's modules, and serve until interrupted (adapters load on first use)."""
    check_serve_options(host, port, api_key, limits)
    fixed = limits.threads if limits.threads != "auto" else None
    team = dist.configure_threads(fixed, serve=True)  # before any torch work: the engine thread inherits it
    adaptive = limits.threads == "auto" or (limits.threads is None and not dist.threads_from_env())
    s = Setting.read(setting)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise UserError(
            f"adapter directory {adapter_dir} does not exist: give the folder holding one folder per adapter"
        )
    # Loaded on a thread that then exits, so that its OpenMP team goes with it: after this, torch runs on the
    # engine's thread only (why: Admission.on_engine).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fanlora-load") as pool:
        engine = pool.submit(load_engine, s, backbone, limits.max_lora_rank, limits.max_loras, dtype, device).result()
    app = create_app(engine, adapter_dir, api_key, limits)
    if adaptive:  # resized on the engine thread between steps (serving/team.py)
        app.state.scheduler.team = AdaptiveTeam(dist.available_cpus())
        team = f"auto, 1–{dist.available_cpus()}"
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") from None
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    bound = sock.getsockname()[1]
    print(
        f"serving on http://{host}:{bound}/v1 (models: {', '.join(app.state.known())}; torch threads {team} of "
        f"{dist.available_cpus()} CPUs available; KV cache {app.state.kv_said})",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", http=TimedH11, timeout_graceful_shutdown=10)
    DrainingServer(config, app.state.scheduler, limits.drain_seconds).run(sockets=[sock])
