"""sparsejax.kernels: hot-path kernels, one folder per op.

Installed as ``sparsejax.kernels`` from the top-level ``kernels/`` folder. Each op has a
pure-jnp ``reference.py`` that defines the answer, Pallas / jax-triton implementations,
an ``api.py`` that picks one (falling back to XLA) and a ``bench.py``.

Example::

    import sparsejax.kernels
"""
