"""DySCO on CUDA against the CPU backend on the same F32 model (all layers offloaded).

Prints a table: scores (probe and capture) max abs difference, biased-logit relative
difference, probe leaves no trace, and a whole DySCO decode (token agreement, mean Jaccard
of the selected sets). Run with DYSCO_SCHED_REPORT=1 to list the backend of every DySCO node.

    python bench/cuda/check_cuda.py MODEL_F32.gguf
"""
from __future__ import annotations

import sys

import numpy as np

from dysco_edge.config import DyscoConfig
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

import llama_cpp

F32 = llama_cpp.GGML_TYPE_F32


def engine(path, gpu, fa):
    return Engine(path, EngineOptions(n_ctx=2048, n_gpu_layers=99 if gpu else 0, flash_attn=fa, type_k=F32, type_v=F32))


def probe_and_bias(path, gpu, fa, ids, heads, bias):
    with engine(path, gpu, fa) as eng:
        n = len(ids)
        eng.decode(ids[:-1], 0, want_logits=False)
        state = eng.seq_state()
        eng.native.set_heads(heads)
        eng.native.probe(ids[-1], n - 1)
        probe = eng.native.scores()
        no_trace = eng.seq_state() == state
        eng.native.set_capture(True)
        eng.native.set_bias(bias)
        eng.decode(ids[-1:], n - 1)
        return probe, eng.native.scores(), eng.logits(), no_trace


def dysco_run(path, gpu, fa, ids, config):
    with engine(path, gpu, fa) as eng:
        trace = []
        out = list(dysco_tokens(eng, ids, config, plan_warmups(len(ids), 8, 4), reuse=0, sampler=Sampler(),
                                max_new_tokens=24, is_end=lambda t: False, trace=trace))
        return out, [set(s.selected.tolist()) for s in trace]


def heads_and_scale(path, gpu, fa, ids):
    """All-heads capture of the last 40 rows, and logits with the attention logit scale 1.3."""
    with engine(path, gpu, fa) as eng:
        n = len(ids)
        eng.decode(ids[:n - 40], 0, want_logits=False)
        eng.native.set_head_capture(n - 40, n)
        eng.decode(ids[n - 40:], n - 40, want_logits=False)
        heads = eng.native.head_scores()
        eng.native.clear_head_capture()
        eng.clear()
        eng.native.set_attn_scale(1.3)
        eng.decode(ids, 0)
        return heads, eng.logits()


def detection_table(path, ids):
    print("\n| CUDA run | all-heads capture max abs diff | scaled-attention logits rel diff |")
    print("|---|---|---|")
    for fa in (False, True):
        cpu_heads, cpu_logits = heads_and_scale(path, False, fa, ids)
        gpu_heads, gpu_logits = heads_and_scale(path, True, fa, ids)
        rel = np.max(np.abs(gpu_logits - cpu_logits)) / np.max(np.abs(cpu_logits))
        print(f"| FA {'on' if fa else 'off'} | {np.max(np.abs(gpu_heads - cpu_heads)):.2e} | {rel:.2e} |", flush=True)


def main():
    path = sys.argv[1]
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 30000, size=600)]
    heads = [(0, 1), (1, 6), (2, 3), (3, 0)]
    bias = np.zeros(len(ids), dtype=np.float32)
    bias[rng.choice(len(ids), 120, replace=False)] = np.log(2.0)
    config = DyscoConfig(qr_heads=tuple(heads), top_k=64)
    print("| CUDA run | probe scores max abs diff | capture scores max abs diff | biased logits rel diff "
          "| probe leaves no trace | DySCO tokens equal | mean Jaccard |")
    print("|---|---|---|---|---|---|---|")
    for fa in (False, True):  # each against the CPU backend with the same flash-attention setting
        cpu = probe_and_bias(path, False, fa, ids, heads, bias)
        cpu_run = dysco_run(path, False, fa, ids, config)
        probe, cap, logits, no_trace = probe_and_bias(path, True, fa, ids, heads, bias)
        toks, sels = dysco_run(path, True, fa, ids, config)
        agree = np.mean([a == b for a, b in zip(toks, cpu_run[0])])
        jac = np.mean([len(a & b) / len(a | b) for a, b in zip(sels, cpu_run[1])])
        rel = np.max(np.abs(logits - cpu[2])) / np.max(np.abs(cpu[2]))
        print(f"| FA {'on' if fa else 'off'} | {np.max(np.abs(probe - cpu[0])):.2e} | {np.max(np.abs(cap - cpu[1])):.2e} "
              f"| {rel:.2e} | {no_trace} | {agree:.3f} | {jac:.4f} |", flush=True)
    detection_table(path, ids)


if __name__ == "__main__":
    main()
