import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import compiler, models


def test_options_on_cpu_and_none_elsewhere():
  opts = compiler.options("cpu")
  assert opts == compiler.CPU_OPTIONS  # jax 0.10's XLA knows them
  assert opts is not compiler.CPU_OPTIONS  # a copy: callers cannot alter the defaults
  assert compiler.options("gpu") is None


def test_compiled_with_options_equals_xla_defaults():
  """The options change how XLA:CPU runs a U-Net forward and backward pass, not
  what it computes (a comparison that means something only while the
  options are in force: without them both sides are the same program).
  Tolerance: the two programs run the convolutions through different
  libraries (YNNPACK vs Eigen), whose float32 sums agree to about 1e-6
  relative; 1e-4 of each value and 1e-5 of the largest leaf value bound it."""
  assert compiler.options(jax.default_backend()) is not None, (
      "this XLA refused bnjax's compiler options: the comparison below would compare a "
      "program with itself")
  model = models.UNet(features=4, depth=2)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))

  def f(params):
    out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  grad = jax.value_and_grad(f)
  ours = compiler.jit(grad)(v["params"])
  ref = compiler.jit(grad, xla_defaults=True)(v["params"])
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_jit_decorator_forms_and_static_args():
  @compiler.jit(static_argnums=(1,))
  def power(x, k):
    return x ** k

  np.testing.assert_allclose(power(jnp.arange(3.0), 3), [0.0, 1.0, 8.0])
  assert compiler.jit(lambda x: x + 1)(1.0) == 2.0


def test_unrolled_stack_rule():
  assert compiler.unrolled_stack("unroll", 2)
  assert not compiler.unrolled_stack("unroll", 1)
  assert not compiler.unrolled_stack("vmap", 8)


def _momentum_step(carry, consts, t):
  """A step of heavy-ball gradient descent on a convolution's squared output,
  the batch ``consts[0][t]``; its loss is the output."""
  w, v = carry
  xs, lr = consts
  x = jax.lax.dynamic_index_in_dim(xs, t, 0, keepdims=False)
  loss, g = jax.value_and_grad(lambda w: jnp.mean(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))(w)
  v = 0.9 * v + g
  return (w - lr * v, v), loss


def test_driven_loop_and_scan_equal_a_python_loop():
  """Both forms of driven against the step written out in NumPy-fed eager
  calls, batch by batch; the caller's carry is left usable (not donated)."""
  xs = jax.random.normal(jax.random.key(0), (6, 2, 5, 5, 3))
  w0 = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  carry0 = (w0, jnp.zeros_like(w0))
  want_w, want_v, want_losses = np.asarray(w0), np.zeros(w0.shape, np.float32), []
  for t in range(6):
    x = np.asarray(xs[t])
    loss, g = jax.value_and_grad(lambda w: jnp.mean(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))(want_w)
    want_v = 0.9 * want_v + np.asarray(g)
    want_w = want_w - 0.05 * want_v
    want_losses.append(float(loss))
  for form in ("scan", "loop"):
    (w, v), losses = compiler.driven(_momentum_step, form)(carry0, (xs, 0.05), 6)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_array_equal(carry0[0], w0)  # still readable: a copy was donated


def test_driven_compiles_its_step_once_for_every_length():
  import compiles
  run = compiler.driven(_momentum_step, "loop")
  xs = jax.random.normal(jax.random.key(0), (9, 2, 5, 5, 3))
  carry = (jnp.ones((3, 3, 3, 4)), jnp.zeros((3, 3, 3, 4)))
  run(carry, (xs, 0.05), 3)
  with compiles.lowered() as events:
    _, losses = run(carry, (xs, 0.01), 9)
  assert losses.shape == (9,)
  assert not [e for e in events if "step" in e], events


def test_loop_form_by_backend_and_errors():
  assert compiler.loop_form("auto", "cpu") == "loop"
  assert compiler.loop_form("auto", "gpu") == "scan"
  assert compiler.loop_form("scan", "cpu") == "scan"
  with pytest.raises(ValueError, match="loop form must be one of"):
    compiler.loop_form("while")
  with pytest.raises(ValueError, match="loop form must be one of"):
    compiler.driven(_momentum_step, "unrolled")
  run = compiler.driven(_momentum_step, "loop")
  carry = (jnp.ones((3, 3, 3, 4)), jnp.zeros((3, 3, 3, 4)))
  for steps in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
      run(carry, (jnp.zeros((2, 1, 5, 5, 3)), 0.1), steps)
