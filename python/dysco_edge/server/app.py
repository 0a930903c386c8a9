"""The FastAPI app: GET /health, GET /slots, GET /v1/models, POST /v1/chat/completions and
POST /v1/completions over one Model, through the worker's queue: one request at a time, or up to
the model's `parallel` plain requests decoding together.

Every answer says whether DySCO ran in its `X-DySCO` header: "on", "off", or
"off; reason=..." when the request left it to "auto" and the model has no QR heads.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..errors import DyscoEdgeError
from .documents import DocumentStore, request_inputs
from .guard import RequireKey, http_error_response, unexpected_error_response, validation_error_response
from .page import PUBLIC_PATHS, add_page
from .queue import Channel, Job, QueueFull, Worker
from .responses import ApiError, ChatShape, Shape, TextShape, api_error
from .schemas import ChatBody, CompletionBody, DyscoChoice, GenerationBody, choose_dysco
from .settings import ServerSettings

PING_S = 15  # an SSE comment line this often keeps idle proxies from closing a long prefill


def create_app(model, settings: ServerSettings) -> FastAPI:
    service = Service(model, settings)
    app = FastAPI(title="dysco-edge", lifespan=service.lifespan, docs_url=None, redoc_url=None)
    if settings.api_key is not None:  # every route but /health, before any body is read
        app.add_middleware(RequireKey, key=settings.api_key, open_paths=("/health",) + PUBLIC_PATHS)
    if settings.cors_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_headers=["*"],
                           allow_methods=["GET", "POST"], expose_headers=["X-DySCO", "Retry-After"])
    app.add_exception_handler(ApiError, _api_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(HTTPException, http_error_response)  # 404, 405 in OpenAI's shape
    app.add_exception_handler(Exception, unexpected_error_response)  # a 500 in OpenAI's shape, no traceback
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/slots", service.slots, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", service.chat, methods=["POST"])
    app.add_api_route("/v1/completions", service.completions, methods=["POST"])
    add_page(app, service)
    return app


class Service:
    def __init__(self, model, settings: ServerSettings):
        self.model, self.settings = model, settings
        self.worker = Worker(settings.max_queue, model.parallel)
        self.documents = DocumentStore(model, allow_paths=settings.local_paths)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.worker.stop)

    async def health(self) -> dict:
        """Alive, and how many slots run a request (as llama-server's /health counts them)."""
        busy = sum(s["state"] != "idle" for s in self.model.slots())
        return {"status": "ok", "slots_idle": self.model.parallel - busy, "slots_processing": busy}

    async def slots(self) -> list[dict]:
        """What each slot runs now (Model.slots)."""
        return self.model.slots()

    async def models(self) -> dict:
        found = self.model.find_heads()
        meta = {"n_ctx": self.model.n_ctx, "n_ctx_train": self.model.n_ctx_train,
                "qr_heads": found.describe() if found else None}
        created = int(self.model.path.stat().st_mtime)
        return {"object": "list", "data": [{"id": self.settings.model_id, "object": "model", "created": created,
                                            "owned_by": "dysco-edge", "meta": meta}]}

    async def chat(self, body: ChatBody, request: Request):
        return await self._answer(request, body, ChatShape(self.settings.model_id, body.include_usage))

    async def completions(self, body: CompletionBody, request: Request):
        return await self._answer(request, body, TextShape(self.settings.model_id, body.include_usage))

    async def _answer(self, request: Request, body: GenerationBody, shape: Shape):
        try:
            dysco = choose_dysco(self.model, body.dysco, self.settings.dysco_mode)
        except DyscoEdgeError as e:
            error = api_error(e)
            error.param = error.param or "dysco"
            raise error from None
        job, focus = await self._enqueue(body, dysco)
        headers = {"X-DySCO": dysco.header}

        async def extra(generation) -> dict:  # what the request asked for besides the answer
            return {} if focus is None else {"focus": await run_in_threadpool(focus.json, self.model, generation)}
        if body.stream:
            events = _sse_events(job, shape, body.return_progress, extra)
            return EventSourceResponse(events, headers=headers, ping=PING_S)
        generation = await _collect(job, request)
        whole = shape.whole(generation, dysco.header)
        whole["dysco"].update(await extra(generation))
        return JSONResponse(whole, headers=headers)

    async def _enqueue(self, body: GenerationBody, dysco: DyscoChoice):
        """Tokenize and check the request (a 400 before it waits), then queue it (503 when full);
        the job and where its focus is located (None: not asked for)."""
        channel = Channel(asyncio.get_running_loop())
        default_max = self.settings.max_tokens or self.model.n_ctx  # None: until the context is full

        def prepare():
            inputs, focus = request_inputs(self.documents, body, self.model)
            return self.model.generate(**inputs, **body.sampling(default_max), dysco=dysco.config, stream=True,
                                       progress=channel.progress, stop_event=channel.cancel,
                                       trace=focus is not None and dysco.applied), focus
        try:
            stream, focus = await run_in_threadpool(prepare)
        except DyscoEdgeError as e:
            raise api_error(e) from None
        return self.submit(Job(channel, stream)), focus

    def submit(self, job: Job) -> Job:
        """Queue a job (a 503 with Retry-After when the queue is full)."""
        try:
            self.worker.submit(job)
        except QueueFull as e:
            job.stream.close()
            raise ApiError(503, str(e), type="unavailable_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job


async def _collect(job: Job, request: Request):
    """The whole Generation of a job; the job is cancelled if its client goes away first."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job.channel))
    try:
        async for kind, value in job.channel.events():
            if kind == "done":
                return value
            if kind == "error":
                raise api_error(value)
        raise ApiError(499, "the client closed the request")
    finally:
        watcher.cancel()
        job.channel.cancel.set()


async def _cancel_on_disconnect(request: Request, channel: Channel) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    channel.cancel.set()


async def _sse_events(job: Job, shape: Shape, progress: bool, extra) -> AsyncIterator[str]:
    """The job's events as OpenAI stream chunks, then [DONE]; `await extra(generation)` is added
    to the finishing chunk as its `dysco` field when not empty. Leaving early (the client went
    away: sse-starlette cancels this generator) cancels the job."""
    channel, req = job.channel, job.stream.req
    started = False
    try:
        async for kind, value in channel.events():
            if kind == "progress":
                if progress:
                    done, ms = value
                    yield _json(shape.progress(len(req.prompt), req.n_cached or 0, (req.n_cached or 0) + done, ms))
                continue
            if not started:
                started = True
                for chunk in _opening(shape, job, progress):
                    yield _json(chunk)
            chunks = _closing(shape, kind, value)
            if kind == "done" and (added := await extra(value)):
                chunks[0]["dysco"] = added
            for chunk in chunks:
                yield _json(chunk)
            if kind == "error":
                return
        yield "[DONE]"
    finally:
        channel.cancel.set()


def _opening(shape: Shape, job: Job, progress: bool) -> list[dict]:
    """Before the first text: the prefill's last progress chunk (all processed), the role chunk."""
    req, out = job.stream.req, []
    if progress:
        n, cached = len(req.prompt), req.n_cached or 0
        out.append(shape.progress(n, cached, n, (time.perf_counter() - job.channel.started) * 1000))
    first = shape.first()
    return out + ([first] if first else [])


def _closing(shape: Shape, kind: str, value) -> list[dict]:
    if kind == "text":
        return [shape.piece(value)]
    if kind == "done":
        return [shape.finish(value)] + ([shape.usage_chunk(value)] if shape.include_usage else [])
    if kind == "error":
        return [api_error(value).body()]
    return []


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
