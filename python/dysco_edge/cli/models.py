"""`dysco-edge models` (the catalog, and what of it is installed here) and the model arguments
that run, serve, eval and heads share: a GGUF path, or `--model NAME` from the catalog."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .. import models
from ..errors import InputError

DEFAULT_HELP = f"GGUF file (default: --model {models.DEFAULT_MODEL})"


def add_parser(subparsers) -> None:
    listing = subparsers.add_parser("models", help="the models you can ask for by name (--model NAME)",
                                    description="Lists the catalog: each model's name, size, licence, "
                                                "whether it is installed here and how to install it.")
    listing.set_defaults(handler=list_command)


def add_model_arguments(parser: argparse.ArgumentParser, *, positional_help: str = DEFAULT_HELP) -> None:
    """The positional GGUF path and --model NAME; `chosen_model` reads them."""
    parser.add_argument("model", nargs="?", help=positional_help)
    parser.add_argument("--model", dest="model_name", metavar="NAME",
                        help=f"a model by name instead of a file ({', '.join(models.names())}; "
                             "`dysco-edge models` lists them); a part-based one is assembled on first use")


def chosen_model(args: argparse.Namespace) -> Optional[Path]:
    """The GGUF the arguments name (a catalog model located, or assembled once); None when neither is given."""
    if args.model and args.model_name:
        raise InputError(f"give a GGUF file ({args.model}) or --model {args.model_name}, not both")
    if args.model_name:
        return models.locate(models.get(args.model_name))
    if args.model and args.model.lower() in models.names() and not Path(args.model).exists():
        raise InputError(f"no file {args.model!r}; for the catalog model of that name, use --model {args.model}")
    return Path(args.model) if args.model else None


def required_model(args: argparse.Namespace) -> Path:
    """chosen_model, for verbs with no default model."""
    path = chosen_model(args)
    if path is None:
        raise InputError("give a GGUF file, or --model NAME (`dysco-edge models` lists the names)")
    return path


def list_command(args: argparse.Namespace) -> int:
    width = max(len(name) for name in models.names())
    for entry in models.CATALOG:
        default = " (the default)" if entry.name == models.DEFAULT_MODEL else ""
        print(f"{entry.name:<{width}}  {_size(entry.size):>8}  {entry.licence:<18}  {_state(entry)}{default}")
        print(f"{'':<{width}}  {entry.description}")
        where = models.model_file(entry)
        if where is not None and where.is_file():
            print(f"{'':<{width}}  file: {where}")
    print(f"\npart-based models are assembled into {models.model_cache_dir()} "
          f"(${models.MODEL_CACHE_ENV} moves it); use one with: dysco-edge run --model NAME ...")
    return 0


def _state(entry: models.CatalogModel) -> str:
    from ..assembly import is_assembled
    missing = models.missing_packages(entry)
    if missing:
        partial = f" ({len(missing)} of {len(entry.files)} parts missing)" if len(missing) < len(entry.files) else ""
        return f"not installed{partial}: {entry.install_command}"
    if not entry.assembled:
        return "installed"
    return "assembled" if is_assembled(entry, models.model_file(entry)) else "installed, assembled on first use"


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"
