"""Every error dysco-edge raises on purpose derives from `DyscoEdgeError`.

The CLI prints these (and OSError) as one line; anything else is a bug of ours and keeps its
traceback. The ValueError / LookupError / RuntimeError mixins let callers keep catching
the built-in kinds they already catch.
"""
from __future__ import annotations


class DyscoEdgeError(Exception):
    """Base of the errors a user can cause and fix; the message says what and how."""


class InputError(DyscoEdgeError, ValueError):
    """A bad argument or input (an empty prompt, a value out of range)."""


class ConfigError(InputError):
    """An invalid DySCO option; the message names the field and the offending value."""


class FlatYamlError(InputError):
    """Text that the flat-YAML reader cannot read; the message names the line or key."""


class ModelFileError(InputError):
    """A model file that is missing from GGUF's shape: not a file, wrong magic, unreadable header."""


class GGUFMetaError(ModelFileError):
    """A file that is not a readable GGUF; the message names the file and what is wrong."""


class UnknownModel(InputError, LookupError):
    """A model name that is not in the catalog (models.py); the message lists the known names."""


class ModelNotInstalled(ModelFileError):
    """A catalog model whose packages are missing; the message names them and the pip command."""


class ModelAssemblyError(ModelFileError):
    """A part-based model that could not be assembled (wrong sha256, disk full, folder not writable)."""


class HeadMapError(InputError):
    """A malformed head map (file or object); the message names the file or field."""


class HeadMapMismatch(InputError):
    """A head map that does not fit a model; the message names each mismatch."""


class ContextOverflow(InputError):
    """The input does not fit the context window; `n_prompt` and `n_ctx` say by how much."""

    def __init__(self, message: str, *, n_prompt: int = 0, n_ctx: int = 0):
        super().__init__(message)
        self.n_prompt, self.n_ctx = n_prompt, n_ctx


class DocumentError(InputError):
    """A document that cannot be read as text (encrypted PDF, binary file); the message names it."""


class ChatTemplateError(InputError):
    """A chat template that does not compile, fails on the messages given (its own
    raise_exception included) or runs past its time or output budget: a bad request (HTTP 400)."""


class TemplateBudgetError(ChatTemplateError):
    """A chat template that ran past its time or size budget (a loop without end, a value of gigabytes)."""


class NoHeadMap(DyscoEdgeError, LookupError):
    """dysco='auto' found no QR heads for this model."""


class DyscoError(DyscoEdgeError, RuntimeError):
    """A DySCO C API call failed; `code` is the dysco_status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class DyscoValueError(DyscoError, ValueError):
    """A bad argument to the C API: a head outside the model, a bias longer than the sequence."""


class EngineError(DyscoEdgeError, RuntimeError):
    """llama.cpp refused a model, a context or a batch; the message gives its answer."""
