"""Flash attention and batching in llama.cpp itself, without our patches or package: two sequences, each
with a KV stream of its own, decoding one token each per llama_decode, against each sequence decoded
alone. Prints the largest logit difference per sequence. Teacher-forced random tokens (documents of
100 and 300 tokens, then 15 steps), as in tests/test_parallel_dysco.py.

Run with llama-cpp-python's bindings on the pristine libllama that bench/speed/build_llama_server.sh
builds (its ggml in LD_LIBRARY_PATH when installed apart), not through dysco_edge:
    LLAMA_CPP_LIB_PATH=build/llama-server/bin python bench/verify/fa_batch_pristine.py MODEL.gguf on|off [N_GPU_LAYERS]
"""
from __future__ import annotations

import sys

import numpy as np

import llama_cpp as L

STEPS = 15
DOCS = {s: [int(t) for t in np.random.default_rng(seed).integers(200, 40000, size=n)]
        for s, (seed, n) in enumerate([(1, 100 + STEPS), (2, 300 + STEPS)])}


def context(model, n_seq: int, flash: bool):
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 768 * n_seq, 512, 512, n_seq
    cp.flash_attn_type, cp.kv_unified, cp.n_threads, cp.n_threads_batch = int(flash), False, 2, 2
    return L.llama_init_from_model(model, cp)


def decode(ctx, items) -> None:
    """One llama_decode of items (tokens, first position, seq_id, logits of the last token or not)."""
    n = sum(len(tokens) for tokens, *_ in items)
    batch, i = L.llama_batch_init(n, 0, 1), 0
    for tokens, pos, seq, want in items:
        for k, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + k, 1
            batch.seq_id[i][0], batch.logits[i] = seq, int(want and k == len(tokens) - 1)
            i += 1
    batch.n_tokens = n
    rc = L.llama_decode(ctx, batch)
    L.llama_batch_free(batch)
    assert rc == 0, f"llama_decode returned {rc}"


def steps(model, flash: bool, seqs: list[int]) -> dict[int, list[np.ndarray]]:
    """Logits of each step of the sequences, decoded together in one context (alone when one)."""
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    ctx, prefix = context(model, len(seqs), flash), {s: len(DOCS[s]) - STEPS for s in seqs}
    for i, s in enumerate(seqs):
        decode(ctx, [(DOCS[s][:prefix[s]], 0, i, False)])
    out = {s: [] for s in seqs}
    for k in range(STEPS):
        decode(ctx, [([DOCS[s][prefix[s] + k]], prefix[s] + k, i, True) for i, s in enumerate(seqs)])
        for i, s in enumerate(seqs):
            out[s].append(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy())
    L.llama_free(ctx)
    return out


def main() -> None:
    path, flash = sys.argv[1], sys.argv[2] == "on"
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.n_gpu_layers = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    model = L.llama_model_load_from_file(path.encode(), params)
    together = steps(model, flash, list(DOCS))
    for s in DOCS:
        alone = steps(model, flash, [s])[s]
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(together[s], alone))
        print(f"flash attention {'on' if flash else 'off'}: sequence {s} ({len(DOCS[s]) - STEPS} + {STEPS} tokens) "
              f"beside the other vs alone, largest logit difference {diff:.4g}")


if __name__ == "__main__":
    main()
