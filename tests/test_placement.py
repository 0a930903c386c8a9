"""Small GPUs: the KV cache options and the gpu_memory fitting (placement.py), against sizes read
independently (the gguf package's reader of the same file) and llama.cpp's own buffer sizes (its
load log, on the CPU and on RPC servers standing in for a GPU)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import models
from dysco_edge import Model
from dysco_edge.cli import build_parser, main
from dysco_edge.errors import ConfigError, InputError
from dysco_edge.placement import MemoryOptions, fit, model_bytes, place

MIB = 1 << 20
CHILD = Path(__file__).with_name("placement_child.py")


@pytest.fixture(scope="module")
def smollm2():
    return models.smollm2_q4_1()


def test_model_bytes_match_the_gguf_reader(smollm2):
    """Per-layer weights, head and embedding as the gguf package's reader sizes every tensor."""
    from gguf import GGUFReader
    reader = GGUFReader(str(smollm2))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    m = model_bytes(smollm2)
    assert m.n_layer == 30 and m.n_vocab == 49152 and m.n_embd == 576 and m.n_head == 9
    for i in range(m.n_layer):
        assert m.layers[i] == sum(v for k, v in sizes.items() if k.startswith(f"blk.{i}.")), i
    assert m.embedding == sizes["token_embd.weight"]
    assert "output.weight" not in sizes  # tied: the head is the embedding loaded again
    assert m.output == sizes["token_embd.weight"] + sizes["output_norm.weight"]
    assert sum(m.layers) + m.embedding + sizes["output_norm.weight"] == sum(sizes.values())
    assert m.kv_width == ((3 * 64, 3 * 64),) * 30  # 3 KV heads of 64


def test_place_counts_the_head_first_then_the_layers_from_the_end(smollm2):
    """llama.cpp's n_gpu_layers: the output head is the first layer offloaded, then the blocks from
    the last one back (llama_buffers below checks the same against llama.cpp itself)."""
    m, memory = model_bytes(smollm2), MemoryOptions()
    none, head, ten, everything = (place(m, n, 4096, memory, flash_attn=True) for n in (0, 1, 10, 31))
    assert none.total == 0 and not none.kv_on_device
    assert head.weights == m.output and head.kv == 0 and head.compute > 0
    assert ten.weights == sum(m.layers[21:]) + m.output and ten.kv == 9 * 4096 * 2 * 192 * 2
    assert ten.dysco == 0  # most of the KV cache is in host memory: so are DySCO's per-cell tensors
    assert everything.weights == sum(m.layers) + m.output and everything.dysco == 3 * 4 * 4096
    host_kv = place(m, 31, 4096, MemoryOptions(kv_offload=False), flash_attn=True)
    assert host_kv.kv == 0 and host_kv.dysco == 0 and not host_kv.kv_on_device


def test_quantized_kv_cells(smollm2):
    m = model_bytes(smollm2)
    f16, q8, q4 = (place(m, 31, 8192, MemoryOptions(cache_type_k=t, cache_type_v=t), flash_attn=True).kv
                   for t in ("f16", "q8_0", "q4_0"))
    assert (f16, q8, q4) == (30 * 8192 * 2 * 192 * 2, 30 * 8192 * 2 * 6 * 34, 30 * 8192 * 2 * 6 * 18)


