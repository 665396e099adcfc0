"""What weight sparsity costs: masked vs dense train step, and mask-update time vs size.

    python -m experiments.bench_sparsity                      # default run (~6 min, 2-core CPU)
    python -m experiments.bench_sparsity --quick              # smoke run (< 1 min on CPU)
    python -m experiments.bench_sparsity --out=experiments/results/bench_sparsity_cpu.json
    python -m experiments.bench_sparsity --hidden=2048,2048 --sizes_m=1,16,100 --rounds=5

Part 1, train step. The real trainer (``make_trainer``: jit, shardings, donation) on
``configs/quickstart.py`` (MLP on the embedded digits) widened to ``--hidden``, with
sparsity 'dense' (plain optax), 'static' and 'rigl' (``--selection`` picks their
``topk_mask`` method). RigL is configured so that no timed step is a mask-update step
(``begin_step = update_every = 10**9``): the numbers are the steady-state cost of
``W ⊙ m`` in the forward pass, the masked gradient and the ``lax.cond`` on the step
counter (the run checks that its masks never changed). Windows of ``--steps`` steps
of every variant are interleaved for ``--rounds`` rounds (the order rotates each
round) so that machine noise hits all variants alike; ``ratio`` is a variant's median
over the dense median, ``paired_ratio`` the median over rounds of the same-round
ratio, ``ratio_vs_static`` its median over static's. 'rigl_update' (every step fires
the drop/grow update, ``update_every=1``) is reported the same way as extra
information; its windows are ``--update_steps`` long.

Part 2, mask update. One RigL drop/grow on a single ``[n/1000, 1000]`` layer at
``--sparsity`` with drop fraction ``--drop_fraction``, as ``sparsejax.dst`` does it:
keep the largest ``|w| + noise`` (σ = 1e-5) among active weights, grow the largest
``|g|`` among the rest, for ``n`` in ``--sizes_m`` (millions of parameters) and each
``topk_mask`` method ('sort', 'threshold'). Compile time is excluded (ahead-of-time
compile, then a warm-up call); the time is the median of up to ``--update_repeats``
further calls, fewer once a point has used ``--point_budget_s`` seconds; where the
warm-up call alone used the budget it is the only sample (``warm_up_only``, marked
``*`` in the table). Both methods must give identical masks with exact counts; that
is checked at every size, recorded in the JSON, and the run fails (after writing the
JSON) if it does not hold.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from configs import quickstart
from sparsejax.masks import topk_mask
from sparsejax.train import make_trainer
from sparsejax.train.data import BatchIterator

flags.DEFINE_bool("quick", False, "tiny smoke run (< 1 min); explicit flags still win")
flags.DEFINE_list("hidden", ["1024", "1024"], "MLP hidden widths for the train-step part")
flags.DEFINE_integer("batch_size", 128, "train-step batch size")
flags.DEFINE_float("sparsity", 0.9, "sparsity of the sparse variants and the mask update")
flags.DEFINE_integer("steps", 20, "steps per timed window (non-update variants)")
flags.DEFINE_integer("update_steps", 2, "steps per timed window of 'rigl_update'")
flags.DEFINE_integer("rounds", 9, "interleaved rounds of windows (medians are reported)")
flags.DEFINE_enum("selection", "threshold", ["sort", "threshold"],
                  "topk_mask method of the sparse train-step variants (config.method.selection)")
flags.DEFINE_list("sizes_m", ["1", "4", "16", "64", "100"],
                  "layer sizes for the mask-update part, in millions of parameters")
flags.DEFINE_list("methods", ["sort", "threshold"], "topk_mask selection methods to time")
flags.DEFINE_float("drop_fraction", 0.3, "fraction of active weights dropped and regrown")
flags.DEFINE_integer("update_repeats", 3, "timed calls per mask-update point (at most)")
flags.DEFINE_float("point_budget_s", 45.0, "stop repeating a mask-update point after this")
flags.DEFINE_bool("skip_step", False, "skip part 1 (train step)")
flags.DEFINE_bool("skip_update", False, "skip part 2 (mask update vs size)")
flags.DEFINE_string("out", "runs/bench_sparsity.json", "where to write the JSON")
FLAGS = flags.FLAGS

QUICK = dict(hidden=["256", "256"], steps=5, update_steps=2, rounds=3,
             sizes_m=["0.05", "0.2"], update_repeats=2, point_budget_s=5.0)
VARIANTS = ("dense", "static", "rigl", "rigl_update")
NEVER = 10**9  # a step count no benchmark reaches (and int32 can hold)


# ----------------------------------------------------------------------------- part 1


def step_config(variant: str, hidden, batch_size: int, sparsity: float,
                selection: str = "threshold"):
    """The quickstart config widened to ``hidden``, with ``variant``'s sparsity settings.

    'rigl' never updates its masks during the benchmark; 'rigl_update' updates on every
    step (drop fraction ≈ its initial value, since the anneal ends at ``10**9``).

    Example::

        step_config('rigl', (1024, 1024), 128, 0.9).method.begin_step   # 10**9
    """
    name = "rigl" if variant == "rigl_update" else variant
    c = quickstart.get_config(name if name == "dense" else f"{name},{sparsity}")
    c.model.hidden = tuple(int(h) for h in hidden)
    c.batch_size = batch_size
    if "selection" in c.method:  # the sparse variants (dense has no masks)
        c.method.selection = selection
    if variant == "rigl":
        c.method.update_every, c.method.begin_step, c.method.end_step = NEVER, NEVER, NEVER
    elif variant == "rigl_update":
        c.method.update_every, c.method.begin_step, c.method.end_step = 1, 0, NEVER
    return c


class _Runner:
    """One variant's trainer, live state and device batches, stepped in timed windows."""

    def __init__(self, variant: str, config):
        self.variant, self.config = variant, config
        self.trainer = t = make_trainer(config)
        with jax.set_mesh(t.mesh):
            self.state = t.init(jax.random.PRNGKey(0))
            it = BatchIterator(t.dataset.train, config.batch_size, 0)
            self.batches = [t.device_batch(next(it)) for _ in range(4)]
            self.masks0 = jax.tree.map(lambda m: m.copy(), self.state.opt_state.masks) \
                if hasattr(self.state.opt_state, "masks") else None
            t0 = time.perf_counter()
            self.state, stats = t.step(self.state, self.batches[0])
            jax.block_until_ready(stats)
            self.compile_s = time.perf_counter() - t0
            self.state, stats = t.step(self.state, self.batches[1])  # one warm step
            jax.block_until_ready(stats)
        self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
        self.windows_ms: list[float] = []

    def window(self, steps: int) -> float:
        """Runs ``steps`` steps, blocks, records and returns the mean ms per step."""
        with jax.set_mesh(self.trainer.mesh):
            t0 = time.perf_counter()
            for i in range(steps):
                self.state, stats = self.trainer.step(self.state,
                                                      self.batches[i % len(self.batches)])
            jax.block_until_ready((self.state, stats))
        ms = 1e3 * (time.perf_counter() - t0) / steps
        self.windows_ms.append(ms)
        return ms

    def masks_changed(self) -> bool | None:
        """Whether any mask differs from the one after ``init`` (None for dense)."""
        if self.masks0 is None:
            return None
        now = self.state.opt_state.masks
        return any(not bool(jnp.array_equal(a, b)) for a, b in
                   zip(jax.tree.leaves(self.masks0), jax.tree.leaves(now)))


