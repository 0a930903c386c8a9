"""`dysco-edge eval` (score decoding methods on generated long-context tasks) and
`dysco-edge eval-report` (tables and plots from the results)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .methods import OPTIONS, Method, parse_methods
from .tasks import SPLITS, TASKS
from ..cli.models import add_model_arguments, chosen_model
from ..errors import InputError

DEFAULT_METHODS = "plain,dysco,random,static"


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="score decoding methods on generated long-context tasks",
                               description="Appends one JSON line per (case, method) to --out as each finishes; "
                                           "running the same command again skips what is there.")
    add_model_arguments(ev)
    ev.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    ev.add_argument("--lengths", default="1024,2048,4096", help="prompt+answer lengths in tokens, comma-separated")
    ev.add_argument("--split", choices=SPLITS, default="dev", help="dev for tuning, test for the report")
    ev.add_argument("--n", type=int, default=100, help="cases per task and length")
    ev.add_argument("--methods", default=DEFAULT_METHODS,
                    help="e.g. 'plain,dysco,random:layers=all,static,attnts:factor=1.2' (see docs/EVAL.md)")
    ev.add_argument("--tuned", metavar="FILE", help="JSON of tuned options per method kind (bench/research/eval_sweep.py)")
    ev.add_argument("--out", required=True, metavar="FILE.jsonl", help="results file (appended to)")
    ev.add_argument("--head-map", metavar="FILE", help="QR heads for this model (JSON head map)")
    ev.add_argument("--seed", type=int, default=0, help="base seed of the generated cases")
    ev.add_argument("--n-gpu-layers", type=int, default=0)
    ev.add_argument("--flash-attn", action="store_true")
    ev.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    ev.add_argument("--batch", type=int, default=512, help="prefill batch size")
    ev.add_argument("--time-limit", type=float, metavar="SECONDS",
                    help="start no case that might end after this; run again to continue")
    ev.add_argument("--shard", default="0/1", metavar="K/N",
                    help="only cases i with i %% N == K, to split one cell over N processes (default 0/1)")
    ev.add_argument("--report", metavar="DIR", help="also write the report of --out into DIR")
    rep = subparsers.add_parser("eval-report", help="markdown tables and PNG plots from eval results")
    rep.add_argument("results", nargs="+", help="results files (JSONL) from dysco-edge eval")
    rep.add_argument("--out", default="docs", metavar="DIR", help="where NAME.md and the plots go (default docs)")
    rep.add_argument("--name", help="file name stem (default: the first results file's)")
    rep.add_argument("--title", default="DySCO evaluation")
    # not --command: its dest would overwrite args.command, the sub-command's name
    rep.add_argument("--reproduce", metavar="COMMAND", help="the command that produced the results, quoted in the report")
    ev.set_defaults(handler=run_eval_command)
    rep.set_defaults(handler=run_report_command)


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--lengths: expected comma-separated token counts like 1024,2048, got {text!r}") from None
    if not lengths:
        raise InputError("--lengths: give at least one length")
    return lengths


def load_tuned(path: str | None) -> dict:
    """{kind: {option: value}} from a tuned file; unknown kinds are refused."""
    if path is None:
        return {}
    try:
        tuned = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"tuned file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON ({e})") from None
    if not isinstance(tuned, dict) or not all(k in OPTIONS and isinstance(v, dict) for k, v in tuned.items()):
        raise InputError(f"{path}: expected {{kind: {{option: value}}}} with kinds from {', '.join(OPTIONS)}")
    return tuned


def resolve_methods(text: str, tuned_path: str | None) -> tuple[Method, ...]:
    tuned = load_tuned(tuned_path)
    return tuple(m.with_tuned(tuned) for m in parse_methods(text))


def build_plan(args: argparse.Namespace):
    from .run import EvalPlan
    from ..models import default_model_path
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return EvalPlan(chosen_model(args) or default_model_path(), tasks, parse_lengths(args.lengths),
                    args.split, args.n, resolve_methods(args.methods, args.tuned), Path(args.out),
                    base_seed=args.seed, head_map=Path(args.head_map) if args.head_map else None,
                    n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn, n_threads=args.threads,
                    n_batch=args.batch, time_limit=args.time_limit, shard=parse_shard(args.shard))


def parse_shard(text: str) -> tuple[int, int]:
    k, slash, n = text.partition("/")
    if not (slash and k.isdigit() and n.isdigit()):
        raise InputError(f"--shard: expected K/N like 0/2, got {text!r}")
    return int(k), int(n)


def run_eval_command(args: argparse.Namespace) -> int:
    from .run import run_eval
    plan = build_plan(args)
    try:
        summary = run_eval(plan)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished result is in {plan.out}; run the same command to continue",
              file=sys.stderr)
        return 130
    print(f"eval: wrote {summary.written} results to {plan.out}"
          + (f"; {summary.remaining} remain: run the same command again to continue" if summary.remaining else ""),
          file=sys.stderr)
    if args.report:
        print(f"report: {_report([plan.out], args.report, None, 'DySCO evaluation', None)}", file=sys.stderr)
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    print(_report(args.results, args.out, args.name, args.title, args.reproduce))
    return 0


def _report(paths, out_dir, name, title, command) -> Path:
    from .report import write_report
    return write_report(paths, out_dir, name=name, title=title, command=command)
