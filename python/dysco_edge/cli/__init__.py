"""The `dysco-edge` command: a dispatcher; each verb lives in its own module (`cli/run.py`,
`cli/models.py`, `cli/rpc_server.py`, `cli/device_check.py`, `server/cli.py`, `heads/cli.py`, `eval/cli.py`) with an
`add_parser` and a handler."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from ..errors import DyscoEdgeError
from ..eval import cli as eval_cli
from ..heads import cli as heads_cli
from ..server import cli as serve_cli
from . import device_check as devices_cli
from . import models as models_cli
from . import rpc_server as rpc_cli
from . import run as run_cli

DESCRIPTION = "DySCO decoding for GGUF models on llama.cpp"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dysco-edge", description=DESCRIPTION)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = ap.add_subparsers(dest="command", required=True)
    for verb in (run_cli, serve_cli, rpc_cli, heads_cli, eval_cli, models_cli, devices_cli):
        verb.add_parser(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args.handler, args, debug=args.debug)


def script_main(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                handler: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """A stand-alone script over one verb (convert/*.py): its docstring's first paragraph as the
    description, the verb's arguments plus --debug, errors as run_handler gives them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    args = parser.parse_args(argv)
    return run_handler(handler, args, debug=args.debug, prog=parser.prog)


def run_handler(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, *,
                debug: bool = False, prog: str = "dysco-edge") -> int:
    """A verb's exit code; our errors and the OS's as one line on stderr (exit 2), unless debug."""
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (DyscoEdgeError, OSError) as e:  # the user's to fix; anything else is our bug: traceback
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
