"""The training state: a NamedTuple of arrays that jits, shards and checkpoints as is.

Example::

    state = TrainState(step=jnp.int32(0), params=params, rest={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-identically (with the data position).

    ``params``: the model's ``nnx.Param`` values as a nested dict; ``rest``: its other
    state (BatchNorm statistics); ``opt_state``: the sparsity transform's state, which
    holds the inner optimizer state and any masks; ``rng``: the run's base key.

    Example::

        state.params['layers'][0]['kernel'].shape
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
