"""Where dysco-edge keeps files it can make again (KV cells, assembled models)."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(env_var: str, leaf: str) -> Path:
    """$env_var when set, else $XDG_CACHE_HOME/dysco-edge/leaf, else ~/.cache/dysco-edge/leaf."""
    explicit = os.environ.get(env_var)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dysco-edge" / leaf
