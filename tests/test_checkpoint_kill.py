"""A writer killed with SIGKILL at seeded points during 20 saves never damages the
last committed checkpoint and never leaves an uncommitted one that restores."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinfra import checkpoint as ck
from jaxinfra.testing import usrbio_double as ud

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_kill_writer.py")


def _writer_module():
  spec = importlib.util.spec_from_file_location("checkpoint_kill_writer", WRITER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assert_restores_exactly(writer, root, name):
  step = int(name.split("_")[1])
  want = writer.state_for(step)
  got = ck.restore(os.path.join(root, name), want)
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
  np.testing.assert_array_equal(np.asarray(got["e"]).view(np.uint16),
                                np.asarray(want["e"]).view(np.uint16))
  assert got["step"] == step


def test_sigkill_during_20_saves(tmp_path):
  writer = _writer_module()
  library = ud.load().path
  root = ud.make_mount(tmp_path / "3fs")  # odd steps go through USRBIO (the double)
  # Events (writes, fsyncs, renames, USRBIO preps) in one complete save of each kind.
  counts = []
  probe = ud.make_mount(tmp_path / "probe")
  for step in (0, 1):
    out = subprocess.run([sys.executable, WRITER, probe, str(step), "0",
                          library], capture_output=True, text=True, timeout=120, check=True)
    counts.append(int(out.stdout.split("events")[-1]))
  rng = np.random.default_rng(20260801)
  outcomes = {"killed": 0, "committed": 0}
  for step in range(20):
    events = counts[step % 2]
    kill_at = int(rng.integers(1, events + events // 4 + 2))  # some saves finish
    result = subprocess.run([sys.executable, WRITER, root, str(step), str(kill_at), library],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, -9), result.stderr[-3000:]
    assert (result.returncode == -9) == (kill_at <= events), (step, kill_at, events)
    outcomes["killed" if result.returncode == -9 else "committed"] += 1
    committed = ck.committed(root)
    path = os.path.join(root, f"step_{step:02d}")
    if f"step_{step:02d}" in committed:
      _assert_restores_exactly(writer, root, f"step_{step:02d}")
    else:
      with pytest.raises(ck.CheckpointError):
        ck.restore(path)
    for leftover in os.listdir(root):  # temporaries never restore either
      if ck.checkpointer.TMP_TAG in leftover:
        with pytest.raises(ck.CheckpointError):
          ck.restore(os.path.join(root, leftover))
    if committed:  # the last committed checkpoint is intact
      _assert_restores_exactly(writer, root, committed[-1])
  assert outcomes["killed"] >= 10 and outcomes["committed"] >= 2, outcomes
  for name in ck.committed(root):
    _assert_restores_exactly(writer, root, name)
