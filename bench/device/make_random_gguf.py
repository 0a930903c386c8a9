"""A GGUF of a real model's shape with random weights (for speed runs on a machine with no
model downloads): Llama-3.1-8B, Qwen3-8B or Qwen2.5-1.5B, written as F16 then quantized with libllama;
Llama-3.1-70B written as Q4_K_M directly (its F16 would need 140 GB of disk): a few random rows per
tensor quantized by ggml, repeated, in llama.cpp's Q4_K_M mix of types.

    python bench/device/make_random_gguf.py --shape llama-3.1-8b --vocab-from tiny.gguf --out m.gguf --type q4_k_m
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
    "llama-3.1-70b": dict(arch="llama", n_embd=8192, n_layer=80, n_head=64, n_head_kv=8, n_ff=28672,
                          n_vocab=128256, head_dim=128, rope_base=500000.0, qk_norm=False, qkv_bias=False,
                          direct=True),
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


def write_metadata(w, shape_name: str, vocab_from: Path, file_type: int) -> None:
    s = SHAPES[shape_name]
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
    w.add_file_type(file_type)
    copy_vocab(w, vocab_from, s["n_vocab"])


def tensor_plan(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, fill) of every tensor; fill is "ones" (norms), "zeros" (biases) or "random"."""
    e, d, hq, hk, ff, v = s["n_embd"], s["head_dim"], s["n_head"], s["n_head_kv"], s["n_ff"], s["n_vocab"]
    plan = [("token_embd.weight", (v, e), "random"), ("output_norm.weight", (e,), "ones"),
            ("output.weight", (v, e), "random")]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (e,), "ones"), (p + "attn_q.weight", (hq * d, e), "random"),
                 (p + "attn_k.weight", (hk * d, e), "random"), (p + "attn_v.weight", (hk * d, e), "random"),
                 (p + "attn_output.weight", (e, hq * d), "random")]
        if s["qkv_bias"]:
            plan += [(p + f"attn_{x}.bias", (n * d,), "zeros") for x, n in (("q", hq), ("k", hk), ("v", hk))]
        if s["qk_norm"]:
            plan += [(p + "attn_q_norm.weight", (d,), "ones"), (p + "attn_k_norm.weight", (d,), "ones")]
        plan += [(p + "ffn_norm.weight", (e,), "ones"), (p + "ffn_gate.weight", (ff, e), "random"),
                 (p + "ffn_up.weight", (ff, e), "random"), (p + "ffn_down.weight", (e, ff), "random")]
    return plan


def write_f16(shape_name: str, vocab_from: Path, out: Path) -> None:
    import gguf
    s = SHAPES[shape_name]
    w = gguf.GGUFWriter(str(out), s["arch"])
    write_metadata(w, shape_name, vocab_from, 1)  # F16
    rng = np.random.default_rng(0)
    cache = {}

    def rand(shape):  # one random block per shape, shared: values do not matter for speed
        if shape not in cache:
            cache[shape] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        return cache[shape]

    fills = {"ones": lambda shape: np.ones(shape, dtype=np.float32),
             "zeros": lambda shape: np.zeros(shape, dtype=np.float32), "random": rand}
    for name, shape, fill in tensor_plan(s):
        w.add_tensor(name, fills[fill](shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def q4_k_m_type(name: str, n_layer: int):
    """The type llama.cpp's Q4_K_M gives this tensor of a llama model (src/llama-quant.cpp, 0c1e570)."""
    from gguf import GGMLQuantizationType as T
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    more_bits = layer >= 0 and (layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2)
    if name == "output.weight" or (more_bits and name.endswith(("attn_v.weight", "ffn_down.weight"))):
        return T.Q6_K
    if name.endswith("attn_v.weight") and n_layer == 80:  # llama.cpp gives a 70B's V more bits
        return T.Q5_K
    return T.Q4_K


class RandomRows:
    """Rows of random weights quantized by ggml (ggml_quantize_chunk), a few per (type, width),
    repeated to any height: real blocks with sane scales, made in seconds."""
    ROWS = 64

    def __init__(self):
        from dysco_edge.runtime.native import lib_dir
        self.lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.rng, self.blocks = np.random.default_rng(0), {}

    def get(self, qtype, rows: int, cols: int) -> np.ndarray:
        from gguf import GGML_QUANT_SIZES
        block, size = GGML_QUANT_SIZES[qtype]
        if (qtype, cols) not in self.blocks:
            src = np.ascontiguousarray(self.rng.standard_normal((self.ROWS, cols), dtype=np.float32) * 0.02)
            dst = np.empty((self.ROWS, cols // block * size), dtype=np.uint8)
            self.lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, self.ROWS, cols, None)
            self.blocks[(qtype, cols)] = dst
        return np.tile(self.blocks[(qtype, cols)], (-(-rows // self.ROWS), 1))[:rows]


def write_q4_k_m(shape_name: str, vocab_from: Path, out: Path) -> None:
    """Tensors written one at a time (infos first, then data), so memory holds one tensor."""
    import gguf
    s = SHAPES[shape_name]
    w = gguf.GGUFWriter(str(out), s["arch"])
    write_metadata(w, shape_name, vocab_from, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    plan = [(name, shape, fill, q4_k_m_type(name, s["n_layer"]) if fill == "random" else None)
            for name, shape, fill in tensor_plan(s)]
    for name, shape, fill, qtype in plan:
        if qtype is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (shape[0], shape[1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rows = RandomRows()
    for name, shape, fill, qtype in plan:
        w.write_tensor_data(np.full(shape, 1.0 if fill == "ones" else 0.0, dtype=np.float32) if qtype is None
                            else rows.get(qtype, *shape))
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
    if SHAPES[args.shape].get("direct"):
        if args.type != "q4_k_m":
            raise SystemExit(f"{args.shape} is written as q4_k_m only, not {args.type}")
        write_q4_k_m(args.shape, args.vocab_from, args.out)
    else:
        f16 = args.out.with_suffix(".f16.gguf")
        write_f16(args.shape, args.vocab_from, f16)
        quantize(f16, args.out, args.type)
        f16.unlink()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
