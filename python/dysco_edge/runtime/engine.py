"""One llama.cpp model and context, driven token by token: the only owner of llama.cpp
pointers (with native.py for the DySCO C API).

The DySCO loop needs finer control than `llama_cpp.Llama.eval` gives: which token gets
logits, removing cells, probing. Everything llama.cpp-specific the package needs is here:
decoding, KV truncation and state, tokens and text, metadata, end of generation, sampling.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from . import _llama  # noqa: F401  (points llama_cpp at our libllama before it loads)
import llama_cpp

from ..cores import physical_cores
from ..errors import EngineError, InputError
from ..limits import INT32_MAX, MAX_THREADS, int_in
from .native import NativeContext, held_gil_calls, lib_dir
from .sampling import SamplingOptions

ProgressFn = Callable[[int, int], None]


SPLIT_MODES = ("layer", "row", "none")  # llama_cpp.LLAMA_SPLIT_MODE_* by name; layer is llama.cpp's default
_SPLIT_MODE_IDS = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
                   "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}


@dataclass(frozen=True)
class SplitOptions:
    """How offloaded layers spread over several devices (llama.cpp's split options), and the RPC
    servers whose devices join this process's before the model loads."""
    mode: str = "layer"                   # layer: whole layers per device; row: rows of each matrix (CUDA); none
    main_gpu: int = 0                     # mode none: the one device used; row: the one for small tensors
    tensor_split: Union[tuple[float, ...], str] = ()  # a share per device in llama.cpp's order ("3,1" too);
                                                      # (): by free memory
    rpc: Union[tuple[str, ...], str] = ()  # host:port of RPC servers ("a:1,b:2" is read as two)

    def __post_init__(self):
        if self.mode not in SPLIT_MODES:
            raise InputError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, got {self.mode!r}")
        object.__setattr__(self, "main_gpu", int_in(self.main_gpu, "main_gpu", 0, INT32_MAX, what="a device index"))
        object.__setattr__(self, "tensor_split", _checked_shares(self.tensor_split))
        object.__setattr__(self, "rpc", _checked_endpoints(self.rpc))


def _checked_shares(shares: Union[Sequence[float], str]) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in (shares.split(",") if isinstance(shares, str) else shares))
    except (TypeError, ValueError):
        raise InputError(f"tensor_split must be numbers, one share per device (e.g. 3,1), got {shares!r}") from None
    if any(not math.isfinite(x) or x < 0 for x in values):
        raise InputError(f"tensor_split shares must be finite and >= 0, got {','.join(f'{x:g}' for x in values)}")
    if values and not any(values):
        raise InputError("tensor_split shares are all zero: give at least one device a share (e.g. 1,1)")
    if len(values) > llama_cpp.LLAMA_MAX_DEVICES:
        raise InputError(f"tensor_split has {len(values)} shares; llama.cpp takes at most "
                         f"{llama_cpp.LLAMA_MAX_DEVICES} devices")
    return values


_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")
MAX_LOGITS_VIEWS = 1024  # Engine's cached logits views, dropped all at once beyond this (a moved buffer's)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of an RPC server's 'host:port' (ggml reads IPv4 addresses and host names only)."""
    host, sep, port = endpoint.rpartition(":")
    # an ASCII name of labels 1..63 long: ggml hands the bytes to gethostbyname (no IDNA), and Python's
    # resolver raises UnicodeError, not OSError, on an empty or overlong label
    labels_ok = _HOST.fullmatch(host) is not None and all(0 < len(label) < 64 for label in host.split("."))
    if not sep or not labels_ok or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"an RPC server is host:port (an IPv4 address or host name, a port in 1..65535), "
                         f"got {endpoint!r}")
    return host, int(port)


def _checked_endpoints(rpc: Union[str, Sequence[str]]) -> tuple[str, ...]:
    endpoints = tuple(rpc.split(",") if isinstance(rpc, str) else rpc)
    if not all(isinstance(e, str) for e in endpoints):
        raise InputError(f"rpc must be host:port strings, got {rpc!r}")
    endpoints = tuple(e.strip() for e in endpoints)
    for endpoint in endpoints:
        parse_endpoint(endpoint)
    if len(set(endpoints)) < len(endpoints):
        raise InputError(f"an RPC server is named twice in {','.join(endpoints)}: name each once")
    return endpoints


@dataclass(frozen=True)
class EngineOptions:
    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = False
    type_k: Optional[int] = None  # a ggml type id (llama_cpp.GGML_TYPE_*); None = F16
    type_v: Optional[int] = None
    offload_kqv: bool = True  # False: the KV cache (and attention) stays in host memory
    n_threads: Optional[int] = None  # None: one per physical core (cores.py), as llama.cpp's tools
    n_seq_max: int = 1  # > 1: that many sequences, each with n_ctx cells of its own (a KV stream each)
    # with n_seq_max > 1: one cache of n_ctx cells that every sequence shares (cells hold several
    # sequences' ids: the reference harness and slot layouts need that), instead of a stream each
    kv_unified: bool = False
    split: SplitOptions = field(default_factory=SplitOptions)

    def __post_init__(self):
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max"):  # uint32 in llama.cpp, int32 positions
            object.__setattr__(self, name, int_in(getattr(self, name), name, 1, INT32_MAX))
        object.__setattr__(self, "n_gpu_layers", int_in(self.n_gpu_layers, "n_gpu_layers", -1, INT32_MAX))
        if self.n_threads is not None:
            object.__setattr__(self, "n_threads", int_in(self.n_threads, "n_threads", 1, MAX_THREADS))
        if self.n_ubatch > self.n_batch:
            raise InputError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        if not isinstance(self.split, SplitOptions):
            raise InputError(f"split must be a SplitOptions, got {self.split!r}")


