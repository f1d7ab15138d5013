"""pipelines.train: bad input before compiling, a short run, kill-and-resume equality, 2 x 4 processes.

The runs are subprocesses of ``python -m pipelines.train`` (the README's
command) on a small corpus, sharing one JAX compilation cache, so a rerun does
not compile the step again.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pipelines import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default mesh and schedule (2 x 2 x 2, DualPipeV, 4 micro-batches), shorter rows.
SMALL = ["--global-batch", "16", "--seq-len", "32", "--warmup", "2", "--no-progress"]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """``JAXINFRA_CACHE`` of the runs: a small corpus's dataset and the compilation cache."""
  root = tmp_path_factory.mktemp("train-cache")
  corpus = root / "corpus"
  corpus.mkdir()
  lib = os.path.dirname(os.__file__)
  for name in ("argparse.py", "dataclasses.py", "functools.py", "json/decoder.py", "textwrap.py"):
    with open(os.path.join(lib, name), "rb") as f:
      (corpus / os.path.basename(name)).write_bytes(f.read())
  return {"root": str(root), "corpus": str(corpus)}


def _command(cache, out, *extra):
  return [sys.executable, "-m", "pipelines.train", "--config", "tiny", "--corpus",
          cache["corpus"], "--out", str(out), *SMALL, *extra]


def _env(cache, **extra):
  env = {**os.environ, "JAXINFRA_CACHE": cache["root"], "JAX_PLATFORMS": "cpu", **extra}
  env.pop("XLA_FLAGS", None)
  return env


