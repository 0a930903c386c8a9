"""The document-QA page at `/` (static files in static/, no build step, nothing fetched from
elsewhere) and the document routes it and other clients use:

POST /v1/documents            register a document: {"path": ...} or {"filename": ..., "data": base64}
GET  /v1/documents            the registered documents (without their text)
GET  /v1/documents/{id}       one, with its text and the offsets of its pages and sections
POST /v1/documents/{id}/open  load its KV prefix from the cache on disk, or prefill it (queued like
                              an answer); {"stream": true}: prefill progress as SSE, then the result

The page and its files are public (they hold no data); the routes under /v1 take the API key.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from ..errors import DyscoEdgeError
from .documents import DocumentBody, Opening, OpenBody
from .queue import Channel, Job
from .responses import ApiError, api_error

STATIC = Path(__file__).parent / "static"
# what a browser loads before it has the key (no data in them); a trailing "/" is a prefix
PUBLIC_PATHS = ("/", "/static/")


def add_page(app: FastAPI, service) -> None:
    routes = DocumentRoutes(service)
    app.add_api_route("/", routes.index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/v1/documents", routes.register, methods=["POST"])
    app.add_api_route("/v1/documents", routes.list, methods=["GET"])
    app.add_api_route("/v1/documents/{doc_id}", routes.get, methods=["GET"])
    app.add_api_route("/v1/documents/{doc_id}/open", routes.open, methods=["POST"])


class DocumentRoutes:
    def __init__(self, service):
        self.service, self.store = service, service.documents

    async def index(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def register(self, body: DocumentBody) -> dict:
        try:
            doc = await run_in_threadpool(self.store.register, body)
        except DyscoEdgeError as e:
            raise api_error(e) from None
        return doc.summary(with_text=True)

    async def list(self) -> dict:
        return {"object": "list", "data": [doc.summary(with_text=False) for doc in self.store.all()]}

    async def get(self, doc_id: str) -> dict:
        return self.store.get(doc_id, param="doc_id").summary(with_text=True)

    async def open(self, doc_id: str, body: OpenBody = OpenBody()):
        doc = self.store.get(doc_id, param="doc_id")
        channel = Channel(asyncio.get_running_loop())

        def progress(done: int, total: int) -> None:  # reports only: a prefill stopped half-way is not kept
            channel.put("progress", (done, total, (time.perf_counter() - channel.started) * 1000))
        job = self.service.submit(Job(channel, Opening(self.service.model, doc, progress)))
        if body.stream:
            return EventSourceResponse(_open_events(job, doc.id))
        async for kind, value in channel.events():
            if kind == "done":
                return _opened(doc.id, value)
            if kind == "error":
                raise api_error(value)
        raise ApiError(500, f"opening {doc_id} was cancelled", type="server_error")


def _opened(doc_id: str, report) -> dict:
    return {"object": "document.opened", "document": doc_id, "how": report.how, "saved": report.saved,
            "seconds": round(report.seconds, 3), "n_tokens": report.n_tokens}


async def _open_events(job: Job, doc_id: str):
    """document.progress events ({processed, total, time_ms}), then document.opened, then [DONE]."""
    async for kind, value in job.channel.events():
        if kind == "progress":
            done, total, ms = value
            yield _json({"object": "document.progress", "document": doc_id,
                         "prompt_progress": {"total": total, "processed": done, "time_ms": round(ms, 3)}})
        elif kind == "done":
            yield _json(_opened(doc_id, value))
        elif kind == "error":
            yield _json(api_error(value).body())
            return
    yield "[DONE]"


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
