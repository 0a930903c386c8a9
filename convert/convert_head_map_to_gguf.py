#!/usr/bin/env python3
"""Embed a dysco-edge head map into a GGUF file's metadata (the dysco.* keys).

Every other key and every tensor is copied unchanged; the map must fit the model's shape.
dysco-edge then finds the QR heads in the GGUF itself, with no head-map file beside it:

    python convert/convert_head_map_to_gguf.py model.gguf head_maps/qwen3-8b.json -o model-dysco.gguf

The same as `dysco-edge heads embed`; the work is dysco_edge.heads.gguf's.
"""
from __future__ import annotations

import sys

from dysco_edge.cli import script_main
from dysco_edge.heads.cli import add_embed_arguments, embed_map


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, add_embed_arguments, embed_map, argv)


if __name__ == "__main__":
    sys.exit(main())
