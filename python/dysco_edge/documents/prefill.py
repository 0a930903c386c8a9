"""A document's unbiased KV prefix: loaded from the disk cache when saved before, else
prefilled and saved. Any trouble with the cache costs a warning and a prefill, never the answer."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

from ..errors import EngineError
from ..runtime.engine import ProgressFn
from .kv_cache import KVCache, KVCacheConfig, cache_key, warn
from .kv_cells import CellsError, check_cells

if TYPE_CHECKING:
    from ..api import Model

CacheSpec = Union[bool, KVCacheConfig, KVCache, None]


@dataclass(frozen=True)
class PrefixReport:
    """How a document's cells came to be, whether they were saved, and the seconds spent."""
    how: str  # 'loaded', 'prefilled' or 'kept' (the context held it already)
    saved: bool
    seconds: float
    n_tokens: int


def as_cache(spec: CacheSpec) -> Optional[KVCache]:
    """True: the default folder; False/None: no cache; a config or a cache as given."""
    if spec is True:
        return KVCache()
    if not spec:
        return None
    return spec if isinstance(spec, KVCache) else KVCache(spec)


def open_prefix(model: "Model", ids: Sequence[int], cache: Optional[KVCache],
                progress: Optional[ProgressFn] = None) -> PrefixReport:
    """Make the model's KV cache hold exactly ids, loading saved cells when it can."""
    start = time.perf_counter()
    ids = [int(t) for t in ids]
    if ids and model.kept_prefix() == ids:
        return PrefixReport("kept", False, time.perf_counter() - start, len(ids))
    key = cache_key(model.file_identity(), model.cells_identity(), ids) if cache and ids else None
    if key is not None:
        cells = cache.load(key, len(ids))
        if cells is not None and _restore(model, ids, cells, cache, key):
            return PrefixReport("loaded", False, time.perf_counter() - start, len(ids))
    model.prefill(ids, progress=progress)
    saved = False
    if key is not None:
        tokens, cells = model.prefix_cells()
        saved = tokens == ids and _save(cache, key, ids, cells)
    return PrefixReport("prefilled", saved, time.perf_counter() - start, len(ids))


def _restore(model: "Model", ids: list[int], cells: bytearray, cache: KVCache, key: bytes) -> bool:
    """Cells that passed the file's checks still have to be a prefill's (kv_cells.py) and be
    taken by llama.cpp; otherwise the file goes and the caller prefills."""
    try:
        check_cells(cells, len(ids))
        model.restore_prefix(ids, cells)
        return True
    except (CellsError, EngineError) as e:
        model.prefill([])  # whatever a refused restore left in the context goes too
        cache.discard(cache.path(key), f"cells refused: {e}")
        return False


def _save(cache: KVCache, key: bytes, ids: list[int], cells: bytearray) -> bool:
    """Only cells whose layout check_cells knows are saved: a file is never written that a later
    load would refuse."""
    try:
        check_cells(cells, len(ids))
    except CellsError as e:
        warn(f"not caching the document's cells: their layout is not one dysco-edge checks ({e})")
        return False
    return cache.save(key, len(ids), cells) is not None
