"""The only module that touches the DySCO C API (native/dysco.h), through cffi in ABI mode, and
through ctypes.PyDLL for the few per-step calls that must keep the GIL (held_gil_calls).

The library is the same libllama that llama-cpp-python loaded, so a `llama_context *`
obtained there is passed here as an integer address.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cffi import FFI

from ..config import HARD_MASK_STRENGTH
from ..errors import DyscoError, DyscoValueError

_CDEF = """
const char * dysco_last_error(void);
int32_t dysco_set_heads(void * ctx, const int32_t * layers, const int32_t * heads, int32_t n_heads);
int32_t dysco_clear_heads(void * ctx);
int32_t dysco_l_max(void * ctx);
int32_t dysco_set_capture(void * ctx, bool on);
int32_t dysco_probe(void * ctx, int32_t token, int32_t pos, int32_t seq_id);
int32_t dysco_set_bias(void * ctx, int32_t seq_id, const float * bias, int32_t n_bias);
int32_t dysco_clear_bias(void * ctx, int32_t seq_id);
int32_t dysco_get_scores(void * ctx, float * out, int32_t n_max);
int32_t dysco_scores_pos(void * ctx);
int32_t dysco_set_head_capture(void * ctx, int32_t pos_begin, int32_t pos_end, int32_t layer_end);
int32_t dysco_clear_head_capture(void * ctx);
int32_t dysco_head_scores_shape(void * ctx, int32_t * n_layer, int32_t * n_head, int32_t * n_pos);
int32_t dysco_get_head_scores(void * ctx, float * out, int64_t n_max);
int32_t dysco_set_attn_scale(void * ctx, float scale);
int32_t dysco_set_placement_log(void * ctx, bool on);
int32_t dysco_get_placement(void * ctx, char * out, int32_t n_max);
int32_t dysco_set_slot_layout(void * ctx, bool on, const int32_t * hidden, int32_t n_hidden, int32_t view_seq);
int32_t dysco_track_supported(void * ctx);
int32_t dysco_importance_reset(void * ctx, int32_t seq_id, int32_t n_positions, double decay, double top_p, int32_t top_k,
                               double strength, double hard_strength, const uint8_t * template_mask, int32_t n_template);
int32_t dysco_importance_set(void * ctx, const double * values, int32_t n);
int32_t dysco_probe_select(void * ctx, int32_t token, int32_t pos, int32_t seq_id);
int32_t dysco_fast_select(void * ctx, int32_t pos, int32_t seq_id);
int32_t dysco_importance_get_seq(void * ctx, int32_t seq_id, double * out, int32_t n_max);
int32_t dysco_pass_selection_seq(void * ctx, int32_t seq_id, int32_t * selected, int32_t n_max);
int32_t dysco_set_seq_capture(void * ctx, int32_t seq_id, bool on);
int32_t dysco_track_end(void * ctx, int32_t seq_id);
int32_t dysco_probe_select_batch(void * ctx, const int32_t * tokens, const int32_t * pos, const int32_t * seq_ids,
                                 int32_t n);
