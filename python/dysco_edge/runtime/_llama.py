"""Makes llama-cpp-python load our libllama (with the DySCO extension) instead of its own.

llama_cpp reads LLAMA_CPP_LIB_PATH when first imported, so this module must be imported
before it; every module of this package that uses llama_cpp imports this one first.
"""
import os
import sys

from .native import lib_dir

if "llama_cpp" in sys.modules and os.environ.get("LLAMA_CPP_LIB_PATH") != str(lib_dir()):
    raise ImportError("llama_cpp was imported before dysco_edge, so it loaded a libllama without DySCO; "
                      "import dysco_edge first")
os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir())


def _keep_libstdcxx_first() -> None:
    """Seen with CUDA 13 builds: libggml-cuda.so exports libstdc++ template symbols that
    libllama's std::regex then binds to, and loading any vocabulary segfaults. Loading
    libstdc++ globally first makes every later library bind to libstdc++'s own."""
    if sys.platform.startswith("linux") and (lib_dir() / "libggml-cuda.so").exists():
        import ctypes
        import ctypes.util
        name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


_keep_libstdcxx_first()