FLASH_ATTN_CHOICES = ("auto", "on", "off")
# placement.CACHE_TYPES by ggml type id
CACHE_TYPE_IDS = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
_DEVICE_KINDS = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator"}
_c = ctypes
_GGML_SIGNATURES = {  # the parts of ggml's backend registry used here: (argument types, result type)
    "ggml_backend_dev_count": ([], _c.c_size_t),
    "ggml_backend_dev_get": ([_c.c_size_t], _c.c_void_p),
    "ggml_backend_dev_name": ([_c.c_void_p], _c.c_char_p),
    "ggml_backend_dev_description": ([_c.c_void_p], _c.c_char_p),
    "ggml_backend_dev_type": ([_c.c_void_p], _c.c_int),
    "ggml_backend_dev_backend_reg": ([_c.c_void_p], _c.c_void_p),
    "ggml_backend_reg_name": ([_c.c_void_p], _c.c_char_p),
    "ggml_backend_reg_by_name": ([_c.c_char_p], _c.c_void_p),
    "ggml_backend_reg_get_proc_address": ([_c.c_void_p, _c.c_char_p], _c.c_void_p),
    "ggml_backend_reg_dev_count": ([_c.c_void_p], _c.c_size_t),
    "ggml_backend_reg_dev_get": ([_c.c_void_p, _c.c_size_t], _c.c_void_p),
    "ggml_backend_device_register": ([_c.c_void_p], None),
    "ggml_backend_dev_memory": ([_c.c_void_p, _c.POINTER(_c.c_size_t), _c.POINTER(_c.c_size_t)], None),
}


@dataclass(frozen=True)
class Device:
    kind: str  # CPU, GPU, iGPU, accelerator (an RPC server's device says GPU, whatever it is)
    name: str  # CPU, CUDA0, RPC0, ...
    description: str  # the model of the device; for an RPC device, its server's host:port
    backend: str = ""  # the backend that registered it: CPU, CUDA, RPC, ...

    def label(self) -> str:
        return f"{self.name} ({self.description})" if self.description else self.name


def devices() -> list[Device]:
    """The compute devices ggml has registered: this build's, and those of RPC servers connected
    (llama-cpp-python binds none of this)."""
    return [device for device, _ in _device_handles()]


def _device_handles() -> list[tuple[Device, int]]:
    ggml = _ggml()
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        out.append((Device(_DEVICE_KINDS.get(ggml.ggml_backend_dev_type(dev), "other"),
                           _text(ggml.ggml_backend_dev_name(dev)), _text(ggml.ggml_backend_dev_description(dev)),
                           _text(ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)))), dev))
    return out


