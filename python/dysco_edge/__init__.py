"""dysco-edge: DySCO decoding for GGUF models on llama.cpp."""

from ._version import __version__  # noqa: F401

from .config import DyscoConfig  # noqa: E402
from .errors import ContextOverflow, DyscoEdgeError, NoHeadMap  # noqa: E402
from .api import DocumentSession, Generation, Model  # noqa: E402

__all__ = ["DyscoConfig", "Model", "DocumentSession", "Generation", "ContextOverflow", "NoHeadMap", "DyscoEdgeError"]
