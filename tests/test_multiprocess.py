"""The multiprocess helper: 2 processes x 4 CPU devices, collectives across them."""

import numpy as np
import pytest

from jaxinfra.testing import MultiprocessError, run_multiprocess


def all_to_all_across_processes():
  """Runs in each worker: an all_to_all over 8 devices in 2 processes, and the
  quantization custom call inside shard_map on the same mesh."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from jaxinfra import quant  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == 2 and jax.local_device_count() == 4
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.NamedSharding(mesh, P("x"))
  full = np.arange(64 * 3, dtype=np.float32).reshape(8, 8, 3)
  x = jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])

  # Device i holds row i; afterwards device j holds x[:, j], from every device.
  exchange = jax.jit(jax.shard_map(
      lambda v: jax.lax.all_to_all(v, "x", split_axis=1, concat_axis=0, tiled=True),
      mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  moved = multihost_utils.process_allgather(exchange(x), tiled=True)
  np.testing.assert_array_equal(moved, full.transpose(1, 0, 2).reshape(64, 1, 3))

  quantize = jax.jit(jax.shard_map(functools.partial(quant.quantize_per_token, impl="ffi"),
                                   mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P("x"))))
  tokens = np.linspace(-3, 3, 8 * 4 * 200, dtype=np.float32).reshape(32, 200)
  q, s = quantize(jax.make_array_from_callback(tokens.shape, sharding, lambda i: tokens[i]))
  q_ref, s_ref = quant.quantize_per_token(tokens, impl="xla")
  np.testing.assert_array_equal(multihost_utils.process_allgather(s, tiled=True), s_ref)
  np.testing.assert_array_equal(
      multihost_utils.process_allgather(q, tiled=True).view(np.uint8), np.asarray(q_ref).view(np.uint8))
  return {"process": jax.process_index(), "checksum": float(moved.sum())}


def fails_in_process_one():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 1:
    raise RuntimeError("deliberate failure in process 1")
  return 0


def allowed_cores():
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return {"process": jax.process_index(), "cores": sorted(os.sched_getaffinity(0))}


@pytest.mark.multiprocess
def test_pinned_processes_each_run_on_one_core_of_their_own():
  import os  # pylint: disable=g-import-not-at-top
  cores = sorted(os.sched_getaffinity(0))
  results = run_multiprocess(allowed_cores, num_processes=2, devices_per_process=1,
                             pin_cores=True)
  assert [r["process"] for r in results] == [0, 1]
  assert [r["cores"] for r in results] == [[cores[0]], [cores[1 % len(cores)]]]
  # Without pinning a worker may use every core this process may.
  assert run_multiprocess(allowed_cores, num_processes=1, devices_per_process=1)[0]["cores"] == cores


@pytest.mark.multiprocess
def test_all_to_all_two_processes_four_devices_each():
  results = run_multiprocess(all_to_all_across_processes, num_processes=2, devices_per_process=4)
  checksum = float(np.arange(64 * 3).sum())
  assert results == [{"process": 0, "checksum": checksum}, {"process": 1, "checksum": checksum}]


@pytest.mark.multiprocess
def test_a_failing_process_is_reported_with_its_output():
  with pytest.raises(MultiprocessError, match=r"(?s)process 1 exited.*deliberate failure"):
    run_multiprocess(fails_in_process_one, num_processes=2, devices_per_process=1, timeout=120)


def hangs_in_process_zero():
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    time.sleep(3600)
  return 0


@pytest.mark.multiprocess
def test_a_hanging_process_times_out_and_is_killed():
  with pytest.raises(MultiprocessError, match=r"timed out after 15 s"):
    run_multiprocess(hangs_in_process_zero, num_processes=2, devices_per_process=1, timeout=15)
