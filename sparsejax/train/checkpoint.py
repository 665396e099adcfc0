"""Orbax checkpoints of the whole ``TrainState`` plus the data-iterator position.

Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.train.checkpoint import Checkpointer
    >>> workdir = Path(tempfile.mkdtemp())
    >>> state = {'params': {'w': jnp.arange(4.)}, 'step': jnp.int32(2)}
    >>> ckpt = Checkpointer(workdir / 'checkpoints', max_to_keep=3)
    >>> for step in (1, 2):
    ...     ckpt.save(step, state, data_position=10 * step)
    >>> ckpt.wait()
    >>> abstract_state = jax.eval_shape(lambda: state)   # shapes and dtypes, no data
    >>> state, position = ckpt.restore(abstract_state)   # latest step
    >>> state['params']['w'].tolist(), position
    ([0.0, 1.0, 2.0, 3.0], 20)
    >>> ckpt.close()
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored; nothing was deleted."""


class Checkpointer:
    """An orbax ``CheckpointManager`` holding ``state`` (pytree) and ``data`` (JSON).

    Saving is asynchronous; ``wait()`` blocks until the last save is committed. Only
    finished checkpoints are ever restored, so a run killed mid-save resumes from the one
    before.

    Example:

        >>> import tempfile
        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.train.checkpoint import Checkpointer
        >>> def init(key):
        ...     return {'w': jax.random.normal(key, (2, 2))}
        >>> key, directory = jax.random.PRNGKey(0), tempfile.mkdtemp()
        >>> ckpt = Checkpointer(directory)
        >>> ckpt.latest_step() is None   # a fresh run
        True
        >>> ckpt.save(3, init(key), data_position=3); ckpt.close()
        >>> ckpt = Checkpointer(directory)   # the run restarts and resumes
        >>> if ckpt.latest_step() is not None:
        ...     state, pos = ckpt.restore(jax.eval_shape(init, key))
        >>> ckpt.latest_step(), pos, state['w'].shape
        (3, 3, (2, 2))
        >>> ckpt.close()
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_position: int, **record) -> None:
        """Saves ``state`` and, as JSON, the iterator position plus ``record`` (the run's
        fingerprint, partial metric sums) under ``step`` (async)."""
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"position": int(data_position), **record})))

    def record(self, step: int | None = None) -> dict:
        """The JSON saved beside the state at ``step`` (default: latest): ``position`` and
        whatever ``save`` was given as ``record``. Reads no arrays.

        Example:

            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> from sparsejax.train.checkpoint import Checkpointer
            >>> ckpt = Checkpointer(tempfile.mkdtemp())
            >>> ckpt.save(5, {'w': jnp.ones(2)}, data_position=5, fingerprint='abc')
            >>> ckpt.wait(); ckpt.record()
            {'position': 5, 'fingerprint': 'abc'}
            >>> ckpt.close()
        """
        step = self.latest_step() if step is None else step
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; keep the cause
            raise CheckpointError(f"checkpoint {self.directory / str(step)} could not be "
                                  f"read ({type(e).__name__}: {e}). It was left in place") from e
        return dict(out.data)

    def restore(self, abstract_state, step: int | None = None):
        """Restores ``(state, data_position)``; ``abstract_state`` carries shapes, dtypes
        and shardings (``jax.ShapeDtypeStruct`` leaves). Raises ``CheckpointError`` naming
        the checkpoint if it is unreadable or does not fit the model."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; keep the cause
            raise CheckpointError(
                f"checkpoint {path} could not be restored ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). It was left in place; move it "
                "away or use another --workdir to start fresh") from e
        return out.state, int(out.data["position"])

    def wait(self) -> None:
        """Blocks until pending saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """``ShapeDtypeStruct`` leaves with the given shardings, the target orbax restores into.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from sparsejax.train.checkpoint import abstract_like
        >>> def init(key):
        ...     return {'w': jax.random.normal(key, (4, 2))}
        >>> mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1])
        >>> state_shardings = {'w': NamedSharding(mesh, P('data'))}
        >>> target = abstract_like(jax.eval_shape(init, jax.random.PRNGKey(0)), state_shardings)
        >>> target['w'].shape, target['w'].dtype, target['w'].sharding.spec
        ((4, 2), dtype('float32'), P('data',))
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
