"""Where a passage lies in a document: the last "[page N]" or "[section: ...]" marker the
readers wrote before it."""
from __future__ import annotations

import re
from typing import Optional

MARKER = re.compile(r"\[(page \d+|section: [^\]\n]{1,200})\]")


def last_marker(text_before: str) -> Optional[str]:
    """'page 12' or 'section: Results' for the last marker in the text, None when none."""
    found = None
    for found in MARKER.finditer(text_before):
        pass
    return found.group(1) if found else None
