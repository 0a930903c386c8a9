"""`dysco-edge run`: document QA from the terminal, with or without DySCO."""
from __future__ import annotations

import sys
import time
from importlib import resources
from pathlib import Path

from ..config import EXACT, FAST, OFF
from ..errors import InputError
from ..limits import check_text
from ..progress import Progress
from .models import add_model_arguments, chosen_model
from .devices import add_device_arguments, add_memory_arguments, device_options, memory_options
QUESTION_ROOM = 256  # context kept for a question asked interactively (its length unknown up front)
MAX_TOKENS = 256
# a greedy answer that repeats 24 tokens verbatim loops on until --max-tokens (measured: README, "Chosen for you")
STOP_ON_REPEAT = 24
SAMPLE_QUESTION = "Who painted the sign at the entrance?"
LINE_TOKENS = 64  # how far --show-focus looks for the end of a focus's line (markers and headings are short)
DYSCO_CHOICES = (OFF, FAST, EXACT)


def add_parser(subparsers) -> None:
    run = subparsers.add_parser("run", help="answer questions about documents (or a prompt)")
    add_model_arguments(run)
    run.add_argument("--doc", action="append", default=[], metavar="FILE",
                     help="document(s) to answer from (default: a bundled sample document)")
    run.add_argument("--question", "-q", action="append", default=[],
                     help="question (repeatable); read from stdin or asked interactively when absent "
                          f"(with the sample document: {SAMPLE_QUESTION!r})")
    run.add_argument("-p", "--prompt", help="a plain prompt instead of document QA")
    run.add_argument("--dysco", choices=DYSCO_CHOICES, default=None,
                     help="off (the default: plain decoding; --compare and --show-focus use fast), fast (no "
                          "probe; costs 2-14%% of decode speed on an H200) or exact (the paper's method: a probe "
                          "before every token)")
    run.add_argument("--no-dysco", dest="dysco", action="store_const", const=OFF, help="plain decoding (--dysco off)")
    run.add_argument("--compare", action="store_true", help="plain and DySCO answers side by side")
    run.add_argument("--head-map", metavar="FILE", help="QR heads for this model (JSON head map)")
    run.add_argument("--show-focus", action="store_true",
                     help="show the document passages DySCO up-weighted most, with their page or section")
    _add_sampling_arguments(run)
    run.add_argument("--n-ctx", type=int, default=None,
                     help="context size (default: what the document, question and --max-tokens need, "
                          "up to the model's training context)")
    run.add_argument("--threads", type=int, default=None, help=threads_help())
    add_memory_arguments(run)
    add_device_arguments(run)
    cache = run.add_argument_group("KV cache on disk (a document opened again is loaded, not prefilled)")
    cache.add_argument("--cache-dir", metavar="DIR",
                       help="where (default: $XDG_CACHE_HOME/dysco-edge/kv, else ~/.cache/dysco-edge/kv)")
    cache.add_argument("--cache-limit", metavar="SIZE", help="size limit, least recently used go first "
                                                             "(default 8G; e.g. 500M)")
    cache.add_argument("--no-cache", action="store_true", help="neither load nor save cells")
    run.set_defaults(handler=run_command)


def _add_sampling_arguments(run) -> None:
    group = run.add_argument_group("how answers are generated")
    group.add_argument("--max-tokens", type=int, default=MAX_TOKENS, metavar="N",
                       help=f"longest answer, in tokens (default {MAX_TOKENS}); an answer ends sooner at the "
                            "model's end-of-turn token")
    group.add_argument("--stop-on-repeat", type=int, default=STOP_ON_REPEAT, metavar="N",
                       help=f"end an answer once its last N tokens repeat an earlier stretch of it, without "
                            f"the repetition (default {STOP_ON_REPEAT}; 0: never)")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="sampling temperature (default 0: greedy, the same answer every time)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed when --temperature > 0 (default: a new one each run)")


def threads_help() -> str:
    from ..cores import physical_cores
    return f"CPU threads for llama.cpp (default: one per physical core, {physical_cores()} here)"


def read_documents(paths: list[str]) -> str:
    if not paths:
        return resources.files("dysco_edge").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    from ..documents.readers import read_document
    return "\n\n".join(read_document(Path(p)) for p in paths)


def cache_spec(args):
    """False, or the KVCacheConfig the flags ask for."""
    from ..documents.kv_cache import DEFAULT_MAX_BYTES, KVCacheConfig, default_cache_dir, parse_size
    if args.no_cache:
        return False
    limit = parse_size(args.cache_limit) if args.cache_limit else DEFAULT_MAX_BYTES
    return KVCacheConfig(Path(args.cache_dir) if args.cache_dir else default_cache_dir(), limit)


def check_args(args) -> None:
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.n_ctx is not None and args.n_ctx < 1:
        raise InputError(f"--n-ctx must be >= 1, got {args.n_ctx}")
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("the prompt is empty")
    for name, texts in (("--prompt", [args.prompt] if args.prompt is not None else []), ("--question", args.question)):
        for text in texts:
            check_text(text, name)
    check_run_options(args)


def check_run_options(args) -> None:
    """What can be refused before the model loads or the document is prefilled."""
    for i, question in enumerate(args.question, 1):
        if not question.strip():
            raise InputError(f"the question is empty (question {i}: -q {question!r}): ask something")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.stop_on_repeat < 0:
        raise InputError(f"--stop-on-repeat must be >= 0 (0: never), got {args.stop_on_repeat}")
    if args.prompt is not None and (args.question or args.doc):
        raise InputError("-p/--prompt is a plain prompt: it takes no --doc or -q")