void * dysco_sampler_init_greedy(void * ctx);
"""

ERR_ARGUMENT, ERR_HEAD, ERR_NO_HEADS, ERR_RANGE, ERR_DECODE, ERR_NO_SCORES, ERR_UNSUPPORTED = range(-1, -8, -1)


_VALUE_CODES = (ERR_ARGUMENT, ERR_HEAD, ERR_RANGE)


def lib_dir() -> Path:
    """Where libllama with the DySCO extension lives (DYSCO_EDGE_LIB_DIR overrides)."""
    override = os.environ.get("DYSCO_EDGE_LIB_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "lib"


def library_file(directory: Path) -> Path:
    for name in ("libllama.so", "libllama.dylib", "llama.dll"):
        if (directory / name).exists():
            return directory / name
    raise ImportError(f"dysco-edge: no libllama in {directory}; reinstall the package "
                      f"(see README) or point DYSCO_EDGE_LIB_DIR at a build's library folder")


_ffi = FFI()
_ffi.cdef(_CDEF)
_lib = None


def _load():
    global _lib
    if _lib is None:
        _lib = _ffi.dlopen(str(library_file(lib_dir())))
    return _lib


@functools.lru_cache(maxsize=None)
def held_gil_calls() -> ctypes.PyDLL:
    """The library again through ctypes.PyDLL, whose calls keep the GIL, for the calls a batch step
    makes per sequence that return in microseconds. cffi (and ctypes.CDLL) release the GIL around every
    call: a reader thread woken by the step's tokens then takes it, and the step thread waits for it back,
    several times a step. Engine._llama_decode also launches a decode's graph through it (llama_decode)
    where that only queues the device's work, and then waits for the device with the GIL released."""
    from llama_cpp import llama_batch  # the struct llama_decode takes by value, as llama-cpp-python lays it out

    lib = ctypes.PyDLL(str(library_file(lib_dir())))  # loaded already: the same handle
    i32, ctx = ctypes.c_int32, ctypes.c_void_p
    for name, argtypes in (("dysco_fast_select", [ctx, i32, i32]), ("dysco_pass_selection_seq", [ctx, i32, ctypes.c_void_p, i32]),
                           ("dysco_set_seq_capture", [ctx, i32, ctypes.c_bool]), ("llama_decode", [ctx, llama_batch]),
                           ("llama_get_sampled_token_ith", [ctx, i32]), ("llama_get_logits_ith", [ctx, i32])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, (ctypes.c_void_p if name == "llama_get_logits_ith" else i32)
    return lib


def _selection_args(decay, top_p, top_k, strength, template) -> tuple:
    """decay, top_p, top_k, strength, hard strength, template mask and its length, as the C API takes
    them (an unset top_p / top_k is -1)."""
    mask = np.ascontiguousarray(template, dtype=np.uint8)
    # a from_buffer cdata keeps `mask` alive until the call is made (a cast of it would not)
    return (float(decay), -1.0 if top_p is None else float(top_p), -1 if top_k is None else int(top_k),
            float(strength), HARD_MASK_STRENGTH, _ffi.from_buffer("uint8_t[]", mask), mask.size)


@dataclass(frozen=True)
class NodePlacement:
    """Where ggml's scheduler ran one node DySCO added to a graph (native/dysco-placement.cpp), beside the
    backend running the attention of the node's layer ("" when not known)."""
    name: str
    op: str
    layer: int
    backend: str
    attention_backend: str
    count: int  # times a node of this name was computed so placed (over nodes and graphs)

    @property
    def cpu_fallback(self) -> bool:
        """On the CPU while its layer's attention runs on another backend (a copy to the host per step)."""
        return self.backend == "CPU" and self.attention_backend not in ("", "CPU")

    @classmethod
    def parse(cls, line: str) -> "NodePlacement":
        name, op, layer, backend, attention, count = line.split("\t")
        return cls(name, op, int(layer), backend, attention, int(count))


def _check(rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    message = _ffi.string(_load().dysco_last_error()).decode("utf-8", "replace") or f"{what} failed"
    raise (DyscoValueError if rc in _VALUE_CODES else DyscoError)(message, rc)


class NativeContext:
    """DySCO controls of one llama_context (given as its address)."""

    def __init__(self, ctx_address: int):
        if not ctx_address:
            raise ValueError("NativeContext needs a live llama_context (got a null pointer)")
        self._lib, self._held = _load(), held_gil_calls()
        self._ctx = _ffi.cast("void *", ctx_address)
        self._address = ctx_address
        self._scores = np.zeros(0, dtype=np.float32)

    def _read_vector(self, getter, dtype, c_type: str, what: str) -> np.ndarray:
        """A vector from a C getter that returns its length when given a null buffer."""
        n = _check(getter(self._ctx, _ffi.NULL, 0), what)
        out = np.empty(n, dtype=dtype)
        _check(getter(self._ctx, _ffi.cast(c_type, _ffi.from_buffer(out)), n), what)
        return out

    def set_heads(self, heads) -> None:
        pairs = [(int(layer), int(head)) for layer, head in heads]
        layers = _ffi.new("int32_t[]", [p[0] for p in pairs])
        idx = _ffi.new("int32_t[]", [p[1] for p in pairs])
        _check(self._lib.dysco_set_heads(self._ctx, layers, idx, len(pairs)), "dysco_set_heads")

    def clear_heads(self) -> None:
        _check(self._lib.dysco_clear_heads(self._ctx), "dysco_clear_heads")

    @property
    def l_max(self) -> int:
        return _check(self._lib.dysco_l_max(self._ctx), "dysco_l_max")

    def set_capture(self, on: bool) -> None:
        _check(self._lib.dysco_set_capture(self._ctx, bool(on)), "dysco_set_capture")

    def probe(self, token: int, pos: int, seq_id: int = 0) -> None:
        _check(self._lib.dysco_probe(self._ctx, int(token), int(pos), int(seq_id)), "dysco_probe")

    def set_bias(self, bias: np.ndarray, seq_id: int = 0) -> None:
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        ptr = _ffi.cast("const float *", _ffi.from_buffer(bias))
        _check(self._lib.dysco_set_bias(self._ctx, int(seq_id), ptr, bias.size), "dysco_set_bias")

    def clear_bias(self, seq_id: int = 0) -> None:
        _check(self._lib.dysco_clear_bias(self._ctx, int(seq_id)), "dysco_clear_bias")

    def scores(self) -> np.ndarray:
        """Mean QR-head attention of the last scored token over positions 0..p (a copy)."""
        return self._read_vector(self._lib.dysco_get_scores, np.float32, "float *", "dysco_get_scores")

    def scores_pos(self) -> int:
        return _check(self._lib.dysco_scores_pos(self._ctx), "dysco_scores_pos")

    def set_head_capture(self, pos_begin: int, pos_end: int, layer_end: int | None = None) -> None:
        """Capture every head's attention (layers < layer_end; None = all) of the tokens decoded
        next at positions [pos_begin, pos_end); starts a new average."""
        rc = self._lib.dysco_set_head_capture(self._ctx, int(pos_begin), int(pos_end), int(layer_end or 0))
        _check(rc, "dysco_set_head_capture")

    def clear_head_capture(self) -> None:
        _check(self._lib.dysco_clear_head_capture(self._ctx), "dysco_clear_head_capture")

    def head_scores(self) -> np.ndarray:
        """[n_layer, n_head, n_pos] attention of the captured tokens, averaged over them (a copy)."""
        dims = _ffi.new("int32_t[3]")
        _check(self._lib.dysco_head_scores_shape(self._ctx, dims, dims + 1, dims + 2), "dysco_head_scores_shape")
        out = np.empty((dims[0], dims[1], dims[2]), dtype=np.float32)
        _check(self._lib.dysco_get_head_scores(self._ctx, _ffi.cast("float *", _ffi.from_buffer(out)), out.size),
               "dysco_get_head_scores")
        return out

    def set_attn_scale(self, factor: float) -> None:
        """Multiply every attention logit by `factor` in later decodes (1.0 = off)."""
        _check(self._lib.dysco_set_attn_scale(self._ctx, float(factor)), "dysco_set_attn_scale")

    def set_placement_log(self, on: bool) -> None:
        """Record where every DySCO node of later decodes runs (on: a new record)."""
        _check(self._lib.dysco_set_placement_log(self._ctx, bool(on)), "dysco_set_placement_log")

    def placement(self) -> list[NodePlacement]:
        """The record since set_placement_log(True): one entry per distinct node and placement."""
        n = _check(self._lib.dysco_get_placement(self._ctx, _ffi.NULL, 0), "dysco_get_placement")
        buf = _ffi.new("char[]", n + 1)
        _check(self._lib.dysco_get_placement(self._ctx, buf, n + 1), "dysco_get_placement")
        return [NodePlacement.parse(line) for line in _ffi.string(buf).decode().splitlines()]

    def set_slot_layout(self, hidden=(), view_seq: int = -1) -> None:
        """Address cells by slot instead of position (a reference-harness replay, see
        bench/verify/reference_harness.py): scores and bias by slot, `hidden` slots masked from every
        query, rows of `view_seq` attending every occupied cell."""
        slots = [int(s) for s in hidden]
        arr = _ffi.new("int32_t[]", slots)
        _check(self._lib.dysco_set_slot_layout(self._ctx, True, arr, len(slots), int(view_seq)), "dysco_set_slot_layout")

    def clear_slot_layout(self) -> None:
        _check(self._lib.dysco_set_slot_layout(self._ctx, False, _ffi.NULL, 0, -1), "dysco_set_slot_layout")

    # ---- importance, selection and bias inside the decode graph (native/dysco-track.cpp) ----

    @property
    def track_supported(self) -> bool:
        """Whether the importance can live in the graph (a plain KV cache; iSWA models track on the host)."""
        return _check(self._lib.dysco_track_supported(self._ctx), "dysco_track_supported") == 1

    def importance_reset(self, n_positions: int, decay: float, top_p: float | None, top_k: int | None,
                         strength: float, template: np.ndarray, seq_id: int = 0) -> None:
        """Track `seq_id` from n_positions positions of zero importance, with these selection settings."""
        rc = self._lib.dysco_importance_reset(self._ctx, int(seq_id), int(n_positions),
                                              *_selection_args(decay, top_p, top_k, strength, template))
        _check(rc, "dysco_importance_reset")

    def importance(self, seq_id: int = -1) -> np.ndarray:
        """The importance by position (a float64 copy; waits for the device) of seq_id (-1: the last
        reset sequence)."""
        def get(ctx, out, n):
            return self._lib.dysco_importance_get_seq(ctx, int(seq_id), out, n)
        return self._read_vector(get, np.float64, "double *", "dysco_importance_get")

    def set_importance(self, values: np.ndarray) -> None:
        """Replace the importance of positions 0..len-1 (finite values >= 0)."""
        arr = np.ascontiguousarray(values, dtype=np.float64)
        _check(self._lib.dysco_importance_set(self._ctx, _ffi.cast("const double *", _ffi.from_buffer(arr)), arr.size),
               "dysco_importance_set")

    def probe_select(self, token: int, pos: int, seq_id: int = 0) -> None:
        """Probe `token` at `pos` (its scores fold into the importance in the graph) and have the next
        full pass select S and bias itself in its graph."""
        _check(self._lib.dysco_probe_select(self._ctx, int(token), int(pos), int(seq_id)), "dysco_probe_select")

    def probe_select_batch(self, items) -> None:
        """probe_select for several sequences at once, items of (token, pos, seq_id): one probe decode,
        each probe folding into its own sequence's importance (a context with a KV stream per sequence)."""
        cols = [_ffi.new("int32_t[]", [int(item[k]) for item in items]) for k in range(3)]
        _check(self._lib.dysco_probe_select_batch(self._ctx, *cols, len(items)), "dysco_probe_select_batch")

    def fast_select(self, pos: int, seq_id: int = 0) -> bool:
        """Fast mode: have the next full pass at `pos` select S from the importance over 0..pos-1, bias
        itself and fold its own scores, all in its graph. False when nothing has scored yet (probe this
        step instead)."""
        return _check(self._held.dysco_fast_select(self._address, int(pos), int(seq_id)), "dysco_fast_select") == 1

    def pass_selection(self, *, want_selected: bool = False, seq_id: int = -1):
        """After the armed full pass (of seq_id; -1: the last reset sequence): S (ascending int64) when
        `want_selected` (waits for the device), else None. Raises DyscoError when that pass did not
        select (it then ran unbiased)."""
        lib, seq = self._lib, int(seq_id)
        if not want_selected:
            _check(self._held.dysco_pass_selection_seq(self._address, seq, None, 0), "dysco_pass_selection")
            return None
        out = np.empty(max(lib.dysco_importance_get_seq(self._ctx, seq, _ffi.NULL, 0), 0) + 1, dtype=np.int32)
        count = _check(lib.dysco_pass_selection_seq(self._ctx, seq, _ffi.cast("int32_t *", _ffi.from_buffer(out)),
                                                    out.size), "dysco_pass_selection")
        return out[:count].astype(np.int64)

    def set_seq_capture(self, seq_id: int, on: bool) -> None:
        """Whether seq_id's full passes score and fold their last token (a parallel context's warmup)."""
        _check(self._held.dysco_set_seq_capture(self._address, int(seq_id), bool(on)), "dysco_set_seq_capture")

    def track_end(self, seq_id: int) -> None:
        """Stop tracking seq_id (its generation ended)."""
        _check(self._lib.dysco_track_end(self._ctx, int(seq_id)), "dysco_track_end")

    def greedy_sampler(self) -> int:
        """The address of a new greedy llama_sampler whose backend graph picks the token in two stages
        (dysco.h dysco_sampler_init_greedy), for a chain that then owns it."""
        sampler = self._lib.dysco_sampler_init_greedy(self._ctx)
        if sampler == _ffi.NULL:
            raise DyscoError("dysco_sampler_init_greedy returned no sampler", ERR_ARGUMENT)
        return int(_ffi.cast("uintptr_t", sampler))


class SequenceControls:
    """The DySCO calls of one sequence of a parallel context, seq_id bound, as the bookkeeping
    strategies (bookkeeping.py) make them on a NativeContext."""

    def __init__(self, native: NativeContext, seq_id: int):
        self.native, self.seq_id = native, seq_id

    def importance_reset(self, n_positions: int, decay: float, top_p: float | None, top_k: int | None,
                         strength: float, template: np.ndarray) -> None:
        self.native.importance_reset(n_positions, decay, top_p, top_k, strength, template, seq_id=self.seq_id)

    def importance(self) -> np.ndarray:
        return self.native.importance(self.seq_id)

    def fast_select(self, pos: int) -> bool:
        return self.native.fast_select(pos, self.seq_id)

    def probe_select(self, token: int, pos: int) -> None:
        self.native.probe_select(token, pos, self.seq_id)

    def pass_selection(self, *, want_selected: bool = False):
        return self.native.pass_selection(want_selected=want_selected, seq_id=self.seq_id)

    def set_capture(self, on: bool) -> None:
        self.native.set_seq_capture(self.seq_id, on)
