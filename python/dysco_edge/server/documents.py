"""Documents the server holds: registered by upload or by a path on the server's machine, read by
the same readers as `run --doc`, opened (their KV prefix loaded from the cache on disk, or
prefilled) as a queued job, and put into chat requests that name them (`"document": id`).

A document's id is a digest of its text, so the same file registered twice is one document.
Paths are read only when the server listens on a loopback address: anyone else with the key
could otherwise read any file the server may read.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, model_validator

from ..api import DOCUMENT_TEMPLATE
from ..documents.focus import places
from ..documents.readers import read_document
from ..errors import ContextOverflow, DocumentError
from .focus import FocusPlan, focus_top
from .responses import ApiError

MAX_UPLOAD_BYTES = 64 << 20
MAX_DOCUMENTS = 32        # the least recently used go first
ANSWER_ROOM = 256         # tokens a registered document leaves free for a question and its answer


class DocumentBody(BaseModel):
    """POST /v1/documents: {"path": "..."} or {"filename": "report.pdf", "data": "<base64>"}."""
    model_config = ConfigDict(extra="forbid")
    path: Optional[str] = None
    filename: Optional[str] = None
    data: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("give either path (a file on the server's machine) or data (the file, base64)")
        if self.data is not None and not (self.filename or "").strip():
            raise ValueError("an upload needs its filename (its suffix says how to read it: .pdf, .html, .md, .txt)")
        return self


class OpenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stream: bool = False  # SSE: prefill progress events, then the opened event


@dataclass(frozen=True)
class StoredDocument:
    id: str
    filename: str
    text: str
    n_tokens: int  # of its question turn with an empty question (what it takes of the context)

    def summary(self, *, with_text: bool) -> dict:
        out = {"id": self.id, "object": "document", "filename": self.filename, "n_chars": len(self.text),
               "n_tokens": self.n_tokens, "places": [{"start": at, "where": where} for at, where in places(self.text)]}
        return {**out, "text": self.text} if with_text else out


class DocumentStore:
    def __init__(self, model, *, allow_paths: bool):
        self.model, self.allow_paths = model, allow_paths
        self._docs: OrderedDict[str, StoredDocument] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, body: DocumentBody) -> StoredDocument:
        """Read, tokenize and keep a document (a 400 when it cannot be read or does not fit)."""
        if body.path is not None:
            if not self.allow_paths:
                raise ApiError(403, "documents are opened by path only when the server listens on a loopback "
                               "address; upload the file instead (filename and data)", param="path")
            return self._keep(Path(body.path).name, read_document(Path(body.path).expanduser()))
        return self._keep(Path(body.filename).name, _read_upload(body.filename, body.data))

    def _keep(self, filename: str, text: str) -> StoredDocument:
        n_tokens = len(self.model.prompt_ids(messages=[_question_turn(text, "")])[0])
        if n_tokens + ANSWER_ROOM > self.model.n_ctx:
            raise ContextOverflow(f"{filename} is {n_tokens} tokens; with {ANSWER_ROOM} for a question and its "
                                  f"answer it does not fit the server's context of {self.model.n_ctx} tokens "
                                  f"(start the server with a larger --n-ctx)", n_prompt=n_tokens,
                                  n_ctx=self.model.n_ctx)
        doc = StoredDocument("doc-" + hashlib.sha256(text.encode()).hexdigest()[:24], filename, text, n_tokens)
        with self._lock:
            self._docs[doc.id] = doc
            self._docs.move_to_end(doc.id)
            while len(self._docs) > MAX_DOCUMENTS:
                self._docs.popitem(last=False)
        return doc

    def get(self, doc_id: str, param: str = "document") -> StoredDocument:
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                self._docs.move_to_end(doc_id)
        if doc is None:
            raise ApiError(404, f"no document {doc_id!r} on this server (register it with POST /v1/documents)",
                           param=param)
        return doc

    def all(self) -> list[StoredDocument]:
        with self._lock:
            return list(self._docs.values())


def _question_turn(text: str, question: str) -> dict:
    return {"role": "user", "content": DOCUMENT_TEMPLATE.format(document=text, question=question)}


def document_messages(doc: StoredDocument, messages: list[dict]) -> list[dict]:
    """The chat with the document put into its first user turn, as `Model.document` asks
    (so the document's KV prefix, once opened, serves every question)."""
    out, placed = [], False
    for message in messages:
        if message["role"] == "user" and not placed:
            message, placed = _question_turn(doc.text, message["content"]), True
        out.append(message)
    if not placed:
        raise ApiError(400, "a chat about a document needs a user message (the question)", param="messages")
    return out


def _read_upload(filename: str, data: str) -> str:
    """An uploaded file's text, read as `run --doc` reads a file of that name."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "data is not base64", param="data") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"{filename} is {len(raw)} bytes; uploads are limited to {MAX_UPLOAD_BYTES} bytes")
    with tempfile.TemporaryDirectory(prefix="dysco-edge-upload-") as folder:
        path = Path(folder) / Path(filename).name
        path.write_bytes(raw)
        try:
            return read_document(path)
        except DocumentError as e:  # name the file as the client knows it
            raise DocumentError(str(e).replace(str(path), filename)) from None


class Opening:
    """A queued job that opens a document's KV prefix; iterating it does the work and yields no
    text, then `result` is the PrefixReport (loaded, prefilled or kept)."""

    def __init__(self, model, doc: StoredDocument, progress):
        self.model, self.doc, self.progress = model, doc, progress
        self.result = None

    def __iter__(self):
        session = self.model.document(self.doc.text, progress=self.progress, reserve=ANSWER_ROOM)
        self.result = session.opened
        return iter(())

    def describe(self) -> str:
        return f"open {self.doc.filename} ({self.doc.n_tokens} tokens)"

    def close(self) -> None:
        pass


def request_inputs(store: DocumentStore, body, model) -> tuple[dict, Optional[FocusPlan]]:
    """Model.generate's input arguments for a chat or completion body, and where its focus is
    located (None: it asked for none). A chat naming a `document` gets the document in its first
    user turn, and its focus is located in the document's text."""
    top = focus_top(body.return_focus)
    document = getattr(body, "document", None)
    if document is not None:
        doc = store.get(document)
        messages = document_messages(doc, body.inputs(model)["messages"])
        return {"messages": messages}, (FocusPlan(top, (doc.text,), ({"document": doc.id},)) if top else None)
    inputs = body.inputs(model)
    if top is None:
        return inputs, None
    if "messages" in inputs:
        return inputs, FocusPlan.for_messages(top, [m["content"] for m in inputs["messages"]])
    prompt = body.prompt if isinstance(body.prompt, str) else None  # token ids: no text to place passages in
    return inputs, FocusPlan(top, (prompt,) if prompt else (), ({},) if prompt else ())
