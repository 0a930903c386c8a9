"""Documents as users have them, as text: plain text and Markdown as they are, PDF through
pypdf with a "[page N]" line before each page, HTML through the standard library's parser with
"[section: heading]" lines. The markers stay in the text the model reads, so a passage can be
placed (markers.py). A file that is not text (binary, not UTF-8, encrypted with a password,
no text layer, damaged past what pypdf reads) raises DocumentError, which the CLI shows as one
line. Nothing is read past MAX_TEXT_BYTES: more text than any model's context holds.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

from ..errors import ContextOverflow, DocumentError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".log", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
_SNIFF = 8192
MAX_TEXT_BYTES = 256 << 20  # ~64M tokens of text: past any model's context
# a text longer than this many characters per token of the context is counted from its start first
_PROBE_CHARS_PER_TOKEN = 8
_PROBE_SLACK = 16  # tokens a cut at a word boundary can add or remove


def read_document(path: str | Path) -> str:
    """The text of a .txt/.md, .pdf or .html file (others are read as UTF-8 text when they are)."""
    path = Path(path)
    if not path.is_file():
        raise DocumentError(f"document not found: {path}")
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    suffix = path.suffix.lower()
    if suffix == ".pdf" or head.startswith(b"%PDF-"):
        text = read_pdf(path)
    elif suffix in HTML_SUFFIXES:
        text = html_to_text(_decode(path, _read_bounded(path)))
    else:
        if b"\0" in head:
            raise DocumentError(f"{path} is a binary file, not a document dysco-edge reads "
                                f"(.txt, .md, .pdf, .html)")
        text = _decode(path, _read_bounded(path))
    if not text.strip():
        raise DocumentError(f"{path} holds no text")
    return text


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise DocumentError(f"{path} is over {MAX_TEXT_BYTES >> 20} MiB of text, more than any model's context "
                            f"holds: pass the part the questions are about")
    return data


def refuse_overlong(text: str, tokenize, limit: int, room: int) -> None:
    """Raise ContextOverflow when text cannot fit `limit` tokens with `room` to spare, judged from
    the tokens of its start alone: a text many times the context is refused in a fraction of a
    second instead of after tokenizing all of it."""
    end = (limit + 1) * _PROBE_CHARS_PER_TOKEN
    if len(text) <= end:
        return
    cut = text.rfind(" ", end // 2, end)  # at a word boundary, where tokenizers split anyway
    at_least = len(tokenize(text[:cut if cut > 0 else end])) - _PROBE_SLACK
    if at_least + room > limit:
        raise ContextOverflow(f"the document is {len(text)} characters, at least {at_least} tokens, but the "
                              f"context holds {limit}; pass the part the questions are about",
                              n_prompt=at_least, n_ctx=limit)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None


def read_pdf(path: Path) -> str:
    """Each page's text after a "[page N]" line (N counted from 1, as viewers show it)."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, PyPdfError
    try:
        with _quiet("pypdf"):
            reader = PdfReader(path)
        _unlock(reader, path)
        with _quiet("pypdf"):
            pages = _page_texts(reader, path)
    except DocumentError:
        raise
    except DependencyError:  # AES without the cryptography package (a dependency of ours: removed since?)
        raise DocumentError(f"{path} is AES-encrypted and decrypting it needs the cryptography package: "
                            f"pip install cryptography") from None
    except RecursionError:
        raise DocumentError(f"{path} nests objects deeper than pypdf reads (a damaged or hostile PDF): "
                            f"print it to a new PDF, or save its text, first") from None
    except NotImplementedError as e:  # a filter or font encoding pypdf lacks
        raise DocumentError(f"{path} uses what pypdf cannot decode ({e}): save its text, or print it to a "
                            f"new PDF, first") from None
    except (PyPdfError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as e:
        # what pypdf raises on a damaged file (its parsers let built-in errors through)
        raise DocumentError(f"{path} is not a PDF dysco-edge can read ({type(e).__name__}: {e}); repair "
                            f"it or save its text first") from None
    if not any(p.split("\n", 1)[1] for p in pages):
        raise DocumentError(f"{path} has no text layer (a scanned PDF?): run OCR on it first")
    return "\n\n".join(pages)


def _page_texts(reader, path: Path) -> list[str]:
    pages, size = [], 0
    for i, page in enumerate(reader.pages, 1):
        pages.append(f"[page {i}]\n{(page.extract_text() or '').strip()}")
        size += len(pages[-1])
        if size > MAX_TEXT_BYTES:
            raise DocumentError(f"{path} holds over {MAX_TEXT_BYTES >> 20} MiB of text by page {i}, more than "
                                f"any model's context holds: pass the pages the questions are about")
    return pages


@contextmanager
def _quiet(logger_name: str):
    """pypdf logs a warning for every repair it makes to a damaged file; the user gets our one line
    (or the text) instead."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unlock(reader, path: Path) -> None:
    """An encrypted PDF opens only when its user password is empty (an owner password alone
    restricts printing or copying, not reading)."""
    if not reader.is_encrypted:
        return
    from pypdf import PasswordType
    opened = reader.decrypt("")
    if opened == PasswordType.NOT_DECRYPTED:
        raise DocumentError(f"{path} is an encrypted PDF: save a copy without its password first")


class _TextCollector(HTMLParser):
    """Visible text; scripts, styles and other non-content dropped; blocks as lines; headings as
    "[section: ...]" lines."""

    SKIP = {"script", "style", "noscript", "template", "svg"}
    BLOCKS = {"p", "div", "br", "li", "tr", "table", "section", "article", "blockquote", "pre", "ul", "ol",
              "dl", "dt", "dd", "hr", "header", "footer", "nav", "aside", "main", "figure", "figcaption"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skipping = 0
        self.heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.HEADINGS:
            self._end_line()
            self.heading = []
        elif tag in self.BLOCKS:
            self._end_line()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.HEADINGS and self.heading is not None:
            title = " ".join("".join(self.heading).split())
            self.heading = None
            if title:
                self.lines += ["", f"[section: {title}]"]
        elif tag in self.BLOCKS:
            self._end_line()

    def handle_data(self, data):
        if self.skipping:
            return
        (self.heading if self.heading is not None else self.current).append(data)

    def _end_line(self):
        line = " ".join("".join(self.current).split())
        if line:
            self.lines.append(line)
        self.current = []

    def text(self) -> str:
        self._end_line()
        return "\n".join(self.lines).strip() + "\n"


def html_to_text(html: str) -> str:
    parser = _TextCollector()
    parser.feed(html)
    parser.close()
    return parser.text()
