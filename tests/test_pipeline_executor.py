"""The pipeline executor against an unpartitioned float64 reference on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxinfra import pipeline as pl
from jaxinfra.testing.numerics import calc_diff

VOCAB, HIDDEN, MICRO, SEQ = 11, 8, 2, 3


@pytest.fixture
def x64():
  """float64 inside the test only."""
  with jax.enable_x64(True):
    yield


def _mesh(shape, names, axis_type=jax.sharding.AxisType.Explicit):
  devices = jax.devices()[:int(np.prod(shape))]
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape), devices=devices)


# An MLP stage like DualPipe's example (Linear h->2h, GELU, Linear 2h->h, no bias) with a
# residual connection, a token embedding before stage 0 and a softmax cross-entropy head.


def stage_fn(p, x):
  return x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]


def embed_fn(table, tokens):
  return table[tokens]


def loss_fn(head, y, labels):
  logp = jax.nn.log_softmax(y @ head)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _model(num_stages, chunks, seed=0, dtype=jnp.float64):
  k = jax.random.split(jax.random.key(seed), 5)
  params = pl.PipelineParams(
      {"w1": jax.random.normal(k[0], (num_stages, HIDDEN, 2 * HIDDEN), dtype) * 0.3,
       "w2": jax.random.normal(k[1], (num_stages, 2 * HIDDEN, HIDDEN), dtype) * 0.3},
      jax.random.normal(k[2], (VOCAB, HIDDEN), dtype),
      jax.random.normal(k[3], (HIDDEN, VOCAB), dtype) * 0.5)
  tokens = jax.random.randint(k[4], (chunks * MICRO, SEQ), 0, VOCAB)
  labels = (tokens * 3 + 1) % VOCAB
  return params, tokens, labels


@functools.partial(jax.jit, static_argnums=2)
def _reference_outputs(params, tokens, chunks):
  """The unpartitioned model, micro-batch by micro-batch: last-stage outputs."""
  num_stages = params.stages["w1"].shape[0]
  outs = []
  for c in range(chunks):
    x = embed_fn(params.embed, tokens[c * MICRO:(c + 1) * MICRO])
    for s in range(num_stages):
      x = stage_fn(jax.tree_util.tree_map(lambda a, s=s: a[s], params.stages), x)
    outs.append(x)
  return jnp.concatenate(outs)


@functools.partial(jax.jit, static_argnums=3)
def _reference_loss(params, tokens, labels, chunks):
  y = _reference_outputs(params, tokens, chunks)
  return sum(loss_fn(params.head, y[c * MICRO:(c + 1) * MICRO], labels[c * MICRO:(c + 1) * MICRO])
             for c in range(chunks)) / chunks


def _assert_equal_grads(grads, ref):
  leaves, ref_leaves = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)
  assert len(leaves) == len(ref_leaves) == 4
  for g, r in zip(leaves, ref_leaves):
    assert g.shape == r.shape and g.dtype == jnp.float64
    assert calc_diff(g, r) < 1e-12
    np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def _check_step(schedule, ranks, chunks, **kwargs):
  num_stages = pl.stages_for(schedule, ranks)
  params, tokens, labels = _model(num_stages, chunks)
  ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(params, tokens, labels, chunks)
  loss, grads = pl.pipeline_step(stage_fn, params, tokens, labels, loss_fn, mesh=_mesh(
      (ranks,), ("pp",)), schedule=schedule, num_chunks=chunks, embed_fn=embed_fn, **kwargs)
  assert loss.dtype == jnp.float64
  assert calc_diff(loss, ref_loss) < 1e-12
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
  _assert_equal_grads(grads, ref_grads)
  return params, tokens, labels


@pytest.mark.parametrize("schedule,ranks,chunks", [
    ("dualpipe", 8, 16),   # 8 ranks, 8 stages, each stage on two mirror ranks
    ("dualpipev", 4, 8),   # 4 ranks, 8 stages in a V
    ("1f1b", 8, 8),
    ("zb1p", 8, 10),
])
def test_8_stage_mlp_matches_the_unpartitioned_reference(x64, schedule, ranks, chunks):
  del x64
  params, tokens, labels = _check_step(schedule, ranks, chunks)
  if schedule.startswith("dualpipe"):  # inference: the same schedule's forwards only
    outputs, loss = pl.pipeline_forward(
        stage_fn, params, tokens, mesh=_mesh((ranks,), ("pp",)), schedule=schedule,
        num_chunks=chunks, embed_fn=embed_fn, labels=labels, loss_fn=loss_fn)
    ref = _reference_outputs(params, tokens, chunks)
    assert outputs.shape == ref.shape
    np.testing.assert_allclose(outputs, ref, rtol=1e-12, atol=1e-12)
    assert float(loss) == pytest.approx(float(_reference_loss(params, tokens, labels, chunks)),
                                        rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,ranks,chunks", [
    ("gpipe", 4, 5), ("1f1b", 3, 2), ("dualpipe", 2, 6), ("dualpipev", 1, 3),
    ("dualpipev", 2, 5), ("dualpipe", 4, 8)])
def test_other_shapes_match_the_reference(x64, schedule, ranks, chunks):
  del x64
  _check_step(schedule, ranks, chunks)


def test_remat_and_a_model_supplied_overlap_hook(x64):
  """A model's ``overlapped_forward_backward`` runs the F&B ticks (here: backward first)."""
  del x64
  calls = []
  def overlapped(forward_fn, forward_args, backward_fn, backward_args, cotangent):
    calls.append((len(forward_args), len(backward_args)))
    _, vjp = jax.vjp(backward_fn, *backward_args)
    grads = vjp(cotangent)
    return forward_fn(*forward_args), grads
  _check_step("dualpipe", 4, 8, overlapped_forward_backward=overlapped)
  assert calls and all(c == (2, 2) for c in calls)  # traced once per F&B branch
  _check_step("zb1p", 4, 6, remat=True)


