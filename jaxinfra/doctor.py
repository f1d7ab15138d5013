"""``jaxinfra doctor``: what this installation provides, and whether it works.

Prints versions (jaxinfra, Python, jax, jaxlib, CUDA), devices, how the
extension was built, which custom calls are registered on which platform and
which of them ``impl="auto"`` selects; then runs every custom call available on
the default backend against its ``xla`` path. Exit status 0 when everything
that is present works, 1 otherwise.
"""

from __future__ import annotations

import os
import platform as platform_lib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import jaxinfra
from jaxinfra import _custom_call
from jaxinfra import gemm
from jaxinfra import mla
from jaxinfra import quant
from jaxinfra.moe import permutation as moe_permutation
from jaxinfra.testing.numerics import calc_diff

_PLATFORMS = ("cpu", "cuda")


def _quant_self_test(fn: Callable) -> Callable[[], bool]:
  def check() -> bool:
    x = jax.random.normal(jax.random.key(0), (3, 200), jnp.float32) * 10
    got = fn(x, impl="ffi")
    want = fn(x, impl="xla")
    return all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
               for a, b in zip(got, want))
  return check


def _mla_decode_self_test() -> bool:
  """Paged decode (a split request, an empty one, causal MTP rows): equal up to
  float32 accumulation order and one bfloat16 rounding."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 2, 4, 576)) / 10, jnp.bfloat16)
  kv = jnp.asarray(rng.standard_normal((4, 64, 1, 576)) / 10, jnp.bfloat16)
  args = (q, kv, jnp.array([[2, 0], [1, 3]], jnp.int32), jnp.array([100, 0], jnp.int32))
  run = lambda impl: mla.mla_decode(*args, softmax_scale=0.07, causal=True, num_sms=8, impl=impl)
  (out, lse), (want_out, want_lse) = run("ffi"), run("xla")
  return (np.allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                      rtol=2 / 128, atol=1e-3)
          and np.allclose(lse, want_lse, rtol=1e-5, atol=1e-5))


def _moe_permute_self_test() -> bool:
  x = jax.random.normal(jax.random.key(0), (6, 40), jnp.bfloat16)
  ids = jnp.array([[0, 2], [1, -1], [2, 0], [0, 1], [3, 3], [2, 1]], jnp.int32)
  got = moe_permutation.permute(x, ids, 3, capacity=2, impl="ffi")
  want = moe_permutation.permute(x, ids, 3, capacity=2, impl="xla")
  return all(np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
             for a, b in zip(got, want))


def _moe_unpermute_self_test() -> bool:
  y = jax.random.normal(jax.random.key(1), (7, 40), jnp.float32)
  row_id_map = jnp.array([[0, 6], [-1, 2], [5, 9], [3, 1]], jnp.int32)
  weights = jax.random.uniform(jax.random.key(2), (4, 2), jnp.float32)
  got = moe_permutation.unpermute(y, row_id_map, weights, impl="ffi")
  want = moe_permutation.unpermute(y, row_id_map, weights, impl="xla")
  return np.array_equal(np.asarray(got), np.asarray(want))


def _gemm_self_test(op: str) -> Callable[[], bool]:
  """FP8 GEMMs: the custom call agrees with the xla path to float32 rounding."""
  def check() -> bool:
    keys = jax.random.split(jax.random.key(0), 2)
    xq, xs = quant.quantize_per_token(jax.random.normal(keys[0], (2, 40, 256)), impl="xla")
    w = jax.random.normal(keys[1], (2, 24, 256))
    wq, ws = quant.quantize_per_block(w, impl="xla")
    tq, ts = quant.quantize_per_token(w[0], impl="xla")   # 1 x 128 scales for k-grouped
    calls = {
        "fp8_gemm": lambda impl: gemm.fp8_gemm(xq[0], xs[0], wq[0], ws[0], impl=impl),
        "grouped_fp8_gemm_masked": lambda impl: gemm.grouped_fp8_gemm_masked(
            xq, xs, wq, ws, jnp.asarray([40, 7]), impl=impl),
        "grouped_fp8_gemm_contiguous": lambda impl: gemm.grouped_fp8_gemm_contiguous(
            xq[0], xs[0], wq, ws, group_ends=jnp.asarray([5, 40]), alignment=8, impl=impl),
        "k_grouped_fp8_gemm": lambda impl: gemm.k_grouped_fp8_gemm(
            xq[0], xs[0], tq, ts, jnp.asarray([128, 128]), impl=impl),
    }
    got, want = (np.asarray(calls[op](impl), np.float32) for impl in ("ffi", "xla"))
    return bool(np.array_equal(got == 0, want == 0) and calc_diff(got, want) < 1e-6)
  return check


# op -> check() comparing impl="ffi" with impl="xla" on the default backend.
_SELF_TESTS: dict[str, Callable[[], bool]] = {
    "quantize_per_token": _quant_self_test(quant.quantize_per_token),
    "quantize_per_block": _quant_self_test(
        lambda x, impl: quant.quantize_per_block(x, (32, 128), impl=impl)),
    "mla_decode": _mla_decode_self_test,
    "moe_permute": _moe_permute_self_test,
    "moe_unpermute": _moe_unpermute_self_test,
    "fp8_gemm": _gemm_self_test("fp8_gemm"),
    "grouped_fp8_gemm_contiguous": _gemm_self_test("grouped_fp8_gemm_contiguous"),
    "grouped_fp8_gemm_masked": _gemm_self_test("grouped_fp8_gemm_masked"),
    "k_grouped_fp8_gemm": _gemm_self_test("k_grouped_fp8_gemm"),
}


def _devices() -> list[str]:
  lines = []
  for name in ("cpu", "cuda", "rocm", "tpu"):
    devices = _custom_call.devices(name)
    if devices:
      kinds = sorted({d.device_kind for d in devices})
      lines.append(f"{name}: {len(devices)} x {', '.join(kinds)}")
  return lines


def _cell(call: _custom_call.CustomCall, platform: str) -> str:
  if platform not in _custom_call.registered_platforms(call):
    return "-"
  if _custom_call.is_disabled(call):
    return "disabled (kill switch)"
  if not _custom_call.devices(platform):
    return f"built (no {platform} device)"
  if platform not in _custom_call.available_platforms(call):
    return "built, not for this GPU" if platform == "cuda" else "unavailable"
  if platform in call.verified:
    return "auto"
  return "ffi only (unverified)"


def _format_build(build: dict) -> tuple[str, str]:
  major, minor = build["xla_ffi_api_version"]
  extension = (f"built against jaxlib {build['jaxlib_headers_version']} headers "
               f"(XLA FFI API {major}.{minor}) with {build['compiler']}")
  if build["cuda"]:
    cuda = f"built: CUDA {build['cuda_version']} for {', '.join(build['cuda_architectures'])}"
  else:
    cuda = "not built"
  return extension, cuda


def run(self_test: bool = True, out=None) -> int:
  """Prints the report; returns the exit status."""
  out = out or sys.stdout
  ok = True

  def line(label: str, value: str) -> None:
    print(f"  {label:<12} {value}", file=out)

  print("jaxinfra doctor", file=out)
  line("jaxinfra", f"{jaxinfra.__version__} ({os.path.dirname(jaxinfra.__file__)})")
  line("python", f"{platform_lib.python_version()} ({sys.executable})")
  runtime_api = _custom_call.runtime_ffi_api_version()
  api = f"{runtime_api[0]}.{runtime_api[1]}" if runtime_api else "unknown"
  line("jax", jax.__version__)
  line("jaxlib", f"{jaxlib.__version__} (XLA FFI API {api})")
  line("numpy", np.__version__)

  error = _custom_call.extension_error()
  build = _custom_call.build_info()
  if build:
    extension, cuda = _format_build(build)
  else:
    extension, cuda = "not importable", "unknown"
  if error:
    extension = f"{extension}; custom calls unavailable: {error}"
    ok = False
  line("extension", extension)
  line("CUDA", cuda)
  for i, text in enumerate(_devices()):
    line("devices" if i == 0 else "", text)
  line("default", f"{jax.default_backend()} ({_custom_call.current_platform()})")
  switch = os.environ.get(_custom_call.KILL_SWITCH_ENV)
  line("kill switch", f"{_custom_call.KILL_SWITCH_ENV}={switch}" if switch else
       f"{_custom_call.KILL_SWITCH_ENV} unset")

  calls = _custom_call.custom_calls()
  width = max(len(c.target) for c in calls) + 2
  print("\ncustom calls (auto: impl='auto' uses it; ffi only: impl='ffi' runs it, auto uses "
        "xla; -: not built)", file=out)
  print(f"  {'target':<{width}}" + "".join(f"{p:<26}" for p in _PLATFORMS), file=out)
  for call in calls:
    print(f"  {call.target:<{width}}" + "".join(f"{_cell(call, p):<26}" for p in _PLATFORMS),
          file=out)

  if self_test and not error:
    current = _custom_call.current_platform()
    print(f"\nself-test on {current} (impl='ffi' against impl='xla')", file=out)
    for call in calls:
      if current not in _custom_call.available_platforms(call) or _custom_call.is_disabled(call):
        print(f"  {call.op:<{width}} skipped (no custom call here)", file=out)
        continue
      try:
        passed = _SELF_TESTS[call.op]()
        result = "ok" if passed else "MISMATCH"
      except Exception as e:  # pylint: disable=broad-except
        passed, result = False, f"ERROR {type(e).__name__}: {e}"
      ok = ok and passed
      print(f"  {call.op:<{width}} {result}", file=out)
  print("\n" + ("all good" if ok else "problems found (see above)"), file=out)
  return 0 if ok else 1
