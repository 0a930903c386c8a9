"""Documents as users have them: the readers, the KV cache with real models (oracle: a fresh
prefill), the context sized from the input, and `dysco-edge run --doc` end to end."""
from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import models
from dysco_edge import ContextOverflow, DyscoConfig, Model
from dysco_edge.cli import build_parser
from dysco_edge.documents import kv_cache
from dysco_edge.documents.kv_cache import KVCache, KVCacheConfig, cache_key
from dysco_edge.documents.markers import last_marker, token_span
from dysco_edge.documents.readers import html_to_text, read_document
from dysco_edge.errors import DocumentError
from dysco_edge.runtime.engine import choose_offload

SMOL_HEADS = ((12, 1), (14, 3), (15, 0), (16, 5), (18, 2), (20, 7))
DOC = ("[page 1]\nThe lighthouse keeper, Mara Quint, painted the sign at the entrance in 1911. "
       "Tom baked bread on Monday. Anna painted the fence on Tuesday.\n\n[page 2]\n"
       + "Sofia wrote a letter to the harbour master on Friday about the broken lamp. " * 12)
QUESTION = "Who painted the sign at the entrance?"


def make_pdf(pages: list[list[str]], *, stream: bytes = b"", stream_keys: bytes = b"") -> bytes:
    """A minimal PDF: one Helvetica text stream per page, lines as text-showing operators (or, given
    `stream`, that content stream with `stream_keys` in its dictionary on every page)."""
    n = len(pages)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{3 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode()]
    for i, lines in enumerate(pages):
        shown = [f"({line.replace(chr(92), chr(92) * 2).replace('(', '[').replace(')', ']')}) Tj T*"
                 for line in lines]
        content = stream or "\n".join(["BT", "/F1 11 Tf", "14 TL", "72 720 Td", *shown, "ET"]).encode("latin-1")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                    f"/Resources << /Font << /F1 {3 + 2 * n} 0 R >> >> >>".encode())
        objs.append(b"<< /Length %d %s>>\nstream\n%s\nendstream" % (len(content), stream_keys, content))
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for k, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (k, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


REPORT = [["Quarterly supplier report", "Deliveries were mostly on time this quarter."],
          ["Exceptions", "The supplier Acme Tools missed the March deadline by nine days."]]


def _encrypted(tmp_path, user_password: str, algorithm: str = "RC4-128"):
    from pypdf import PdfReader, PdfWriter
    plain = tmp_path / "plain.pdf"
    plain.write_bytes(make_pdf(REPORT))
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm=algorithm)
    path = tmp_path / f"locked-{bool(user_password)}-{algorithm}.pdf"
    with open(path, "wb") as f:
        writer.write(f)
    return path


# ---- readers ----

def test_pdf_pages_read_back_with_page_markers(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(REPORT))
    text = read_document(path)
    assert text.startswith("[page 1]\nQuarterly supplier report")
    page2 = text.index("[page 2]")
    assert "Acme Tools missed the March deadline" in text[page2:]
    assert last_marker(text[:text.index("Acme")]) == "page 2"


def test_an_encrypted_pdf_is_refused_unless_anyone_may_open_it(tmp_path):
    with pytest.raises(DocumentError, match="encrypted PDF"):
        read_document(_encrypted(tmp_path, "secret"))
    assert "Acme Tools" in read_document(_encrypted(tmp_path, ""))  # owner password only: readable


@pytest.mark.parametrize("algorithm", ["AES-128", "AES-256"])
def test_an_aes_encrypted_pdf_reads_as_an_rc4_one_does(tmp_path, algorithm):
    """pypdf decrypts AES only with the cryptography package, which is why it is a dependency."""
    assert "Acme Tools" in read_document(_encrypted(tmp_path, "", algorithm))
    with pytest.raises(DocumentError, match="encrypted PDF"):
        read_document(_encrypted(tmp_path, "secret", algorithm))


