"""A GGUF of a real model's shape with random weights (for speed runs on a machine with no
model downloads): Llama-3.1-8B, Qwen3-8B or Qwen2.5-1.5B, written as F16 then quantized with libllama.

    python bench/cuda/make_random_gguf.py --shape llama-3.1-8b --vocab-from tiny.gguf --out m.gguf --type q4_k_m
"""
from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

import numpy as np

SHAPES = {
    "llama-3.1-8b": dict(arch="llama", n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336,
                         n_vocab=128256, head_dim=128, rope_base=500000.0, qk_norm=False, qkv_bias=False),
    "qwen3-8b": dict(arch="qwen3", n_embd=4096, n_layer=36, n_head=32, n_head_kv=8, n_ff=12288,
                     n_vocab=151936, head_dim=128, rope_base=1000000.0, qk_norm=True, qkv_bias=False),
    # Qwen2.5-Coder-1.5B-Instruct's shape (the largest real model we can run)
    "qwen2.5-1.5b": dict(arch="qwen2", n_embd=1536, n_layer=28, n_head=12, n_head_kv=2, n_ff=8960,
                         n_vocab=151936, head_dim=128, rope_base=1000000.0, qk_norm=False, qkv_bias=True),
}


def copy_vocab(writer, src: Path, n_vocab: int) -> None:
    """The source GGUF's BPE vocab, padded with unused tokens to the target size."""
    from gguf import GGUFReader
    r = GGUFReader(str(src))
    field = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    merges_f = r.fields["tokenizer.ggml.merges"]
    merges = [bytes(merges_f.parts[i]).decode("utf-8") for i in merges_f.data]
    pad = n_vocab - len(tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens + [f"<|unused_{i}|>" for i in range(pad)])
    writer.add_token_types(types + [5] * pad)  # 5: unused
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_f16(shape_name: str, vocab_from: Path, out: Path) -> None:
    import gguf
    s = SHAPES[shape_name]
    w = gguf.GGUFWriter(str(out), s["arch"])
    w.add_name(f"random {shape_name}")
    w.add_block_count(s["n_layer"])
    w.add_context_length(131072)
    w.add_embedding_length(s["n_embd"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["n_vocab"])
    w.add_file_type(1)  # F16
    copy_vocab(w, vocab_from, s["n_vocab"])
    rng = np.random.default_rng(0)
    cache = {}

    def rand(*shape):  # one random block per shape, shared: values do not matter for speed
        if shape not in cache:
            cache[shape] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        return cache[shape]

    e, d, hq, hk, ff, v = s["n_embd"], s["head_dim"], s["n_head"], s["n_head_kv"], s["n_ff"], s["n_vocab"]
    ones = lambda n: np.ones(n, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(v, e))
    w.add_tensor("output_norm.weight", ones(e))
    w.add_tensor("output.weight", rand(v, e))
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(e))
        w.add_tensor(p + "attn_q.weight", rand(hq * d, e))
        w.add_tensor(p + "attn_k.weight", rand(hk * d, e))
        w.add_tensor(p + "attn_v.weight", rand(hk * d, e))
        w.add_tensor(p + "attn_output.weight", rand(e, hq * d))
        if s["qkv_bias"]:
            w.add_tensor(p + "attn_q.bias", np.zeros(hq * d, dtype=np.float32))
            w.add_tensor(p + "attn_k.bias", np.zeros(hk * d, dtype=np.float32))
            w.add_tensor(p + "attn_v.bias", np.zeros(hk * d, dtype=np.float32))
        if s["qk_norm"]:
            w.add_tensor(p + "attn_q_norm.weight", ones(d))
            w.add_tensor(p + "attn_k_norm.weight", ones(d))
        w.add_tensor(p + "ffn_norm.weight", ones(e))
        w.add_tensor(p + "ffn_gate.weight", rand(ff, e))
        w.add_tensor(p + "ffn_up.weight", rand(ff, e))
        w.add_tensor(p + "ffn_down.weight", rand(e, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, ftype_name: str) -> None:
    from dysco_edge.runtime import _llama  # noqa: F401
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}")
    params.nthread = os.cpu_count() or 8
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"quantize failed ({rc})")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--vocab-from", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--type", default="q4_k_m")
    args = ap.parse_args()
    f16 = args.out.with_suffix(".f16.gguf")
    write_f16(args.shape, args.vocab_from, f16)
    quantize(f16, args.out, args.type)
    f16.unlink()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
