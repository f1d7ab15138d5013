"""Test setup: 8 CPU devices for mesh code, the gpu marker's skip, and the
checkout's ``pipelines``/``models`` packages on sys.path."""

import os
import sys

import jax
import pytest

# Before any backend starts: every test sees 8 CPU devices, so shard_map and
# mesh code run without GPUs.
jax.config.update("jax_num_cpu_devices", 8)

import jaxinfra  # pylint: disable=g-import-not-at-top,wrong-import-position

if jaxinfra._custom_call.extension_error():  # pylint: disable=protected-access
  pytest.exit(f"jaxinfra at {jaxinfra.__file__} has no usable extension: "
              f"{jaxinfra._custom_call.extension_error()}. Install the package "  # pylint: disable=protected-access
              "(pip install .) and run `pytest` rather than `python -m pytest`, which puts "
              "the source tree first on sys.path.", returncode=2)

# pipelines/ and models/ are run from a checkout, not installed. Appended, so the
# installed jaxinfra (imported above) keeps precedence over the source tree.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.append(_ROOT)


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  del config
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
