#!/usr/bin/env python3
"""Convert the authors' QR-head lists into a dysco-edge head map (JSON).

Reads a DySCO YAML config (`selected_heads: "[(17, 24), ...]"` and its decoding options) or a
QRHead head set (`attn_head_set: "8-21,8-14,..."`, or the bare list), and writes the head map
for the model whose shape --model MODEL.gguf gives (or --arch/--layers/--heads/--kv-heads/--embd):

    python convert/convert_authors_heads_to_map.py qwen3-8b.yaml --model Qwen3-8B-Q4_K_M.gguf -o qwen3-8b.json

The same as `dysco-edge heads import`; the work is dysco_edge.heads.importing's.
"""
from __future__ import annotations

import sys

from dysco_edge.cli import script_main
from dysco_edge.heads.cli import add_import_arguments, import_map


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, add_import_arguments, import_map, argv)


if __name__ == "__main__":
    sys.exit(main())