def bench_steps(hidden, batch_size: int, sparsity: float, steps: int, update_steps: int,
                rounds: int, selection: str = "threshold") -> dict:
    """Part 1: interleaved windows of every variant's train step; medians and ratios.

    Example::

        bench_steps((1024, 1024), 128, 0.9, steps=20, update_steps=3, rounds=7)['rigl']
    """
    runners = {v: _Runner(v, step_config(v, hidden, batch_size, sparsity, selection))
               for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            runners[v].window(update_steps if v == "rigl_update" else steps)
    dense = runners["dense"].windows_ms
    dense_med = statistics.median(dense)
    static_med = statistics.median(runners["static"].windows_ms)
    out = {}
    for v, run in runners.items():
        med = statistics.median(run.windows_ms)
        out[v] = {
            "params": run.params, "compile_s": run.compile_s, "step_ms": med,
            "step_ms_min": min(run.windows_ms), "windows_ms": run.windows_ms,
            "steps_per_window": update_steps if v == "rigl_update" else steps,
            "ratio": med / dense_med, "ratio_vs_static": med / static_med,
            "paired_ratio": statistics.median(a / b for a, b in zip(run.windows_ms, dense)),
            "masks_changed": run.masks_changed()}
    if out["rigl"]["masks_changed"] or out["rigl_update"]["masks_changed"] is False:
        raise AssertionError("mask-update schedule is not what the benchmark assumes: "
                             f"rigl changed={out['rigl']['masks_changed']}, rigl_update "
                             f"changed={out['rigl_update']['masks_changed']}")
    return out


# ----------------------------------------------------------------------------- part 2


def drop_and_grow(w, g, m, key, *, method: str, drop_fraction: float,
                  noise_std: float = 1e-5):
    """One RigL drop/grow on one layer, as in ``sparsejax.dst``: returns (kept, grown).

    ``n_drop = ⌊f · n_active⌋``; keep the ``n_active − n_drop`` largest ``|w| + noise``
    among active weights, grow ``n_drop`` of the largest ``|g|`` among the rest.

    Example::

        kept, grown = drop_and_grow(w, g, m, key, method='threshold', drop_fraction=0.3)
    """
    n_active = jnp.sum(m, dtype=jnp.int32)
    n_drop = jnp.floor(drop_fraction * n_active.astype(jnp.float32)).astype(jnp.int32)
    score = jnp.abs(w) + noise_std * jax.random.normal(key, w.shape)
    kept = topk_mask(score, n_active - n_drop, eligible=m, method=method)
    grown = topk_mask(jnp.abs(g), n_drop, eligible=~kept, method=method)
    return kept, grown


def layer_inputs(n: int, sparsity: float, seed: int = 0):
    """A ``[n/1000, 1000]`` layer: weights (0 where inactive), dense grads, mask, key.

    The mask keeps each weight with probability ``1 - sparsity``.

    Example::

        w, g, m, key = layer_inputs(10**6, 0.9)
    """
    shape = (max(1, round(n / 1000)), 1000)
    k_m, k_w, k_g, key = jax.random.split(jax.random.PRNGKey(seed), 4)
    m = jax.random.bernoulli(k_m, 1.0 - sparsity, shape)
    w = jnp.where(m, jax.random.normal(k_w, shape), 0.0)
    g = jax.random.normal(k_g, shape)
    return jax.block_until_ready((w, g, m, key))


def time_update(n: int, methods, sparsity: float, drop_fraction: float, repeats: int,
                budget_s: float) -> dict:
    """Part 2 at one size: compile and call times per method, and the masks' agreement.

    Example::

        time_update(10**6, ['sort', 'threshold'], 0.9, 0.3, repeats=3, budget_s=30)
    """
    w, g, m, key = layer_inputs(n, sparsity)
    n_active = int(jnp.sum(m))
    n_drop = int(np.floor(np.float32(drop_fraction) * np.float32(n_active)))  # as in jit
    row = {"params": int(w.size), "shape": list(w.shape), "n_active": n_active,
           "n_drop": n_drop, "methods": {}}
    masks = {}
    for method in methods:
        fn = jax.jit(lambda w, g, m, k, method=method: drop_and_grow(
            w, g, m, k, method=method, drop_fraction=drop_fraction))
        t0 = time.perf_counter()
        compiled = fn.lower(w, g, m, key).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept, grown = jax.block_until_ready(compiled(w, g, m, key))
        first_s = time.perf_counter() - t0
        spent, last, times = first_s, first_s, []
        while len(times) < repeats and spent + last <= budget_s:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(w, g, m, key))
            last = time.perf_counter() - t0
            times.append(last)
            spent += last
        warm_up_only = not times  # one call already used the budget: it is the sample
        counts_ok = (int(jnp.sum(kept)) == n_active - n_drop and int(jnp.sum(grown)) == n_drop
                     and not bool(jnp.any(kept & grown)) and not bool(jnp.any(kept & ~m)))
        row["methods"][method] = {"compile_s": compile_s, "first_call_s": first_s,
                                  "times_s": times or [first_s], "warm_up_only": warm_up_only,
                                  "median_s": statistics.median(times or [first_s]),
                                  "exact_counts": counts_ok}
        masks[method] = (kept, grown)
    ref = masks[methods[0]]
    row["identical_masks"] = all(
        bool(jnp.array_equal(ref[0], k)) and bool(jnp.array_equal(ref[1], gr))
        for k, gr in masks.values())
    return row