def run_command(args) -> int:
    check_args(args)
    memory = memory_options(args)
    text = read_documents(args.doc) if args.prompt is None else None  # unreadable files fail before loading
    if args.prompt is None and not args.doc and not args.question:
        args.question = [SAMPLE_QUESTION]
        print(f"question: {SAMPLE_QUESTION}", file=sys.stderr)
    cache = cache_spec(args)
    path = chosen_model(args)
    from ..api import Model  # heavy imports after argument parsing
    model = Model(path, n_ctx=args.n_ctx, n_threads=args.threads, head_map=args.head_map, **memory,
                  **device_options(args))
    print(f"running on {model.where()}", file=sys.stderr)
    if model.placement:
        print(model.placement.describe(), file=sys.stderr)
    dysco = choose_dysco(model, args)
    options = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                   stop_on_repeat=args.stop_on_repeat)
    if args.prompt is not None:
        answer(model, lambda **kw: model.generate(args.prompt, **kw), dysco, args, options,
               lambda ids: model.text_span(ids, args.prompt))
        return 0
    room = max([len(model.tokenize(q)) + 16 for q in args.question] + [QUESTION_ROOM]) + args.max_tokens
    session = model.document(text, progress=Progress("prefill", unit="tok"), cache=cache, reserve=room)
    print(f"document: {session.n_document_tokens} tokens, {describe_opening(session.opened)}; "
          f"context {model.n_ctx}; model: {model.path.name}; DySCO: {dysco_label(dysco, args)}", file=sys.stderr)
    for question in questions(args.question):
        answer(model, lambda **kw: session.ask(question, **kw), dysco, args, options,
               lambda ids: session.document_span())
    return 0


def choose_dysco(model, args):
    """The model's DySCO config in the chosen mode, or None (--dysco off, or no QR heads found:
    said on stderr)."""
    from ..errors import NoHeadMap
    mode = args.dysco or (FAST if args.compare or args.show_focus else OFF)
    if mode == OFF:
        return None
    try:
        config = model.resolve_dysco("auto")
    except NoHeadMap as e:
        print(f"dysco-edge: note: {e}; answering without DySCO", file=sys.stderr)
        return None
    print(f"QR heads: {model.find_heads().describe()}; DySCO mode: {mode}", file=sys.stderr)
    # static DySCO (a map with dynamic=false) runs no probe already: it has no fast mode
    return config.replace(mode=mode if config.dynamic else EXACT)


def dysco_label(dysco, args) -> str:
    if dysco is not None:
        return f"on ({dysco.mode})"
    return "off (the default; --dysco fast or exact turns it on)" if args.dysco is None else "off"


def describe_opening(opened) -> str:
    if opened.how == "loaded":
        return f"loaded from the KV cache in {opened.seconds:.2f} s (not prefilled)"
    if opened.how == "kept":
        return "already in the context"
    saved = "; saved to the KV cache, so the next run loads it" if opened.saved else ""
    return f"prefilled in {opened.seconds:.1f} s{saved}"


def questions(given: list[str]):
    if given:
        yield from given
        return
    if not sys.stdin.isatty():
        try:
            for line in sys.stdin:
                if line.strip():
                    yield line.strip()
        except UnicodeDecodeError as e:
            raise InputError(f"standard input is not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
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


def answer(model, ask, dysco, args, options, span) -> None:
    """Print each answer (plain and DySCO with --compare); span(prompt ids) gives the positions
    --show-focus may show: the document's, or the prompt's own text."""
    runs = [("plain", None), ("DySCO", dysco)] if args.compare and dysco else [(None, dysco)]
    for label, config in runs:
        if label:
            print(f"--- {label}:")
        started = time.perf_counter()
        stream = ask(dysco=config, stream=True, trace=args.show_focus and config is not None, **options)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        print(describe_answer(stream.result, time.perf_counter() - started), file=sys.stderr)
        if args.show_focus and stream.result.trace:
            show_focus(model, stream.result, span(stream.result.prompt_ids))


def describe_answer(generation, seconds: float) -> str:
    """How long the answer took and why it ended, for stderr."""
    n = len(generation.token_ids)
    why = {"repeat": "; cut where it began repeating itself (--stop-on-repeat)",
           "length": "; cut at --max-tokens", "context": "; the context is full"}.get(generation.finish_reason, "")
    return f"({n} token{'s' if n != 1 else ''} in {seconds:.1f} s{why})"


def show_focus(model, generation, within=None) -> None:
    """The passages DySCO up-weighted most (within the document, when there is one), each with the
    page, section or heading it lies in: the last marker up to the end of the focus's line (a focus
    on a marker or heading is placed by it)."""
    from ..documents.markers import last_marker
    ids = generation.prompt_ids
    lo, hi = within or (0, generation.n_prompt)
    for pos, passage in model.focus_spans(generation, within=within):
        line_rest = model.detokenize(ids[pos + 1:min(hi, pos + 1 + LINE_TOKENS)]).split("\n", 1)
        where = last_marker(model.detokenize(ids[lo:pos + 1]) + line_rest[0] + ("\n" if len(line_rest) > 1 else ""))
        print(f"  focus{f' ({where})' if where else ''}: ...{passage}...", file=sys.stderr)
