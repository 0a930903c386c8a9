"""Documents as users have them: readers for text, Markdown, PDF and HTML (readers.py), the
KV cache on disk (kv_cache.py) and a document's prefix loaded from it or prefilled (prefill.py)."""
from .kv_cache import KVCache, KVCacheConfig
from .readers import read_document

__all__ = ["KVCache", "KVCacheConfig", "read_document"]
