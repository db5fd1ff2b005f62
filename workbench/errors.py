"""The project's own exception types: every bad input ends in one of these, with a sentence a user can act on."""


class WorkbenchError(Exception):
    """Base of every error the workbench raises on purpose (the CLI prints it as one line, exit 1)."""


class GGUFError(WorkbenchError):
    """The file is not a readable, complete GGUF (missing, truncated, bad magic, absurd header)."""


class UnsupportedError(WorkbenchError):
    """The file is valid but uses something the engine does not implement (architecture, quant type)."""


class ModelError(WorkbenchError):
    """Metadata or tensors disagree with each other (wrong type, missing tensor, shape mismatch)."""


class InputError(WorkbenchError):
    """A request is invalid: bad token id, empty or too-long prompt, bad device/dtype/sampling values."""


class NumericError(WorkbenchError):
    """The forward pass produced NaN or Inf: the message names the first capture point where they appeared."""


class ResourceError(WorkbenchError):
    """The machine cannot hold what was asked for (memory for the weights, the KV cache or a step)."""


class ReferenceFailed(WorkbenchError):
    """The reference engine could not run: it refused the file, crashed, or is not installed."""