def test_without_cryptography_an_aes_pdf_is_one_line_naming_the_package(tmp_path):
    path = _encrypted(tmp_path, "", "AES-256")
    # a fresh interpreter where the package cannot be imported, as after `pip uninstall cryptography`
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from dysco_edge.documents.readers import read_document\n"
            "from dysco_edge.errors import DocumentError\n"
            f"try:\n    read_document({str(path)!r})\nexcept DocumentError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.startswith("refused:") and "pip install cryptography" in out.stdout


@pytest.mark.parametrize("stream, keys, message", [
    (b"x" * 64, b"/Filter /NoSuchDecode", "cannot decode"),  # a filter pypdf does not have
    (b"BT /F1 11 Tf " + b"[" * 20_000 + b" TJ ET", b"", "nests objects deeper"),  # RecursionError in pypdf
])
def test_a_pdf_pypdf_cannot_read_is_one_line_naming_it(tmp_path, stream, keys, message):
    path = tmp_path / "odd.pdf"
    path.write_bytes(make_pdf(REPORT, stream=stream, stream_keys=keys))
    with pytest.raises(DocumentError, match=message) as caught:
        read_document(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_text_past_any_context_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    from dysco_edge.documents import readers
    monkeypatch.setattr(readers, "MAX_TEXT_BYTES", 1000)
    big = tmp_path / "big.txt"
    big.write_text("word " * 300)
    with pytest.raises(DocumentError, match="more than any model's context"):
        read_document(big)
    html = tmp_path / "big.html"
    html.write_text("<p>" + "word " * 300 + "</p>")
    with pytest.raises(DocumentError, match="more than any model's context"):
        read_document(html)


def test_html_keeps_text_and_sections_and_drops_scripts_and_styles(tmp_path):
    page = ("<html><head><title>Report</title><style>p { color: red }</style>"
            "<script>var secret = 'do not read';</script></head><body><h1>Intro</h1>"
            "<p>Deliveries &amp; returns were <b>on time</b>.</p><h2>Exceptions</h2>"
            "<div>Acme<br>missed March</div><noscript>enable js</noscript></body></html>")
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    text = read_document(path)
    assert "secret" not in text and "color" not in text and "enable js" not in text
    assert "[section: Intro]\nDeliveries & returns were on time." in text
    assert "[section: Exceptions]\nAcme\nmissed March" in text
    assert last_marker(text[:text.index("Acme")]) == "section: Exceptions"
    assert html_to_text("<p>unclosed <i>tags") == "unclosed tags\n"


def test_text_and_markdown_as_they_are(tmp_path):
    md = tmp_path / "notes.md"
    md.write_text("# Title\n\nSome *text*.\n", encoding="utf-8")
    assert read_document(md) == "# Title\n\nSome *text*.\n"


@pytest.mark.parametrize("content,name,message", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "program", "binary file"),
    (b"caf\xe9 au lait", "latin1.txt", "not UTF-8"),
    (b"<p>caf\xe9 au lait</p>", "latin1.html", "not UTF-8"),
    (b"ok \xed\xa0\x80 surrogate", "surrogate.md", "not UTF-8"),  # a UTF-16 surrogate encoded
    (b"  \n\n", "empty.txt", "holds no text"),
    (b"%PDF-1.4 not really a pdf", "broken.pdf", "not a PDF dysco-edge can read"),
])
def test_unreadable_files_are_refused(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=message):
        read_document(path)


def test_last_marker():
    assert last_marker("no markers here") is None
    assert last_marker("[page 3]\nx\n[section: B]\ny [page 12] z") == "page 12"


# ---- devices and flags ----

@pytest.mark.parametrize("layers,flash,gpu,expect", [
    (None, "auto", True, (-1, True)),   # a GPU build: everything offloaded, flash attention on
    (None, "auto", False, (0, False)),  # a CPU build
    (0, "auto", True, (0, False)),      # --n-gpu-layers 0 on a GPU build: CPU, FA auto goes off
    (10, "off", True, (10, False)),
    (None, "on", False, (0, True)),
    (None, True, False, (0, True)),     # the API's old bool still works
])
def test_offload_defaults(layers, flash, gpu, expect):
    assert choose_offload(layers, flash, gpu=gpu) == expect


