"""The OpenAI-compatible wire format of ``fanlora serve``: request bodies, the error shape, the body cap, and
how a job's events become a whole answer or a server-sent-event stream."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fanlora.errors import UserError
from fanlora.serving.flags import DEFAULTS
from fanlora.serving.jobs import Extras


class Limits(BaseModel):
    # one field per `fanlora serve` flag (serving/flags.py says what each does); defaults defined there once
    max_tokens: int = DEFAULTS["max_tokens"]
    max_body_bytes: int = DEFAULTS["max_body_bytes"]
    max_queue: int = DEFAULTS["max_queue"]
    max_batch: int = DEFAULTS["max_batch"]
    scheduler: str = DEFAULTS["scheduler"]  # or "batch": one generate() call per batch (the old path)
    max_batched_tokens: int = DEFAULTS["max_batched_tokens"]  # continuous only: tokens per forward
    prefix_cache_mb: float = DEFAULTS["prefix_cache_mb"]  # continuous only (0: off)
    max_lora_rank: int = DEFAULTS["max_lora_rank"]
    max_loras: int = DEFAULTS["max_loras"]  # resident in the engine's slots, least recently used idle one out
    max_cpu_loras: int = DEFAULTS["max_cpu_loras"]  # parsed adapters kept in host memory (0: none)
    drain_seconds: float = DEFAULTS["drain_seconds"]  # on SIGTERM: how long running requests may take
    overload_seconds: float = DEFAULTS["overload_seconds"]  # waiting longer for a row: late, /ready 503
    kv_cache_mb: float | None = None  # continuous only: the paged KV pool's bound; None: an eighth of the RAM
    threads: int | Literal["auto"] | None = None  # torch's team; None: FANLORA_THREADS, OMP_NUM_THREADS, else auto

    def check(self) -> None:
        """Refuse limits that cannot work, naming the `fanlora serve` flag."""
        for flag, value in (
            ("--max-tokens", self.max_tokens),
            ("--max-queue", self.max_queue),
            ("--max-batch", self.max_batch),
            ("--max-lora-rank", self.max_lora_rank),
            ("--max-loras", self.max_loras),
        ):
            if value < 1:
                raise UserError(f"{flag} {value} must be ≥ 1")
        if self.max_batched_tokens <= self.max_batch:
            raise UserError(
                f"--max-batched-tokens {self.max_batched_tokens} must exceed --max-batch {self.max_batch}: every "
                "decoding row takes one token of each forward's budget and prompts need the rest"
            )
        if not 0 <= self.prefix_cache_mb <= 1_000_000:
            raise UserError(f"--prefix-cache-mb {self.prefix_cache_mb} must be between 0 (off) and 1000000")
        if self.max_cpu_loras < 0:
            raise UserError(f"--max-cpu-loras {self.max_cpu_loras} must be ≥ 0 (0: keep no parsed adapter)")
        if self.kv_cache_mb is not None and not 0 < self.kv_cache_mb <= 10_000_000:
            raise UserError(f"--kv-cache-mb {self.kv_cache_mb} must be a positive number of MiB")
        if not 0 < self.overload_seconds <= 3600:
            raise UserError(f"--overload-seconds {self.overload_seconds} must be between 0 (excluded) and 3600")
        if not 0 <= self.drain_seconds <= 3600:
            raise UserError(f"--drain-seconds {self.drain_seconds} must be between 0 and 3600")


#: OpenAI request fields fanlora does not implement, with the values that ask for nothing (what a client that
#: fills in defaults sends): any other value is a 400 naming the field, never silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
}
IGNORED = ("user", "metadata", "store")  # accepted: they never change an answer
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # as OpenAI: up to 4 stop sequences
MAX_N = 16  # samples per prompt (n)
MAX_LOGPROBS = 20  # alternatives per token (completions' logprobs, chat's top_logprobs), as OpenAI and vLLM
MAX_PROMPTS = 64  # prompts in one completions request (a list)


def _unicode(text: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\udfff" in JSON): a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (not valid Unicode): send UTF-8 text") from None
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # OpenAI's: one more chunk before [DONE] with the usage and no choices


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by `_known_fields`: unsupported fields are refused

    model: str
    max_tokens: int = Field(16, ge=0)  # 0 only with echo (completions): the prompt's logprobs, nothing generated
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's current name for max_tokens: wins if both
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_N)  # independent samples; with a seed, sample i uses seed + i
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    top_k: int = Field(0, ge=-1)  # vLLM's (extra_body): -1 or 0 keep every token
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # vLLM's
    min_tokens: int = Field(0, ge=0)  # vLLM's: no EOS and no stop string before this many tokens
    num_beams: int = Field(1, ge=1, le=8)  # extension (vLLM had use_beam_search): beam search, answered whole
    ignore_eos: bool = False  # extension (vLLM's): decode max_tokens tokens, EOS or not (equal work in benchmarks)

    @model_validator(mode="after")
    def _aliases(self) -> SamplingRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} is more than max_tokens {self.max_tokens}")
        if self.num_beams > 1 and self.extras_asked():
            raise ValueError("beam search takes none of n, logprobs, penalties, top_k, min_p, min_tokens: drop them")
        return self

    def extras_asked(self) -> bool:
        return self.n > 1 or self.extras() != Extras()

    def extras(self) -> Extras:
        """What the request asks beyond the decoding strategy (the defaults ask for nothing)."""
        return Extras(
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            logprobs=self.logprob_count(),
        )

    def logprob_count(self) -> int | None:
        """How many alternatives per token the request wants (None: no logprobs)."""
        return None

    @model_validator(mode="after")
    def _known_fields(self) -> SamplingRequest:
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key not in UNSUPPORTED:
                raise ValueError(f"unrecognized request argument {key!r}: drop it")
            if not any(value == neutral and type(value) is type(neutral) for neutral in UNSUPPORTED[key]):
                raise ValueError(f"{key!r} is not supported by fanlora serve: drop it (or send its default)")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
        return [s for s in stops if s]  # an empty stop string would end every answer at once: ignored


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids, or lists of token ids
    echo: bool = False  # the prompt first in each choice's text (and in its logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's logprob and this many alternatives

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str] | list[list[int]]:
        """As a list of prompts: each text (non-empty, valid Unicode) or each list of token ids (non-empty)."""
        prompts = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
        if not prompts:
            raise ValueError("the prompt list is empty: send at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request: split it")
        for p in prompts:
            if not p:
                raise ValueError("a prompt is empty: send at least one token of text")
            if isinstance(p, str):
                _unicode(p)
            elif min(p) < 0:
                raise ValueError("token ids are ≥ 0")
        return prompts

    @model_validator(mode="after")
    def _echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 asks for nothing: give max_tokens ≥ 1 (or echo the prompt)")
        if self.echo and self.stream and self.max_tokens == 0 and self.n > 1:
            raise ValueError("echo with max_tokens 0 and n > 1 repeats the prompt: send n 1")
        return self

    def logprob_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    """One part of a chat message's content given as a list (what LangChain and the current SDKs send)."""

    model_config = ConfigDict(extra="allow")  # an image part's fields: refused by its type, with the reason

    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type != "text":
            raise ValueError(f"content part of type {self.type!r} is not supported: fanlora serves text only")
        _unicode(self.text)
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None  # OpenAI's participant name: accepted, not rendered

    _valid = field_validator("content")(lambda v: _unicode(v) if isinstance(v, str) else v)

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        """Name a non-text part before the union's own errors (which would only say "not a string")."""
        for part in value if isinstance(value, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content part of type {kind!r} is not supported: fanlora serves text only")
        return value

    def rendered(self) -> dict[str, str]:
        """As the chat template wants it: developer as system, text parts joined by newlines (as vLLM)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False  # each generated token's logprob (choices[].logprobs.content)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # and this many alternatives (needs logprobs)

    @model_validator(mode="after")
    def _chat(self) -> ChatRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be ≥ 1")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class AdapterRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None  # must be the adapter directory's own sub-directory of that name


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive
HEADER_TIMEOUT = 10.0  # seconds for a request's headers (:class:`fanlora.serving.server.TimedH11`)


UNGUARDED = ("/health", "/ready")  # a load balancer's probes carry no key


class Guard:
    """ASGI middleware in front of every route but the probes: the API key, then the body size.

    The key is compared in constant time. The body is read here, before the route parses it, however it is
    sent (chunked or not): past ``max_bytes`` the client gets 413 and the rest is never read — Starlette has
    no such cap of its own. A pure ASGI middleware rather than ``@app.middleware("http")``: Starlette's
    BaseHTTPMiddleware wraps ``receive`` in a way that can swallow the ``http.disconnect`` message a
    non-streaming request watches for.
    """

    def __init__(self, app: Any, api_key: str | None, max_bytes: int, body_timeout: float = BODY_TIMEOUT) -> None:
        self.app, self.max_bytes, self.body_timeout = app, max_bytes, body_timeout
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refused = self._refuse(headers)
        if refused is not None:
            return await refused(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:  # a client that trickles its body would hold a socket and a task forever
                return await error(408, f"request body not received within {self.body_timeout:g} s")(
                    scope, receive, send
                )
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await error(413, f"request body is over the limit of {self.max_bytes} bytes")(
                    scope, receive, send
                )
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    def _refuse(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        if self.expected is not None and not (
            scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
        ):  # the scheme is case-insensitive (RFC 9110), the key is not
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            return error(413, f"request body of {length} bytes is over the limit of {self.max_bytes}")
        return None


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)
