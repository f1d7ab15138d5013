"""The extension, registration, impl selection and `jaxinfra doctor`."""

import io
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxinfra
from jaxinfra import _custom_call
from jaxinfra import _ffi
from jaxinfra import cli
from jaxinfra import doctor
from jaxinfra import quant

TARGETS = {"jaxinfra_quantize_per_token", "jaxinfra_quantize_per_block"}


def test_registrations_and_build_info():
  info = _ffi.build_info()
  registrations = _ffi.registrations()
  assert TARGETS <= set(registrations)
  for target in TARGETS:
    platforms = set(registrations[target])
    assert platforms == ({"cpu", "CUDA"} if info["cuda"] else {"cpu"})
    assert all(type(c).__name__ == "PyCapsule" for c in registrations[target].values())
  assert isinstance(info["cuda"], bool)
  if info["cuda"]:
    assert info["cuda_version"].split(".")[0].isdigit()
    assert info["cuda_architectures"] and all(isinstance(a, str) for a in info["cuda_architectures"])
  else:
    assert info["cuda_version"] is None and info["cuda_architectures"] == []
  # Built against the oldest supported jaxlib, never newer than the running one.
  assert tuple(info["xla_ffi_api_version"]) <= _custom_call.runtime_ffi_api_version()
  assert info["jaxlib_headers_version"].startswith("0.10.")


def test_every_target_is_registered_on_cpu():
  assert _custom_call.extension_error() is None
  for call in _custom_call.custom_calls():
    assert "cpu" in _custom_call.registered_platforms(call)
    assert "cpu" in _custom_call.auto_platforms(call)


def test_abi_guard_refuses_handlers_built_against_newer_headers():
  build = {"xla_ffi_api_version": (0, 4), "jaxlib_headers_version": "0.11.2"}
  assert "newer than this jaxlib's 0.3" in _custom_call.abi_error(build, (0, 3))
  assert _custom_call.abi_error(build, (0, 4)) is None
  assert _custom_call.abi_error({**build, "xla_ffi_api_version": (0, 1)}, (0, 3)) is None


@pytest.mark.parametrize("arch, capability, runs", [
    ("90a-real", (9, 0), True), ("90a", (9, 0), True), ("90a-real", (10, 0), False),
    ("90a-real", (8, 0), False), ("80-real", (8, 6), True), ("80-real", (9, 0), False),
    ("80", (9, 0), True), ("100a", (9, 0), False),
])
def test_cuda_architecture_matching(arch, capability, runs):
  assert _custom_call._arch_runs_on(arch, capability) is runs


def test_ffi_on_a_platform_without_handlers_raises(monkeypatch):
  monkeypatch.setattr(_custom_call, "current_platform", lambda: "tpu")
  with pytest.raises(ValueError, match=r"quantize_per_token: impl='ffi' has no custom call for "
                                       r"platform 'tpu'.*\['cpu'"):
    quant.quantize_per_token(np.ones((2, 128), np.float32), impl="ffi")


def test_unknown_kill_switch_name_warns(monkeypatch):
  monkeypatch.setenv(_custom_call.KILL_SWITCH_ENV, "quantize_per_tokens")
  with pytest.warns(RuntimeWarning, match="unknown op 'quantize_per_tokens'"):
    assert _custom_call.disabled_ops() == frozenset()


def test_define_rejects_conflicting_settings():
  with pytest.raises(ValueError, match="defined twice"):
    _custom_call.define("quantize_per_token", verified=("cpu", "cuda"))


def test_doctor_reports_targets_and_passes_its_self_test():
  out = io.StringIO()
  assert doctor.run(out=out) == 0
  text = out.getvalue()
  assert f"jax          {jax.__version__}" in text
  for target in TARGETS:
    assert target in text
  assert text.count(" ok\n") == len(_custom_call.custom_calls())
  assert jaxinfra.__version__ in text


def test_doctor_command_line(tmp_path):
  assert cli.main(["doctor", "--no-self-test"]) == 0
  # Outside the checkout, so that the installed package is the one imported.
  done = subprocess.run([sys.executable, "-m", "jaxinfra", "doctor"], capture_output=True,
                        text=True, timeout=120, check=False, cwd=tmp_path)
  assert done.returncode == 0, done.stdout + done.stderr
  assert re.search(r"jaxinfra_quantize_per_token +auto", done.stdout)


# Hopper kernels written without a GPU: registered in CUDA builds, never
# verified, so impl="auto" must not select them (docs/gpu-kernels.md).
UNVERIFIED_CUDA_TARGETS = {"jaxinfra_fp8_gemm", "jaxinfra_grouped_fp8_gemm_contiguous",
                           "jaxinfra_grouped_fp8_gemm_masked", "jaxinfra_k_grouped_fp8_gemm",
                           "jaxinfra_mla_decode"}


def test_unrun_cuda_kernels_are_registered_but_not_verified():
  from jaxinfra import gemm, mla  # pylint: disable=g-import-not-at-top
  info = _ffi.build_info()
  registrations = _ffi.registrations()
  for target in UNVERIFIED_CUDA_TARGETS:
    assert set(registrations[target]) == ({"cpu", "CUDA"} if info["cuda"] else {"cpu"})
  for call in (gemm.FP8_GEMM, gemm.GROUPED_FP8_GEMM_CONTIGUOUS, gemm.GROUPED_FP8_GEMM_MASKED,
               gemm.K_GROUPED_FP8_GEMM, mla.MLA_DECODE):
    assert call.target in UNVERIFIED_CUDA_TARGETS
    assert "cuda" not in call.verified
    assert "cuda" not in _custom_call.auto_platforms(call)


def test_checkout_without_extension_uses_the_installed_one():
  # `python -m pipelines.train` from a checkout imports the checkout's jaxinfra;
  # after a plain `pip install .` it has no _ffi, and the installed one is used.
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import jaxinfra; from jaxinfra import _custom_call as c; "
          "print(c.extension_error()); print(sorted(c._EXT.registered))")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       check=True, timeout=300).stdout.splitlines()
  assert out[0] == "None"
  assert "jaxinfra_quantize_per_token" in out[1]
