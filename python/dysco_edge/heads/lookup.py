"""Which head map a model gets, and where it came from.

Order: a map the user passes (head_map= / --head-map) always wins; otherwise
the map embedded in the GGUF (`dysco.*` keys), then the shipped `head_maps/`
(first the one the model catalog names for this file, when it is shipped and
fits; else by shape), then the user's head-map directory ($DYSCO_HEAD_MAPS,
else ~/.config/dysco-edge/head_maps/). An embedded map that does not fit the model
is an error (the file is wrong), not skipped silently.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from .gguf import read_embedded_head_map
from .maps import (
    HeadMap,
    HeadMapError,
    HeadMapMismatch,
    ModelShape,
    check_head_map_fits,
    find_head_map,
    load_head_map,
    shipped_head_map_file,
)
from ..errors import InputError
from ..models import head_map_name_for

__all__ = ["FoundHeadMap", "locate_head_map", "no_head_map_message", "user_head_map_dirs", "user_head_maps"]

USER_MAP = "user"
EMBEDDED = "embedded"
SHIPPED = "shipped"
USER_DIR = "user-dir"
_ORIGIN_WORDS = {
    USER_MAP: "head map {location}",
    EMBEDDED: "embedded in {location}",
    SHIPPED: "shipped head map",
    USER_DIR: "user head map {location}",
}


@dataclass(frozen=True)
class FoundHeadMap:
    """A head map and where it was found: origin is user, embedded, shipped or user-dir."""

    head_map: HeadMap
    origin: str
    location: str = ""  # the file it was read from (empty for shipped maps)

    def __post_init__(self) -> None:
        if self.origin not in _ORIGIN_WORDS:
            raise InputError(f"origin must be one of {', '.join(_ORIGIN_WORDS)}, got {self.origin!r}")

    @property
    def where(self) -> str:
        """E.g. "shipped head map", "embedded in model.gguf"."""
        return _ORIGIN_WORDS[self.origin].format(location=self.location).strip()

    def describe(self) -> str:
        """E.g. "SmolLM2-135M-Instruct (shipped head map)"."""
        return f"{self.head_map.name} ({self.where})"


def locate_head_map(shape: ModelShape, gguf_path: Path, *, user_map: HeadMap | None = None,
                    user_map_path: str = "", check_embedded: bool = True) -> FoundHeadMap | None:
    """The head map for this model, by the order above; None when none fits.

    check_embedded=False skips reading the GGUF (a caller that knows it has no `dysco.*` keys).
    """
    if user_map is not None:
        check_head_map_fits(user_map, shape, exact_shape=False)  # deliberately applied: heads must exist
        return FoundHeadMap(user_map, USER_MAP, user_map_path or "given")
    embedded = read_embedded_head_map(gguf_path) if check_embedded else None
    if embedded is not None:
        try:
            check_head_map_fits(embedded, shape)
        except HeadMapMismatch as err:
            raise HeadMapMismatch(f"the head map embedded in {gguf_path.name} does not fit it: {err}; "
                                  "embed a map detected for this model, or pass one with --head-map") from None
        return FoundHeadMap(embedded, EMBEDDED, gguf_path.name)
    shipped = _named_by_catalog(gguf_path, shape) or find_head_map(shape)
    if shipped is not None:
        return FoundHeadMap(shipped, SHIPPED)
    return _from_user_dirs(shape)


def _named_by_catalog(gguf_path: Path, shape: ModelShape) -> HeadMap | None:
    """The shipped map models.py names for a catalog model's file; None when the file is not a
    catalog model's, the map is not shipped yet, or it does not fit (then lookup goes by shape)."""
    stem = head_map_name_for(gguf_path)
    head_map = shipped_head_map_file(stem) if stem else None
    if head_map is None:
        return None
    try:
        check_head_map_fits(head_map, shape)
    except HeadMapMismatch:
        return None
    return head_map


def _from_user_dirs(shape: ModelShape) -> FoundHeadMap | None:
    found = user_head_maps(tuple(user_head_map_dirs()))
    by_map = {id(head_map): path for head_map, path in found}
    chosen = find_head_map(shape, head_maps=[head_map for head_map, _ in found])
    return None if chosen is None else FoundHeadMap(chosen, USER_DIR, str(by_map[id(chosen)]))


def user_head_map_dirs() -> list[Path]:
    """$DYSCO_HEAD_MAPS (one or more folders, os.pathsep-separated), else ~/.config/dysco-edge/head_maps."""
    env = os.environ.get("DYSCO_HEAD_MAPS", "").strip()
    if env:
        return [Path(part).expanduser() for part in env.split(os.pathsep) if part.strip()]
    config_home = os.environ.get("XDG_CONFIG_HOME", "").strip() or Path.home() / ".config"
    return [Path(config_home) / "dysco-edge" / "head_maps"]


@functools.lru_cache(maxsize=8)
def _user_head_maps_cached(dirs: tuple[Path, ...], stamp: tuple) -> tuple[tuple[HeadMap, Path], ...]:
    out = []
    for folder in dirs:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                out.append((load_head_map(path), path))
            except HeadMapError as err:  # one broken file must be fixed, not silently ignored
                raise HeadMapError(f"{err} (in the user head-map folder: fix or remove the file)") from None
    return tuple(out)


def user_head_maps(dirs: tuple[Path, ...]) -> tuple[tuple[HeadMap, Path], ...]:
    """Every head map (and its file) in these folders; re-read when a file changes."""
    stamp = tuple((str(p), p.stat().st_mtime_ns) for d in dirs if d.is_dir() for p in sorted(d.glob("*.json")))
    return _user_head_maps_cached(dirs, stamp)


def no_head_map_message(shape: ModelShape, gguf_path: Path) -> str:
    """What to tell a user whose model has no QR heads: how to detect them and how to pass them."""
    return (f"no QR heads are known for this model ({shape.architecture}, {shape.n_layer} layers, "
            f"{shape.n_head} heads): detect them with `dysco-edge heads detect {gguf_path} -o heads.json`, "
            f"then pass --head-map heads.json (head_map=... in Python), embed them with "
            f"`dysco-edge heads embed {gguf_path} heads.json -o model-with-heads.gguf`, or copy heads.json "
            f"into {user_head_map_dirs()[0]}; or decode without DySCO (--no-dysco / dysco=None)")
