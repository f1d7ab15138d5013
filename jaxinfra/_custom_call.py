"""jaxinfra's custom calls: loading ``jaxinfra._ffi``, registering its handlers
with XLA, and choosing an implementation for each call of an op.

Every op takes ``impl``:

* ``"xla"``: the pure-JAX implementation; runs on any backend.
* ``"ffi"``: the custom call on the current platform; a ``ValueError`` if the
  extension has no handler for it.
* ``"auto"``: the custom call on each platform where it is compiled *and*
  verified (its tests passed there), else ``"xla"``. The choice is made per
  lowering platform with ``jax.lax.platform_dependent``.

Kill switch: ``JAXINFRA_DISABLE_CUSTOM_CALLS=quantize_per_token,...`` (op names,
or ``all``) makes the named ops use their ``"xla"`` path, whatever ``impl``
says; it is read when a function is traced, so it is meant for A/B runs in
fresh processes (already-jitted functions keep their compiled choice).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax

IMPLS = ("auto", "ffi", "xla")
KILL_SWITCH_ENV = "JAXINFRA_DISABLE_CUSTOM_CALLS"

# XLA's platform names in registrations -> JAX's lowering platform names.
_JAX_PLATFORM = {"cpu": "cpu", "CUDA": "cuda"}


@dataclasses.dataclass(frozen=True)
class CustomCall:
  """One op backed by an FFI target.

  Attributes:
    op: the op's name, e.g. ``"quantize_per_token"``; the FFI target is
      ``"jaxinfra_" + op`` and its handlers ``"jaxinfra_<op>_<platform>"``.
    verified: JAX platform names (``"cpu"``, ``"cuda"``) where the custom
      call's tests passed, so ``impl="auto"`` may select it there.
  """

  op: str
  verified: tuple[str, ...]

  @property
  def target(self) -> str:
    return f"jaxinfra_{self.op}"


@dataclasses.dataclass
class _Extension:
  module: Any = None
  load_error: str | None = None
  registration_error: str | None = None
  build: dict = dataclasses.field(default_factory=dict)
  registered: dict[str, set[str]] = dataclasses.field(default_factory=dict)


_CALLS: dict[str, CustomCall] = {}
_EXT = _Extension()


def define(op: str, *, verified: tuple[str, ...]) -> CustomCall:
  """Declares an op's custom call (once, at import of the op's module)."""
  call = CustomCall(op, tuple(verified))
  if _CALLS.get(op, call) != call:
    raise ValueError(f"custom call {op!r} defined twice with different settings")
  _CALLS[op] = call
  return call


def custom_calls() -> tuple[CustomCall, ...]:
  return tuple(_CALLS.values())


def _api_version_of(header: str) -> tuple[int, int] | None:
  try:
    with open(header) as f:
      text = f.read()
  except OSError:
    return None
  major = re.search(r"#define\s+XLA_FFI_API_MAJOR\s+(\d+)", text)
  minor = re.search(r"#define\s+XLA_FFI_API_MINOR\s+(\d+)", text)
  if not (major and minor):
    return None
  return int(major.group(1)), int(minor.group(1))


def runtime_ffi_api_version() -> tuple[int, int] | None:
  """The XLA FFI API version of the running jaxlib (from its shipped headers)."""
  return _api_version_of(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h"))


def abi_error(build: dict, runtime: tuple[int, int] | None) -> str | None:
  """Why handlers from ``build`` must not be registered with a jaxlib speaking
  FFI API ``runtime`` (None when they may). XLA rejects handlers built against
  newer FFI headers than its own, and the rejection takes the backend down."""
  built = tuple(build["xla_ffi_api_version"])
  if runtime is None or built <= tuple(runtime):
    return None
  return (f"jaxinfra._ffi was built against XLA FFI API {built[0]}.{built[1]} (jaxlib "
          f"{build['jaxlib_headers_version']}), newer than this jaxlib's "
          f"{runtime[0]}.{runtime[1]}; rebuild jaxinfra against a jaxlib no newer than the "
          f"one installed")


def _installed_extension_dir() -> str | None:
  """The ``jaxinfra`` directory of another ``sys.path`` entry holding a built
  ``_ffi`` extension, or None.

  Running ``python -m pipelines.train`` (or ``python -m pytest``) from a
  checkout imports the checkout's ``jaxinfra``, which has no compiled
  extension when the package was installed with ``pip install .``; the
  installed extension is then used with the checkout's Python code.
  """
  jaxinfra_dir = os.path.dirname(os.path.abspath(__file__))
  for entry in sys.path:
    candidate = os.path.join(os.path.abspath(entry or os.curdir), "jaxinfra")
    if candidate == jaxinfra_dir or not os.path.isdir(candidate):
      continue
    if any(os.path.isfile(os.path.join(candidate, "_ffi" + suffix))
           for suffix in importlib.machinery.EXTENSION_SUFFIXES):
      return candidate
  return None


def _import_extension():
  try:
    from jaxinfra import _ffi  # pylint: disable=g-import-not-at-top
    return _ffi
  except ImportError:
    installed = _installed_extension_dir()
    if installed is None:
      raise
  package = sys.modules["jaxinfra"]
  package.__path__.append(installed)
  from jaxinfra import _ffi  # pylint: disable=g-import-not-at-top,reimported
  return _ffi


def _load_and_register() -> None:
  try:
    _ffi = _import_extension()
  except ImportError as e:
    _EXT.load_error = f"{type(e).__name__}: {e}"
    return
  _EXT.module = _ffi
  _EXT.build = dict(_ffi.build_info())
  _EXT.registration_error = abi_error(_EXT.build, runtime_ffi_api_version())
  if _EXT.registration_error:
    warnings.warn(_EXT.registration_error + "; custom calls are disabled", RuntimeWarning)
    return
  for target, platforms in _ffi.registrations().items():
    for xla_platform, capsule in platforms.items():
      jax.ffi.register_ffi_target(target, capsule, platform=xla_platform, api_version=1)
      _EXT.registered.setdefault(target, set()).add(_JAX_PLATFORM[xla_platform])


def build_info() -> dict:
  """What the extension was built with ({} when it is not importable)."""
  return dict(_EXT.build)


def extension_error() -> str | None:
  """Why the custom calls are unavailable, or None when they are registered."""
  return _EXT.load_error or _EXT.registration_error


def registered_platforms(call: CustomCall) -> frozenset[str]:
  """JAX platform names with a handler registered for ``call``."""
  return frozenset(_EXT.registered.get(call.target, ()))


def current_platform() -> str:
  """The default backend as a lowering platform name: cpu, cuda, rocm or tpu."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def _arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
  """Whether code built for a CMake CUDA architecture runs on a device."""
  match = re.fullmatch(r"(\d+)(\d)([af]?)(-real|-virtual)?", arch)
  if not match:
    return False
  built = (int(match.group(1)), int(match.group(2)))
  if match.group(3) or match.group(4) == "-real":
    # Arch-specific (90a) code and plain cubins run on exactly that major.minor
    # (plain cubins also on later minors of the same major).
    return built == capability or (not match.group(3) and built[0] == capability[0]
                                   and built[1] <= capability[1])
  return built <= capability  # PTX is JIT-compiled for newer devices


