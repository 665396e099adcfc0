"""Benchmark of block-sparse attention against dense attention, side by side, in one run.

Masks (per sequence length, one mask shared by all heads): block sparsity 0% (all blocks),
50% and 90% (random block masks with the diagonal blocks kept; the measured block density
is reported), and causal. Modes: forward, and forward+backward (the vjp w.r.t. q, k, v).
Each (sequence, mode) group is timed interleaved (``interleaved_ms``) with the dense
baseline ``jax.nn.dot_product_attention`` (``implementation="cudnn"`` on GPU where it
runs, else XLA; plus its ``is_causal`` variant).

Implementations timed: on GPU the compiled Pallas kernel (``pallas``), plus the XLA paths
where their memory fits; on CPU Pallas runs only interpreted (meaningless for speed) so it
is NOT timed there, and the XLA paths are: ``xla`` (dense masked, no skipping: shown at one
sparsity) and ``xla_blocks`` (gathers only the visited key blocks: skips work anywhere, but
pads every query block to the LARGEST count, so causal masks — counts 1..nK — save nothing
and random masks reach only mean/max of the ideal).

Reported per row: ms, TFLOP/s over the visited blocks (forward ``4·B·H·visited·bq·bk·D``,
forward+backward 3.5× that, the FlashAttention-2 convention), speed-up vs the dense
baseline, the ideal ``1/(1-s) = 1/density`` and the fraction of it reached. GPU targets
(printed): ≥ 5× over cuDNN at 90% sparsity (fwd and fwd+bwd); dense mode ≥ 0.5× cuDNN.

    python3 -m sparsejax.kernels.block_sparse_attention.bench --quick   # < 1 min on CPU
    python3 -m sparsejax.kernels.block_sparse_attention.bench           # 4k and 16k, GPU

The Pallas tile is the mask block (``--block_q``/``--block_k``); ``--num_warps`` and
``--num_stages`` set its Triton launch options (default: the kernel's); ``--pallas_only``
leaves the XLA paths out (the dense baselines are still timed). ``python3 -m
experiments.gpu_check`` searches over these on a GPU.

Example:

    >>> from sparsejax.kernels.block_sparse_attention import bench
    >>> [round(float(bench.random_block_mask(1024, s, block_q=64, block_k=64).block_density), 3)
    ...  for s in bench.SPARSITIES]          # block densities of the masks timed at 0/50/90%
    [1.0, 0.449, 0.098]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from .._common import interleaved_ms, on_gpu, write_json
from .api import block_sparse_attention
from .masks import BlockMask, causal_mask, from_block_mask
from .pallas import block_sparse_attention_pallas

SPARSITIES = (0.0, 0.5, 0.9)
TARGETS = {"speedup_vs_cudnn_at_90": 5.0, "dense_mode_vs_cudnn": 0.5}
XLA_MEMORY_LIMIT = 8 << 30        # bytes of f32 logits above which XLA paths are skipped


def random_block_mask(seq: int, sparsity: float, *, block_q: int, block_k: int,
                      seed: int = 0) -> BlockMask:
    """Random block mask at about ``sparsity`` (fraction of blocks skipped), diagonal kept.

    Example:

        >>> from sparsejax.kernels.block_sparse_attention.bench import random_block_mask
        >>> m = random_block_mask(4096, 0.9, block_q=128, block_k=64)
        >>> round(float(m.block_density), 3), m.num_q_blocks, m.num_k_blocks
        (0.106, 32, 64)
        >>> full = m.block_classes()[0][0, 0]
        >>> bool(all(full[i, 2 * i] for i in range(32)))     # the diagonal blocks are kept
        True
    """
    n_q, n_k = seq // block_q, seq // block_k
    diagonal = np.zeros((n_q, n_k), bool)
    diagonal[np.arange(n_q), (np.arange(n_q) * block_q) // block_k] = True
    # Keep probability chosen so that random + diagonal ≈ 1 - sparsity.
    keep = max(0.0, ((1.0 - sparsity) - 1.0 / n_k) / (1.0 - 1.0 / n_k))
    blocks = (np.random.default_rng(seed).random((n_q, n_k)) < keep) | diagonal
    return from_block_mask(blocks[None, None], block_q=block_q, block_k=block_k)


def _masks(seq: int, block_q: int, block_k: int) -> dict[str, BlockMask]:
    out = {f"sparsity_{int(s * 100)}": random_block_mask(seq, s, block_q=block_q,
                                                         block_k=block_k)
           for s in SPARSITIES}
    out["causal"] = causal_mask(seq, block_q=block_q, block_k=block_k)
    return out


def _dense_attention(gpu: bool, q, k, v, causal: bool):
    """The strongest dense baseline available: cuDNN on GPU, else XLA. Returns (fn, name)."""
    impls = ["cudnn", "xla"] if gpu else ["xla"]
    for impl in impls:
        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl))
        try:
            jax.block_until_ready(fn(q, k, v))
            return fn, impl
        except Exception:  # noqa: BLE001 — cuDNN unavailable for this shape/device
            continue
    raise RuntimeError("no dense attention implementation ran")


def _with_grad(fn, do):
    """``(q, k, v) -> (out, dq, dk, dv)``: forward plus the vjp of cotangent ``do``."""
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))
    return jax.jit(run)


def _logits_bytes(batch, heads, seq_q, width) -> int:
    return 4 * batch * heads * seq_q * width


def bench_rows(seq: int, batch: int, heads: int, head_dim: int, dtype, block_q: int,
               block_k: int, gpu: bool, repeats: int = 5, num_warps: int | None = None,
               num_stages: int | None = None, xla: bool = True) -> list[dict]:
    """Times every (mask, implementation) against the dense baselines at one length.

    ``bench_rows(512, 1, 2, 128, jnp.bfloat16, 64, 64, gpu=False, repeats=3)`` takes
    seconds on CPU; a bad block size fails before anything is timed. ``num_warps`` /
    ``num_stages`` are the Pallas kernel's Triton launch options (``None``: its defaults);
    ``xla=False`` times only Pallas (GPU) against the dense baselines.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.bench import bench_rows
        >>> bench_rows(512, 1, 2, 128, jnp.bfloat16, 48, 64, gpu=False, repeats=3)
        Traceback (most recent call last):
            ...
        ValueError: block_q=48 must be a power of two >= 16 (Triton tiles are powers of two)
    """
    ks = jax.random.split(jax.random.key(seq), 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in ks)
    masks = _masks(seq, block_q, block_k)
    dense_flops = 4.0 * batch * heads * seq * seq * head_dim
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        factor = 1.0 if mode == "fwd" else 3.5
        fns, meta = {}, {}
        for causal in (False, True):
            fn, impl = _dense_attention(gpu, q, k, v, causal)
            name = f"dense_{impl}" + ("_causal" if causal else "")
            if mode == "fwd+bwd":
                fn = _with_grad(lambda q, k, v, fn=fn: fn(q, k, v), do)
            fns[name] = lambda fn=fn: fn(q, k, v)
            meta[name] = dict(mask="dense" + ("_causal" if causal else ""),
                              density=0.5 if causal else 1.0, impl=name,
                              flops=factor * dense_flops * (0.5 if causal else 1.0))
        baseline = next(n for n in fns if not n.endswith("_causal"))
        for mask_name, m in masks.items():
            density = float(m.block_density)
            impls = ["pallas"] if gpu else []
            width = (m.kv_index_full.shape[-1] + m.kv_index_partial.shape[-1]) * block_k
            if xla and _logits_bytes(batch, heads, seq, width) <= XLA_MEMORY_LIMIT:
                impls.append("xla_blocks")
            if xla and mask_name == "sparsity_90" and _logits_bytes(
                    batch, heads, seq, seq) <= XLA_MEMORY_LIMIT:
                impls.append("xla")
            for impl in impls:
                if impl == "pallas" and (num_warps is not None or num_stages is not None):
                    fn = lambda q, k, v, m=m: block_sparse_attention_pallas(
                        q, k, v, m, num_warps=num_warps, num_stages=num_stages or 2)
                else:
                    fn = lambda q, k, v, m=m, impl=impl: block_sparse_attention(
                        q, k, v, m, implementation=impl)
                fn = jax.jit(fn) if mode == "fwd" else _with_grad(fn, do)
                name = f"{impl}/{mask_name}"
                fns[name] = lambda fn=fn: fn(q, k, v)
                visited = density * (seq // block_q) * (seq // block_k)
                meta[name] = dict(mask=mask_name, density=density, impl=impl,
                                  flops=factor * 4.0 * batch * heads * visited * block_q
                                  * block_k * head_dim)
        timing = interleaved_ms(fns, repeats=repeats)
        base_ms = timing["ms"][baseline]
        for name, ms in timing["ms"].items():
            info = meta[name]
            speedup = base_ms / ms
            ideal = 1.0 / info["density"]
            rows.append({"seq": seq, "batch": batch, "heads": heads, "head_dim": head_dim,
                         "dtype": jnp.dtype(dtype).name, "block_q": block_q,
                         "block_k": block_k, "mode": mode, "name": name, **info,
                         "sparsity": 1.0 - info["density"], "ms": ms,
                         "ms_min": timing["ms_min"][name],
                         "tflops": info["flops"] / (ms * 1e-3) / 1e12,
                         "baseline": baseline, "speedup_vs_dense": speedup,
                         "ideal_speedup": ideal, "fraction_of_ideal": speedup / ideal,
                         "first_call_s": timing["first_call_s"][name]})
    return rows


def print_table(rows: list[dict], gpu: bool) -> None:
    """Prints one line per (seq, mode, implementation, mask).

    Example:

        >>> from sparsejax.kernels.block_sparse_attention.bench import print_table
        >>> row = dict(seq=4096, mode="fwd", name="pallas/sparsity_90", impl="pallas",  # made up
        ...            mask="sparsity_90", sparsity=0.9, ms=1.5, tflops=300.0,
        ...            speedup_vs_dense=6.2, ideal_speedup=10.0, fraction_of_ideal=0.62)
        >>> print_table([row], gpu=True)
           seq     mode               name sparsity         ms  TFLOP/s vs dense  ideal of ideal
          4096      fwd pallas/sparsity_90    90.0%      1.500  300.000    6.20x  10.0x      62%
        GPU targets: >= 5.0x over dense cuDNN at 90% sparsity (fwd and fwd+bwd);
        dense mode >= 0.5x cuDNN.
          seq 4096 fwd sparsity_90: 6.20x (target 5.0x) met
    """
    print(f"{'seq':>6} {'mode':>8} {'name':>26} {'sparsity':>8} {'ms':>10} {'TFLOP/s':>8} "
          f"{'vs dense':>8} {'ideal':>6} {'of ideal':>8}")
    for r in rows:
        print(f"{r['seq']:>6} {r['mode']:>8} {r['name']:>26} {r['sparsity']:>8.1%} "
              f"{r['ms']:>10.3f} {r['tflops']:>8.3f} {r['speedup_vs_dense']:>7.2f}x "
              f"{r['ideal_speedup']:>5.1f}x {r['fraction_of_ideal']:>8.0%}")
    print(f"GPU targets: >= {TARGETS['speedup_vs_cudnn_at_90']}x over dense cuDNN at 90% "
          f"sparsity (fwd and fwd+bwd); dense mode >= {TARGETS['dense_mode_vs_cudnn']}x cuDNN.")
    if not gpu:
        print("CPU run: Pallas is not timed (interpret mode only); targets apply to GPU.")
        return
    for r in rows:
        if r["impl"] != "pallas" or r["mask"] not in ("sparsity_90", "sparsity_0"):
            continue
        goal = TARGETS["speedup_vs_cudnn_at_90" if r["mask"] == "sparsity_90"
                       else "dense_mode_vs_cudnn"]
        status = "met" if r["speedup_vs_dense"] >= goal else "MISSED"
        print(f"  seq {r['seq']} {r['mode']} {r['mask']}: {r['speedup_vs_dense']:.2f}x "
              f"(target {goal}x) {status}")


def main(argv=None) -> None:
    """Command line: runs the bench, prints the table, writes the JSON.

    ``main(["--quick", "--out=/tmp/bsa.json"])`` runs the quick bench (< 1 min on CPU). A
    bad argument fails before anything is timed or written.

    Example:

        >>> import os, tempfile
        >>> from sparsejax.kernels.block_sparse_attention.bench import main
        >>> tmp = tempfile.TemporaryDirectory()
        >>> main(["--quick", "--block_q=48", f"--out={tmp.name}/bsa.json"])
        Traceback (most recent call last):
            ...
        ValueError: block_q=48 must be a power of two >= 16 (Triton tiles are powers of two)
        >>> os.listdir(tmp.name)
        []
        >>> tmp.cleanup()
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, < 1 min on CPU")
    p.add_argument("--seqs", type=str, default=None, help="comma list (4096,16384; quick 512,1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="query heads (16; quick 2)")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--block_q", type=int, default=None, help="128 (quick 64)")
    p.add_argument("--block_k", type=int, default=None, help="64 (quick 64)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--num_warps", type=int, default=None,
                   help="Pallas num_warps (default: the kernel's, 8 for head_dim 128)")
    p.add_argument("--num_stages", type=int, default=None, help="Pallas num_stages (2)")
    p.add_argument("--pallas_only", action="store_true",
                   help="time only Pallas (GPU) against the dense baselines, no XLA paths")
    p.add_argument("--out", type=str, default=None,
                   help="JSON path (default experiments/results/"
                        "kernel_block_sparse_attention_<platform>.json)")
    args = p.parse_args(argv)
    gpu = on_gpu()
    seqs = [int(s) for s in (args.seqs or ("512,1024" if args.quick else "4096,16384"))
            .split(",")]
    heads = args.heads or (2 if args.quick else 16)
    block_q = args.block_q or (64 if args.quick else 128)
    block_k = args.block_k or 64
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    for seq in seqs:
        rows += bench_rows(seq, args.batch, heads, args.head_dim, jnp.bfloat16, block_q,
                           block_k, gpu, repeats, num_warps=args.num_warps,
                           num_stages=args.num_stages, xla=not args.pallas_only)
    print_table(rows, gpu)
    out = args.out or ("experiments/results/kernel_block_sparse_attention_"
                       f"{jax.default_backend()}.json")
    note = ("GPU: compiled Pallas kernel timed." if gpu else
            "CPU: Pallas runs only in interpret mode here (meaningless for speed) and is not "
            "timed; the XLA paths are timed: 'xla' (dense masked, no skipping) and "
            "'xla_blocks' (gathers only the visited key blocks, each query block padded to "
            "the largest count: no saving on causal). Numbers are for the record.")
    path = write_json(out, {"note": note, "targets_gpu": TARGETS, "quick": args.quick,
                            "pallas_options": {"num_warps": args.num_warps,
                                               "num_stages": args.num_stages},
                            "pallas_only": args.pallas_only,
                            "flops_convention": "fwd 4*B*H*visited*bq*bk*D; fwd+bwd 3.5x fwd",
                            "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
