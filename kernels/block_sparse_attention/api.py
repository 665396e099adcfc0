"""Block-sparse attention entry point: checks inputs, picks an implementation, falls back.

Implementations (all give the reference's answer, see ``reference.attention_reference``):

* ``"pallas"`` — the flash-style kernel that skips unvisited blocks (``pallas.py``); runs
  compiled on GPU and only interpreted (slow, for tests) elsewhere.
* ``"xla"`` — dense masked attention with the mask's element mask (no skipping).
* ``"xla_blocks"`` — gathers each query block's visited key blocks and attends over them
  with plain jnp (skips work on any device; memory grows with the visited blocks).

``implementation=None`` picks ``"pallas"`` when the kernel applies (head dim 64/128, q/k/v
all bf16 or all f32, sequences multiples of the mask blocks) AND it would run compiled (a
GPU backend) or ``interpret=True`` was asked for explicitly; otherwise ``"xla"``. So on CPU
the default never silently runs the interpreter. Sequences that are not multiples of the
block sizes are not padded: the default falls back to XLA (the mask handles the ragged last
block), and an explicit ``"pallas"`` raises.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.kernels.block_sparse_attention import masks, reference
    >>> from sparsejax.kernels.block_sparse_attention.api import block_sparse_attention
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 2, 16))
    >>> m = masks.causal_mask(64, block_q=16, block_k=16)
    >>> out = block_sparse_attention(q, k, v, m)             # [B, T, H, D]
    >>> g = jax.jit(jax.grad(lambda q: block_sparse_attention(q, k, v, m).sum()))(q)
    >>> g_ref = jax.jit(jax.grad(
    ...     lambda q: reference.attention_reference(q, k, v, m.dense()).sum()))(q)
    >>> out.shape, float(jnp.abs(g - g_ref).max()) < 1e-4
    ((1, 64, 2, 16), True)
"""

from __future__ import annotations

import jax

from .._common import on_gpu
from . import pallas, xla
from .masks import BlockMask

IMPLEMENTATIONS = ("pallas", "xla", "xla_blocks")


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask) -> None:
    """Raises ValueError naming the problem when q/k/v/mask shapes do not fit together.

    ``q: [B, T, H, D]``, ``k, v: [B, S, Hkv, D]`` with ``H % Hkv == 0``; ``mask`` built for
    ``(T, S)`` with mask batch/heads in ``{1, B}`` / ``{1, H}``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks
        >>> from sparsejax.kernels.block_sparse_attention.api import check_inputs
        >>> q, k, v = jnp.zeros((3, 1, 64, 2, 16))
        >>> check_inputs(q, k, v, masks.causal_mask(q.shape[1], block_q=16, block_k=16))   # ok
        >>> check_inputs(q, k, v, masks.causal_mask(128, block_q=16, block_k=16))
        Traceback (most recent call last):
            ...
        ValueError: mask was built for seq_q=128, seq_k=128 but q has seq 64 and k has seq 64
    """
    if not isinstance(mask, BlockMask):
        raise ValueError(f"mask must be a BlockMask (see masks.py); got {type(mask).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be [batch, seq, heads, head_dim]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    b, t, h, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"batch mismatch: q has batch {b}, k/v have {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"head dim mismatch: q has {d}, k/v have {k.shape[3]}")
    if h % k.shape[2]:
        raise ValueError(f"num query heads H={h} is not divisible by num kv heads "
                         f"Hkv={k.shape[2]}")
    if mask.seq_q != t or mask.seq_k != k.shape[1]:
        raise ValueError(f"mask was built for seq_q={mask.seq_q}, seq_k={mask.seq_k} but q "
                         f"has seq {t} and k has seq {k.shape[1]}")
    bm, hm = mask.mask_shape
    if bm not in (1, b):
        raise ValueError(f"mask batch {bm} must be 1 or the batch size {b}")
    if hm not in (1, h):
        raise ValueError(f"mask heads {hm} must be 1 or the number of query heads {h}")


def choose_implementation(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask,
                          implementation: str | None = None,
                          interpret: bool | None = None) -> str:
    """The implementation ``block_sparse_attention`` will run for these inputs.

    Raises ValueError for an unknown name, or for ``"pallas"`` on inputs the kernel cannot
    take (naming why).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks
        >>> from sparsejax.kernels.block_sparse_attention.api import choose_implementation
        >>> q, k, v = jnp.zeros((3, 1, 32, 2, 64))
        >>> m = masks.causal_mask(32, block_q=16, block_k=16)
        >>> choose_implementation(q, k, v, m)                  # "pallas" on GPU, "xla" on CPU
        'xla'
        >>> choose_implementation(q, k, v, m, interpret=True)  # "pallas" (interpreted) if it fits
        'pallas'
        >>> q32, k32, v32 = q[..., :32], k[..., :32], v[..., :32]   # head dim 32: it does not
        >>> choose_implementation(q32, k32, v32, m, interpret=True)
        'xla'
        >>> choose_implementation(q32, k32, v32, m, "pallas")
        Traceback (most recent call last):
            ...
        ValueError: head dim 32 is not supported by the Pallas kernel (needs one of (64, 128))
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of "
                         f"{(None,) + IMPLEMENTATIONS}")
    reason = pallas.unsupported_reason(q, k, v, mask)
    if implementation == "pallas":
        if reason is not None:
            raise ValueError(reason)
        return "pallas"
    if implementation is not None:
        return implementation
    runs = on_gpu() or bool(interpret)   # compiled on GPU, or interpreted when asked
    return "pallas" if reason is None and runs else "xla"


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, *,
                           scale: float | None = None, implementation: str | None = None,
                           interpret: bool | None = None) -> jax.Array:
    """Block-sparse softmax attention ``[B, T, H, D]``, differentiable in q, k, v.

    ``q: [B, T, H, D]``; ``k, v: [B, S, Hkv, D]`` (GQA: head ``h`` uses kv head
    ``h // (H // Hkv)``); ``mask``: a ``BlockMask`` for ``(T, S)``; ``scale`` defaults to
    ``D ** -0.5``. Each query attends to the keys its mask allows (softmax over those only);
    a query with none outputs 0. ``implementation`` ∈ {None, "pallas", "xla",
    "xla_blocks"} (see the module docstring for the choice and the fallbacks);
    ``interpret`` (Pallas only) defaults to ``not on_gpu()``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks, reference
        >>> from sparsejax.kernels.block_sparse_attention.api import block_sparse_attention
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 256, 2, 16))
        >>> m = masks.sliding_window_mask(256, 32, sinks=16, block_q=32, block_k=16)
        >>> out = jax.jit(lambda q, k, v: block_sparse_attention(
        ...     q, k, v, m, implementation="xla_blocks"))(q, k, v)
        >>> float(jnp.abs(out - reference.attention_reference(q, k, v, m.dense())).max()) < 1e-5
        True
    """
    check_inputs(q, k, v, mask)
    impl = choose_implementation(q, k, v, mask, implementation, interpret)
    if impl == "pallas":
        return pallas.block_sparse_attention_pallas(q, k, v, mask, scale=scale,
                                                    interpret=interpret)
    if impl == "xla_blocks":
        return xla.attention_xla_blocks(q, k, v, mask, scale=scale)
    return xla.attention_xla(q, k, v, mask.dense(), scale=scale)