def test_run_flags():
    parse = build_parser().parse_args
    args = parse(["run", "m.gguf", "--doc", "a.pdf"])
    assert (args.n_ctx, args.n_gpu_layers, args.flash_attn, args.no_cache) == (None, None, "auto", False)
    assert parse(["run", "--flash-attn", "--doc", "a"]).flash_attn == "on"
    assert parse(["run", "--flash-attn", "off", "--n-gpu-layers", "0", "--n-ctx", "4096"]).flash_attn == "off"
    args = parse(["run", "--cache-dir", "/tmp/x", "--cache-limit", "2G", "--no-cache"])
    assert (args.cache_dir, args.cache_limit, args.no_cache) == ("/tmp/x", "2G", True)
    with pytest.raises(SystemExit):
        parse(["run", "--flash-attn", "maybe"])


# ---- with models ----

@pytest.fixture(scope="module")
def smol():
    with Model(models.smollm2_q4_1(), n_threads=2) as m:
        yield m


def _answers(session) -> tuple[list[int], list[int]]:
    plain = session.ask(QUESTION, dysco=None, max_new_tokens=12).token_ids
    dysco = session.ask(QUESTION, dysco=DyscoConfig(qr_heads=SMOL_HEADS, top_k=32), max_new_tokens=12).token_ids
    return plain, dysco


@pytest.fixture(scope="module")
def oracle(smol):
    """Answers after a fresh prefill, cache off."""
    smol.prefill([])
    return _answers(smol.document(DOC, cache=False))


@pytest.mark.slow
def test_cached_cells_answer_as_a_fresh_prefill(smol, oracle, tmp_path):
    config = KVCacheConfig(tmp_path)
    smol.prefill([])
    cold = smol.document(DOC, cache=config)
    assert (cold.opened.how, cold.opened.saved) == ("prefilled", True)
    assert len(KVCache(config).entries()) == 1
    assert smol.document(DOC, cache=config).opened.how == "kept"  # already in the context
    smol.prefill([])  # forget the cells in memory
    warm = smol.document(DOC, cache=config)
    assert warm.opened.how == "loaded" and warm.opened.n_tokens == cold.opened.n_tokens
    assert _answers(warm) == oracle


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_file_is_prefilled_again(smol, oracle, tmp_path, capsys, damage):
    config = KVCacheConfig(tmp_path)
    smol.prefill([])
    smol.document(DOC, cache=config)
    (_, _, path), = KVCache(config).entries()
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) * 2 // 3:]
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(data)
    smol.prefill([])
    capsys.readouterr()
    again = smol.document(DOC, cache=config)
    assert "ignoring cached cells" in capsys.readouterr().err
    assert (again.opened.how, again.opened.saved) == ("prefilled", True)
    assert _answers(again) == oracle


def _edit_cells(path, edit) -> None:
    """Apply edit to the saved cells' positions (the first cache's, as llama.cpp wrote them: context
    magic, sequence id, stream count, cell count, then position, sequence count and sequence id
    per cell), and write the checksum again, as a deliberate edit would."""
    h = kv_cache._HEADER.size
    data = bytearray(path.read_bytes())
    n = struct.unpack_from("<I", data, h + 12)[0]
    cells = np.frombuffer(data, "<i4", count=3 * n, offset=h + 16).reshape(n, 3).copy()
    edit(cells)
    data[h + 16:h + 16 + cells.nbytes] = cells.tobytes()
    magic, version, key, count, length, _ = kv_cache._HEADER.unpack_from(data)
    data[:h] = kv_cache._HEADER.pack(magic, version, key, count, length, zlib.crc32(data[h:]))
    path.write_bytes(data)