def devices(platform: str) -> list:
  """The devices of a lowering platform ([] when its backend is absent)."""
  try:
    return jax.devices(platform)
  except RuntimeError:
    return []


@functools.cache
def _cuda_devices_supported() -> bool:
  cuda_devices = devices("cuda")
  archs = _EXT.build.get("cuda_architectures", [])
  return bool(cuda_devices) and all(
      any(_arch_runs_on(a, tuple(int(p) for p in str(d.compute_capability).split(".")))
          for a in archs)
      for d in cuda_devices)


def available_platforms(call: CustomCall) -> frozenset[str]:
  """Platforms where ``impl="ffi"`` can run ``call`` on this machine."""
  platforms = set(registered_platforms(call))
  if "cuda" in platforms and not _cuda_devices_supported():
    platforms.discard("cuda")
  return frozenset(platforms)


def auto_platforms(call: CustomCall) -> frozenset[str]:
  """Platforms where ``impl="auto"`` selects the custom call."""
  if is_disabled(call):
    return frozenset()
  return available_platforms(call) & frozenset(call.verified)


def disabled_ops() -> frozenset[str]:
  """Op names switched off by ``JAXINFRA_DISABLE_CUSTOM_CALLS``."""
  names = set()
  for raw in os.environ.get(KILL_SWITCH_ENV, "").split(","):
    name = raw.strip().removeprefix("jaxinfra_")
    if not name:
      continue
    if name == "all":
      names.update(_CALLS)
    elif name in _CALLS:
      names.add(name)
    else:
      _warn_once(f"{KILL_SWITCH_ENV} names unknown op {name!r}; known ops: "
                 f"{', '.join(sorted(_CALLS))}")
  return frozenset(names)