def test_float32_step_under_jit_on_an_auto_mesh():
  params, tokens, labels = _model(4, 4, dtype=jnp.float32)
  ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(params, tokens, labels, 4)
  mesh = _mesh((4,), ("pp",), jax.sharding.AxisType.Auto)
  step = jax.jit(lambda p: pl.pipeline_step(stage_fn, p, tokens, labels, loss_fn,
                                            schedule="zb1p", mesh=mesh, num_chunks=4,
                                            embed_fn=embed_fn))
  loss, grads = step(params)
  assert loss.dtype == jnp.float32
  assert calc_diff(loss, ref_loss) < 1e-10
  for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    assert calc_diff(g, r) < 1e-10


# A stage with an expert-parallel all-to-all over "ep" on a (pp=2, ep=4) mesh: each device's
# micro-batch is cut into 4 token groups; group j goes to device j of the ep axis, which applies
# its expert, and comes back. Experts are sharded over "ep"; the dense weight is replicated.

EP = 4


def ep_stage(p, x):
  h = jnp.tanh(x @ p["w"])
  n = h.shape[0]
  groups = h.reshape(EP, n // EP, HIDDEN)
  mine = lax.all_to_all(groups, "ep", 0, 0)          # [source device, tokens, hidden]
  done = jnp.tanh(mine @ p["experts"][0])            # this device's expert
  back = lax.all_to_all(done, "ep", 0, 0)            # [expert, tokens, hidden]
  return x + back.reshape(n, HIDDEN)


def _ep_reference_stage(p, x):
  h = jnp.tanh(x @ p["w"])
  n = h.shape[0]
  groups = h.reshape(EP, n // EP, HIDDEN)
  done = jnp.tanh(jnp.einsum("gth,ghk->gtk", groups, p["experts"]))
  return x + done.reshape(n, HIDDEN)


def mse(_, y, target):
  return jnp.mean((y - target) ** 2)


@pytest.mark.parametrize("schedule", ["dualpipev", pytest.param("1f1b", marks=pytest.mark.slow)])
def test_stages_with_collectives_on_a_pp_ep_mesh(x64, schedule):
  del x64
  ranks, chunks, micro = 2, 4, 8
  num_stages = pl.stages_for(schedule, ranks)
  k = jax.random.split(jax.random.key(1), 4)
  stages = {"w": jax.random.normal(k[0], (num_stages, HIDDEN, HIDDEN), jnp.float64) * 0.4,
            "experts": jax.random.normal(k[1], (num_stages, EP, HIDDEN, HIDDEN),
                                         jnp.float64) * 0.4}
  batch = EP * chunks * micro  # every ep device gets chunks x micro tokens
  x = jax.random.normal(k[2], (batch, HIDDEN), jnp.float64)
  target = jax.random.normal(k[3], (batch, HIDDEN), jnp.float64)

  def reference(stages):
    total = 0.0
    for d in range(EP):  # ep device d's shard of the batch, micro-batch by micro-batch
      for c in range(chunks):
        rows = slice(d * chunks * micro + c * micro, d * chunks * micro + (c + 1) * micro)
        y = x[rows]
        for s in range(num_stages):
          y = _ep_reference_stage(jax.tree_util.tree_map(lambda a, s=s: a[s], stages), y)
        total += mse(None, y, target[rows])
    return total / (EP * chunks)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(stages)
  loss, grads = pl.pipeline_step(
      ep_stage, stages, x, target, mse, mesh=_mesh((ranks, EP), ("pp", "ep")),
      schedule=schedule, num_chunks=chunks, batch_axes=("ep",),
      stage_specs={"w": P(), "experts": P("ep")})
  assert calc_diff(loss, ref_loss) < 1e-12
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
  for name in ("w", "experts"):
    assert calc_diff(grads[name], ref_grads[name]) < 1e-12
    np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12)


def test_bad_input_names_the_requirement():
  params, tokens, labels = _model(4, 8, dtype=jnp.float32)
  step = functools.partial(pl.pipeline_step, stage_fn, params, tokens, labels, loss_fn,
                           embed_fn=embed_fn)
  with pytest.raises(ValueError, match="mesh has no axis 'pp'"):
    step(mesh=_mesh((4,), ("stages",)), num_chunks=8)
  with pytest.raises(ValueError, match="pipeline ranks must be even"):
    step(mesh=_mesh((3,), ("pp",)), schedule="dualpipe", num_chunks=8)
  with pytest.raises(ValueError, match="num_chunks must be even and at least 2 \\* ranks = 8"):
    step(mesh=_mesh((4,), ("pp",)), schedule="dualpipe", num_chunks=4)
  with pytest.raises(ValueError, match="at least 2 \\* ranks = 4"):
    step(mesh=_mesh((2,), ("pp",)), schedule="dualpipev", num_chunks=3)
  with pytest.raises(ValueError, match="leading stage axis of size 8"):
    step(mesh=_mesh((4,), ("pp",)), schedule="dualpipev", num_chunks=8)
  with pytest.raises(ValueError, match="inputs: the batch"):
    step(mesh=_mesh((4,), ("pp",)), schedule="1f1b", num_chunks=5)
  with pytest.raises(ValueError, match="batch_axes"):
    step(mesh=_mesh((4,), ("pp",)), schedule="1f1b", num_chunks=8, batch_axes=("dp",))
  widen = lambda p, x: jnp.concatenate([x, x], axis=-1)
  with pytest.raises(ValueError, match="stage outputs do not differ between stages"):
    pl.pipeline_step(widen, params, tokens, labels, loss_fn, embed_fn=embed_fn,
                     mesh=_mesh((4,), ("pp",)), schedule="1f1b", num_chunks=8)
  to_half = lambda p, x: stage_fn(p, x).astype(jnp.float16)
  with pytest.raises(ValueError, match="shape and dtype"):
    pl.pipeline_step(to_half, params, tokens, labels, loss_fn, embed_fn=embed_fn,
                     mesh=_mesh((4,), ("pp",)), schedule="1f1b", num_chunks=8)
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    pl.pipeline_step(stage_fn, params, tokens, labels, lambda h, y, t: y, embed_fn=embed_fn,
                     mesh=_mesh((4,), ("pp",)), schedule="1f1b", num_chunks=8)


def test_falls_back_to_remat_when_vjp_residuals_are_not_arrays(x64, monkeypatch):
  """If a JAX version stops exposing jax.vjp's residuals, the step recomputes instead."""
  del x64
  from jaxinfra.pipeline import executor  # pylint: disable=g-import-not-at-top

  def unavailable(vjp, prm):
    raise executor._StashUnavailable("test")  # pylint: disable=protected-access
  monkeypatch.setattr(executor, "split_residuals", unavailable)
  with pytest.warns(RuntimeWarning, match="recomputing the forward"):
    _check_step("1f1b", 2, 3)
