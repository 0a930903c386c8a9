"""Self-checks of the transformers oracle (tests/oracle.py) and the model fixtures
(tests/models.py). They test the oracle, not dysco_edge.

Fast tests use the tiny random llama / qwen3 models (built once into the cache, about
10-30 s each the first time). Tests that need SmolLM2 or Gemma 3 weights are ``slow``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

# Same module objects as tests/conftest.py ("import models"), so the oracle's model
# cache is shared within a session.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import models  # noqa: E402
import oracle  # noqa: E402

import torch

TINY = {"llama": models.tiny_llama_f32, "qwen3": models.tiny_qwen3_f32}


def _ids(n: int, seed: int = 0, vocab: int = 49152) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[1], rng.integers(10, vocab - 1, size=n - 1)])


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    """(arch, gguf path, eager oracle model) for each tiny architecture."""
    path = TINY[request.param]()
    return request.param, path, oracle.load_hf(path)


# ------------------------------------------------------------------------ fixtures


def test_tiny_builders_are_idempotent():
    for build in TINY.values():
        first = build()
        mtime = first.stat().st_mtime_ns
        again = build()
        assert again == first and again.stat().st_mtime_ns == mtime
        assert not list(first.parent.glob(f".{first.name}.tmp-*"))


def test_tiny_gguf_metadata(tiny):
    arch, path, model = tiny
    kv = oracle._gguf_scalar_metadata(path)
    spec = models.TINY_SPECS[arch]["config"]
    assert kv["general.architecture"] == arch
    assert kv["general.file_type"] == 0
    assert kv[f"{arch}.attention.head_count"] == spec["num_attention_heads"]
    assert kv[f"{arch}.attention.head_count_kv"] == spec["num_key_value_heads"]
    assert kv[f"{arch}.block_count"] == spec["num_hidden_layers"]
    assert kv["tokenizer.ggml.pre"] == "smollm"
    assert "tokenizer.chat_template" in kv
    # the loader got the geometry right (qwen3's head_dim needs oracle's override)
    cfg = model.config
    assert cfg.head_dim == spec["head_dim"]
    assert cfg.num_key_value_heads == spec["num_key_value_heads"]


def test_gguf_roundtrip_keeps_weights_and_head_order(tiny):
    """The GGUF (llama.cpp converter, which permutes Q/K rows for llama) loaded back by
    transformers equals the original HF model: same weights, same per-head attention."""
    from transformers import AutoModelForCausalLM

    arch, _path, model = tiny
    ref = AutoModelForCausalLM.from_pretrained(
        str(models.tiny_hf_dir(arch)), dtype=torch.float32, attn_implementation="eager").eval()
    got, want = model.state_dict(), ref.state_dict()
    assert set(want) <= set(got)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    ids = _ids(33, seed=5)
    np.testing.assert_allclose(oracle.attention_rows(model, ids), oracle.attention_rows(ref, ids),
                               atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ attention


def test_attention_rows_are_distributions(tiny):
    _arch, _path, model = tiny
    ids = _ids(50, seed=1)
    probs = oracle.attention_rows(model, ids)
    cfg = model.config
    assert probs.shape == (cfg.num_hidden_layers, cfg.num_attention_heads, len(ids))
    assert probs.dtype == np.float64
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # a random model still has non-uniform attention (the fixtures are useful for DySCO)
    assert probs.max() > 5.0 / len(ids)


def test_attention_rows_match_output_attentions(tiny):
    _arch, _path, model = tiny
    ids = _ids(24, seed=2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids)[None], output_attentions=True, use_cache=False)
    probs = oracle.attention_rows(model, ids)
    for layer, att in enumerate(out.attentions):
        np.testing.assert_allclose(probs[layer], att[0, :, -1, :].double().numpy(), atol=1e-7, rtol=0)


def test_last_token_attention_is_mean_over_heads(tiny):
    _arch, _path, model = tiny
    ids = _ids(30, seed=3)
    heads = [(0, 1), (2, 7), (3, 0), (2, 2)]
    a = oracle.last_token_attention(model, ids, heads)
    probs = oracle.attention_rows(model, ids)
    assert a.shape == (len(ids),) and a.dtype == np.float64
    np.testing.assert_allclose(a, np.mean([probs[l, h] for l, h in heads], axis=0), atol=1e-12)
    np.testing.assert_allclose(a.sum(), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        oracle.last_token_attention(model, ids, [(0, model.config.num_attention_heads)])
    with pytest.raises(ValueError):
        oracle.last_token_attention(model, ids, [(model.config.num_hidden_layers, 0)])


# ----------------------------------------------------------------------------- bias


def test_zero_bias_reproduces_plain_logits(tiny):
    _arch, _path, model = tiny
    ids = _ids(40, seed=4)
    plain = oracle.plain_logits(model, ids)
    assert plain.shape == (model.config.vocab_size,)
    np.testing.assert_allclose(oracle.logits_with_bias(model, ids, np.zeros(len(ids))), plain,
                               atol=1e-5, rtol=0)


def test_constant_bias_is_a_softmax_shift(tiny):
    _arch, _path, model = tiny
    ids = _ids(40, seed=4)
    plain = oracle.plain_logits(model, ids)
    np.testing.assert_allclose(oracle.logits_with_bias(model, ids, np.full(len(ids), 3.0)), plain,
                               atol=2e-4, rtol=0)


def test_bias_changes_logits(tiny):
    _arch, _path, model = tiny
    ids = _ids(40, seed=6)
    plain = oracle.plain_logits(model, ids)
    bias = np.zeros(len(ids))
    bias[[3, 11, 20]] = np.log(2.0)
    bias[-1] = np.log(2.0)
    soft = oracle.logits_with_bias(model, ids, bias)
    assert np.abs(soft - plain).max() > 1e-3


def test_hard_mask_leaves_only_self_attention(tiny):
    """-inf on every position but the last: the last token attends only to itself in
    every layer, which (RoPE being relative) equals running that token alone."""
    _arch, _path, model = tiny
    ids = _ids(40, seed=7)
    bias = np.full(len(ids), -np.inf)
    bias[-1] = 0.0
    hard = oracle.logits_with_bias(model, ids, bias)
    plain = oracle.plain_logits(model, ids)
    alone = oracle.plain_logits(model, ids[-1:])
    assert np.abs(hard - plain).max() > 1e-2
    np.testing.assert_allclose(hard, alone, atol=1e-4, rtol=0)
    probs = oracle.attention_rows(model, ids, row_biases={len(ids) - 1: bias})
    np.testing.assert_allclose(probs[..., -1], 1.0, atol=1e-7)


def test_bias_is_added_to_scaled_logits(tiny):
    """Layer 0's inputs do not depend on the bias, so there the biased probabilities must
    be exactly softmax(log p + b): the bias is added after the 1/sqrt(d) scale."""
    _arch, _path, model = tiny
    ids = _ids(36, seed=8)
    n = len(ids)
    bias = np.zeros(n)
    bias[[0, 5, 17, n - 1]] = np.log(2.0)
    bias[[9, 10]] = -np.inf
    plain = oracle.attention_rows(model, ids, layers=[0])[0]
    biased = oracle.attention_rows(model, ids, layers=[0], row_biases={n - 1: bias})[0]
    expect = plain * np.exp(bias)
    expect /= expect.sum(-1, keepdims=True)
    np.testing.assert_allclose(biased, expect, atol=1e-6, rtol=0)


def test_last_row_bias_leaves_earlier_rows_alone(tiny):
    _arch, _path, model = tiny
    ids = _ids(30, seed=9)
    n = len(ids)
    bias = np.zeros(n)
    bias[:5] = 2.0
    rows = oracle.logits_with_row_biases(model, ids, {n - 1: bias}, rows=[n - 2, n - 1])
    np.testing.assert_allclose(rows[0], oracle.plain_logits(model, ids[:-1]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rows[1], oracle.logits_with_bias(model, ids, bias), atol=1e-5, rtol=0)


def test_earlier_row_bias_reaches_later_tokens(tiny):
    """A bias on row n-2 changes the K/V that row writes, hence the last token's logits
    (what a teacher-forced DySCO run does over several steps)."""
    _arch, _path, model = tiny
    ids = _ids(30, seed=10)
    n = len(ids)
    b = np.zeros(n - 1)
    b[[2, 4, n - 2]] = np.log(2.0)
    rows = oracle.logits_with_row_biases(model, ids, {n - 2: b}, rows=[n - 2, n - 1])
    np.testing.assert_allclose(rows[0], oracle.logits_with_bias(model, ids[:-1], b), atol=1e-5, rtol=0)
    assert np.abs(rows[1] - oracle.plain_logits(model, ids)).max() > 1e-4


def test_bias_validation(tiny):
    _arch, _path, model = tiny
    ids = _ids(10)
    with pytest.raises(ValueError):
        oracle.logits_with_bias(model, ids, np.zeros(9))
    with pytest.raises(ValueError):
        oracle.logits_with_bias(model, ids, np.full(10, np.nan))
    with pytest.raises(ValueError):
        oracle.logits_with_bias(model, ids, np.full(10, -np.inf))
    with pytest.raises(ValueError):
        oracle.logits_with_row_biases(model, ids, {3: np.zeros(10)})


def test_sdpa_honours_the_float_mask(tiny):
    """Documented behaviour: SDPA applies the same 4-D float mask (no weights, though)."""
    _arch, path, eager = tiny
    sdpa = oracle.load_hf(path, attn_implementation="sdpa")
    ids = _ids(32, seed=11)
    bias = np.zeros(len(ids))
    bias[[1, 8, 30, 31]] = np.log(2.0)
    bias[[4, 5]] = -np.inf
    np.testing.assert_allclose(oracle.logits_with_bias(sdpa, ids, bias),
                               oracle.logits_with_bias(eager, ids, bias), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError):
        oracle.attention_rows(sdpa, ids, layers=[0])


# --------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_f32_is_an_exact_dequantized_copy():
    import gguf
    from gguf.quants import dequantize

    src, dst = models.smollm2_q4_1(), models.smollm2_f32()
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert set(fa) == set(fb)  # (key order is kept by the current builder, not required)
    for key in fa:
        if key == "general.file_type":
            assert fb[key].contents() == 0
            continue
        assert fa[key].types == fb[key].types, key
        assert fa[key].contents() == fb[key].contents(), key
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(ta.shape) == list(tb.shape)
        assert np.array_equal(dequantize(ta.data, ta.tensor_type), np.asarray(tb.data)), ta.name


@pytest.mark.slow
def test_smollm2_oracle_answers():
    from transformers import AutoTokenizer

    model = oracle.load_hf(models.smollm2_f32())
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    tok = AutoTokenizer.from_pretrained(str(models.smollm2_hf_tokenizer_dir()))
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    out = []
    for _ in range(6):
        nxt = int(np.argmax(oracle.plain_logits(model, ids + out)))
        out.append(nxt)
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_gemma3_sliding_window_masks():
    model = oracle.load_hf(models.gemma3_270m_f32())
    cfg = model.config
    assert cfg.sliding_window == 512 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 1
    sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
    assert [i for i in range(18) if i not in sliding] == [5, 11, 17]

    n = 560  # longer than the window
    ids = _ids(n, seed=12, vocab=262144)
    ids[0] = 2  # <bos>
    plain = oracle.plain_logits(model, ids)
    # per-layer-type masks with zero bias reproduce the model's own masks
    np.testing.assert_allclose(oracle.logits_with_bias(model, ids, np.zeros(n)), plain, atol=1e-4, rtol=0)
    # one 4-D mask for every layer would drop the window (the pitfall the dict avoids)
    mask = oracle.build_attention_mask(model, n, {n - 1: np.zeros(n)})
    with torch.no_grad():
        one = model(input_ids=torch.tensor(ids)[None], attention_mask=mask["full_attention"],
                    use_cache=False, logits_to_keep=1).logits[0, -1].double().numpy()
    assert np.abs(one - plain).max() > 1e-2

    bias = np.zeros(n)
    bias[[10, 300, n - 1]] = 5.0  # 10 is outside the window of the last token, 300 inside
    probs = oracle.attention_rows(model, ids, layers=[0, 5], row_biases={n - 1: bias})
    base = oracle.attention_rows(model, ids, layers=[0, 5])
    first_in_window = n - 512
    assert probs[0, :, :first_in_window].max() == 0.0  # sliding layer: stays masked
    assert base[0, :, :first_in_window].max() == 0.0
    # full layer: position 10 is visible and up-weighted (layer 5's inputs move with the
    # bias of layers 0-4 too, so compare the mean over heads only)
    assert probs[5, :, 10].mean() > 3 * base[5, :, 10].mean()
    assert (probs[0, :, 300] > base[0, :, 300]).all()  # sliding layer, inside: biased
    expect = base[0] * np.exp(bias)
    expect /= expect.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[0], expect, atol=1e-6, rtol=0)
