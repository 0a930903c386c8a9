"""Documents as users have them, as text: plain text and Markdown as they are, PDF through
pypdf with a "[page N]" line before each page, HTML through the standard library's parser with
"[section: heading]" lines. The markers stay in the text the model reads, so a passage can be
placed (markers.py). A file that is not text (binary, encrypted, no text layer) raises
DocumentError, which the CLI shows as one line.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

from ..errors import DocumentError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".log", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
_SNIFF = 8192


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
        text = html_to_text(_decode(path, path.read_bytes()))
    else:
        if b"\0" in head:
            raise DocumentError(f"{path} is a binary file, not a document dysco-edge reads "
                                f"(.txt, .md, .pdf, .html)")
        text = _decode(path, path.read_bytes())
    if not text.strip():
        raise DocumentError(f"{path} holds no text")
    return text


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None


def read_pdf(path: Path) -> str:
    """Each page's text after a "[page N]" line (N counted from 1, as viewers show it)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError
    try:
        with _quiet("pypdf"):
            reader = PdfReader(path)
        _unlock(reader, path)
        with _quiet("pypdf"):
            pages = [f"[page {i}]\n{(page.extract_text() or '').strip()}" for i, page in enumerate(reader.pages, 1)]
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError) as e:  # what pypdf raises on a damaged file
        raise DocumentError(f"{path} is not a PDF dysco-edge can read ({type(e).__name__}: {e})") from None
    if not any(p.split("\n", 1)[1] for p in pages):
        raise DocumentError(f"{path} has no text layer (a scanned PDF?): run OCR on it first")
    return "\n\n".join(pages)


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
    from pypdf.errors import DependencyError
    try:
        opened = reader.decrypt("")
    except DependencyError:
        opened = PasswordType.NOT_DECRYPTED
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
