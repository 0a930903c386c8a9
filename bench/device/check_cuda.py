"""DySCO on CUDA against the CPU backend on the same F32 model (all layers offloaded).

Prints a table: scores (probe and capture) max abs difference, biased-logit relative
difference, probe leaves no trace, and a whole DySCO decode (token agreement, mean Jaccard
of the selected sets). Run with DYSCO_SCHED_REPORT=1 to list the backend of every DySCO node.

    python bench/device/check_cuda.py MODEL_F32.gguf
"""
from __future__ import annotations

import sys

import numpy as np

from dysco_edge.config import DyscoConfig
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

import llama_cpp

F32 = llama_cpp.GGML_TYPE_F32


def options(gpu: bool, fa: bool, **extra) -> EngineOptions:
    """An F32-KV context: CPU, or every layer offloaded (extra: e.g. split=SplitOptions(...))."""
    return EngineOptions(n_ctx=2048, n_gpu_layers=99 if gpu else 0, flash_attn=fa, type_k=F32, type_v=F32, **extra)


def probe_and_bias(path, opts, ids, heads, bias):
    with Engine(path, opts) as eng:
        return probe_and_bias_on(eng, ids, heads, bias)


def probe_and_bias_on(eng, ids, heads, bias):
    """On a fresh engine: probe scores of the last prompt token, whether the probe left the sequence's
    cells as they were, then the capture scores and logits of its biased pass (bias and capture cleared)."""
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
    try:
        return probe, eng.native.scores(), eng.logits(), no_trace
    finally:
        eng.native.clear_bias()
        eng.native.set_capture(False)


def dysco_run(path, opts, ids, config):
    with Engine(path, opts) as eng:
        trace = []
        out = list(dysco_tokens(eng, ids, config, plan_warmups(len(ids), 8, 4), reuse=0, sampler=Sampler(),
                                max_new_tokens=24, is_end=lambda t: False, trace=trace))
        return out, [set(s.selected.tolist()) for s in trace]


def pass_diffs(path, ref, test, ids, heads, bias) -> str:
    """Table cells: probe and capture scores max abs diff, biased logits rel diff, the test's probe
    leaves no trace."""
    want = probe_and_bias(path, ref, ids, heads, bias)
    probe, cap, logits, no_trace = probe_and_bias(path, test, ids, heads, bias)
    rel = np.max(np.abs(logits - want[2])) / np.max(np.abs(want[2]))
    return (f"{np.max(np.abs(probe - want[0])):.2e} | {np.max(np.abs(cap - want[1])):.2e} | {rel:.2e} "
            f"| {no_trace}")


def run_agreement(path, ref, test, ids, config) -> str:
    """Table cells of a whole DySCO decode: token agreement, mean and min Jaccard of the selected sets."""
    want_tokens, want_sets = dysco_run(path, ref, ids, config)
    tokens, sets = dysco_run(path, test, ids, config)
    agree = np.mean([a == b for a, b in zip(tokens, want_tokens)])
    jac = [len(a & b) / len(a | b) for a, b in zip(sets, want_sets)]
    return f"{agree:.3f} | {np.mean(jac):.4f} | {np.min(jac):.4f}"


def heads_and_scale(path, opts, ids):
    """All-heads capture of the last 40 rows, and logits with the attention logit scale 1.3."""
    with Engine(path, opts) as eng:
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
        cpu_heads, cpu_logits = heads_and_scale(path, options(False, fa), ids)
        gpu_heads, gpu_logits = heads_and_scale(path, options(True, fa), ids)
        rel = np.max(np.abs(gpu_logits - cpu_logits)) / np.max(np.abs(cpu_logits))
        print(f"| FA {'on' if fa else 'off'} | {np.max(np.abs(gpu_heads - cpu_heads)):.2e} | {rel:.2e} |", flush=True)


def check_inputs(n_layer: int = 4):
    """A 600-token random prompt, QR heads in layers 0..3 (or spread over n_layer: first, a third,
    past the middle, last), a bias on 120 positions and a DySCO config on those heads."""
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 30000, size=600)]
    layers = [0, 1, 2, 3] if n_layer <= 4 else [0, n_layer // 3, n_layer // 2 + 1, n_layer - 1]
    heads = list(zip(layers, [1, 6, 3, 0]))
    bias = np.zeros(len(ids), dtype=np.float32)
    bias[rng.choice(len(ids), 120, replace=False)] = np.log(2.0)
    return ids, heads, bias, DyscoConfig(qr_heads=tuple(heads), top_k=64)


def main():
    path = sys.argv[1]
    ids, heads, bias, config = check_inputs()
    print("| CUDA run | probe scores max abs diff | capture scores max abs diff | biased logits rel diff "
          "| probe leaves no trace | DySCO tokens equal | mean Jaccard | min Jaccard |")
    print("|---|---|---|---|---|---|---|---|")
    for fa in (False, True):  # each against the CPU backend with the same flash-attention setting
        cpu, gpu = options(False, fa), options(True, fa)
        print(f"| FA {'on' if fa else 'off'} | {pass_diffs(path, cpu, gpu, ids, heads, bias)} "
              f"| {run_agreement(path, cpu, gpu, ids, config)} |", flush=True)
    detection_table(path, ids)


if __name__ == "__main__":
    main()
