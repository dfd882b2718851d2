"""Counting what JAX compiles, for the tests that a second call with other
values of a float option compiles nothing new."""

import contextlib

import jax

# Emitted for every jaxpr lowered to an MLIR module: each jitted function
# traced anew (and each eager operation of a new shape). Counted instead of
# backend compilations, which the persistent compilation cache
# (tests/conftest.py) may serve: a function traced again is lowered again
# whether or not its program is then compiled or loaded.
LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def lowered():
  """The names of the functions lowered while the ``with`` block runs (a
  list, filled as they are)."""
  names = []

  def listener(event, duration, **kwargs):
    if event == LOWERING:
      names.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