def _run(cache, out, *extra, timeout=900):
  result = subprocess.run(_command(cache, out, *extra), cwd=ROOT, env=_env(cache),
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _losses(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(len(records)))
  return np.array([r["loss"] for r in records])


# ----------------------------------------------------------------------------
# Bad input: an error before anything is compiled.


def _bad(argv, tmp_path, capsys):
  compiled = []
  listener = lambda event, *args, **kwargs: compiled.append(event) if event == COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    code = train.main(["--out", str(tmp_path / "out"), "--no-progress", *argv], setup=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  err = capsys.readouterr().err
  assert code == 2, err
  assert not compiled, f"compiled before failing: {compiled}"
  assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
  return err


@pytest.mark.parametrize("argv, message", [
    (["--data", "3", "--global-batch", "48"], "3 x 2 x 2 = 12 devices, but 8 are available"),
    (["--data", "1", "--pipe", "4", "--expert", "2", "--global-batch", "64",
      "--num-chunks", "8"], "do not split into 8 equal pipeline stages"),
    (["--num-chunks", "2"], "num_chunks must be at least 2 * ranks = 4"),
    (["--global-batch", "24"], "--global-batch=24 must split into"),
    (["--config", "huge"], "unknown config 'huge'"),
    (["--corpus", "/nonexistent/corpus"], "corpus path '/nonexistent/corpus' does not exist"),
    (["--warmup", "500", "--steps", "10"], "--warmup must be in [0, --steps=10]"),
    (["--seq-len", "4096"], "exceeds the model's max_position 2048"),
])
def test_bad_input_fails_before_compiling(argv, message, tmp_path, capsys):
  assert message in _bad(argv, tmp_path, capsys)


def test_experts_must_divide_the_expert_axis(tmp_path, capsys, monkeypatch):
  from models.deepseek_v3 import config as cfg_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(cfg_lib.CONFIGS, "tiny9", cfg_lib.TINY.replace(
      n_routed_experts=9, n_expert_groups=3))
  err = _bad(["--config", "tiny9"], tmp_path, capsys)
  assert "n_routed_experts=9 is not divisible by the 2 devices of mesh axis 'expert'" in err


def test_checkpoint_of_another_run_is_refused(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  identity = train.TrainSettings(lr=1e-3).run_identity()
  (ckpt / train.RUN_FILE).write_text(json.dumps(identity))
  err = _bad(["--ckpt-dir", str(ckpt)], tmp_path, capsys)
  assert "holds checkpoints of another run" in err and "'lr': (0.001, 0.003)" in err


def test_settings_identity_round_trip():
  s, _ = train.parse_args(["--config", "tiny", "--steps", "7", "--fp8", "--bias-update-rate",
                           "0.01"])
  assert s.steps == 7 and s.fp8 and train.model_config(s).linear == "fp8"
  assert train.model_config(s).bias_update_rate == 0.01
  assert train.model_config(train.parse_args([])[0]).bias_update_rate == 1e-3
  assert json.loads(json.dumps(s.run_identity())) == s.run_identity()


# ----------------------------------------------------------------------------
# Training runs (subprocesses)


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
  """12 steps with checkpoints every 4: the reference trajectory."""
  out = tmp_path_factory.mktemp("train-full")
  result = _run(cache, out, "--steps", "12", "--ckpt-every", "4")
  return {"out": out, "losses": _losses(out), "stdout": result.stdout}


@pytest.mark.slow
def test_short_run_learns_and_writes_outputs(uninterrupted):
  out, losses = uninterrupted["out"], uninterrupted["losses"]
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  # From ~ln(512) * 1.3 (CE + 0.3 MTP CE at chance) clearly down within 12 steps.
  assert losses[0] > 7.0 and losses[-3:].mean() < 0.8 * losses[0], losses
  assert os.path.getsize(out / "loss.png") > 10_000
  with open(out / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  assert {"loss", "lr", "grad_norm", "max_load_ratio", "tokens_per_s"} <= set(first)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["first_loss"] == losses[0] and summary["final_loss"] == losses[-1]
  # --keep 2: the two newest committed checkpoints remain.
  assert sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step_")) == [
      "step_00000008", "step_00000012"]
  assert "loss " in uninterrupted["stdout"]


@pytest.mark.slow
def test_kill_and_rerun_resumes_with_the_same_losses(cache, uninterrupted, tmp_path):
  out = tmp_path / "run"
  command = _command(cache, out, "--steps", "12", "--ckpt-every", "4")
  process = subprocess.Popen(command, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
  metrics = out / "metrics.jsonl"
  deadline = time.monotonic() + 900
  try:
    # Kill it (SIGKILL: no clean-up) once step 6 is logged: step 4's checkpoint
    # started two steps ago, the run is midway to the next.
    while time.monotonic() < deadline and process.poll() is None:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
        break
      time.sleep(0.2)
    assert process.poll() is None, process.stdout.read().decode()[-3000:]
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  committed = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step_"))
  assert committed and committed[-1] in ("step_00000004", "step_00000008")  # never none

  result = _run(cache, out, "--steps", "12", "--ckpt-every", "4")
  resumed = int(committed[-1][len("step_"):])
  assert f"resumed from {out / 'checkpoints' / committed[-1]} (step {resumed})" in result.stdout
  losses = _losses(out)
  np.testing.assert_allclose(losses, uninterrupted["losses"], rtol=0, atol=1e-5)


def _checkpoint_steps(directory):
  return sorted(int(n[5:]) for n in os.listdir(directory) if n.startswith("step_"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_four_devices_match_one_process(cache, uninterrupted, tmp_path):
  from jaxinfra.testing import free_port  # pylint: disable=g-import-not-at-top
  out = tmp_path / "mp"
  port = free_port()
  processes = []
  for rank in range(2):
    command = _command(cache, out, "--steps", "12", "--ckpt-every", "4", "--num-processes", "2",
                       "--process-id", str(rank), "--coordinator", f"127.0.0.1:{port}",
                       "--cpu-devices", "4")
    processes.append(subprocess.Popen(command, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True))
  try:
    outputs = [p.communicate(timeout=900)[0].decode() for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  for p, text in zip(processes, outputs):
    assert p.returncode == 0, text[-3000:]
  assert "(2 process(es))" in outputs[0]
  np.testing.assert_allclose(_losses(out), uninterrupted["losses"], rtol=0, atol=1e-5)
  assert _checkpoint_steps(out / "checkpoints") == [8, 12]


@pytest.mark.slow
def test_checkpoint_layout_round_trip(tmp_path):
  """Checkpoints hold the model's own layout (what serving restores into a
  DeepSeekV3); from_pure inverts to_pure exactly, through a save and restore."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import model as model_lib  # pylint: disable=g-import-not-at-top
  s = train.TrainSettings()
  config = train.model_config(s)
  mesh = train.make_mesh(s)
  with jax.set_mesh(mesh):
    parts = train.build_model(s, config, mesh)
    tx, _ = train.make_optimizer(s, parts.params)
    opt_state = jax.jit(tx.init)(parts.params)
    tree = train.checkpoint_tree(parts, parts.params, opt_state, 7, s, config)
    expected = nnx.to_pure_dict(nnx.state(model_lib.DeepSeekV3(config, rngs=nnx.Rngs(s.seed))))
    assert jax.tree_util.tree_structure(tree["model"]) == jax.tree_util.tree_structure(expected)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree["model"], expected)
    path = str(tmp_path / train._ckpt_name(7))  # pylint: disable=protected-access
    checkpoint.save(path, tree)
    restored = checkpoint.restore(path, train.checkpoint_tree(parts, parts.params, opt_state, 0,
                                                              s, config))
    assert (restored["step"], restored["config"]) == (7, "tiny")
    back = train.from_pure(parts, restored["model"])
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(parts.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, parts.params)


def test_latest_checkpoint_and_pruning_keep_the_last_committed(tmp_path):
  """Only committed checkpoints count; an interrupted save's leftovers never do,
  and pruning never removes the newest committed ones."""
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  assert train.latest_checkpoint(root) is None
  for step in (4, 8, 12):
    checkpoint.save(os.path.join(root, train._ckpt_name(step)), {"x": np.full(3, step), "step": step})  # pylint: disable=protected-access
  # A save killed before its commit: data written, no marker.
  os.makedirs(os.path.join(root, train._ckpt_name(16)))  # pylint: disable=protected-access
  with open(os.path.join(root, train._ckpt_name(16), "data.p0.f0"), "wb") as f:  # pylint: disable=protected-access
    f.write(b"partial")
  assert train.latest_checkpoint(root) == (12, os.path.join(root, "step_00000012"))
  train._prune(root, keep=2, protect="")  # pylint: disable=protected-access
  assert checkpoint.committed(root) == ["step_00000008", "step_00000012"]
  train._prune(root, keep=1, protect="step_00000008")  # pylint: disable=protected-access
  assert checkpoint.committed(root) == ["step_00000008", "step_00000012"]
  train._prune(root, keep=1, protect="")  # pylint: disable=protected-access
  assert checkpoint.committed(root) == ["step_00000012"]
  restored = checkpoint.restore(os.path.join(root, "step_00000012"))
  assert restored["step"] == 12 and list(np.asarray(restored["x"])) == [12, 12, 12]


def test_plot_loss(tmp_path):
  records = [{"step": i, "loss": 8.0 * 0.97 ** i, "lr": 1e-3 * min(1, i / 5)} for i in range(40)]
  path = str(tmp_path / "loss.png")
  train.plot_loss(records, path, "test")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
