"""An independent oracle for attention probabilities and biased logits (transformers).

Loads a GGUF file with transformers (weights dequantized to fp32 by ``gguf``), runs it
in fp32 with *eager* attention under ``torch.no_grad``, and answers:

``plain_logits(model, ids)``                 logits of the last token.
``last_token_attention(model, ids, heads)``  mean over ``(layer, head)`` query heads of
                                             the softmax probabilities from the LAST
                                             token to every position 0..n-1.
``logits_with_bias(model, ids, bias)``       logits of the last token when ``bias[j]``
                                             is added to the last token's attention
                                             logit of position j (after the 1/sqrt(d)
                                             scale, before softmax) in every layer
                                             and every head.
``logits_with_row_biases(...)``              the same with a bias on several query rows
                                             (a teacher-forced DySCO run biases every
                                             intervention step; later tokens see the
                                             K/V those biased passes wrote).

Head indices are query-head indices in the Hugging Face order (the GGUF loader undoes
llama.cpp's per-head Q/K row permutation for llama-arch; the permutation never moves
rows across heads, so llama.cpp's head h is HF's head h).

How the bias reaches the attention (transformers 5.x, checked for 5.23):
a 4-D float mask passed as ``attention_mask`` is returned unchanged by
``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask`` and the
eager attention does ``scores * scaling + mask`` before the softmax, so the mask is
the whole causal structure: we build it ourselves (0 on and below the diagonal, -inf
above, plus the bias rows). SDPA honours the same float mask (it passes it as
``attn_mask``), but SDPA returns no attention weights, so this module uses eager.

Sliding-window models (Gemma 3: window 512 on 5 of every 6 layers): a single 4-D mask
would be used for *every* layer and lose the window. Gemma 3 (and other models whose
forward accepts a ``{"full_attention": ..., "sliding_attention": ...}`` mapping as
``attention_mask``) get one mask per layer type: the sliding mask also hides
positions j with q - j >= window (same rule as llama.cpp's LLAMA_SWA_TYPE_STANDARD and
transformers' ``sliding_window_overlay``); the bias is added on top, so positions
outside the window stay masked whatever their bias.

Known loader quirk fixed here: transformers' GGUF config mapping for ``qwen3`` ignores
``qwen3.attention.key_length``, so a Qwen3 GGUF whose head_dim != hidden/heads (every
real Qwen3 and our tiny model) would load with the wrong head_dim; ``load_hf`` passes
``head_dim`` from the GGUF metadata.

Loading is slow the first time (transformers parses every tokenizer array of the
GGUF); the loaded model is then kept as a plain transformers checkpoint under
``$DYSCO_TEST_MODELS/oracle-hf/`` (see ``_hf_cache_dir``) for later processes.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "load_hf",
    "clear_cache",
    "build_attention_mask",
    "plain_logits",
    "logits_with_bias",
    "logits_with_row_biases",
    "attention_rows",
    "last_token_attention",
]

_CACHE: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()

# Loading a GGUF through transformers parses every tokenizer array with gguf's
# GGUFReader, twice (config, then weights): about 25 s for SmolLM2 and 70 s for
# Gemma 3 (262k tokens) on this machine. After the first load the model is saved as a
# plain transformers checkpoint (safetensors + config.json, exactly the loaded
# weights) keyed by the GGUF's path, size, mtime and the transformers version; later
# processes load that in about a second. DYSCO_ORACLE_HF_CACHE=0 turns this off.
_HF_CACHE_VERSION = "1"


# --------------------------------------------------------------------------- loading

def _gguf_scalar_metadata(path: Path) -> dict:
    """The GGUF header's key/values without the tokenizer's large arrays (the package's reader;
    ``gguf.GGUFReader`` would parse the 262k-entry tokenizer arrays of Gemma 3 too)."""
    from dysco_edge.heads.gguf_meta import read_gguf_metadata
    return read_gguf_metadata(path, want=lambda key: not key.startswith("tokenizer.ggml.")
                              or key == "tokenizer.ggml.pre")


def _gguf_metadata(path: Path) -> dict:
    """The few GGUF keys the loader needs to check or fix up."""
    kv = _gguf_scalar_metadata(path)
    arch = kv["general.architecture"]
    out = {"arch": arch}
    for key in ("attention.key_length", "attention.value_length", "attention.head_count",
                "embedding_length", "attention.sliding_window", "block_count"):
        if f"{arch}.{key}" in kv:
            out[key] = kv[f"{arch}.{key}"]
    return out


def _config_overrides(meta: dict) -> dict:
    over: dict = {}
    arch = meta["arch"]
    k_len = meta.get("attention.key_length")
    if arch in ("qwen3", "qwen2") and k_len is not None:
        over["head_dim"] = int(k_len)
    return over


def _hf_cache_dir(path: Path, overrides: dict) -> Path | None:
    if os.environ.get("DYSCO_ORACLE_HF_CACHE", "1") in ("0", "", "false", "no"):
        return None
    import hashlib
    import transformers

    st = path.stat()
    ident = "|".join([_HF_CACHE_VERSION, str(path), str(st.st_size), str(st.st_mtime_ns),
                      transformers.__version__, repr(sorted(overrides.items()))])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = os.environ.get("DYSCO_TEST_MODELS")
    root = Path(root) if root else Path.home() / ".cache" / "dysco-edge" / "test-models"
    return root / "oracle-hf" / f"{path.stem}-{digest}"


def _save_hf(model, target: Path) -> None:
    import shutil

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the "gguf" marker; weights are plain fp32
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        if not target.exists():
            os.replace(tmp, target)
    except OSError:
        pass  # a cache is an optimisation only
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf(gguf_path, attn_implementation: str = "eager"):
    """A transformers causal LM for a GGUF file (fp32, eval mode), cached per path.

    ``gguf_path``: the ``.gguf`` file, or a directory holding exactly one.
    """
    path = Path(gguf_path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected exactly one .gguf file, found {len(found)}")
        path = found[0]
    path = path.resolve()
    key = (str(path), attn_implementation)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    meta = _gguf_metadata(path)
    overrides = _config_overrides(meta)
    cached = _hf_cache_dir(path, overrides)
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        if cached is not None and (cached / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(
                str(cached), dtype=torch.float32, attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32,
                attn_implementation=attn_implementation, **overrides,
            )
            if cached is not None:
                _save_hf(model, cached)
    finally:
        transformers.logging.set_verbosity(prev)
        if progress:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(torch.float32).eval()
    model.requires_grad_(False)
    _check_config(model, meta)
    with _LOCK:
        _CACHE.setdefault(key, model)
        return _CACHE[key]


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _check_config(model, meta: dict) -> None:
    cfg = model.config
    n_head = meta.get("attention.head_count")
    if n_head is not None and int(n_head) != cfg.num_attention_heads:
        raise RuntimeError(f"loaded {cfg.num_attention_heads} heads, GGUF says {n_head}")
    k_len = meta.get("attention.key_length")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if k_len is not None and int(k_len) != head_dim:
        raise RuntimeError(f"loaded head_dim {head_dim}, GGUF says {k_len}")
    if _sliding_layers(model):
        window = meta.get("attention.sliding_window")
        if window is not None and int(window) != cfg.sliding_window:
            raise RuntimeError(f"loaded sliding_window {cfg.sliding_window}, GGUF says {window}")


# ----------------------------------------------------------------------------- masks


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: cannot find model.model.layers")
    return layers


def _layer_types(model) -> list[str]:
    types = getattr(model.config, "layer_types", None)
    n = model.config.num_hidden_layers
    return list(types) if types else ["full_attention"] * n


def _sliding_layers(model) -> bool:
    return "sliding_attention" in _layer_types(model)


def _as_ids(token_ids) -> "torch.Tensor":
    import torch

    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("empty token list")
    return torch.from_numpy(ids).view(1, -1)


def _check_row_biases(row_biases: Mapping[int, Sequence[float]] | None, n: int) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for row, bias in (row_biases or {}).items():
        row = int(row)
        if row < 0:
            row += n
        if not 0 <= row < n:
            raise ValueError(f"bias row {row} out of range for {n} tokens")
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.size != row + 1:
            raise ValueError(f"bias for row {row} must have {row + 1} entries (positions 0..{row}), got {b.size}")
        if np.isnan(b).any() or np.isposinf(b).any():
            raise ValueError(f"bias for row {row} has NaN or +inf")
        if np.isneginf(b).all():
            raise ValueError(f"bias for row {row} masks every position")
        out[row] = b
    return out


def build_attention_mask(model, n: int, row_biases: Mapping[int, Sequence[float]] | None = None):
    """The additive float mask(s) for ``n`` tokens: causal, plus ``row_biases[i]`` on row i.

    Returns a ``[1, 1, n, n]`` float32 tensor, or for models with sliding-window layers a
    dict ``{"full_attention": M, "sliding_attention": M_window}`` (what their forward
    accepts as a precomputed per-layer-type mask).
    """
    import torch

    rows = _check_row_biases(row_biases, n)
    neg = float("-inf")
    base = torch.zeros((n, n), dtype=torch.float32)
    base.masked_fill_(torch.ones((n, n), dtype=torch.bool).triu(1), neg)
    extra = torch.zeros((n, n), dtype=torch.float32)
    for row, b in rows.items():
        extra[row, : row + 1] = torch.from_numpy(b.astype(np.float32))
    full = (base + extra).view(1, 1, n, n)
    if not _sliding_layers(model):
        return full
    window = int(model.config.sliding_window)
    q = torch.arange(n).view(n, 1)
    k = torch.arange(n).view(1, n)
    outside = (q - k) >= window
    sliding = (base.masked_fill(outside, neg) + extra).view(1, 1, n, n)
    for row, b in rows.items():
        inside = ~outside[row, : row + 1]
        if not np.isfinite(b[inside.numpy()]).any():
            raise ValueError(f"bias for row {row} masks every position inside the sliding window")
    return {"full_attention": full, "sliding_attention": sliding}


# --------------------------------------------------------------------------- forward


@contextlib.contextmanager
def _capture_last_row(model, layers: Iterable[int], store: dict[int, "torch.Tensor"]):
    """Forward hooks that keep the last query row of each layer's attention probabilities."""
    import torch

    hooks = []
    mods = _layers(model)

    def make(layer):
        def hook(_module, _inputs, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("attention module returned no weights: load the model with "
                                   "attn_implementation='eager'")
            store[layer] = weights[0, :, -1, :].detach().to("cpu", dtype=torch.float64)
        return hook

    try:
        for layer in sorted(set(layers)):
            hooks.append(mods[layer].self_attn.register_forward_hook(make(layer)))
        yield
    finally:
        for h in hooks:
            h.remove()


def _forward(model, token_ids, row_biases=None, capture_layers: Iterable[int] = (),
             logit_rows: Sequence[int] = (-1,)):
    """One causal forward pass over all tokens (no KV cache); returns the logits of
    ``logit_rows`` (float64, ``[len(logit_rows), vocab]``) and the captured attention rows."""
    import torch

    ids = _as_ids(token_ids)
    n = ids.shape[1]
    rows = [r + n if r < 0 else r for r in logit_rows]
    if any(not 0 <= r < n for r in rows):
        raise ValueError(f"logit rows {list(logit_rows)} out of range for {n} tokens")
    mask = build_attention_mask(model, n, row_biases) if row_biases else None
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad(), _capture_last_row(model, capture_layers, store):
        # logits_to_keep as an index tensor: the LM head runs on those rows only
        out = model(input_ids=ids, attention_mask=mask, use_cache=False,
                    logits_to_keep=torch.tensor(rows, dtype=torch.long))
    logits = out.logits[0].to(torch.float64).numpy()
    if np.isnan(logits).any():
        raise FloatingPointError("NaN in logits (a bias row masking everything?)")
    return logits, store


def plain_logits(model, token_ids) -> np.ndarray:
    """Logits (float64, one per vocabulary entry) of the last token; standard causal pass."""
    logits, _ = _forward(model, token_ids, logit_rows=[-1])
    return logits[0]


def logits_with_row_biases(model, token_ids, row_biases: Mapping[int, Sequence[float]],
                           rows: Sequence[int] | None = None) -> np.ndarray:
    """Logits (float64, ``[len(rows), vocab]``) with ``row_biases[i]`` (length i+1, -inf
    allowed) added to query row i's attention logits in every layer and head.

    ``rows`` defaults to the biased rows, in increasing order.
    """
    n = len(np.asarray(token_ids).reshape(-1))
    checked = _check_row_biases(row_biases, n)
    rows = sorted(checked) if rows is None else list(rows)
    logits, _ = _forward(model, token_ids, row_biases=checked, logit_rows=rows)
    return logits


def logits_with_bias(model, token_ids, bias: Sequence[float]) -> np.ndarray:
    """Logits (float64) of the last token with ``bias`` (one entry per position 0..n-1,
    -inf allowed) added to the last token's attention logits in every layer and head."""
    n = len(np.asarray(token_ids).reshape(-1))
    return logits_with_row_biases(model, token_ids, {n - 1: bias}, rows=[n - 1])[0]


def attention_rows(model, token_ids, layers: Iterable[int] | None = None,
                   row_biases: Mapping[int, Sequence[float]] | None = None) -> np.ndarray:
    """Softmax attention probabilities (float64) from the LAST token, ``[L, H, n]``
    (layers not asked for are NaN). ``row_biases`` as in ``logits_with_row_biases``
    (a bias on the last row shows in the returned probabilities)."""
    n_layers = model.config.num_hidden_layers
    layers = range(n_layers) if layers is None else sorted(set(int(l) for l in layers))
    for l in layers:
        if not 0 <= l < n_layers:
            raise ValueError(f"layer {l} out of range (model has {n_layers})")
    n = len(np.asarray(token_ids).reshape(-1))
    _, store = _forward(model, token_ids, row_biases=row_biases, capture_layers=layers, logit_rows=[-1])
    out = np.full((n_layers, model.config.num_attention_heads, n), np.nan)
    for l, w in store.items():
        out[l] = w.numpy()
    return out


def last_token_attention(model, token_ids, heads: Iterable[tuple[int, int]],
                         row_biases: Mapping[int, Sequence[float]] | None = None) -> np.ndarray:
    """Mean over the ``(layer, head)`` query heads of the softmax attention probabilities
    from the last token to every position: float64, length ``len(token_ids)``.

    Without ``row_biases`` this is DySCO's ``a`` for a plain (unbiased) pass."""
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("no heads given")
    n_heads = model.config.num_attention_heads
    for l, h in heads:
        if not 0 <= h < n_heads:
            raise ValueError(f"head {h} out of range (model has {n_heads} query heads)")
    probs = attention_rows(model, token_ids, layers={l for l, _ in heads}, row_biases=row_biases)
    return np.mean([probs[l, h] for l, h in heads], axis=0)
