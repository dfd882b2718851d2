import jax
import jax.numpy as jnp
import numpy as np

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
