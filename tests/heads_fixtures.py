"""Small builders shared by the tests/test_heads_*.py files: a synthetic GGUF and head maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from dysco_edge.heads.maps import HeadMap, ModelShape

SHAPE = ModelShape(architecture="llama", n_layer=4, n_head=8, n_head_kv=2, n_embd=128)


def write_gguf(path: Path, *, shape: ModelShape = SHAPE, embedded: HeadMap | None = None) -> Path:
    """A metadata-complete little GGUF (no weights a model could run): F32, F16 and Q8_0 tensors.

    `embedded`: a head map written as dysco.* keys as is, unchecked (to test refusing misfits).
    """
    import gguf
    from dysco_edge.heads.gguf import _gguf_type, head_map_keys
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), arch=shape.architecture)
    writer.add_name("Synthetic Test Model")
    writer.add_block_count(shape.n_layer)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_embedding_length(shape.n_embd)
    writer.add_token_list(["<s>", "a", "b", "hello world"])
    writer.add_array("general.tags", ["x", "y"])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value in (head_map_keys(embedded) if embedded else {}).items():
        vtype, sub_type = _gguf_type(value)
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    rng = np.random.default_rng(0)
    writer.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("b.f16", rng.standard_normal((7,)).astype(np.float16))
    q8 = quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def head_map(*, name: str = "Synthetic", heads=((1, 2), (3, 7)), shape: ModelShape = SHAPE,
             scores: bool = True, **extra) -> HeadMap:
    """A valid map for `shape`, with every head's QRScore and detection facts when scores=True."""
    rng = np.random.default_rng(1)
    options = {"qr_scores": rng.random((shape.n_layer, shape.n_head)).tolist(),
               "detection": {"method": "qrhead", "seed": 3, "examples": 10, "max_layer": None}} if scores else {}
    return HeadMap(name=name, source="test", qr_heads=heads, shape=ModelShape(**{**vars(shape), "name": name}),
                   config={"top_k": 64, "top_p": None, "strength": 2.0, "intervention_warmup": "auto"},
                   name_patterns=("synthetic",), **{**options, **extra})


def tensor_bytes(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, ggml type, raw bytes) of every tensor, in file order."""
    import gguf

    return [(t.name, int(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(str(path)).tensors]
