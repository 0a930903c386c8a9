"""dysco-edge: DySCO decoding for GGUF models on llama.cpp."""

__version__ = "0.1.0"

from .config import DyscoConfig  # noqa: E402
from .api import ContextOverflow, DocumentSession, Generation, Model, NoHeadMap  # noqa: E402

__all__ = ["DyscoConfig", "Model", "DocumentSession", "Generation", "ContextOverflow", "NoHeadMap"]
