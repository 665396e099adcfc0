"""The training state: a NamedTuple of arrays that jits, shards and checkpoints as is.

Example:

    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> from sparsejax.train.state import TrainState
    >>> params, tx = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}, optax.sgd(0.1)
    >>> state = TrainState(step=jnp.int32(0), params=params, rest={}, opt_state=tx.init(params),
    ...                    rng=jax.random.PRNGKey(0))
    >>> state = jax.jit(lambda s: s._replace(step=s.step + 1))(state)   # a pytree of arrays
    >>> int(state.step), [x.shape for x in jax.tree.leaves(state)]
    (1, [(), (2,), (3, 2), (2,)])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-identically (with the data position).

    ``params``: the model's ``nnx.Param`` values as a nested dict; ``rest``: its other
    state (BatchNorm statistics); ``opt_state``: the sparsity transform's state, which
    holds the inner optimizer state and any masks; ``rng``: the run's base key.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.models import MLP
        >>> from sparsejax.train.state import TrainState
        >>> _, params, rest = nnx.split(MLP(64, (32,), 10, rngs=nnx.Rngs(0)), nnx.Param, ...)
        >>> state = TrainState(jnp.int32(0), nnx.to_pure_dict(params), nnx.to_pure_dict(rest),
        ...                    opt_state=(), rng=jax.random.PRNGKey(0))
        >>> state.params['layers'][0]['kernel'].shape
        (64, 32)
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
