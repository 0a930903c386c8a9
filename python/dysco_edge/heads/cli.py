"""`dysco-edge heads ...`: show, import, embed and detect QR-head maps.

  heads show MODEL.gguf | --model NAME        which head map a model gets, and from where
  heads import FILE --model MODEL.gguf -o OUT.json
                                              a DySCO YAML / QRHead head set -> head map
  heads embed MODEL.gguf MAP.json -o OUT.gguf write the map into the GGUF's metadata
  heads detect MODEL.gguf | --model NAME [-o MAP.json]
                                              QR-head detection (QRHead) on a calibration set
  heads select MAP.json --max-layer K -o OUT.json
                                              re-pick a detected map's top 16 under a layer cap

cli.py registers the parser with `add_parser` and calls `run` for the `heads` command.
Every error is one line (`dysco-edge: error: ...`) and a non-zero exit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli.models import add_model_arguments, required_model
from ..errors import InputError
from ..progress import Progress

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    heads = subparsers.add_parser("heads", help="show, import, embed or detect QR-head maps")
    sub = heads.add_subparsers(dest="heads_command", required=True)
    _add_show(sub)
    _add_import(sub)
    _add_embed(sub)
    _add_detect(sub)
    _add_select(sub)
    heads.set_defaults(handler=run)


def _add_show(sub) -> None:
    show = sub.add_parser("show", help="which head map a model gets, and where it comes from")
    add_model_arguments(show, positional_help="GGUF file")
    show.add_argument("--head-map", metavar="FILE", help="a head map to check against the model instead")


def _add_import(sub) -> None:
    add_import_arguments(sub.add_parser("import", help="turn a DySCO YAML config or a QRHead head set into a head map"))


def add_import_arguments(imp: argparse.ArgumentParser) -> None:
    """The arguments of `heads import` (and of convert/convert_authors_heads_to_map.py)."""
    imp.add_argument("file", help="DySCO YAML (selected_heads) or QRHead config / list (attn_head_set)")
    imp.add_argument("--model", metavar="GGUF", help="the model the heads are for (gives its shape)")
    for flag, what in (("--arch", "architecture"), ("--layers", "layers"), ("--heads", "query heads per layer"),
                       ("--kv-heads", "KV heads"), ("--embd", "embedding width")):
        imp.add_argument(flag, type=str if flag == "--arch" else int, help=f"{what}, without --model")
    imp.add_argument("--name", help="the map's name (default: the model's GGUF name)")
    imp.add_argument("--name-pattern", action="append", default=[], metavar="REGEX",
                     help="model names the map is for (repeatable)")
    imp.add_argument("-o", "--output", required=True, metavar="OUT.json")


def _add_embed(sub) -> None:
    add_embed_arguments(sub.add_parser("embed", help="write a head map into a GGUF file's metadata (dysco.* keys)"))


def add_embed_arguments(embed: argparse.ArgumentParser) -> None:
    """The arguments of `heads embed` (and of convert/convert_head_map_to_gguf.py)."""
    embed.add_argument("model", help="GGUF file")
    embed.add_argument("head_map", metavar="MAP.json")
    out = embed.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", metavar="OUT.gguf", help="the new GGUF file")
    out.add_argument("--in-place", action="store_true", help="rewrite MODEL.gguf (through a temporary file)")
    embed.add_argument("--force", action="store_true", help="overwrite an existing OUT.gguf")


def _add_detect(sub) -> None:
    detect = sub.add_parser("detect", help="detect QR heads (QRHead) on a generated calibration set")
    add_model_arguments(detect, positional_help="GGUF file")
    detect.add_argument("--examples", type=int, default=64, help="calibration examples (default 64)")
    detect.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    detect.add_argument("--documents", type=int, default=8, help="documents per example (default 8)")
    detect.add_argument("--max-layer", type=int, metavar="K",
                        help="QR heads only in layers 0..K: the probe then costs at most (K+1)/L of a pass")
    detect.add_argument("--name", help="the map's name (default: the model's GGUF name)")
    detect.add_argument("--name-pattern", action="append", default=[], metavar="REGEX")
    detect.add_argument("-o", "--output", metavar="MAP.json", help="where to write the map (default: stdout)")
    detect.add_argument("--n-threads", type=int, default=None)
    detect.add_argument("--n-gpu-layers", type=int, default=0)


def _add_select(sub) -> None:
    select = sub.add_parser("select", help="re-pick a detected map's top 16 from its QRScores under a layer cap")
    select.add_argument("head_map", metavar="MAP.json", help="a map written by heads detect (holds qr_scores)")
    select.add_argument("--max-layer", type=int, metavar="K", help="QR heads only in layers 0..K (omit: no cap)")
    select.add_argument("--name", help="rename the map")
    select.add_argument("--name-pattern", action="append", default=None, metavar="REGEX",
                        help="replace the map's name patterns (repeatable)")
    select.add_argument("-o", "--output", metavar="OUT.json", help="where to write the map (default: stdout)")


def run(args: argparse.Namespace) -> int:
    """Run one heads subcommand."""
    commands = {"show": _show, "import": _import, "embed": _embed, "detect": _detect, "select": _select}
    return _with_file_errors(commands[args.heads_command], args)


def import_map(args: argparse.Namespace) -> int:
    """`heads import`: a DySCO YAML / QRHead head set -> a head map JSON."""
    return _with_file_errors(_import, args)


def embed_map(args: argparse.Namespace) -> int:
    """`heads embed`: a head map -> dysco.* metadata of a GGUF."""
    return _with_file_errors(_embed, args)


def _with_file_errors(command, args: argparse.Namespace) -> int:
    """OS errors and non-UTF-8 files become one-line errors naming the file."""
    try:
        return command(args)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        raise InputError(f"{where}{err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"a file given is not UTF-8 text (byte {err.start}): convert it first") from None


# ---- show ----

def _show(args) -> int:
    from .gguf import model_shape
    from .lookup import locate_head_map, no_head_map_message
    from .maps import load_head_map

    path = _gguf(required_model(args))
    shape = model_shape(path)
    user_map = load_head_map(args.head_map) if args.head_map else None
    found = locate_head_map(shape, path, user_map=user_map, user_map_path=args.head_map or "")
    print(f"model: {path.name} ({shape.architecture}, {shape.n_layer} layers, {shape.n_head} heads, "
          f"{shape.n_head_kv} KV heads, embedding {shape.n_embd})")
    if found is None:
        print(no_head_map_message(shape, path), file=sys.stderr)
        return 1
    print(f"QR heads: {found.describe()}")
    print(f"  source: {found.head_map.source}")
    print(f"  heads: {' '.join(f'{layer}-{head}' for layer, head in found.head_map.qr_heads)}")
    print(f"  {probe_cost_line(found.head_map.to_config().l_max, shape.n_layer)}")
    return 0


def probe_cost_line(l_max: int, n_layer: int) -> str:
    return f"probe cost: layers 0-{l_max}, (L_max+1)/L = {l_max + 1}/{n_layer} = {(l_max + 1) / n_layer:.2f} of a pass"


# ---- import ----

def _import(args) -> int:
    from .importing import import_head_map

    shape = _import_shape(args)
    source = Path(args.file)
    name = args.name or _default_name(shape.name, Path(args.model) if args.model else source)
    head_map = import_head_map(source.read_text(encoding="utf-8"), shape, name=name, origin=source.name,
                               name_patterns=tuple(args.name_pattern))
    _write_map(head_map, args.output)
    print(f"wrote {args.output}: {len(head_map.qr_heads)} QR heads for {name} ({head_map.source})", file=sys.stderr)
    return 0


def _import_shape(args):
    from .gguf import model_shape
    from .maps import ModelShape

    flags = {"architecture": args.arch, "n_layer": args.layers, "n_head": args.heads,
             "n_head_kv": args.kv_heads, "n_embd": args.embd}
    if args.model:
        if any(v is not None for v in flags.values()):
            raise InputError("give either --model or the shape flags (--arch --layers ...), not both")
        return model_shape(_gguf(args.model))
    missing = [f"--{k}" for k, v in zip(("arch", "layers", "heads", "kv-heads", "embd"), flags.values()) if v is None]
    if missing:
        raise InputError(f"the model's shape is needed: pass --model MODEL.gguf, or {' '.join(missing)}")
    return ModelShape(**flags)


# ---- embed ----

def _embed(args) -> int:
    from .gguf import embed_head_map
    from .maps import load_head_map

    src = _gguf(args.model)
    dst = src if args.in_place else Path(args.output)
    if not args.in_place and dst.exists() and not args.force:
        raise InputError(f"{dst} exists: pass --force to overwrite it, or --in-place to rewrite {src.name}")
    head_map = load_head_map(args.head_map)
    started = time.perf_counter()
    embed_head_map(src, head_map, dst)
    print(f"wrote {dst}: {head_map.name}, {len(head_map.qr_heads)} QR heads as dysco.* metadata "
          f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


# ---- detect ----

def _detect(args) -> int:
    from ..runtime.chat import ChatTemplate
    from ..runtime.engine import Engine, EngineOptions
    from .maps import ModelShape
    from .detect import detect_heads, detection_head_map

    _check_detect_args(args)
    path = _gguf(required_model(args))
    with Engine(path, EngineOptions(n_ctx=4096, n_gpu_layers=args.n_gpu_layers, n_threads=args.n_threads)) as eng:
        shape = ModelShape.from_gguf_metadata(eng.metadata)
        if args.max_layer is not None and args.max_layer >= shape.n_layer:
            raise InputError(f"--max-layer {args.max_layer} is past the model's last layer ({shape.n_layer - 1})")
        detection = detect_heads(eng, ChatTemplate.from_engine(eng), examples=args.examples, seed=args.seed,
                                 documents=args.documents, progress=Progress("detecting QR heads", unit="example"))
        _warn_if_window_covers_prompts(eng.metadata, shape.architecture, detection)
    head_map = detection_head_map(detection, shape, name=args.name or _default_name(shape.name, path),
                                  max_layer=args.max_layer, name_patterns=args.name_pattern, model_file=str(path))
    _write_map(head_map, args.output)
    l_max = head_map.to_config().l_max
    print(f"QR heads: {' '.join(f'{layer}-{head}' for layer, head in head_map.qr_heads)}; "
          f"{probe_cost_line(l_max, shape.n_layer)}; {detection.seconds:.0f} s", file=sys.stderr)
    return 0


def _select(args) -> int:
    import dataclasses

    from .maps import load_head_map
    from .detect import reselect

    head_map = reselect(load_head_map(args.head_map), max_layer=args.max_layer)
    if args.name:
        head_map = dataclasses.replace(head_map, name=args.name,
                                       shape=dataclasses.replace(head_map.shape, name=args.name))
    if args.name_pattern is not None:
        head_map = dataclasses.replace(head_map, name_patterns=tuple(args.name_pattern))
    _write_map(head_map, args.output)
    print(f"QR heads: {' '.join(f'{layer}-{head}' for layer, head in head_map.qr_heads)}; "
          f"{probe_cost_line(head_map.to_config().l_max, head_map.shape.n_layer)}", file=sys.stderr)
    return 0


def _warn_if_window_covers_prompts(metadata, arch: str, detection) -> None:
    """Heads of sliding-window layers see only the last W tokens: prompts within ~2W cannot tell them
    from heads that see the whole context, which is what long documents need."""
    window, prompt_tokens = int(metadata.get(f"{arch}.attention.sliding_window", 0) or 0), detection.prompt_tokens
    if window and prompt_tokens < 2 * window:
        print(f"dysco-edge: note: this model has sliding-window layers (window {window}) and the calibration "
              f"prompts average {prompt_tokens} tokens, so heads that cannot see past the window score as well "
              f"as those that can; for long documents pass --documents "
              f"{max(detection.documents + 1, round(detection.documents * 2 * window / max(prompt_tokens, 1)))} "
              "or more", file=sys.stderr)


def _check_detect_args(args) -> None:
    for flag, value, low in (("--examples", args.examples, 1), ("--documents", args.documents, 2),
                             ("--max-layer", args.max_layer, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")


# ---- shared ----

def _gguf(path: str | Path) -> Path:
    from .gguf_meta import check_gguf_file
    return check_gguf_file(path)


def _default_name(gguf_name: str, path: Path) -> str:
    """The GGUF's general.name (first of its names), else the file name without extension."""
    return gguf_name.split(" | ")[0].strip() or path.stem


def _write_map(head_map, output: str | None) -> None:
    from .maps import dump_head_map

    text = dump_head_map(head_map)
    if output is None:
        sys.stdout.write(text)
        return
    Path(output).write_text(text, encoding="utf-8")
