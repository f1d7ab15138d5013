"""jaxinfra: DeepSeek's open-source infrastructure for JAX.

Importing jaxinfra registers its XLA FFI handlers (see ``jaxinfra._custom_call``).
Run ``jaxinfra doctor`` to see what this installation provides.
"""

from importlib import metadata as _metadata

from jaxinfra import _custom_call
from jaxinfra import quant
from jaxinfra import mla

try:
  __version__ = _metadata.version("jaxinfra")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
  __version__ = "0.0.0+source"

__all__ = ["quant", "mla", "__version__"]
