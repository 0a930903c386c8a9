"""The server's options, checked once when it starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import MODES, OFF
from ..errors import InputError


@dataclass(frozen=True)
class ServerSettings:
    model_id: str                       # the name /v1/models lists and responses carry
    api_key: Optional[str] = None       # when set, /v1/* needs "Authorization: Bearer <key>"
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are given
    max_queue: int = 16                 # requests waiting behind the running one; more get 503
    max_tokens: Optional[int] = None    # a request's default max_tokens; None: the rest of the context
    dysco_mode: str = OFF               # for requests that send dysco "auto" (or nothing); off: plain
    local_paths: bool = False           # POST /v1/documents may name a file on this machine (loopback only)

    def __post_init__(self):
        if not self.model_id.strip():
            raise InputError("model_id must not be empty")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key must not be empty")
        if self.max_queue < 1:
            raise InputError(f"the queue length must be >= 1, got {self.max_queue}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.dysco_mode not in (OFF, *MODES):
            raise InputError(f"the DySCO mode must be one of {', '.join((OFF, *MODES))}, got {self.dysco_mode!r}")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