def test_fit_takes_the_most_layers_that_fit(smollm2):
    m = model_bytes(smollm2)
    options = {n: place(m, n, 4096, MemoryOptions(), flash_attn=True) for n in range(32)}
    for n in (5, 17, 30):
        budget = options[n].total + 1  # just above n layers, below n + 1
        assert options[n + 1].total > budget
        chosen = fit(m, 4096, MemoryOptions(gpu_memory=budget), flash_attn=True)
        assert chosen.chosen.n_gpu_layers == n
        assert f"{n - 1}/30 layers and the output head offloaded" in chosen.describe()
        assert "everything would need" in chosen.describe()
    whole = fit(m, 4096, MemoryOptions(gpu_memory="8G"), flash_attn=True)
    assert whole.chosen.n_gpu_layers == 31 and "30/30 layers and the output head" in whole.describe()
    assert "all of it fits" in whole.describe()
    tiny = fit(m, 4096, MemoryOptions(gpu_memory="1M"), flash_attn=True)
    assert tiny.chosen.n_gpu_layers == 0 and "nothing offloaded" in tiny.describe()


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(cache_type_k="q5_0"), InputError, "cache_type_k must be one of f16, q8_0, q4_0, got 'q5_0'"),
    (dict(cache_type_v="Q8_0"), InputError, "cache_type_v must be one of f16, q8_0, q4_0, got 'Q8_0'"),
    (dict(gpu_memory="eight"), InputError, "not a size: 'eight'"),
    (dict(gpu_memory=0), InputError, "gpu_memory must be a size such as 8G .* got 0"),
    (dict(kv_offload="no"), InputError, "kv_offload must be True or False, got 'no'"),
])
def test_memory_options_refuse_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        MemoryOptions(**kwargs)


def test_quantized_v_needs_flash_attention():
    q8 = MemoryOptions(cache_type_v="q8_0")
    assert q8.flash_attn_for("auto") == "on" and q8.flash_attn_for(True) is True
    for off in ("off", False):
        with pytest.raises(ConfigError, match="cache_type_v q8_0 needs flash attention"):
            q8.flash_attn_for(off)
    assert MemoryOptions(cache_type_k="q4_0").flash_attn_for("off") == "off"  # a quantized K alone is fine


def test_run_and_serve_take_the_memory_flags(capsys):
    parse = build_parser().parse_args
    for verb in ("run", "serve"):
        args = parse([verb, "--no-kv-offload", "--cache-type-k", "q8_0", "--cache-type-v", "q4_0", "--gpu-memory", "8G"])
        assert (args.kv_offload, args.cache_type_k, args.cache_type_v, args.gpu_memory) == (False, "q8_0", "q4_0", "8G")
        args = parse([verb])
        assert (args.kv_offload, args.cache_type_k, args.cache_type_v, args.gpu_memory) == (True, "f16", "f16", None)
    assert main(["run", "--cache-type-v", "q8_0", "--flash-attn", "off", "-p", "hi"]) == 2
    assert "cache_type_v q8_0 needs flash attention" in capsys.readouterr().err
    assert main(["run", "--gpu-memory", "8G", "--n-gpu-layers", "3", "-p", "hi"]) == 2
    assert "give --n-gpu-layers (3) or --gpu-memory (8G), not both" in capsys.readouterr().err
    assert main(["serve", "--gpu-memory", "lots"]) == 2
    assert "not a size: 'lots'" in capsys.readouterr().err


# ---- against llama.cpp's own buffer sizes (its load log) ----