def _text(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def offload_devices() -> list[Device]:
    """The devices llama.cpp spreads offloaded layers over, in its order (the order of tensor_split's
    shares and main_gpu's index): RPC servers' first, then GPUs, then integrated GPUs if no GPU."""
    found = devices()
    rpc = [d for d in found if d.backend == "RPC"]
    gpus = [d for d in found if d.kind == "GPU" and d.backend != "RPC"]
    return rpc + gpus + ([d for d in found if d.kind == "iGPU"] if not gpus else [])


def offload_free_bytes() -> int:
    """Free memory of the devices that take offloaded layers, together (0 on the CPU alone)."""
    ggml, free, total = _ggml(), ctypes.c_size_t(), ctypes.c_size_t()
    found, offload = 0, offload_devices()
    for device, handle in _device_handles():
        if device in offload:
            ggml.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
            found += free.value
    return found


def gpu_offload_supported() -> bool:
    """Whether any device can take layers: a GPU, an integrated GPU, or a connected RPC server's.
    Not llama_supports_gpu_offload(): that is true in any build with the RPC backend, GPU or not."""
    return bool(offload_devices())


@functools.lru_cache(maxsize=None)
def _ggml():
    # the backend registry lives in libggml: open the file libllama links (its soname, libggml.so.0),
    # for a wheel holds copies, not links, and another copy would be a second registry that
    # libllama never sees (RPC servers connected there would take no layers)
    sonames = sorted(lib_dir().glob("libggml.so.[0-9]*"), key=lambda p: len(p.name))
    for path in [*sonames[:1], *(lib_dir() / n for n in ("libggml.so", "libggml.dylib", "ggml.dll"))]:
        if path.exists():
            lib = ctypes.CDLL(str(path))  # already loaded by libllama: the same handle
            break
    else:
        raise EngineError(f"no libggml in {lib_dir()}")
    for fn_name, (argtypes, restype) in _GGML_SIGNATURES.items():
        fn = getattr(lib, fn_name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


# ---- RPC: other machines' devices (ggml's RPC backend, protocol of ggml-rpc.h in the pinned tree) ----

RPC_PROTOCOL = (7, 0)    # a server must speak 7.x with x <= 0, as ggml's own handshake demands
RPC_TIMEOUT_S = 10.0     # for our handshake: a server serves one client at a time, a busy one never answers
_RPC_CMD_HELLO = 14
# what ggml's client asks of every device as it registers and loads: (command, reply size)
_RPC_DEVICE_QUERIES = ((11, 16), (1, 8), (2, 8))  # GET_DEVICE_MEMORY, GET_ALIGNMENT, GET_MAX_SIZE
_RPC_CMD_DEVICE_COUNT = 15
RPC_MAX_DEVICES = 64     # more from one server is garbage, not hardware
_RPC_CAPS_SIZE = 24      # transport capabilities in the handshake; all zero: plain TCP
_rpc_lock = threading.Lock()
_rpc_connected: set[str] = set()  # ggml's device registry is process-wide and permanent: register once


def connect_rpc(endpoints: Sequence[str]) -> None:
    """Add each RPC server's devices to ggml's registry, once per endpoint and process: every model
    loaded afterwards, in this process, may put layers on them (they come first in llama.cpp's order)."""
    with _rpc_lock:
        for endpoint in endpoints:
            if endpoint not in _rpc_connected:
                _register_rpc_server(endpoint)
                _rpc_connected.add(endpoint)


def _rpc_reg(ggml, endpoint: str):
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise EngineError(f"this build of dysco-edge has no RPC backend, so {endpoint} cannot be used: "
                          f"rebuild it with CMAKE_ARGS=-DGGML_RPC=ON (the default)")
    return reg


def _rpc_function(ggml, reg, name: str, restype, *argtypes):
    address = ggml.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise EngineError(f"ggml's RPC backend in this build has no {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def _register_rpc_server(endpoint: str) -> None:
    ggml = _ggml()
    reg = _rpc_reg(ggml, endpoint)
    rpc_handshake(endpoint)  # ggml aborts the process when a server is unreachable or answers wrongly
    add_server = _rpc_function(ggml, reg, "ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    server = add_server(endpoint.encode())
    if not server:
        raise EngineError(f"the RPC server at {endpoint} offers no devices")
    for i in range(ggml.ggml_backend_reg_dev_count(server)):
        ggml.ggml_backend_device_register(ggml.ggml_backend_reg_dev_get(server, i))


def rpc_handshake(endpoint: str) -> tuple[int, int, int]:
    """The protocol version of the RPC server at endpoint, asked over a connection of our own, with
    the questions ggml's client asks next (device count; each device's memory, alignment, maximum
    size) checked too: ggml aborts the process on any malformed answer. An EngineError names the
    server when it cannot be reached, does not answer, speaks another version or answers wrongly."""
    host, port = parse_endpoint(endpoint)
    hello = struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CAPS_SIZE) + bytes(_RPC_CAPS_SIZE)
    try:
        with socket.create_connection((host, port), timeout=RPC_TIMEOUT_S) as sock:
            sock.sendall(hello)
            reply = _receive(sock, 8 + 4 + _RPC_CAPS_SIZE)
            version = _check_hello(endpoint, reply)
            _check_devices(endpoint, sock)
            return version
    except socket.timeout:
        raise EngineError(f"the RPC server at {endpoint} did not answer in {RPC_TIMEOUT_S:.0f} s; it serves one "
                          f"client at a time: is another process using it?") from None
    except OSError as e:
        raise EngineError(f"cannot reach the RPC server at {endpoint} ({e.strerror or e}); start one there "
                          f"with `dysco-edge rpc-server --host ADDRESS --port {port}`") from None


def _check_hello(endpoint: str, reply: bytes) -> tuple[int, int, int]:
    size, major, minor, patch = struct.unpack_from("<QBBB", reply)
    if size != 4 + _RPC_CAPS_SIZE or major != RPC_PROTOCOL[0] or minor > RPC_PROTOCOL[1]:
        raise EngineError(f"{endpoint} did not answer as an RPC server of protocol {RPC_PROTOCOL[0]}."
                          f"{RPC_PROTOCOL[1]} (llama.cpp's of the same version, or dysco-edge rpc-server)")
    return major, minor, patch


def _rpc_ask(endpoint: str, sock, cmd: int, payload: bytes, reply_size: int) -> bytes:
    """One command's reply, as ggml's client reads it (its size first); EngineError when it is not that."""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    head = _receive(sock, 8, exact=True)
    body = _receive(sock, reply_size, exact=True) if head == struct.pack("<Q", reply_size) else None
    if body is None:
        raise EngineError(f"the RPC server at {endpoint} answered the handshake but not command {cmd} (it closed "
                          f"the connection or sent something else): is it a dysco-edge rpc-server of this version?")
    return body


def _check_devices(endpoint: str, sock) -> None:
    (count,) = struct.unpack("<I", _rpc_ask(endpoint, sock, _RPC_CMD_DEVICE_COUNT, b"", 4))
    if not 1 <= count <= RPC_MAX_DEVICES:
        raise EngineError(f"the RPC server at {endpoint} says it has {count} devices; expected 1..{RPC_MAX_DEVICES}")
    for device in range(count):
        for cmd, size in _RPC_DEVICE_QUERIES:
            _rpc_ask(endpoint, sock, cmd, struct.pack("<I", device), size)


def _receive(sock, n: int, *, exact: bool = False) -> Optional[bytes]:
    """n bytes; if the peer closes first (a server of another protocol hangs up), what came padded
    with zeros, or None when `exact`."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    if exact and len(data) < n:
        return None
    return data.ljust(n, b"\0")


def rpc_server_devices(names: Sequence[str] = ()) -> list[Device]:
    """The local devices an RPC server offers: those named, else every GPU, else the CPU."""
    local = [d for d in devices() if d.backend != "RPC"]
    if names:
        known = {d.name: d for d in local}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"no device named {', '.join(unknown)} here; this build has "
                             f"{', '.join(d.name for d in local)}")
        return [known[n] for n in names]
    gpus = [d for d in local if d.kind in ("GPU", "iGPU")]
    return gpus or [d for d in local if d.kind == "CPU"]


def serve_rpc(endpoint: str, served: Sequence[Device], *, n_threads: int, cache_dir: Optional[str] = None) -> None:
    """Serve the devices to RPC clients at endpoint ('IPv4:port') with ggml's RPC server. It blocks
    while it serves; returning means it could not start (or stopped accepting): an EngineError."""
    ggml = _ggml()
    handles = [h for d, h in _device_handles() if d in served]
    start = _rpc_function(ggml, _rpc_reg(ggml, endpoint), "ggml_backend_rpc_start_server", None, ctypes.c_char_p,
                          ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(handles),
          (ctypes.c_void_p * len(handles))(*handles))
    raise EngineError(f"the RPC server could not listen on {endpoint} (is the port in use, or the address "
                      f"not one of this machine's?)")


def choose_offload(n_gpu_layers: Optional[int], flash_attn: "str | bool",
                   gpu: Optional[bool] = None) -> tuple[int, bool]:
    """(layers to offload, flash attention) as llama.cpp defaults them: where a device can take
    layers (a GPU, an RPC server's) every layer is offloaded and flash attention is on; explicit
    choices win. `gpu` None: ask the registered devices (gpu_offload_supported)."""
    if isinstance(flash_attn, bool):
        flash_attn = "on" if flash_attn else "off"
    if flash_attn not in FLASH_ATTN_CHOICES:
        raise InputError(f"flash_attn must be one of {', '.join(FLASH_ATTN_CHOICES)}, got {flash_attn!r}")
    if n_gpu_layers is not None and n_gpu_layers < -1:
        raise InputError(f"n_gpu_layers must be >= -1 (-1: all), got {n_gpu_layers}")
    gpu = gpu_offload_supported() if gpu is None else gpu
    layers = n_gpu_layers if n_gpu_layers is not None else (-1 if gpu else 0)
    if not gpu:
        layers = 0  # nothing to offload to: llama.cpp ignores it; say so by recording 0
    on = {"on": True, "off": False, "auto": gpu and layers != 0}[flash_attn]
    return layers, on


def layer_devices(split: SplitOptions) -> list[Device]:
    """The devices that take offloaded layers under these split options."""
    found = offload_devices()
    if split.mode == "none":
        return found[split.main_gpu:split.main_gpu + 1]
    return found


def check_split(split: SplitOptions) -> None:
    """Refuse in words what llama.cpp would refuse in a log line (main_gpu past the devices) or
    ignore without a word (shares for devices that are not there)."""
    found = offload_devices()
    names = ", ".join(d.label() for d in found) or "none: only the CPU"
    if split.mode == "none" and found and split.main_gpu >= len(found):
        raise InputError(f"main_gpu {split.main_gpu} names no device; the devices that take layers are, "
                         f"from 0: {names}")
    if len(split.tensor_split) > len(found):
        raise InputError(f"tensor_split gives {len(split.tensor_split)} shares but {len(found)} device(s) "
                         f"take layers here ({names}): give one share per device")


class Engine:
    """One model and one context; positions of sequence `seq_id` are managed by the caller."""

    def __init__(self, model_path: str | os.PathLike, options: EngineOptions = EngineOptions()):
        self.path = Path(model_path)
        self.options = options
        # llama-cpp-python's defaults are half the logical CPUs for decoding (1 of 2 cores) and all of
        # them for batches; llama.cpp's tools use the physical cores for both
        self.n_threads = options.n_threads or physical_cores()
        split = options.split
        connect_rpc(split.rpc)
        check_split(split)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=options.n_ctx, n_batch=options.n_batch,
                n_ubatch=options.n_ubatch, n_gpu_layers=options.n_gpu_layers,
                split_mode=_SPLIT_MODE_IDS[split.mode], main_gpu=split.main_gpu,
                tensor_split=list(split.tensor_split) or None,
                flash_attn=options.flash_attn, type_k=options.type_k, type_v=options.type_v,
                offload_kqv=options.offload_kqv, n_threads=self.n_threads, n_threads_batch=self.n_threads, verbose=False)
        except ValueError as err:  # llama-cpp-python's word for "llama.cpp refused it"
            raise EngineError(f"llama.cpp could not load {self.path}: {err}") from None
        self._closed = False
        self._model = self._llm.model
        self._own_ctx = self._new_context(options.n_ctx) if options.n_seq_max > 1 else None
        self._bind(self._own_ctx or self._llm.ctx)
        self._vocab_ptr = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._logits_row = ctypes.c_float * self.n_vocab
        self._logits_views: dict[int, np.ndarray] = {}  # views of llama.cpp's logits rows, by address
        self._held = held_gil_calls()  # the per-step readouts (logits address, sampled token) keep the GIL
        self._held_decode = self._held.llama_decode
        self._device_samplers: dict[int, object] = {}   # seq_id -> the greedy chain llama.cpp samples it with
        # a vocabulary never changes: each token's text and end flag are asked of llama.cpp once
        self._pieces: dict[int, bytes] = {}
        self._ends: dict[int, bool] = {}
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self._held_launch_tokens = self._launch_only_tokens()

    # ---- every pointer is handed out only while the model lives: a closed model (or one that
    # llama-cpp-python freed at interpreter exit) answers EngineError, never a dangling pointer ----

    @property
    def closed(self) -> bool:
        return self._closed or self._llm._model.model is None

    def _alive(self) -> None:
        if self.closed:
            raise EngineError(f"the model {self.path.name} is closed: load it again to generate")

    @property
    def model(self):
        self._alive()
        return self._model

    @property
    def ctx(self):
        self._alive()
        return self._ctx

    @property
    def native(self) -> NativeContext:
        self._alive()
        return self._native

    @property
    def _vocab(self):
        self._alive()
        return self._vocab_ptr

    def _bind(self, ctx) -> None:
        """Make ctx the context every call uses (its batch and DySCO controls with it)."""
        self._ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx_seq(ctx)  # one sequence's positions
        # llama.cpp caps a batch at the requested n_ctx (it pads n_ctx itself): feed what it takes
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self._native = NativeContext(ctypes.cast(ctx, ctypes.c_void_p).value)
        # the context's DySCO state must exist before llama.cpp builds its first graph: a graph built
        # without it holds none, and reused for a DySCO step (same shape) it would never bias or select
        self._native.set_capture(False)
        self._batch = TokenBatch(self.n_batch)

    def _new_context(self, n_ctx: int):
        """A context like Llama's on the same weights; with several sequences, n_ctx cells for each in
        a KV stream of its own (llama-cpp-python offers no such option for its own context): a
        sequence's cells then lie as they would alone, so its attention sums run in the same order
        and its answer equals the one it gets alone."""
        params = llama_cpp.llama_context_params.from_buffer_copy(self._llm.context_params)
        n_seq, unified = self.options.n_seq_max, self.options.kv_unified
        params.n_ctx = n_ctx if unified else n_ctx * n_seq
        params.n_batch, params.n_ubatch = self.options.n_batch, self.options.n_ubatch
        params.n_seq_max, params.kv_unified = n_seq, unified
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise EngineError(f"could not create a context of {n_ctx} tokens with {self.options.n_seq_max} "
                              f"sequence(s) for {self.path}")
        return ctx

    def resize(self, n_ctx: int) -> None:
        """A context of n_ctx positions on the same loaded weights; sequence 0's cells move over
        (the caller's record of which tokens they hold stays true)."""
        cells = self.save_seq(0) if self.seq_pos_max(0) >= 0 else None
        ctx = self._new_context(n_ctx)
        old, self._own_ctx = self._own_ctx, ctx
        self._bind(ctx)
        self.options = replace(self.options, n_ctx=n_ctx)
        if old is not None:
            llama_cpp.llama_free(old)
        self._free_device_samplers()  # they were set on the old context
        if cells is not None:
            self.load_seq(cells, 0)

    def close(self) -> None:
        self._closed = True
        if self._own_ctx is not None:
            llama_cpp.llama_free(self._own_ctx)
            self._own_ctx = None
        self._llm.close()
        self._free_device_samplers()  # after the context that used them

    def _free_device_samplers(self) -> None:
        for chain in self._device_samplers.values():
            llama_cpp.llama_sampler_free(chain)
        self._device_samplers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _launch_only_tokens(self) -> int:
        """The most tokens a decode launches with the GIL held (0: none). On one CUDA device holding
        every layer and the KV cache, llama_decode of one ubatch only builds and queues the graph;
        _llama_decode then waits for the device with the GIL released. Released during the launch
        instead, the GIL went to the server's threads and the step waited to get it back, a few times
        a step (bench/RESULTS.md, issue 26). Where the CPU computes a layer, llama_decode does the work
        itself and must release the GIL."""
        o = self.options
        used = layer_devices(o.split)
        every_layer = o.n_gpu_layers < 0 or o.n_gpu_layers > self.n_layer
        if len(used) != 1 or used[0].backend != "CUDA" or not every_layer or not o.offload_kqv:
            return 0
        return min(o.n_ubatch, self.n_batch)

    def where(self) -> str:
        """Where this engine runs, in words: the first line `run` prints."""
        o = self.options
        used = layer_devices(o.split)
        threads = self.n_threads
        if o.n_gpu_layers == 0 or not used:
            cpu = next((d.description for d in devices() if d.kind == "CPU"), "")
            return f"CPU{': ' + cpu if cpu else ''} ({threads} thread{'s' if threads != 1 else ''}{self._kv_where(False)})"
        # llama.cpp's count takes the output head first, then the blocks from the last one back
        layers = self.n_layer if o.n_gpu_layers < 0 else max(0, min(o.n_gpu_layers, self.n_layer + 1) - 1)
        if len(used) == 1 and used[0].backend != "RPC":
            names = used[0].description or used[0].name
        else:  # several, or on another machine: which device is which
            names = ", ".join(d.label() for d in used)
        shares = ":".join(f"{x:g}" for x in o.split.tensor_split[:len(used)])
        split = f", split by {o.split.mode}{' ' + shares if shares else ''}" if len(used) > 1 else ""
        return (f"{names} ({layers}/{self.n_layer} layers offloaded{split}{self._kv_where()}, flash attention "
                f"{'on' if o.flash_attn else 'off'})")

    def _kv_where(self, offloaded: bool = True) -> str:
        """The KV cache's types and place where they are not the defaults."""
        o, names = self.options, {v: k for k, v in CACHE_TYPE_IDS.items()}
        k, v = (names.get(t, str(t)) if t is not None else "f16" for t in (o.type_k, o.type_v))
        types = "" if (k, v) == ("f16", "f16") else f" {k}/{v}"
        where = " in host memory" if offloaded and not o.offload_kqv else ""
        return f", KV cache{types}{where}" if types or where else ""

    # ---- the model's vocabulary and metadata ----

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp read it (values as strings)."""
        return self._llm.metadata

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of text; `special` parses special-token text such as '<|im_start|>'."""
        self._alive()
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"text to tokenize is not valid UTF-8: character {e.start} is {text[e.start]!r}") from None
        return self._llm.tokenize(data, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> bytes:
        """The bytes of ids (a token may end inside a UTF-8 character)."""
        self._alive()
        return self._llm.detokenize(list(ids), special=special)

    def piece(self, token: int) -> bytes:
        """detokenize([token]), kept per token: a generation's text grows by one piece per token."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.detokenize([token])
        return piece

    def special_text(self, which: str) -> str:
        """The text of the 'bos' or 'eos' token ('' when the model has none)."""
        token = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which](self._vocab)
        return self.token_text(token) if token >= 0 else ""

    def is_control(self, token: int) -> bool:
        """Whether the token is a control token (or <unk>): text only special-token parsing turns into it."""
        attr = llama_cpp.llama_vocab_get_attr(self._vocab, token)
        return bool(attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN))

    def token_text(self, token: int) -> str:
        """The text a special token is written as (e.g. '<|im_end|>')."""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """Whether the token ends a generation (EOS, end of turn, ...)."""
        end = self._ends.get(token)
        if end is None:
            end = self._ends[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return end

    # ---- the KV cache ----

    @property
    def memory(self):
        return llama_cpp.llama_get_memory(self.ctx)

    def clear(self) -> None:
        """Forget every sequence."""
        llama_cpp.llama_memory_clear(self.memory, True)

    def truncate(self, pos: int, seq_id: int = 0) -> None:
        """Drop positions >= pos of the sequence."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, pos, -1)

    def seq_pos_max(self, seq_id: int = 0) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id)

    def seq_state(self, seq_id: int = 0) -> bytes:
        """The sequence's serialized KV cache (for comparing caches)."""
        return bytes(self.save_seq(seq_id))

    def save_seq(self, seq_id: int = 0) -> bytearray:
        """The sequence's KV cells, serialized by llama.cpp (its positions, tokens' K and V)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, view, size, seq_id)
        del view  # a live ctypes view pins the bytearray's size
        if written == 0 and size > 0:
            raise EngineError(f"llama.cpp could not serialize the cells of sequence {seq_id}")
        del data[written:]
        return data

    def load_seq(self, data: bytes | bytearray, seq_id: int = 0) -> None:
        """Replace the sequence's cells by ones save_seq produced (same model, KV types and backend)."""
        self.truncate(0, seq_id)
        n = len(data)
        array_type = ctypes.c_uint8 * n
        src = array_type.from_buffer(data) if isinstance(data, bytearray) else array_type.from_buffer_copy(data)
        read = llama_cpp.llama_state_seq_set_data(self.ctx, src, n, seq_id)
        del src
        if read == 0:  # llama.cpp has emptied the sequence again
            raise EngineError(f"llama.cpp refused {n} bytes of saved cells for sequence {seq_id} "
                              f"(another model, KV type or context size?)")

    def cells_identity(self) -> dict[str, object]:
        """What besides the model file and tokens decides the bytes of saved cells."""
        o = self.options
        identity = {"type_k": o.type_k, "type_v": o.type_v, "flash_attn": o.flash_attn,
                    "n_gpu_layers": o.n_gpu_layers, "devices": [d.description for d in devices()],
                    "llama_cpp": llama_cpp.__version__}
        if o.split != SplitOptions(rpc=o.split.rpc):  # the servers are among the devices already
            identity["split"] = [o.split.mode, o.split.main_gpu, list(o.split.tensor_split)]
        return identity

    # ---- decoding ----

    def decode(self, tokens: Sequence[int], start_pos: int, *, want_logits: bool = True,
               seq_id: int = 0, progress: Optional[ProgressFn] = None) -> None:
        """Feed tokens at start_pos.. in batches; only the last one gets logits (if asked)."""
        n = len(tokens)
        if n == 0:
            raise InputError("decode needs at least one token")
        if start_pos + n > self.n_ctx:
            raise InputError(f"{start_pos + n} positions do not fit the context of {self.n_ctx} tokens")
        for begin in range(0, n, self.n_batch):
            chunk = tokens[begin:begin + self.n_batch]
            outputs = want_logits and begin + len(chunk) == n
            self._fill_batch(chunk, start_pos + begin, seq_id, outputs)
            rc = self._llama_decode(len(chunk), outputs)
            if rc != 0:
                raise EngineError(f"llama_decode failed with {rc} at positions {start_pos + begin}.."
                                  f"{start_pos + begin + len(chunk) - 1}")
            if progress:
                progress(begin + len(chunk), n)

    def _fill_batch(self, chunk: Sequence[int], pos0: int, seq_id: int, last_logits: bool) -> None:
        self._batch.fill(chunk, pos0, seq_id, last_logits)

    def decode_batch(self, items: Sequence[tuple[Sequence[int], int, int, bool]]) -> int:
        """One llama_decode of several sequences' tokens: items of (tokens, first position, seq_id,
        whether the last token gets logits), at most n_batch tokens in all. Returns llama.cpp's code
        (0 done, 1 no room in the KV cache; others raise); an item's logits are at the batch index of
        its last token (the tokens of the items before it, plus its own, minus one)."""
        n = sum(len(tokens) for tokens, *_ in items)
        if n == 0 or n > self.n_batch or any(len(tokens) == 0 for tokens, *_ in items):
            raise InputError(f"a batch holds 1..{self.n_batch} tokens, at least one a sequence, got {n}")
        self._batch.fill_items(items)
        rc = self._llama_decode(n, any(want for *_, want in items))
        if rc not in (0, 1):
            raise EngineError(f"llama_decode failed with {rc} on a batch of {len(items)} sequence(s)")
        return rc

    def _llama_decode(self, n_tokens: int, outputs: bool) -> int:
        """llama_decode of the filled batch. Where it only queues the device's work and an output is
        read next (_launch_only_tokens), the launch keeps the GIL and the wait for the device releases
        it; a batch without outputs is left to run on while the host fills the next one."""
        if outputs and n_tokens <= self._held_launch_tokens:
            rc = self._held_decode(self.ctx, self._batch.c)
            llama_cpp.llama_synchronize(self.ctx)  # the device's work, with the GIL released
            return rc
        return llama_cpp.llama_decode(self.ctx, self._batch.c)

    def copy_seq(self, src: int, dst: int, end: int) -> None:
        """Make dst hold src's cells of positions 0..end-1 (llama.cpp copies a whole KV stream)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self.truncate(end, dst)

    def logits(self, index: int = -1) -> np.ndarray:
        """Logits of the last token decoded with want_logits, or of batch index `index` of the last
        decode_batch (a copy, float32)."""
        return self._logits_view(index).copy()

    def _logits_view(self, index: int = -1) -> np.ndarray:
        """The logits at batch index `index` of the last decode (-1: the last ones) where llama.cpp
        keeps them (valid until the next decode). Its buffer stays put from step to step, so a row's
        view is made once (a batch of N sequences reads N rows a step); a buffer that moves adds views."""
        # an address, not llama_cpp's float pointer (which ctypes.cast turns back at more than the call's cost)
        address = self._held.llama_get_logits_ith(self.ctx, index)
        if not address:
            raise EngineError("no logits to sample from: the last decode asked for none")
        view = self._logits_views.get(address)
        if view is None:
            if len(self._logits_views) >= MAX_LOGITS_VIEWS:
                self._logits_views.clear()
            view = self._logits_views[address] = np.frombuffer(self._logits_row.from_address(address),
                                                               dtype=np.float32)
        return view

    def sample_on_device(self, seq_id: int, on: bool) -> bool:
        """Whether llama.cpp picks seq_id's greedy token in its graph (its backend sampling, with our
        two-stage argmax, native.greedy_sampler) from now on, instead of the host reading the logits row:
        a decode whose every output is sampled so copies no logits back. Each change replans the next
        decode's graph. False when off, or when llama.cpp cannot (e.g. a tensor split); then
        engine.logits and the host sampler serve as before."""
        chain = self._device_samplers.pop(seq_id, None)
        if chain is not None:
            llama_cpp.llama_set_sampler(self.ctx, seq_id, None)
            llama_cpp.llama_sampler_free(chain)
        if not on:
            return False
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        greedy = ctypes.cast(self._native.greedy_sampler(), llama_cpp.llama_sampler_p_ctypes)
        llama_cpp.llama_sampler_chain_add(chain, greedy)
        if not llama_cpp.llama_set_sampler(self.ctx, seq_id, chain):
            llama_cpp.llama_sampler_free(chain)
            return False
        self._device_samplers[seq_id] = chain  # llama.cpp keeps the pointer: alive until unset
        return True

    def sampled_token(self, index: int = -1) -> int:
        """The token llama.cpp sampled in the graph at batch index `index` of the last decode, for a
        sequence sample_on_device turned on."""
        token = self._held.llama_get_sampled_token_ith(self.ctx, index)
        if token < 0:
            raise EngineError(f"llama.cpp sampled no token at batch index {index} of the last decode")
        return int(token)

    def greedy_token(self, index: int = -1) -> Optional[int]:
        """The first largest of the logits at batch index `index` (-1: the last), read in place:
        llama.cpp's greedy sampler's choice without its copy of every logit into candidates. None when
        that is NaN (where the two differ)."""
        logits = self._logits_view(index)
        token = int(logits.argmax())
        return None if math.isnan(logits[token]) else token


class TokenBatch:
    """A llama_batch whose arrays numpy owns, so that a batch is filled by slices rather than one
    ctypes call per token and field, and a decode step allocates nothing. One sequence per token."""

    def __init__(self, size: int):
        self.token, self.pos = np.zeros(size, np.int32), np.zeros(size, np.int32)
        self.n_seq_id, self.seq_id = np.ones(size, np.int32), np.zeros(size, np.int32)
        self.logits = np.zeros(size, np.int8)
        # seq_id is an array of pointers, one per token, each to that token's one sequence id
        self._seq_rows = (self.seq_id.ctypes.data + 4 * np.arange(size, dtype=np.uint64)).astype(np.uintp)
        p = ctypes.POINTER
        self.c = llama_cpp.llama_batch(
            n_tokens=0, token=self._ptr(self.token, llama_cpp.llama_token), embd=None,
            pos=self._ptr(self.pos, llama_cpp.llama_pos), n_seq_id=self._ptr(self.n_seq_id, ctypes.c_int32),
            seq_id=ctypes.cast(self._seq_rows.ctypes.data, p(p(llama_cpp.llama_seq_id))),
            logits=self._ptr(self.logits, ctypes.c_int8))

    @staticmethod
    def _ptr(array: np.ndarray, c_type):
        return ctypes.cast(array.ctypes.data, ctypes.POINTER(c_type))

    def fill(self, chunk: Sequence[int], pos0: int, seq_id: int, last_logits: bool) -> None:
        n = len(chunk)
        if n == 1:  # a decode step: items cost a fraction of slices
            self.token[0], self.pos[0], self.seq_id[0], self.logits[0] = chunk[0], pos0, seq_id, last_logits
        else:
            self.token[:n] = chunk
            self.pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
            self.seq_id[:n] = seq_id
            self.logits[:n] = 0
            self.logits[n - 1] = last_logits
        self.c.n_tokens = n

    def fill_items(self, items: Sequence[tuple[Sequence[int], int, int, bool]]) -> None:
        """Several sequences' tokens: items of (tokens, first position, seq_id, logits for the last)."""
        n = 0
        for tokens, pos0, seq_id, want in items:
            end = n + len(tokens)
            self.token[n:end] = tokens
            self.pos[n:end] = np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
            self.seq_id[n:end] = seq_id
            self.logits[n:end] = 0
            self.logits[end - 1] = want
            n = end
        self.c.n_tokens = n


class Sampler:
    """A llama.cpp sampler chain; `sample(engine)` picks from the last decoded logits (of
    engine.ctx; greedy ones through engine.greedy_token)."""

    def __init__(self, options: SamplingOptions = SamplingOptions()):
        self.options = options
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        for stage in self._stages(options):
            llama_cpp.llama_sampler_chain_add(self._chain, stage)

    @staticmethod
    def _stages(o: SamplingOptions):
        if o.greedy:
            return [llama_cpp.llama_sampler_init_greedy()]
        stages = []
        if o.top_k:
            stages.append(llama_cpp.llama_sampler_init_top_k(o.top_k))
        if o.top_p < 1:
            stages.append(llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
        if o.min_p > 0:
            stages.append(llama_cpp.llama_sampler_init_min_p(o.min_p, 1))
        stages.append(llama_cpp.llama_sampler_init_temp(o.temperature))
        seed = o.seed if o.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        stages.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return stages

    def sample(self, engine: Engine, index: int = -1) -> int:
        """A token from the logits at batch index `index` of the last decode (-1: the last ones)."""
        # greedy: the chain only has greedy's argmax, whose state never changes; llama.cpp's copies
        # the whole vocabulary's logits into candidates first (most of a token's host time at 150K)
        token = engine.greedy_token(index) if self.options.greedy else None
        if token is None:
            token = int(llama_cpp.llama_sampler_sample(self._chain, engine.ctx, index))
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):
        self.close()