def is_disabled(call: CustomCall) -> bool:
  return call.op in disabled_ops()


@functools.cache
def _warn_once(message: str) -> None:
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  axes = getattr(aval, "vma", None)  # jax <= 0.9
  if axes is None:  # jax 0.10+: aval.manual_axis_type.varying
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(axes or ())


def vary_like(value: Any, *inputs: Any) -> Any:
  """``value`` (a pytree) marked varying over every manual mesh axis ``inputs`` vary over.

  Inside ``shard_map``, values computed only from constants are "invariant";
  scan carries, ``platform_dependent`` branches and custom calls whose
  results depend on varying inputs need the same type as those inputs. A
  no-op outside ``shard_map``.
  """
  axes = frozenset().union(*(_varying_axes(a) for a in jax.tree_util.tree_leaves(inputs)))
  if not axes:
    return value

  def cast(o):
    missing = tuple(sorted(axes - _varying_axes(o)))
    return jax.lax.pcast(o, missing, to="varying") if missing else o

  return jax.tree_util.tree_map(cast, value)


def ffi_call(target: str, result_shape_dtypes: Any, *operands: jax.Array, vmap_method: str,
             input_output_aliases: dict[int, int] | None = None, **attrs: Any) -> Any:
  """``jax.ffi.ffi_call(target, ...)(*operands, **attrs)`` that also works inside
  ``shard_map`` when operands vary over different mesh axes (sharded tokens with
  replicated weights, say): the operands are cast to the union of their varying
  axes, which the results then vary over too."""
  operands = tuple(vary_like(x, *operands) for x in operands)
  call = jax.ffi.ffi_call(target, result_shape_dtypes, vmap_method=vmap_method,
                          input_output_aliases=input_output_aliases)
  return vary_like(call(*operands, **attrs), *operands)


def _varying_like_inputs(fn: Callable) -> Callable:
  """``fn`` with its outputs typed as varying like its inputs: inside
  ``shard_map`` an ``ffi_call``'s results carry no varying axes, unlike the
  ``xla`` path's (and ``platform_dependent`` rejects branches whose types differ)."""

  def wrapped(*args):
    return vary_like(fn(*args), *args)

  return wrapped


def select(call: CustomCall, impl: str, *, ffi: Callable, xla: Callable) -> Callable:
  """Returns the function that implements ``call`` under ``impl``.

  ``ffi`` and ``xla`` take the same positional array arguments and return the
  same pytree of arrays.
  """
  if impl not in IMPLS:
    raise ValueError(f"{call.op}: impl must be one of {IMPLS}, got {impl!r}")
  if impl == "xla":
    return xla
  if is_disabled(call):
    if impl == "ffi":
      _warn_once(f"{call.op}: impl='ffi' overridden by {KILL_SWITCH_ENV}; using impl='xla'")
    return xla
  if impl == "ffi":
    platform = current_platform()
    if platform not in available_platforms(call):
      reason = extension_error() or (
          f"handlers are registered for {sorted(registered_platforms(call)) or 'no platform'}")
      if platform == "cuda" and "cuda" in registered_platforms(call):
        reason = (f"its CUDA kernels were built for {_EXT.build.get('cuda_architectures')}, "
                  f"which do not run on {jax.devices('cuda')[0].device_kind}")
      raise ValueError(f"{call.op}: impl='ffi' has no custom call for platform "
                       f"{platform!r}: {reason}. Use impl='auto' or impl='xla'.")
    return _varying_like_inputs(ffi)
  branches = {platform: _varying_like_inputs(ffi) for platform in auto_platforms(call)}
  if not branches:
    return xla

  def auto(*args):
    return jax.lax.platform_dependent(*args, default=xla, **branches)

  return auto


def non_differentiable(fn: Callable, op: str, hint: str) -> Callable:
  """Wraps ``fn`` so that differentiating through it raises a clear error.

  Both implementations of an op then behave the same under ``jax.grad``
  (an ``ffi_call`` has no derivative; the ``xla`` path would otherwise give a
  meaningless one). Inputs under ``stop_gradient`` are fine.
  """

  @jax.custom_jvp
  def wrapped(*args):
    return fn(*args)

  def jvp(primals, tangents):
    del primals, tangents
    raise TypeError(f"{op} is not differentiable. {hint}")

  wrapped.defjvp(jvp)
  return wrapped


_load_and_register()
