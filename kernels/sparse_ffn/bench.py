"""Benchmark of the activation-sparse FFN against the dense XLA FFN, side by side.

Decode (rows B ∈ {1, 8}, d_model d, F = 4d, ~8% of units active), each form against its
own dense formula with XLA matmuls (the strongest dense baseline on the device):

- ``gemv``: the gather-GEMV alone, ``Σ_{j∈S} coef_j (x2·K2[:, j]) V[j]`` with given
  ``(idx, coef)``, vs the dense ``(A ⊙ x2 K2) V`` (the part a sparse kernel replaces);
- ``spark``: the whole Spark FFN (dense predictor, statistical top-k, selection,
  gather-GEMV; ``selection`` topk or nonzero) vs the dense ``SparkFFN`` formula;
- ``topk``: the top-k FFN (dense up, ``lax.top_k``, gathered down) vs the dense FFN.

The sparse side runs the XLA gather (``jnp.take`` + einsum) everywhere and, on GPU, also
the Pallas gather-GEMV; on CPU Pallas only runs interpreted, which says nothing about
speed, so it is not timed there. The target (Spark paper: 1.40× decode speed-up on GPU;
ours: ≥ 2× for the FFN at B = 1 on GPU) is printed with the results.

Training (T tokens, fwd+bwd of ``sum(y²)`` w.r.t. x and both weights): the dense FFN vs
``block_sparse_ffn`` keeping 25% / 50% of the unit blocks per token tile (block 128,
tile 128): ``gather`` with the exact default scores (an extra dense up-projection
forward), ``gather+given`` with precomputed scores (an external predictor's cost left
out) and ``ragged`` (``lax.ragged_dot``) at 25%.

    python3 -m sparsejax.kernels.sparse_ffn.bench --quick    # < 1 min on a 2-core CPU
    python3 -m sparsejax.kernels.sparse_ffn.bench            # d = 2048, T = 2048

``--units_per_step/--block_cols/--col_splits/--num_warps/--num_stages`` set the Pallas
gather-GEMV's options in the ``gemv`` form (``spark`` and ``topk`` go through the api,
which uses the kernel's defaults); ``--skip_train`` times decode only. ``python3 -m
experiments.gpu_check`` searches over these on a GPU.

Example:

    >>> from sparsejax.kernels.sparse_ffn import bench
    >>> bench.print_tables([], [])             # the target is printed with the results
    decode: d_ff = 4·d_model, 8% active units; target: Spark FFN decode >= 2x over the dense
    XLA FFN at B = 1 on GPU
      form  B     d     k         variant        ms vs dense   max err
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.activations import k_from_density, statistical_topk

from .._common import interleaved_ms, on_gpu, write_json
from .api import block_sparse_ffn, spark_ffn_decode, sparse_ffn_decode, topk_ffn_decode
from .pallas import sparse_ffn_decode_pallas
from .reference import block_scores, dropped_units, topk_indices

DENSITY = 0.08
# Tuning options of sparse_ffn_decode_pallas (its defaults), settable from the command line.
PALLAS_OPTIONS = {"units_per_step": 16, "block_cols": 256, "col_splits": 1, "num_warps": 4,
                  "num_stages": 2}
TARGET = "Spark FFN decode >= 2x over the dense XLA FFN at B = 1 on GPU"


def _weights(seed: int, d: int, f: int, dtype) -> dict:
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype)  # noqa: E731
    return {"k1": w(d // 2, f), "k2": w(d - d // 2, f), "v": w(f, d), "b": w(1, d)[0],
            "w_up": w(d, f), "b_up": w(1, f)[0], "w_down": w(f, d)}


def _dense_spark(x, k1, k2, v, b):
    r = k1.shape[0]
    gate = jax.nn.gelu(statistical_topk(x[:, :r] @ k1, DENSITY, mode="soft"))
    return (gate * (x[:, r:] @ k2)) @ v + b


def _dense_topk(x, w_up, b_up, w_down, b, k):
    h = jax.nn.relu(x @ w_up + b_up)
    vals, idx = jax.lax.top_k(h, k)
    return jnp.zeros_like(h).at[jnp.arange(h.shape[0])[:, None], idx].set(vals) @ w_down + b


def decode_rows(d: int, batches, dtype, gpu: bool, repeats: int = 7, seed: int = 0,
                pallas_options: dict | None = None) -> list:
    """One row per (form, B): ms of each variant, speed-up vs the dense XLA baseline.

    ``decode_rows(d=256, batches=(1,), dtype=jnp.float32, gpu=False)`` takes seconds on
    CPU; a bad size fails before anything is timed. ``pallas_options`` (keyword arguments
    of ``sparse_ffn_decode_pallas``: ``units_per_step``, ``num_warps``, ...) apply to the
    ``gemv`` form's Pallas variant (an unknown name or a value the kernel refuses raises
    before anything is timed); ``None`` keeps the api call and the kernel's defaults.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.bench import decode_rows
        >>> decode_rows(d=0, batches=(1,), dtype=jnp.float32, gpu=False)
        Traceback (most recent call last):
            ...
        ValueError: d must be a positive int, got 0
    """
    unknown = sorted(set(pallas_options or {}) - set(PALLAS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown Pallas options {unknown}; known: {list(PALLAS_OPTIONS)}")
    f = 4 * d
    k = k_from_density(f, DENSITY)
    k_max = int(round(1.25 * k))                   # capacity above the expected count
    w = _weights(seed, d, f, dtype)
    k2_t = w["k2"].T                               # unit-major, converted once
    impls = ["xla"] + (["pallas"] if gpu else [])
    rows = []
    for b in batches:
        x = jnp.asarray(np.random.default_rng(seed + b).standard_normal((b, d)), dtype)
        r = d // 2
        pre = jax.nn.gelu(statistical_topk(x[:, :r] @ w["k1"], DENSITY, mode="soft"))
        idx, coef = topk_indices(pre, k_max)
        dropped = int(jnp.max(dropped_units(pre, k_max)))
        x2 = x[:, r:]
        forms = {}
        dense_gemv = jax.jit(lambda x2, k2, v, idx, coef: (
            jnp.zeros((x2.shape[0], k2.shape[1]), coef.dtype)
            .at[jnp.arange(x2.shape[0])[:, None], jnp.maximum(idx, 0)].add(coef) * (x2 @ k2)) @ v)
        fns = {"dense": lambda: dense_gemv(x2, w["k2"], w["v"], idx, coef)}
        for impl in impls:
            if impl == "pallas" and pallas_options:
                g = jax.jit(lambda x2, k2t, v, idx, coef: sparse_ffn_decode_pallas(
                    x2, k2t, v, idx, coef, **pallas_options))
                jax.eval_shape(g, x2, k2_t, w["v"], idx, coef)   # bad options raise here
            else:
                g = jax.jit(lambda x2, k2t, v, idx, coef, impl=impl: sparse_ffn_decode(
                    x2, k2t, v, idx, coef, implementation=impl))
            fns[impl] = lambda g=g: g(x2, k2_t, w["v"], idx, coef)
        forms["gemv"] = fns
        dense_spark = jax.jit(_dense_spark)
        fns = {"dense": lambda: dense_spark(x, w["k1"], w["k2"], w["v"], w["b"])}
        for impl in impls:
            for sel in ("topk", "nonzero"):
                g = jax.jit(lambda x, k1, k2t, v, bb, impl=impl, sel=sel: spark_ffn_decode(
                    x, k1, k2t, v, v_bias=bb, density=DENSITY, k_max=k_max, selection=sel,
                    implementation=impl))
                fns[f"{impl}/{sel}"] = lambda g=g: g(x, w["k1"], k2_t, w["v"], w["b"])
        forms["spark"] = fns
        dense_topk = jax.jit(_dense_topk, static_argnames="k")
        fns = {"dense": lambda: dense_topk(x, w["w_up"], w["b_up"], w["w_down"], w["b"], k=k)}
        for impl in impls:
            g = jax.jit(lambda x, wu, bu, wd, bb, impl=impl: topk_ffn_decode(
                x, wu, bu, wd, bb, activation="relu", k=k, implementation=impl))
            fns[impl] = lambda g=g: g(x, w["w_up"], w["b_up"], w["w_down"], w["b"])
        forms["topk"] = fns
        for form, fns in forms.items():
            timing = interleaved_ms(fns, repeats=repeats)
            base = np.asarray(fns["dense"](), np.float32)
            err = {n: float(np.max(np.abs(np.asarray(fn(), np.float32) - base)))
                   for n, fn in fns.items() if n != "dense"}
            ms = timing["ms"]
            rows.append({"form": form, "batch": b, "d_model": d, "d_ff": f, "k": k,
                         "k_max": k_max, "dropped_units_max": dropped,
                         "dtype": jnp.dtype(dtype).name, "ms": ms, "ms_min": timing["ms_min"],
                         "speedup": {n: ms["dense"] / t for n, t in ms.items()},
                         "max_abs_err_vs_dense": err, "first_call_s": timing["first_call_s"]})
    return rows


def train_rows(tokens: int, d: int, dtype, block: int = 128, tile: int = 128,
               keeps=(0.25, 0.5), repeats: int = 5, seed: int = 1) -> list:
    """One row per keep fraction: fwd+bwd ms of the dense FFN and the block-sparse paths.

    ``train_rows(tokens=256, d=128, dtype=jnp.float32)`` takes seconds on CPU; tokens
    that are not whole tiles fail before anything is timed.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.bench import train_rows
        >>> train_rows(tokens=100, d=128, dtype=jnp.float32)     # tile = 128 tokens
        Traceback (most recent call last):
            ...
        TypeError: cannot reshape array of shape (100, 512) (size 51200) into shape ...
    """
    f = 4 * d
    w = _weights(seed, d, f, dtype)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((tokens, d)), dtype)
    n_blocks = f // block
    cfg = dict(activation="relu", block_units=block, tile_tokens=tile)

    def grad_of(fwd):
        loss = lambda x, wu, bu, wd, b: jnp.sum(jnp.square(fwd(x, wu, bu, wd, b)))  # noqa: E731
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return lambda: g(x, w["w_up"], w["b_up"], w["w_down"], w["b"])

    scores = block_scores(x, w["w_up"], w["b_up"], **cfg)
    rows = []
    for keep in keeps:
        kb = max(1, int(round(keep * n_blocks)))
        fns = {"dense": grad_of(lambda x, wu, bu, wd, b: jax.nn.relu(x @ wu + bu) @ wd + b)}
        fns["gather"] = grad_of(lambda x, wu, bu, wd, b: block_sparse_ffn(
            x, wu, wd, b_up=bu, b_down=b, keep_blocks=kb, **cfg))
        fns["gather+given"] = grad_of(lambda x, wu, bu, wd, b: block_sparse_ffn(
            x, wu, wd, b_up=bu, b_down=b, keep_blocks=kb, scores=scores, **cfg))
        if keep == min(keeps):
            fns["ragged"] = grad_of(lambda x, wu, bu, wd, b: block_sparse_ffn(
                x, wu, wd, b_up=bu, b_down=b, keep_blocks=kb, implementation="ragged", **cfg))
        timing = interleaved_ms(fns, repeats=repeats)
        ms = timing["ms"]
        rows.append({"tokens": tokens, "d_model": d, "d_ff": f, "block_units": block,
                     "tile_tokens": tile, "keep_blocks": kb, "keep_fraction": kb / n_blocks,
                     "dtype": jnp.dtype(dtype).name, "ms": ms, "ms_min": timing["ms_min"],
                     "speedup": {n: ms["dense"] / t for n, t in ms.items()},
                     "first_call_s": timing["first_call_s"]})
    return rows


def print_tables(decode: list, train: list) -> None:
    """Prints the decode and training tables (one line per variant).

    Example:

        >>> from sparsejax.kernels.sparse_ffn.bench import print_tables
        >>> dec = dict(form="spark", batch=1, d_model=2048, k=655,           # made-up rows
        ...            ms={"dense": 0.5, "xla/topk": 0.2}, speedup={"dense": 1.0, "xla/topk": 2.5},
        ...            max_abs_err_vs_dense={"xla/topk": 1e-6})
        >>> tr = dict(tokens=2048, d_model=1024, keep_fraction=0.25,
        ...           ms={"dense": 40.0, "gather": 16.0}, speedup={"dense": 1.0, "gather": 2.5})
        >>> print_tables([dec], [tr])
        decode: d_ff = 4·d_model, 8% active units; target: Spark FFN decode >= 2x over the
        dense XLA FFN at B = 1 on GPU
          form  B     d     k         variant        ms vs dense   max err
         spark  1  2048   655           dense    0.5000    1.00x  0.00e+00
         spark  1  2048   655        xla/topk    0.2000    2.50x  1.00e-06
        training fwd+bwd: block-granular FFN vs dense
            T     d  keep       variant        ms vs dense
         2048  1024   25%         dense    40.000    1.00x
         2048  1024   25%        gather    16.000    2.50x
    """
    print(f"decode: d_ff = 4·d_model, {DENSITY:.0%} active units; target: {TARGET}")
    print(f"{'form':>6} {'B':>2} {'d':>5} {'k':>5} {'variant':>15} {'ms':>9} {'vs dense':>8}"
          f" {'max err':>9}")
    for r in decode:
        for v, t in r["ms"].items():
            print(f"{r['form']:>6} {r['batch']:>2} {r['d_model']:>5} {r['k']:>5} {v:>15} "
                  f"{t:>9.4f} {r['speedup'][v]:>7.2f}x "
                  f"{r['max_abs_err_vs_dense'].get(v, 0.0):>9.2e}")
    if train:
        print("training fwd+bwd: block-granular FFN vs dense")
        print(f"{'T':>5} {'d':>5} {'keep':>5} {'variant':>13} {'ms':>9} {'vs dense':>8}")
    for r in train:
        for v, t in r["ms"].items():
            print(f"{r['tokens']:>5} {r['d_model']:>5} {r['keep_fraction']:>5.0%} {v:>13} "
                  f"{t:>9.3f} {r['speedup'][v]:>7.2f}x")


def main(argv=None) -> None:
    """Command line: runs the decode and training benches, prints, writes the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, < 1 min on CPU")
    p.add_argument("--d_model", type=int, default=None, help="decode d_model (2048; quick 512)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (2048; quick 512)")
    p.add_argument("--train_d_model", type=int, default=None,
                   help="training d_model (1024; quick 256)")
    p.add_argument("--dtype", default=None, help="bfloat16 on GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timing windows (7; quick 3)")
    for name, default in PALLAS_OPTIONS.items():
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"Pallas gather-GEMV {name} in the gemv form ({default})")
    p.add_argument("--skip_train", action="store_true", help="decode rows only")
    p.add_argument("--out", default=None, help="JSON path (default: "
                   "experiments/results/kernel_sparse_ffn_<platform>.json)")
    args = p.parse_args(argv)
    options = {n: getattr(args, n) for n in PALLAS_OPTIONS if getattr(args, n) is not None}
    gpu = on_gpu()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    d = args.d_model or (512 if args.quick else 2048)
    tokens = args.tokens or (512 if args.quick else 2048)
    td = args.train_d_model or (256 if args.quick else 1024)
    repeats = args.repeats or (3 if args.quick else 7)
    decode = decode_rows(d, (1, 8), dtype, gpu, repeats=repeats, pallas_options=options)
    train = [] if args.skip_train else train_rows(tokens, td, dtype, repeats=repeats)
    print_tables(decode, train)
    out = args.out or f"experiments/results/kernel_sparse_ffn_{jax.default_backend()}.json"
    path = write_json(out, {"quick": args.quick, "target": TARGET, "density": DENSITY,
                            "pallas_options": options,
                            "decode": decode, "train": train})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