# ----------------------------------------------------------------------------- main


def _apply_quick() -> None:
    """Sets the ``QUICK`` values of every flag not given on the command line."""
    for name, value in QUICK.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def main(argv):
    """Runs both parts, prints a table per part and writes ``--out``."""
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.quick:
        _apply_quick()
    unknown = set(FLAGS.methods) - {"sort", "threshold"}
    if unknown or not FLAGS.methods:
        raise app.UsageError(f"--methods: unknown {sorted(unknown)}; known: sort, threshold")
    t_start = time.perf_counter()
    hidden = tuple(int(h) for h in FLAGS.hidden)
    settings = {k: FLAGS[k].value for k in (
        "quick", "hidden", "batch_size", "sparsity", "steps", "update_steps", "rounds",
        "selection", "sizes_m", "methods", "drop_fraction", "update_repeats",
        "point_budget_s", "skip_step", "skip_update")}
    out = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
           "num_devices": jax.device_count(), "jax": jax.__version__,
           "host": platform.node(), "settings": settings}

    if not FLAGS.skip_step:
        print(f"train step: MLP hidden={hidden} batch={FLAGS.batch_size} sparsity="
              f"{FLAGS.sparsity}, {FLAGS.rounds} interleaved rounds", flush=True)
        steps = bench_steps(hidden, FLAGS.batch_size, FLAGS.sparsity, FLAGS.steps,
                            FLAGS.update_steps, FLAGS.rounds, FLAGS.selection)
        out["train_step"] = steps
        print(f"{'variant':12s} {'params':>10s} {'step_ms':>9s} {'min_ms':>9s} {'ratio':>7s} "
              f"{'paired':>7s} {'/static':>7s} {'compile_s':>9s}")
        for v, r in steps.items():
            print(f"{v:12s} {r['params']:>10,d} {r['step_ms']:9.3f} {r['step_ms_min']:9.3f} "
                  f"{r['ratio']:7.3f} {r['paired_ratio']:7.3f} {r['ratio_vs_static']:7.3f} "
                  f"{r['compile_s']:9.1f}", flush=True)

    ok = True
    if not FLAGS.skip_update:
        print(f"mask update (one drop/grow, sparsity={FLAGS.sparsity}, drop fraction="
              f"{FLAGS.drop_fraction}), seconds per call:", flush=True)
        print(f"{'params':>12s} " + " ".join(f"{m + '_s':>12s}" for m in FLAGS.methods)
              + f" {'identical':>9s} {'exact':>6s}", flush=True)
        rows = []
        for size in FLAGS.sizes_m:
            row = time_update(round(float(size) * 1e6), FLAGS.methods, FLAGS.sparsity,
                              FLAGS.drop_fraction, FLAGS.update_repeats, FLAGS.point_budget_s)
            rows.append(row)
            exact = all(r["exact_counts"] for r in row["methods"].values())
            ok &= row["identical_masks"] and exact
            print(f"{row['params']:>12,d} " + " ".join(
                f"{row['methods'][m]['median_s']:11.4f}"
                + ("*" if row["methods"][m]["warm_up_only"] else " ") for m in FLAGS.methods)
                + f" {str(row['identical_masks']):>9s} {str(exact):>6s}", flush=True)
        if any(r["warm_up_only"] for row in rows for r in row["methods"].values()):
            print("* one call (the warm-up) used the point budget and is the only sample")
        out["mask_update"] = rows
        out["all_masks_identical_and_exact"] = ok

    out["total_s"] = time.perf_counter() - t_start
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {FLAGS.out} ({out['total_s']:.0f} s)")
    if not ok:
        raise AssertionError("sort and threshold selection disagree or miss the exact count; "
                             f"see {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
