"""OpenAI's response shapes: whole answers, streamed chunks, usage, errors; and
llama-server's two extensions we speak (prefill progress, context overflow)."""
from __future__ import annotations

import re
import time
import uuid
from typing import Optional

from ..errors import ConfigError, ContextOverflow, DyscoEdgeError, InputError, NoHeadMap

_FIELD = re.compile(r"([A-Za-z_][\w.\[\]]*): ")
# our Generation.finish_reason -> OpenAI's ("context": the context filled up)
FINISH = {"stop": "stop", "length": "length", "context": "length", "interrupted": "stop"}


class ApiError(DyscoEdgeError):
    """An error answered as JSON: {"error": {"code", "type", "message", "param", ...}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, extra: Optional[dict] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param
        self.extra, self.headers = extra or {}, headers or {}

    def body(self) -> dict:
        error = {"code": self.status, "type": self.type, "message": str(self), "param": self.param}
        return {"error": {**error, **self.extra}}


def api_error(exc: Exception) -> ApiError:
    """The HTTP answer to an error raised while preparing or running a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflow):  # llama-server's shape, so its clients can react
        return ApiError(400, str(exc), type="exceed_context_size_error",
                        extra={"n_prompt_tokens": exc.n_prompt, "n_ctx": exc.n_ctx})
    if isinstance(exc, ConfigError):
        field = str(exc).split(":", 1)[0]
        return ApiError(400, str(exc), param=f"dysco.{field}" if field.replace("/", "").isidentifier() else "dysco")
    if isinstance(exc, (InputError, NoHeadMap)):  # "top_k: expected ..." names its field: param top_k
        named = _FIELD.match(str(exc))
        return ApiError(400, str(exc), param=named.group(1) if named else None)
    return ApiError(500, f"the server failed to answer: {exc}", type="server_error")


def usage(generation) -> dict:
    n_out = len(generation.token_ids)
    return {"prompt_tokens": generation.n_prompt, "completion_tokens": n_out,
            "total_tokens": generation.n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": generation.n_cached}}


class Shape:
    """One response's id and envelope; ChatShape and TextShape fill in the choices."""
    object_whole = object_chunk = prefix = ""

    def __init__(self, model_id: str, include_usage: bool):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created, self.model_id, self.include_usage = int(time.time()), model_id, include_usage

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices}

    def chunk(self, choices: list) -> dict:
        out = self._envelope(self.object_chunk, choices)
        if self.include_usage:  # OpenAI: every chunk has the key, only the last one a value
            out["usage"] = None
        return out

    def progress(self, total: int, cache: int, processed: int, time_ms: float) -> dict:
        """llama-server's prefill progress: no choices, counts include the cached prefix."""
        return {**self.chunk([]), "prompt_progress": {"total": total, "cache": cache, "processed": processed,
                                                      "time_ms": round(time_ms, 3)}}

    def usage_chunk(self, generation) -> dict:
        return {**self.chunk([]), "usage": usage(generation)}

    def whole(self, generation, dysco_header: str) -> dict:
        out = self._envelope(self.object_whole, [self._whole_choice(generation)])
        out["usage"] = usage(generation)
        out["dysco"] = {"applied": generation.dysco is not None, "status": dysco_header}
        return out

    def first(self) -> Optional[dict]:
        return None

    def piece(self, text: str) -> dict:
        raise NotImplementedError

    def finish(self, generation) -> dict:
        raise NotImplementedError

    def _whole_choice(self, generation) -> dict:
        raise NotImplementedError


class ChatShape(Shape):
    object_whole, object_chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _delta(self, delta: dict, finish: Optional[str] = None) -> dict:
        return self.chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def first(self) -> dict:
        return self._delta({"role": "assistant", "content": ""})

    def piece(self, text: str) -> dict:
        return self._delta({"content": text})

    def finish(self, generation) -> dict:
        return self._delta({}, FINISH[generation.finish_reason])

    def _whole_choice(self, generation) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": generation.text},
                "logprobs": None, "finish_reason": FINISH[generation.finish_reason]}


class TextShape(Shape):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"

    def _text(self, text: str, finish: Optional[str] = None) -> dict:
        return self.chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def piece(self, text: str) -> dict:
        return self._text(text)

    def finish(self, generation) -> dict:
        return self._text("", FINISH[generation.finish_reason])

    def _whole_choice(self, generation) -> dict:
        return {"index": 0, "text": generation.text, "logprobs": None,
                "finish_reason": FINISH[generation.finish_reason]}
