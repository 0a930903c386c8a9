"""Property-based tests (hypothesis) of what dysco-edge reads from files: the document readers on
random and mutated bytes, the KV cache's files (our header and llama.cpp's cell layout) as the real
SmolLM2 writes them, and head maps as JSON and as the authors' YAML.

The property is always the same: a value, or our one-line error; never another exception, never a
hang (each example has a deadline). Bounded for CI: derandomized, a fixed number of examples each;
DYSCO_EDGE_FUZZ_EXAMPLES=N runs N examples of each instead (a longer local run).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from dysco_edge.config import DyscoConfig
from dysco_edge.documents import kv_cache
from dysco_edge.documents.kv_cache import KVCache, KVCacheConfig
from dysco_edge.documents.kv_cells import CellsError, check_cells
from dysco_edge.documents.readers import html_to_text, read_document
from dysco_edge.errors import DocumentError, InputError
from dysco_edge.heads.maps import HeadMap, HeadMapError, get_shipped_head_map, load_head_map
from test_documents import REPORT, make_pdf

_OVERRIDE = int(os.environ.get("DYSCO_EDGE_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int, seconds: float = 20):
    return settings(max_examples=_OVERRIDE or examples, derandomize=True, database=None,
                    deadline=timedelta(seconds=seconds), print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _read(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"doc{suffix}"
        path.write_bytes(data)
        try:
            text = read_document(path)
        except DocumentError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            return None
    assert isinstance(text, str) and text.strip()
    return text


# ---- documents ----

SUFFIXES = [".txt", ".md", ".html", ".pdf", ".csv", ""]


@fuzz(150)
@given(data=st.binary(max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_readers_on_random_bytes(data, suffix):
    _read(data, suffix)


def _encrypted_pdf(algorithm: str) -> bytes:
    import io

    from pypdf import PdfReader, PdfWriter
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(REPORT))))
    writer.encrypt(user_password="", owner_password="owner", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


PDFS = [make_pdf(REPORT), _encrypted_pdf("AES-256"), _encrypted_pdf("RC4-128"),
        make_pdf(REPORT, stream=zlib.compress(b"BT /F1 11 Tf 72 720 Td (compressed text) Tj ET"),
                 stream_keys=b"/Filter /FlateDecode")]
_EDIT = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.floats(0, 1),
                  st.binary(min_size=1, max_size=64))


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, chunk in edits:
        at = int(where * max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= chunk[0] or 1
        elif kind == "insert":
            out[at:at] = chunk
        elif kind == "delete":
            del out[at:at + len(chunk)]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


@fuzz(120)
@given(base=st.sampled_from(range(len(PDFS))), edits=st.lists(_EDIT, min_size=1, max_size=6))
def test_pdf_reader_on_mutated_real_pdfs(base, edits):
    _read(_mutate(PDFS[base], edits), ".pdf")


_HTML_PIECES = ["<p>", "</p>", "<h1>", "</h1>", "<script>", "</script>", "<style>", "<!--", "-->", "<![CDATA[",
                "]]>", "<!DOCTYPE", "<?xml", "?>", "&amp;", "&#", "&#x", ";", "<", ">", "/", "=", '"', "'",
                "<br/>", "<div class=\"a\">", "</div>", "<svg>", "<template>", "text", " ", "\n", "é", "\x00"]


@fuzz(150)
@given(pieces=st.lists(st.sampled_from(_HTML_PIECES) | st.text(max_size=8), max_size=60))
def test_html_reader_on_tag_soup(pieces):
    html = "".join(pieces)
    assert isinstance(html_to_text(html), str)
    _read(html.encode("utf-8", "surrogatepass"), ".html")


# ---- the KV cache's files, as SmolLM2 writes them ----

DOC = "The lighthouse keeper, Mara Quint, painted the sign at the entrance in 1911."
QUESTION = " Who painted the sign? Answer:"


@pytest.fixture(scope="module")
def smol():
    from dysco_edge import Model
    with Model(models.smollm2_q4_1(), n_threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def saved(smol, tmp_path_factory):
    """A real cache file of DOC's cells, its key, and the answer after a fresh prefill (the oracle)."""
    ids = smol.tokenize(DOC, add_bos=True)
    smol.prefill([])
    answer = smol.generate(token_ids=ids + smol.tokenize(QUESTION), dysco=None, max_new_tokens=6).token_ids
    smol.prefill(ids)
    tokens, cells = smol.prefix_cells()
    assert tokens == ids
    key = kv_cache.cache_key(smol.file_identity(), smol.cells_identity(), ids)
    folder = tmp_path_factory.mktemp("kv")
    path = KVCache(KVCacheConfig(folder)).save(key, len(ids), cells)
    return {"ids": ids, "key": key, "file": path.read_bytes(), "answer": answer}