def llama_buffers(*argv: str) -> dict[str, float]:
    """MiB per '<device> <kind>' (model, KV, compute) that llama.cpp logged loading a model in a child."""
    out = subprocess.run([sys.executable, str(CHILD), *argv], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {}
    for device, kind, mib in re.findall(r"\s(\S+) +(model|KV|compute) buffer size = +([0-9.]+) MiB", out.stderr):
        key = f"{device.split('[')[0]} {kind}"
        found[key] = found.get(key, 0.0) + float(mib)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("cache_type,flash", [("f16", "off"), ("f16", "on"), ("q8_0", "on"), ("q4_0", "on")])
def test_kv_and_compute_against_llama_cpp_on_the_cpu(smollm2, cache_type, flash):
    """All on the CPU: the KV bytes are llama.cpp's to the byte (MiB with 2 decimals), and the compute
    allowance covers llama.cpp's compute buffer (the whole graph runs there)."""
    m = model_bytes(smollm2)
    for n_ctx in (1024, 6000):
        found = llama_buffers(str(smollm2), str(n_ctx), flash, cache_type, "0")
        memory = MemoryOptions(cache_type_k=cache_type, cache_type_v=cache_type)
        p = place(m, 31, n_ctx, memory, flash_attn=flash == "on")
        assert abs(found["CPU KV"] * MIB - p.kv) < 0.01 * MIB, (n_ctx, found)
        assert found["CPU compute"] * MIB <= p.compute, (n_ctx, found, p.compute / MIB)


@pytest.fixture(scope="module")
def rpc_server():
    """One rpc-server on this machine (its device stands in for a GPU); yields its host:port."""
    from test_rpc import child_env, free_port, wait_listening
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dysco_edge.cli", "rpc-server", "--port", str(port), "--threads", "1"],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(proc, port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("n_gpu_layers", [12, 30, 31])
def test_device_bytes_against_llama_cpp_over_rpc(smollm2, rpc_server, n_gpu_layers):
    """The layers llama.cpp put on the server's device weigh what place() says (within its alignment
    padding), their KV cells to the byte, and its compute buffer there stays within the allowance."""
    m = model_bytes(smollm2)
    found = llama_buffers(str(smollm2), "4096", "on", "f16", str(n_gpu_layers), rpc_server)
    p = place(m, n_gpu_layers, 4096, MemoryOptions(), flash_attn=True)
    assert abs(found["RPC0 model"] * MIB - p.weights) <= 0.005 * p.weights + 0.01 * MIB, (found, p)
    assert abs(found["RPC0 KV"] * MIB - p.kv) < 0.01 * MIB, (found, p)
    assert found["RPC0 compute"] * MIB <= p.compute, (found, p.compute / MIB)


def _decodes(path, doc: str, **options) -> dict:
    with Model(path, n_ctx=1024, n_gpu_layers=0, flash_attn="on", n_threads=1, **options) as model:
        config = model.resolve_dysco("auto")
        out = {"plain": model.generate(doc, dysco=None, max_new_tokens=12).token_ids}
        for mode in ("exact", "fast"):
            g = model.generate(doc, dysco=config.replace(mode=mode), max_new_tokens=12, trace=True)
            out[mode] = (g.token_ids, [(step.pos - g.n_prompt, set(step.selected.tolist())) for step in g.trace])
        return out


@pytest.mark.slow
def test_q8_0_kv_cache_against_f16(smollm2):
    """A quantized KV cache's oracle is the F16 one on the same CPU and thread count: q8_0 cells move
    the logits and the QR-head scores a little, so the answers agree at first and every step's
    selected set, while the tokens before it agree, is close to F16's, not equal
    (bench/device/consumer_check.py on its 400-token document measured Jaccard 0.978 mean, 0.957 min).
    A near-tie may flip later: on an AVX2 CPU the DySCO answers part at token 7 of 12 (README "Small
    GPUs" has q4_0, whose tokens part from F16's within a few)."""
    from rpc_child import document
    f16, q8 = _decodes(smollm2, document()), _decodes(smollm2, document(), cache_type_k="q8_0", cache_type_v="q8_0")
    assert q8["plain"][:6] == f16["plain"][:6]
    for mode in ("exact", "fast"):
        (tokens, sets), (want_tokens, want_sets) = q8[mode], f16[mode]
        agree = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), len(tokens))
        assert agree >= 6, (mode, tokens, want_tokens)
        # a step feeding answer token i (i = -1: the prompt's last) saw equal tokens while i < agree
        sets, want_sets = [x for x in sets if x[0] < agree], [x for x in want_sets if x[0] < agree]
        assert [i for i, _ in sets] == [i for i, _ in want_sets]
        jaccard = [len(a & b) / len(a | b) for (_, a), (_, b) in zip(sets, want_sets)]
        assert min(jaccard) >= 0.9 and sum(jaccard) / len(jaccard) >= 0.95, (mode, jaccard)
        assert min(jaccard) < 1.0, mode  # the cells did change: a test that could not see q8_0 would pass with 1.0
