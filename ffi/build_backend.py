"""PEP 517 build backend: scikit-build-core plus one decision, CUDA on or off.

CUDA kernels need the CUTLASS/CuTe headers from the ``nvidia-cutlass`` package,
but only when CUDA is built. This wrapper decides once, before the build
environment is made, so that the requirement and the CMake option agree:

* ``JAXINFRA_CUDA`` (environment, or ``-DJAXINFRA_CUDA=...`` in ``CMAKE_ARGS``,
  or ``-C cmake.define.JAXINFRA_CUDA=...``) is ``ON``, ``OFF`` or ``AUTO``;
* ``AUTO`` (the default) means ON when a CUDA compiler is found (``CUDACXX``,
  ``nvcc`` on ``PATH``, ``$CUDA_HOME/bin/nvcc`` or ``/usr/local/cuda/bin/nvcc``).

Everything else is scikit-build-core unchanged.
"""

from __future__ import annotations

import os
import re
import shutil

from scikit_build_core import build as _skbuild

_DEFINE = "cmake.define.JAXINFRA_CUDA"
_CUTLASS = "nvidia-cutlass>=4.2,<5"


def _requested(config_settings: dict | None) -> str:
  if config_settings and _DEFINE in config_settings:
    return str(config_settings[_DEFINE]).upper()
  match = re.search(r"-DJAXINFRA_CUDA(?::\w+)?=(\w+)", os.environ.get("CMAKE_ARGS", ""))
  if match:
    return match.group(1).upper()
  return os.environ.get("JAXINFRA_CUDA", "AUTO").upper()


def _nvcc_found() -> bool:
  candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
  for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
    if home:
      candidates.append(os.path.join(home, "bin", "nvcc"))
  return any(c and os.path.isfile(c) and os.access(c, os.X_OK) for c in candidates)


def _cuda_on(config_settings: dict | None) -> bool:
  requested = _requested(config_settings)
  if requested not in ("AUTO", "ON", "OFF"):
    raise ValueError(f"JAXINFRA_CUDA must be AUTO, ON or OFF, got {requested!r}")
  return requested == "ON" or (requested == "AUTO" and _nvcc_found())


def _with_decision(config_settings: dict | None) -> dict:
  settings = dict(config_settings or {})
  settings[_DEFINE] = "ON" if _cuda_on(config_settings) else "OFF"
  return settings


def _requires(base: list[str], config_settings: dict | None) -> list[str]:
  return [*base, _CUTLASS] if _cuda_on(config_settings) else list(base)


def get_requires_for_build_wheel(config_settings=None):
  return _requires(_skbuild.get_requires_for_build_wheel(config_settings), config_settings)


def get_requires_for_build_editable(config_settings=None):
  return _requires(_skbuild.get_requires_for_build_editable(config_settings), config_settings)


def get_requires_for_build_sdist(config_settings=None):
  return _skbuild.get_requires_for_build_sdist(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
  return _skbuild.build_wheel(wheel_directory, _with_decision(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
  return _skbuild.build_editable(
      wheel_directory, _with_decision(config_settings), metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
  return _skbuild.build_sdist(sdist_directory, config_settings)


prepare_metadata_for_build_wheel = _skbuild.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _skbuild.prepare_metadata_for_build_editable