def _fields(payload: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every count and id in the first cache of llama.cpp's cells: what an
    edit can change short of the K and V numbers themselves."""
    n = struct.unpack_from("<I", payload, 12)[0]
    fields = [(0, "<I"), (4, "<i"), (8, "<I"), (12, "<I")]
    fields += [(16 + 12 * i + k, f) for i in range(n) for k, f in ((0, "<i"), (4, "<I"), (8, "<i"))]
    at = 16 + 12 * n
    fields += [(at, "<I"), (at + 4, "<I"), (at + 8, "<i"), (at + 12, "<Q")]  # v_trans, n_layer, layer 0's K
    return fields


_HEADER_FIELDS = {"version": 8, "digest": 12, "count": 44, "length": 52, "crc": 60}


def _loaded(folder: Path, saved: dict, data: bytes) -> bytes | None:
    cache = KVCache(KVCacheConfig(folder))
    path = cache.path(saved["key"])
    path.write_bytes(data)
    return cache.load(saved["key"], len(saved["ids"]))


@pytest.mark.slow
@fuzz(200)
@given(bits=st.lists(st.integers(0, 1 << 40), min_size=1, max_size=4))
def test_kv_file_bit_flips_are_discarded(saved, bits):
    data = bytearray(saved["file"])
    for bit in bits:
        data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    with tempfile.TemporaryDirectory() as folder:
        got = _loaded(Path(folder), saved, bytes(data))
        assert (got is None) == (bytes(data) != saved["file"])
        assert (got is None) != Path(folder, saved["key"].hex() + ".kv").exists()  # bad files go


@pytest.mark.slow
@fuzz(200)
@given(field=st.sampled_from(sorted(_HEADER_FIELDS)), value=st.integers(0, 2**64 - 1) | st.sampled_from(
    [0, 1, 2**31, 2**32 - 1, 2**63]), delta=st.sampled_from([None, -1, 1, 1 << 20, 1 << 40]))
def test_kv_header_field_values_are_discarded_unless_unchanged(saved, field, value, delta):
    data = bytearray(saved["file"])
    at = _HEADER_FIELDS[field]
    fmt = {"version": "<I", "digest": "32s", "count": "<Q", "length": "<Q", "crc": "<I"}[field]
    if field == "digest":
        struct.pack_into(fmt, data, at, value.to_bytes(8, "little") * 4)
    else:
        old = struct.unpack_from(fmt, data, at)[0]
        new = value if delta is None else old + delta
        struct.pack_into(fmt, data, at, new % (1 << (8 * struct.calcsize(fmt))))
    with tempfile.TemporaryDirectory() as folder:
        got = _loaded(Path(folder), saved, bytes(data))
    assert (got is None) == (bytes(data) != saved["file"])


def _resummed(saved: dict, offset: int, fmt: str, value: int) -> tuple[bytes, bytes]:
    """The file with one payload field set to value and its checksum written again (a deliberate
    edit), and the payload."""
    h = kv_cache._HEADER.size
    data = bytearray(saved["file"])
    size = struct.calcsize(fmt)
    struct.pack_into(fmt, data, h + offset, value % (1 << (8 * size)) if fmt[-1] in "IQ" else
                     (value + (1 << (8 * size - 1))) % (1 << (8 * size)) - (1 << (8 * size - 1)))
    magic, version, key, count, length, _ = kv_cache._HEADER.unpack_from(data)
    data[:h] = kv_cache._HEADER.pack(magic, version, key, count, length, zlib.crc32(data[h:]))
    return bytes(data), bytes(data[h:])


_VALUES = st.integers(-(2**31), 2**32) | st.sampled_from([-1, 0, 1, 2, 255, 256, 2**31 - 1, 2**31, 2**32 - 1])


@pytest.mark.slow
@fuzz(300)
@given(choice=st.integers(0, 10**6), value=_VALUES, relative=st.booleans())
def test_kv_cell_layout_edits_summed_again_are_refused_unless_unchanged(saved, choice, value, relative):
    """Every count, id and position of the cells: an edit under a valid checksum is refused by the
    check before llama.cpp, or is no edit at all."""
    payload = saved["file"][kv_cache._HEADER.size:]
    offset, fmt = (fields := _fields(payload))[choice % len(fields)]
    old = struct.unpack_from(fmt, payload, offset)[0]
    _, edited = _resummed(saved, offset, fmt, old + value if relative else value)
    try:
        check_cells(edited, len(saved["ids"]))
    except CellsError as e:
        assert "\n" not in str(e)
        return
    # accepted: the layout is unchanged, or a type or row size that llama.cpp checks against the model
    assert edited == payload or offset >= 16 + 12 * (len(saved["ids"])) + 8


@pytest.mark.slow
@fuzz(12, seconds=120)
@given(choice=st.integers(0, 10**6), value=_VALUES)
def test_kv_edits_end_to_end_answer_as_a_fresh_prefill(smol, saved, choice, value, tmp_path_factory):
    """Through the real model: whatever the edit, the document opens (loaded or prefilled after a
    one-line warning) and answers as a fresh prefill does."""
    payload = saved["file"][kv_cache._HEADER.size:]
    offset, fmt = (fields := _fields(payload))[choice % len(fields)]
    data, _ = _resummed(saved, offset, fmt, value)
    folder = tmp_path_factory.mktemp("e2e")
    KVCache(KVCacheConfig(folder)).path(saved["key"]).write_bytes(data)
    from dysco_edge.documents.prefill import open_prefix
    smol.prefill([])
    opened = open_prefix(smol, saved["ids"], KVCache(KVCacheConfig(folder)))
    assert opened.how in ("loaded", "prefilled")
    answer = smol.generate(token_ids=saved["ids"] + smol.tokenize(QUESTION), dysco=None, max_new_tokens=6)
    assert answer.token_ids == saved["answer"]


# ---- head maps: JSON files and the authors' YAML ----

GOOD = get_shipped_head_map("SmolLM2-135M-Instruct").to_dict()
_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                 | st.text(max_size=12))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_SECTIONS = ["config", "match", "qr_heads", "name", "source", "notes", "qr_scores", "detection"]
_CONFIG_KEYS = ["top_k", "top_p", "strength", "decay", "context_warmup", "intervention_warmup",
                "template_sequences", "dynamic", "mode", "qr_heads", "bogus"]
_MATCH_KEYS = ["architecture", "n_layer", "n_head", "n_head_kv", "n_embd", "name_patterns"]


def _load_text(text: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "map.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_head_map(path)
        except HeadMapError as e:
            assert "\n" not in str(e).strip() and "map.json" in str(e)
            return None


@fuzz(200)
@given(section=st.sampled_from(_SECTIONS), key=st.sampled_from(_CONFIG_KEYS + _MATCH_KEYS), value=_JSON)
def test_head_map_fields_with_any_json_value(section, key, value):
    data = json.loads(json.dumps(GOOD))
    if section in ("config", "match"):
        data[section][key] = value
    else:
        data[section] = value
    got = _load_text(json.dumps(data, allow_nan=True))
    assert got is None or isinstance(got, HeadMap)


@fuzz(150)
@given(text=st.text(max_size=300) | st.builds(
    lambda prefix, depth, digits: prefix + "[" * depth + "9" * digits + "]" * depth,
    st.sampled_from(["", '{"qr_heads": ', "[1, "]), st.integers(0, 3000), st.integers(0, 6000)))
def test_head_map_files_of_any_text(text):
    _load_text(text)


_YAML_KEYS = ["selected_heads", "top_k", "top_p", "strength", "decay_factor", "context_warmup_steps",
              "intervention_warmup", "template_sequences", "dynamic_rescale", "other"]
_YAML_VALUES = (st.text(max_size=40) | st.integers().map(str) | st.sampled_from(
    ["[(1, 2)]", "[[1, 2], [3, 4]]", "null", "true", "auto", "1e999", "nan", "- [1, 2]", "[(1, 2", "'x'"])
    | st.builds(lambda d, n: "[" * d + "9" * n + "]" * d, st.integers(0, 2000), st.integers(1, 6000)))


@fuzz(200)
@given(lines=st.lists(st.tuples(st.sampled_from(_YAML_KEYS), _YAML_VALUES), max_size=8))
def test_dysco_yaml_of_any_values(lines):
    text = "selected_heads: [(1, 2)]\n" + "".join(f"{k}: {v}\n" for k, v in lines)
    try:
        config = DyscoConfig.from_dysco_yaml(text)
    except InputError as e:
        assert "\n" not in str(e).strip()
        return
    assert isinstance(config, DyscoConfig) and np.all([h >= 0 for pair in config.qr_heads for h in pair])
