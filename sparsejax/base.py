"""The sparsity-transform contract: ``init``, ``update`` and ``forward``.

A weight-sparsity transform is optax's ``GradientTransformationExtraArgs`` extended by
one pure function, ``forward(params, state) -> params_seen_by_the_model``. It wraps
an inner optax optimizer, keeps its masks (and the inner optimizer state) in a pytree of
arrays, and never needs the model's code to change. See DESIGN.md, "The transform
contract".

Example::

    import optax, sparsejax
    tx = sparsejax.dense(optax.adam(1e-3))
    state = tx.init(params)
    fwd = tx.forward(params, state)               # what the model sees
    updates, state = tx.update(grads, state, params)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optax

Params = Any
State = Any


class SparseTransformation(NamedTuple):
    """A sparsity transform: optax's ``(init, update)`` plus ``forward``.

    ``init(params) -> state``; ``update(grads, state, params=None, **extra) ->
    (updates, state)`` with the optax signature, so it drops into any loop that takes
    an optax transformation; ``forward(params, state) -> params`` gives the parameters
    the model computes with (``W ⊙ m`` and any custom gradient).

    Example::

        tx = sparsejax.dense(optax.sgd(0.1))
        assert isinstance(tx, sparsejax.SparseTransformation)
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Params, State]]
    forward: Callable[[Params, State], Params]


def _identity_forward(params: Params, state: State) -> Params:
    del state
    return params


def dense(inner: optax.GradientTransformation) -> SparseTransformation:
    """The identity sparsity transform: ``inner`` unchanged, ``forward`` returns params.

    This is what the training loop uses before any sparsity exists, and the dense
    baseline every sparse run is compared against.

    Example::

        tx = sparsejax.dense(optax.adamw(3e-4))
        state = tx.init({'w': jnp.ones(3)})
        assert tx.forward({'w': jnp.ones(3)}, state)['w'].sum() == 3
    """
    inner = optax.with_extra_args_support(inner)
    return SparseTransformation(inner.init, inner.update, _identity_forward)


def as_sparse_transformation(tx: Any) -> SparseTransformation:
    """Returns ``tx`` if it already has ``forward``; wraps a plain optax one in ``dense``.

    Example::

        tx = sparsejax.as_sparse_transformation(optax.sgd(0.1))
        assert tx.forward({'w': 1.0}, tx.init({'w': 1.0})) == {'w': 1.0}
    """
    if isinstance(tx, SparseTransformation):
        return tx
    if hasattr(tx, "init") and hasattr(tx, "update"):
        if hasattr(tx, "forward"):
            return SparseTransformation(tx.init, tx.update, tx.forward)
        return dense(tx)
    raise TypeError(
        f"expected an optax GradientTransformation or a sparsejax SparseTransformation, "
        f"got {type(tx).__name__}"
    )
