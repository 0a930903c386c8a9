"""Step-by-step smoke of the DySCO C API on one backend (prints each step before running it)."""
import sys

import numpy as np

from dysco_edge.runtime.engine import Engine, EngineOptions

path, gpu_layers, fa = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fa"
ids = [int(t) for t in np.random.default_rng(0).integers(100, 30000, size=200)]
n = len(ids)
print("load", flush=True)
eng = Engine(path, EngineOptions(n_ctx=1024, n_gpu_layers=gpu_layers, flash_attn=fa))
print("prefill", flush=True)
eng.decode(ids[:-1], 0, want_logits=False)
print("plain step", flush=True)
eng.decode(ids[-1:], n - 1)
print("logits", eng.logits()[:3], flush=True)
eng.truncate(n - 1)
eng.native.set_heads([(0, 1), (2, 3)])
print("capture step", flush=True)
eng.native.set_capture(True)
eng.decode(ids[-1:], n - 1)
print("scores", eng.native.scores().sum(), flush=True)
eng.native.set_capture(False)
eng.truncate(n - 1)
print("probe", flush=True)
eng.native.probe(ids[-1], n - 1)
print("probe scores", eng.native.scores().sum(), flush=True)
print("bias step", flush=True)
eng.native.set_bias(np.full(n, 0.5, dtype=np.float32))
eng.decode(ids[-1:], n - 1)
print("ok", eng.logits()[:3], flush=True)
