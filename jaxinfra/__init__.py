"""jaxinfra: DeepSeek's open-source infrastructure for JAX.

Importing jaxinfra registers its XLA FFI handlers (see ``jaxinfra._custom_call``)
and imports the modules whose ops are custom calls (``quant``, ``mla``, ``gemm``,
``moe``), so every custom call is known to ``impl`` selection and the kill
switch. ``eplb``, ``pipeline`` and ``checkpoint`` are imported on use.
Run ``jaxinfra doctor`` to see what this installation provides.
"""

from importlib import metadata as _metadata

from jaxinfra import _custom_call
from jaxinfra import gemm
from jaxinfra import mla
from jaxinfra import moe
from jaxinfra import quant

try:
  __version__ = _metadata.version("jaxinfra")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
  __version__ = "0.0.0+source"

__all__ = ["gemm", "mla", "moe", "quant", "__version__"]
