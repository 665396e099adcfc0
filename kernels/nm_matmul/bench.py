"""Benchmark of ``x @ W`` with W N:M-compressed against the dense XLA matmul.

Variants, timed side by side in one run on one device:

- ``dense``: ``x @ W`` with W the dense masked weight, XLA matmul (the baseline);
- ``reference``: ``sparsejax.nm.nm_matmul``, the gather (skipped when its
  ``[rows, K/M, N, out]`` intermediate exceeds ``--gather_limit`` elements);
- ``xla``: decompress then one dense matmul (``api.nm_matmul_xla``);
- ``pallas``: the Pallas kernel, GPU only; on CPU it only runs interpreted, which
  says nothing about speed, so it is not timed there (recorded as such).

Compressed arrays are passed as jit arguments, not closed over, so XLA cannot
constant-fold the decompression away. Per variant: median ms, speed-up vs dense
(``dense_ms / ms``), and the bytes of weights read (dense vs values + uint8 indices).
No speed-up from compute is expected: the kernel's MMA is dense; only the weight
traffic shrinks, which can matter when few rows make the matmul memory-bound.

    python3 -m sparsejax.kernels.nm_matmul.bench --quick    # < 1 min on a 2-core CPU
    python3 -m sparsejax.kernels.nm_matmul.bench            # GPU: bf16, 4096² sizes

``--block_m/--block_n/--block_k/--num_warps/--num_stages`` override the Pallas kernel's
tiles and Triton launch options (``api.default_tiles`` per shape for the rest; rows are
padded to a whole ``block_m``); ``python3 -m experiments.gpu_check`` searches over them.

Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax.kernels.nm_matmul import bench
    >>> [bench.weight_bytes(4096, 4096, n, m, jnp.bfloat16)["ratio"] for n, m in bench.PATTERNS]
    [0.75, 0.1875, 0.375]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.nm import NMCompressed, compress_nm, decompress_nm

from .._common import interleaved_ms, on_gpu, write_json
from .api import Tiles, default_tiles, nm_matmul, nm_matmul_xla
from .pallas import check_tiles, nm_matmul_pallas
from .reference import nm_matmul_reference

GPU_SIZES = [(16, 4096, 4096), (128, 4096, 4096), (4096, 4096, 4096)]
CPU_SIZES = [(16, 4096, 4096), (512, 4096, 4096)]
QUICK_SIZES = [(16, 1024, 1024), (256, 1024, 1024)]
PATTERNS = [(2, 4), (1, 8), (2, 8)]


def weight_bytes(k: int, out: int, n: int, m: int, dtype) -> dict:
    """Bytes of weights one matmul reads: dense ``K·out`` entries vs ``K·N/M·out``
    values plus as many uint8 indices.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.nm_matmul.bench import weight_bytes
        >>> weight_bytes(4096, 4096, 2, 4, jnp.bfloat16)
        {'dense': 33554432, 'compressed': 25165824, 'ratio': 0.75}
    """
    item = jnp.dtype(dtype).itemsize
    dense = k * out * item
    kept = k * n // m * out
    compressed = kept * item + kept * 1
    return {"dense": dense, "compressed": compressed, "ratio": compressed / dense}


def _pallas_tiled(x, c: NMCompressed, tiles: Tiles) -> jax.Array:
    """The Pallas kernel with explicit tiles and launch options, rows padded to a tile."""
    rows = x.shape[0]
    pad = -rows % tiles.block_m
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    return nm_matmul_pallas(xp, c, **tiles._asdict())[:rows]


def _variants(x, c: NMCompressed, dense_w, gather_limit: int, gpu: bool,
              tiles: dict | None = None) -> tuple[dict, dict, Tiles | None]:
    """Thunks to time (arrays and the compressed kernel as jit arguments), the variants
    left out, with why, and the Pallas tiles used (``tiles`` overrides the defaults)."""
    n, m, shape = c.n, c.m, c.shape
    dense_f = jax.jit(lambda x, w: x @ w)
    xla_f = jax.jit(nm_matmul_xla)
    ref_f = jax.jit(nm_matmul_reference)
    fns = {"dense": lambda: dense_f(x, dense_w), "xla": lambda: xla_f(x, c)}
    skipped = {}
    inter = x.shape[0] * (shape[0] // m) * n * shape[1]
    if inter <= gather_limit:
        fns["reference"] = lambda: ref_f(x, c)
    else:
        skipped["reference"] = (f"gather intermediate [rows, K/M, N, out] has {inter} "
                                f"elements > --gather_limit {gather_limit}")
    auto = default_tiles(x.shape[0], shape[0], shape[1], m)
    used = None
    if gpu and auto is not None and tiles:
        used = auto._replace(**tiles)
        try:
            check_tiles(0, shape[0], shape[1], m, used.block_m, used.block_n, used.block_k)
        except ValueError as e:
            skipped["pallas"], used = f"tiles {tuple(used)}: {e}", None
        else:
            pal_f = jax.jit(functools.partial(_pallas_tiled, tiles=used))
            fns["pallas"] = lambda: pal_f(x, c)
    elif gpu and auto is not None:
        pal_f = jax.jit(lambda x, c: nm_matmul(x, c, implementation="pallas"))
        fns["pallas"], used = (lambda: pal_f(x, c)), auto
    elif gpu:
        skipped["pallas"] = "no power-of-two tiling fits this shape"
    else:
        skipped["pallas"] = "not timed: on CPU the Pallas kernel only runs in interpret mode"
    return fns, skipped, used


def run_bench(sizes, patterns, dtype, gather_limit: int = 1 << 27, repeats: int = 7,
              seed: int = 0, tiles: dict | None = None) -> list[dict]:
    """One row per (size, pattern): ms per variant, speed-up vs dense, weight bytes,
    the max |error| of each variant against the dense matmul, and the Pallas tiles
    (``tiles``: ``Tiles`` fields overriding ``default_tiles``; ``None`` off GPU).

    ``run_bench([(16, 512, 512)], [(2, 4)], jnp.float32)[0]["speedup_vs_dense"]["xla"]``
    takes seconds on CPU; a shape or pattern that cannot be compressed fails before
    anything is timed.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.nm_matmul.bench import run_bench
        >>> run_bench([(16, 510, 512)], [(2, 4)], jnp.float32)
        Traceback (most recent call last):
            ...
        ValueError: N:M 2:4: axis 0 of size 510 is not divisible by M
    """
    gpu = on_gpu()
    rows = []
    for r, k, out in sizes:
        kw, kx = jax.random.split(jax.random.key(seed))
        w = jax.random.normal(kw, (k, out), jnp.float32).astype(dtype)
        x = jax.random.normal(kx, (r, k), jnp.float32).astype(dtype)
        for n, m in patterns:
            c = compress_nm(w, n, m, axis=0)
            dense_w = decompress_nm(c).astype(dtype)
            fns, skipped, used = _variants(x, c, dense_w, gather_limit, gpu, tiles)
            timing = interleaved_ms(fns, repeats=repeats)
            base = np.asarray(fns["dense"](), np.float32)
            err = {name: float(np.max(np.abs(np.asarray(f(), np.float32) - base)))
                   for name, f in fns.items() if name != "dense"}
            ms = timing["ms"]
            rows.append({"rows": r, "k": k, "out": out, "pattern": f"{n}:{m}",
                         "dtype": jnp.dtype(dtype).name, "ms": ms, "ms_min": timing["ms_min"],
                         "speedup_vs_dense": {v: ms["dense"] / t for v, t in ms.items()},
                         "weight_bytes": weight_bytes(k, out, n, m, dtype),
                         "max_abs_err_vs_dense": err, "skipped": skipped,
                         "pallas_tiles": None if used is None else used._asdict(),
                         "first_call_s": timing["first_call_s"]})
    return rows


def print_table(rows: list[dict]) -> None:
    """Prints one line per (size, pattern, variant).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.nm_matmul.bench import print_table, weight_bytes
        >>> row = dict(rows=16, k=4096, out=4096, pattern="2:4",            # a made-up row
        ...            ms={"dense": 0.9, "xla": 1.2}, speedup_vs_dense={"dense": 1.0, "xla": 0.75},
        ...            weight_bytes=weight_bytes(4096, 4096, 2, 4, jnp.bfloat16),
        ...            max_abs_err_vs_dense={"xla": 0.0}, skipped={"pallas": "not timed"})
        >>> print_table([row])
         rows     K   out  N:M   variant        ms vs dense     W bytes   max err
           16  4096  4096  2:4     dense     0.900    1.00x    33554432  0.00e+00
           16  4096  4096  2:4       xla     1.200    0.75x    25165824  0.00e+00
                                  pallas  skipped: not timed
    """
    print(f"{'rows':>5} {'K':>5} {'out':>5} {'N:M':>4} {'variant':>9} {'ms':>9} "
          f"{'vs dense':>8} {'W bytes':>11} {'max err':>9}")
    for row in rows:
        wb = row["weight_bytes"]
        for v, t in row["ms"].items():
            nbytes = wb["dense"] if v == "dense" else wb["compressed"]
            print(f"{row['rows']:>5} {row['k']:>5} {row['out']:>5} {row['pattern']:>4} "
                  f"{v:>9} {t:>9.3f} {row['speedup_vs_dense'][v]:>7.2f}x {nbytes:>11} "
                  f"{row['max_abs_err_vs_dense'].get(v, 0.0):>9.2e}")
        for v, why in row["skipped"].items():
            print(f"{'':>22} {v:>9}  skipped: {why}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, < 1 min on CPU")
    p.add_argument("--patterns", default=",".join(f"{n}:{m}" for n, m in PATTERNS),
                   help="comma-separated N:M patterns")
    p.add_argument("--repeats", type=int, default=None, help="timing windows (7; 5 quick)")
    p.add_argument("--gather_limit", type=int, default=1 << 27,
                   help="largest gather intermediate (elements) for the reference")
    for name in Tiles._fields:
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"Pallas {name} (default: api.default_tiles per shape)")
    p.add_argument("--out", default=None, help="JSON path (default: "
                   "experiments/results/kernel_nm_matmul_<platform>.json)")
    args = p.parse_args(argv)
    tiles = {n: getattr(args, n) for n in Tiles._fields if getattr(args, n) is not None}
    gpu = on_gpu()
    patterns = [tuple(int(v) for v in s.split(":")) for s in args.patterns.split(",")]
    sizes = QUICK_SIZES if args.quick else (GPU_SIZES if gpu else CPU_SIZES)
    dtype = jnp.bfloat16 if gpu else jnp.float32
    repeats = args.repeats or (5 if args.quick else 7)
    rows = run_bench(sizes, patterns, dtype, args.gather_limit, repeats, tiles=tiles)
    print_table(rows)
    out = args.out or f"experiments/results/kernel_nm_matmul_{'gpu' if gpu else 'cpu'}.json"
    path = write_json(out, {"quick": args.quick, "dtype": jnp.dtype(dtype).name,
                            "pallas_tiles": tiles,
                            "note": "speedup_vs_dense = dense_ms / ms; weights read: dense "
                                    "vs N/M values + uint8 indices; the Pallas kernel's MMA "
                                    "is dense, so only weight traffic can shrink",
                            "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
