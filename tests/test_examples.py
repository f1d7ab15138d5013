"""The examples run and their own checks pass (each asserts against a
reference: full recompute / xla path, float64 NumPy, the one-device layer)."""

import os
import subprocess
import sys

import pytest

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("mla_decode.py", ["--steps", "4"]),
    ("fp8_dense.py", ["--steps", "30"]),
    ("ep_moe.py", []),
])
def test_example_runs(script, args):
  result = subprocess.run([sys.executable, os.path.join(_EXAMPLES, script), *args],
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.rstrip().endswith("OK"), result.stdout
