"""The HTTP layer: OpenAI's endpoints over one worker, streaming as server-sent events.

Everything here is translation: request bodies to ``Generation``s, the worker's events to OpenAI's
response and chunk shapes, errors to ``{"error": {...}}`` with their status. The model work is in
``engine``, the ordering in ``worker``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsmoe.errors import DsmoeError
from dsmoe.serve.engine import Finished, Generation, Piece, TokenLogprob
from dsmoe.serve.metrics import Metrics
from dsmoe.serve.schema import ApiError, ChatRequest, CompletionRequest
from dsmoe.serve.worker import END, Failed, Job, Worker

log = logging.getLogger("dsmoe.serve")

RequestT = TypeVar("RequestT", bound=BaseModel)

DISCONNECT_POLL_SECONDS = 0.1
"""How often a waiting request checks that its client is still there."""


@dataclass
class ServerOptions:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024


class BodyLimit:
    """Refuses a request body over ``limit`` bytes (413), or a POST without a length (411), before reading it."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            error = None
            if length is None:
                error = ApiError(411, "the request needs a Content-Length header")
            elif not length.isdigit() or int(length) > self.limit:
                error = ApiError(413, f"the request body is over the limit of {self.limit} bytes")
            if error is not None:
                await _json(error.status, error.body())(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(worker: Worker, options: ServerOptions, metrics: Metrics) -> FastAPI:
    """The application; the caller starts ``worker`` and closes it on shutdown."""
    engine = worker.engine
    app = FastAPI(title="dsmoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    created = int(time.time())
    key = options.api_key.encode() if options.api_key else None

    def authorized(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count(request, exc.status)
        log.info("%s %s %d: %s", request.method, request.url.path, exc.status, exc.message)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _json(exc.status, exc.body(), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, ApiError(400, _validation_message(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return await api_error(request, ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    def _count(request: Request, status: int) -> None:
        metrics.requests.labels(request.url.path, str(status)).inc()

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.closed:
            return _json(503, {"status": "shutting down"})
        return _json(200, {"status": "ok", "queue_depth": worker.depth})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> JSONResponse:
        entry = {"id": options.model_name, "object": "model", "created": created, "owned_by": "dsmoe",
                 "max_model_len": engine.context}
        return _json(200, {"object": "list", "data": [entry]})

    def _settings(body: ChatRequest | CompletionRequest, prompt_tokens: int, limit: int | None) -> Any:
        max_new = engine.max_new_tokens(prompt_tokens, limit)
        try:
            return engine.sampling(max_new, body.temperature, body.top_p, body.top_k, body.repetition_penalty,
                                   body.seed, ignore_eos=body.ignore_eos)
        except DsmoeError as exc:
            raise ApiError(400, str(exc)) from None

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatRequest)
        body.check_supported()
        messages = body.chat_messages()
        ids = engine.encode_chat(messages)
        generation = Generation(ids, _settings(body, len(ids), body.limit()), body.stop_strings(), messages=messages)
        job = _submit(request, [generation])
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "created": int(time.time()), "model": options.model_name}
        if body.stream:
            return _stream(request, job, rid, _chat_chunks(job, request, head, body.include_usage()))
        done, _ = await _collect(request, job, rid)
        (end,) = done
        return _json(200, {
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": end.text}, "logprobs": None,
                         "finish_reason": end.finish_reason}],
            "usage": _usage(done),
        })

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        body.check_supported()
        stops = body.stop_strings()
        prompts = body.prompts()
        generations = []
        for prompt in prompts:
            ids = engine.encode_prompt(prompt)
            generations.append(Generation(ids, _settings(body, len(ids), body.max_tokens), stops,
                                          logprobs=body.logprobs, echo=body.echo))
        job = _submit(request, generations)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "created": int(time.time()), "model": options.model_name, "object": "text_completion"}
        if body.stream:
            return _stream(request, job, rid, _completion_chunks(job, request, head, body, prompts))
        done, _ = await _collect(request, job, rid)
        choices = []
        for end in done:
            echoed = engine.echo_text(prompts[end.index]) if body.echo else ""
            choices.append({"index": end.index, "text": echoed + end.text, "finish_reason": end.finish_reason,
                            "logprobs": _logprobs(end, echoed) if body.logprobs is not None else None})
        return _json(200, {**head, "choices": choices, "usage": _usage(done)})

    def _submit(request: Request, generations: list[Generation]) -> Job:
        job = Job(generations, asyncio.get_running_loop())
        worker.submit(job)
        return job

    async def _events(request: Request, job: Job) -> AsyncIterator[Piece | Finished | Failed]:
        """The job's events as they come; when the client leaves, the job is cancelled at once."""
        ended = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item is END:
                    ended = True
                    return
                yield item
        finally:
            if not ended:
                worker.cancel(job)

    async def _collect(request: Request, job: Job, rid: str) -> tuple[list[Finished], str]:
        done: list[Finished] = []
        async for item in _events(request, job):  # errors are counted and logged by api_error
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, Finished):
                if item.finish_reason == "cancelled":
                    raise _stopped(job)
                done.append(item)
        if len(done) != len(job.generations):  # the client went away before the end
            raise ApiError(499, "client disconnected")
        _log(rid, request, job, done, 200)
        return done, rid

    def _stream(request: Request, job: Job, rid: str, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except _StreamError as exc:  # the headers are sent: the error is the stream's last event, no [DONE]
                yield f"data: {json.dumps(exc.error.body(), ensure_ascii=False)}\n\n"
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    async def _chat_chunks(job: Job, request: Request, head: dict[str, Any], usage: bool) -> AsyncIterator[dict[str, Any]]:
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        async for event in _stream_events(request, job, head["id"]):
            if isinstance(event, Piece):
                yield chunk({"content": event.text})
            else:
                yield chunk({}, event.finish_reason)
                if usage:
                    yield {**head, "choices": [], "usage": _usage([event])}

    async def _completion_chunks(job: Job, request: Request, head: dict[str, Any], body: CompletionRequest,
                                 prompts: list[Any]) -> AsyncIterator[dict[str, Any]]:
        def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        done: list[Finished] = []
        started: set[int] = set()
        async for event in _stream_events(request, job, head["id"], done):
            if body.echo and event.index not in started:
                started.add(event.index)
                yield chunk(event.index, engine.echo_text(prompts[event.index]))
            if isinstance(event, Piece):
                yield chunk(event.index, event.text)
            else:
                yield chunk(event.index, "", event.finish_reason)
        if body.include_usage():
            yield {**head, "choices": [], "usage": _usage(done)}

    async def _stream_events(request: Request, job: Job, rid: str,
                             done: list[Finished] | None = None) -> AsyncIterator[Piece | Finished]:
        """Events for a stream; an error or a shutdown ends it with an ``error`` event and no [DONE]."""
        done = [] if done is None else done
        status = 499
        try:
            async for item in _events(request, job):
                if isinstance(item, Failed):
                    status = item.error.status
                    raise _StreamError(item.error)
                if isinstance(item, Finished) and item.finish_reason == "cancelled":
                    status = 503
                    raise _StreamError(_stopped(job))
                if isinstance(item, Finished):
                    done.append(item)
                yield item
            if len(done) == len(job.generations):
                status = 200
        finally:
            _log(rid, request, job, done, status)

    def _stopped(job: Job) -> ApiError:
        if job.stop_reason == "shutdown":
            return ApiError(503, "the server is shutting down; the reply was cut short", kind="server_error",
                            code="shutting_down")
        return ApiError(499, "client disconnected")

    def _log(rid: str, request: Request, job: Job, done: list[Finished], status: int) -> None:
        metrics.requests.labels(request.url.path, str(status)).inc()
        prompt = sum(d.prompt_tokens for d in done)
        reused = sum(d.reused_tokens for d in done)
        new = sum(d.completion_tokens for d in done)
        elapsed = time.perf_counter() - job.submitted
        waited = (job.started or time.perf_counter()) - job.submitted
        rate = new / sum(d.seconds for d in done) if done and new else 0.0
        outcome = {200: "ok", 499: "cancelled: client disconnected"}.get(status, f"status {status}")
        cached = f", {reused} reused from the KV cache" if reused else ""
        log.info("%s %s %s: %d prompt tokens%s, %d new, %.2f s (%.2f s queued), %.1f tokens/s",
                 rid, request.url.path, outcome, prompt, cached, new, elapsed, waited, rate)

    return app


class _StreamError(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


def _usage(done: list[Finished]) -> dict[str, int]:
    prompt = sum(d.prompt_tokens for d in done)
    new = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _logprobs(end: Finished, echoed: str) -> dict[str, list[Any]]:
    """OpenAI's completion logprobs: the echoed prompt's tokens first (the first has none), then the new ones."""
    entries: list[TokenLogprob] = list(end.prompt_logprobs or []) + list(end.logprobs or [])
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [e.top for e in entries],
        "text_offset": offsets,
    }


async def _parse(request: Request, kind: type[RequestT]) -> RequestT:
    """The body as ``kind``, whatever its Content-Type says (curl -d sends a form type); 400 when it is not."""
    try:
        return kind.model_validate_json(await request.body())
    except ValidationError as exc:
        raise ApiError(400, _validation_message(exc.errors())) from None


def _validation_message(errors: Sequence[Any]) -> str:
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
