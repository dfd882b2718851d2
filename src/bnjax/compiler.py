"""XLA compiler options for bnjax's own compiled model functions.

The options are passed per call to ``jax.jit(..., compiler_options=...)``,
never through ``XLA_FLAGS`` or a global setting, so importing bnjax changes no
other program's compilation.

On the CPU backend, jax 0.10's XLA hands convolutions, matrix products,
reductions and elementwise fusions to its YNNPACK runtime by default. There
its convolutions did not use the second core of this 2-core machine (a 3x3
convolution 32 -> 16 channels at 64x64, batch 16, forward: 8.1 ms on one core,
7.3 ms on two), while XLA's own (Eigen) convolutions did (11.2 -> 6.1 ms).
Keeping YNNPACK for reductions only made a width-16 64x64 U-Net train step
about 1.2x faster (docs/measured.md); the function computed is the same.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["jit", "options", "unrolled_stack", "enable_persistent_cache", "CPU_OPTIONS",
           "driven", "loop_form", "LOOP_FORMS"]

#: Options of the CPU backend of XLA that bnjax passes to its own ``jit`` calls (never
#: set globally).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _accepted(backend: str) -> bool:
  """Whether this XLA build knows the options (they are experimental)."""
  try:
    x = jax.device_put(jnp.zeros((), jnp.float32), jax.devices(backend)[0])
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(x).compile()
  except Exception:  # an XLA that renamed or dropped the option
    return False
  return True


def options(backend: str | None = None) -> dict[str, Any] | None:
  """The compiler options bnjax uses on ``backend`` (default: JAX's default
  backend), or None where it uses XLA's defaults."""
  backend = backend or jax.default_backend()
  if backend != "cpu" or not _accepted(backend):
    return None
  return dict(CPU_OPTIONS)


def unrolled_stack(strategy: str, models_per_program: int) -> bool:
  """Whether a training program maps several models unrolled into one
  program (``strategy`` as resolved by :func:`bnjax.stacking.resolve`). Such a
  program trains faster with XLA's defaults on CPU: its single-threaded
  library convolutions of the copies overlap (K = 4 / 8: 0.96 / 0.99 of
  one-by-one steps with the defaults, 0.90 / 0.91 with :func:`options`;
  docs/measured.md, "Compiler options")."""
  return strategy == "unroll" and models_per_program > 1


def jit(fn: Callable | None = None, *, xla_defaults: bool = False, **kwargs) -> Callable:
  """``jax.jit(fn, **kwargs)`` with :func:`options` for the default backend
  (with XLA's defaults if ``xla_defaults``).

  The backend is looked up at the first call, not when ``jit`` runs, so a
  module-level ``@compiler.jit`` does not initialise JAX at import. Usable as
  ``@jit`` or ``@jit(static_argnums=...)``. Called inside another ``jit`` it
  is a plain nested ``jax.jit`` (XLA takes options from the outermost one).
  """
  if fn is None:
    return functools.partial(jit, xla_defaults=xla_defaults, **kwargs)
  if xla_defaults:
    return jax.jit(fn, **kwargs)
  compiled = nested = None

  @functools.wraps(fn)
  def call(*args, **kw):
    nonlocal compiled, nested
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves((args, kw))):
      # Inside another jit: XLA takes compiler options from the outer one only.
      nested = nested or jax.jit(fn, **kwargs)
      return nested(*args, **kw)
    if compiled is None:
      compiled = jax.jit(fn, compiler_options=options(), **kwargs)
    return compiled(*args, **kw)

  return call


#: How :func:`driven` runs a loop of steps: ``"scan"`` (one compiled
#: ``lax.scan``), ``"loop"`` (one compiled step called per iteration from
#: Python) or ``"auto"`` (``"loop"`` on the CPU backend, ``"scan"`` elsewhere).
LOOP_FORMS: tuple[str, ...] = ("auto", "scan", "loop")


def loop_form(form: str = "auto", backend: str | None = None) -> str:
  """``"scan"`` or ``"loop"``: the form :func:`driven` uses for ``form`` on
  ``backend`` (default: JAX's default backend).

  On XLA:CPU (jax 0.10) the gradient of a convolution inside a loop body is
  compiled without the library kernel the same operation gets at the top
  level of a program: the kernel gradient keeps its dimension order
  (``dim_labels=f01b_i01o->01bf``) and is emitted as XLA's generic loop nest
  split over the outer dimensions, where at the top level it is rewritten
  to Eigen's canonical order (``b01f_01io->b01f``) and its library kernel.
  A 3x3 convolution's weight-gradient step (16 -> 16 channels, 8x8, batch
  64) takes 22 ms inside ``lax.scan`` (the same in ``fori_loop`` and with
  ``unroll=5``) against 0.6 ms called once per iteration; a U-Net's online
  TENT step 2-6x (docs/design.md, "Loops of compiled steps"). Forward-only
  steps are not slower called one by one either, so on CPU every loop is
  driven from Python; other backends keep the scan."""
  if form not in LOOP_FORMS:
    raise ValueError(f"loop form must be one of {LOOP_FORMS}, got {form!r}")
  if form != "auto":
    return form
  return "loop" if (backend or jax.default_backend()) == "cpu" else "scan"


def driven(step: Callable, form: str = "auto") -> Callable:
  """``run(carry, consts, steps) -> (carry, ys)``: ``step(carry, consts, t)
  -> (carry, y)`` for ``t = 0 .. steps - 1``, the ``y`` stacked on a new
  leading axis (``ys`` None when ``step`` returns ``y`` None), as one
  compiled ``lax.scan`` or as one compiled step called per iteration with
  the carry's buffers donated (:func:`loop_form`; ``t`` an int32 scalar in
  both, so a step reads its own slice of ``consts`` by
  ``jax.lax.dynamic_index_in_dim``). Both forms compute the same function.
  The loop compiles its step once for every ``steps``, puts ``consts`` on
  the device once per call and stacks the ``y`` on the host (``ys`` NumPy
  arrays: no program per length); the scan compiles once per ``steps``.
  The caller's carry is never donated (the loop works on a copy)."""
  if form not in LOOP_FORMS:
    raise ValueError(f"loop form must be one of {LOOP_FORMS}, got {form!r}")
  scanned = jit(lambda carry, consts, ts: jax.lax.scan(
      lambda c, t: step(c, consts, t), carry, ts))
  one = jit(step, donate_argnums=0)

  def run(carry, consts, steps: int):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
      raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if loop_form(form) == "scan":
      return scanned(carry, consts, jnp.arange(steps, dtype=jnp.int32))
    carry = jax.tree_util.tree_map(jnp.copy, carry)
    consts = jax.device_put(consts)  # once, not with every step
    ys = []
    for t in range(steps):
      carry, y = one(carry, consts, np.int32(t))
      ys.append(y)
    if not ys or all(y is None for y in ys):
      return carry, None
    return carry, jax.tree_util.tree_map(lambda *a: np.stack(a), *jax.device_get(ys))

  return run


CACHE_ENV = "BNJAX_COMPILATION_CACHE"


def enable_persistent_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache, so that a rerun of a script
  loads its compiled programs from disk instead of compiling them again.

  ``path`` defaults to ``$BNJAX_COMPILATION_CACHE``, else
  ``~/.cache/bnjax/xla``; ``BNJAX_COMPILATION_CACHE=off`` turns it off. This
  changes JAX's process-wide configuration, so the experiment scripts call it
  in their ``main``; importing bnjax never does. Returns the folder used, or
  None when off.
  """
  path = path or os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "bnjax", "xla")
  if path.lower() in ("off", "0", "none"):
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