_EDITS = {
    "negative": lambda c: c.__setitem__((0, 0), -7),
    "duplicated": lambda c: c.__setitem__((2, 0), c[1, 0]),
    "reversed": lambda c: c.__setitem__((slice(None), 0), c[::-1, 0]),
    "rotated": lambda c: c.__setitem__((slice(None), 0), np.roll(c[:, 0], 5)),
    "other sequence": lambda c: c.__setitem__((3, 2), 1),
    "two sequences": lambda c: c.__setitem__((3, 1), 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", sorted(_EDITS))
def test_cells_edited_then_summed_again_are_refused_and_prefilled(smol, oracle, tmp_path, capsys, edit):
    """Positions edited under a valid checksum loaded and changed the answer before."""
    config = KVCacheConfig(tmp_path)
    smol.prefill([])
    smol.document(DOC, cache=config)
    (_, _, path), = KVCache(config).entries()
    _edit_cells(path, _EDITS[edit])
    smol.prefill([])
    capsys.readouterr()
    again = smol.document(DOC, cache=config)
    err = capsys.readouterr().err
    assert "cells refused" in err and "removed, prefilling again" in err, err
    assert (again.opened.how, again.opened.saved) == ("prefilled", True)
    assert _answers(again) == oracle


@pytest.mark.slow
def test_other_model_misses_and_foreign_cells_are_refused(smol, tmp_path, capsys):
    """Gemma 3 never loads SmolLM2's cells: another key; and cells under a forged key are refused
    by llama.cpp, removed, and prefilled."""
    config = KVCacheConfig(tmp_path)
    smol.prefill([])
    smol.document(DOC, cache=config)
    (_, _, smol_file), = KVCache(config).entries()
    with Model(models.gemma3_270m(), n_threads=2) as gemma:
        assert gemma.document(DOC, cache=config).opened.how == "prefilled"
        assert len(KVCache(config).entries()) == 2
        gemma_ids = gemma.kept_prefix()
        expected = gemma.generate(token_ids=gemma_ids + gemma.tokenize(" Mara"), dysco=None, max_new_tokens=6)
        key = cache_key(gemma.file_identity(), gemma.cells_identity(), gemma_ids)
        forged = bytearray(smol_file.read_bytes())
        forged[12:44], forged[44:52] = key, len(gemma_ids).to_bytes(8, "little")
        KVCache(config).path(key).write_bytes(forged)
        gemma.prefill([])
        capsys.readouterr()
        session = gemma.document(DOC, cache=config)
        assert "refused" in capsys.readouterr().err and session.opened.how == "prefilled"
        again = gemma.generate(token_ids=gemma_ids + gemma.tokenize(" Mara"), dysco=None, max_new_tokens=6)
        assert again.token_ids == expected.token_ids


@pytest.mark.slow
def test_context_follows_the_input_and_an_overlong_document_fails_first():
    with Model(models.smollm2_q4_1(), n_threads=2) as m:
        assert m.n_ctx == 512 and m.n_ctx_train == 8192
        session = m.document(DOC, cache=False, reserve=700)
        assert m.n_ctx % 256 == 0 and session.n_document_tokens + 700 < m.n_ctx <= session.n_document_tokens + 1000
        held = m.n_ctx
        with pytest.raises(ContextOverflow, match=r"the input is 21\d{3} tokens but .* context of 8192 tokens"):
            m.document("lorem ipsum dolor " * 3000, cache=False)
        assert m.n_ctx == held and m.kept_prefix()[:5] == session.model.kept_prefix()[:5]
        long = m.generate("Say hi.", dysco=None, max_new_tokens=2000)  # grows again, up to what it needs
        assert m.n_ctx >= 2000 and long.token_ids
    with Model(models.smollm2_q4_1(), n_ctx=256, n_threads=2) as fixed:
        with pytest.raises(ContextOverflow, match=r"but the context holds 256"):
            fixed.document(DOC, cache=False)



@pytest.mark.slow
def test_a_document_many_times_the_context_is_refused_before_it_is_tokenized(smol):
    """A 48 MB text file took 150 s and 3.7 GB before the "too long" error: it was tokenized whole, twice."""
    text = "Sofia wrote a letter to the harbour master on Friday about the broken lamp. " * 60_000  # 4.6 MB
    start = time.perf_counter()
    with pytest.raises(ContextOverflow, match=r"at least \d+ tokens, but the context holds 8192"):
        smol.document(text, cache=False)
    assert time.perf_counter() - start < 5


def test_the_early_refusal_counts_only_what_surely_does_not_fit():
    """Against a tokenizer of whitespace-separated words (the oracle: str.split)."""
    from dysco_edge.documents.readers import refuse_overlong
    calls = []

    def words(text):
        calls.append(len(text))
        return text.split()

    long_words = ("x" * 19 + " ") * 5000  # 100,000 characters, 5,000 tokens: fits 8192 with room
    refuse_overlong(long_words, words, 8192, 100)
    short_words = "ab " * 100_000  # 100,000 tokens
    with pytest.raises(ContextOverflow, match=r"at least 2\d{4} tokens") as caught:
        refuse_overlong(short_words, words, 8192, 100)
    assert caught.value.n_prompt <= len(short_words.split()) and max(calls) <= 8193 * 8
    refuse_overlong("ab " * 20_000, words, 8192, 100)  # short enough to be counted whole, later
    assert len(calls) == 2


# ---- the command line ----

def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dysco_edge.cli", "run", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


@pytest.mark.parametrize("kind", ["encrypted", "binary"])
def test_cli_refuses_an_unreadable_document_in_one_line(tmp_path, kind):
    path = _encrypted(tmp_path, "pw") if kind == "encrypted" else tmp_path / "data.bin"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    proc = _run("--doc", str(path), "-q", "x", timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("dysco-edge: error: ") and str(path) in proc.stderr


@pytest.mark.slow
def test_cli_opens_a_pdf_then_loads_its_cells(tmp_path):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_pdf(REPORT))
    args = ["--model", "smollm2-135m", "--doc", str(pdf), "-q", "Which supplier missed the March deadline?",
            "--max-tokens", "12", "--cache-dir", str(tmp_path / "kv"), "--show-focus"]
    first, second = _run(*args), _run(*args)
    for proc in (first, second):
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines()[0].startswith("running on CPU")
    assert "prefilled in" in first.stderr and "saved to the KV cache" in first.stderr
    assert "loaded from the KV cache" in second.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "focus" in first.stderr
    # --show-focus decodes with fast DySCO; without it, run's default is plain: ask for fast
    off = _run(*args[:-3], "--dysco", "fast", "--no-cache", "--cache-dir", str(tmp_path / "off"))
    assert off.returncode == 0 and off.stdout == first.stdout and not (tmp_path / "off").exists()


def test_markdown_headings_place_a_passage_but_code_comments_do_not():
    text = "# Guide\nintro\n\n## Install ##\n```sh\n# not a heading\npip install x\n```\nafter the code\n"
    assert last_marker(text) == "section: Install"
    assert last_marker("# Guide\nintro\n## Inst") == "section: Guide"  # a heading still being read
    assert last_marker("    # indented code\ntext\n") is None
    assert last_marker("[page 2]\nx\n## Results\ny\n") == "page 2, section: Results"
    assert last_marker("## Results\ny\n[page 3]\nz") == "page 3"  # the heading was on an earlier page


def test_token_span_finds_the_text_in_token_pieces():
    pieces = [b"<|im_start|>", b"user", b"\n", b"The", b" caf", b"\xc3", b"\xa9", b" opens", b"\n\n", b"Q"]
    assert token_span(pieces, "The caf\u00e9 opens") == (3, 8)
    assert token_span(pieces, "  The caf\u00e9 opens\n") == (3, 8)  # surrounding whitespace aside
    assert token_span(pieces, "caf\u00e9") == (4, 7)  # a token holding part of it counts
    assert token_span(pieces, "missing") is None and token_span(pieces, " ") is None
