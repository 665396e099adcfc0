"""Train-step time and examples/s for each reference model, written as JSON.

    python -m experiments.bench_step                       # all models, this machine
    python -m experiments.bench_step --models=mlp,lm --steps=50 --out=/tmp/bench.json

Each model runs its config's real train step (jit, shardings, donation) on the default
mesh; compile time is reported separately and excluded from the step time, which is
the median over ``--repeats`` timed windows of ``--steps`` steps.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from configs import lm_recall, quickstart, resnet_cifar10, vit_digits
from sparsejax.train import make_trainer
from sparsejax.train.data import BatchIterator

flags.DEFINE_list("models", ["mlp", "resnet", "vit", "lm"], "reference models to time")
flags.DEFINE_integer("steps", 20, "steps per timed window")
flags.DEFINE_integer("repeats", 5, "timed windows (the median is reported)")
flags.DEFINE_integer("batch_size", 0, "override every config's batch size (0: keep)")
flags.DEFINE_string("out", "runs/bench_step.json", "where to write the JSON")
FLAGS = flags.FLAGS


def bench_configs():
    """The config each reference model is timed with (embedded data, no download)."""
    resnet = resnet_cifar10.get_config()
    with resnet.unlocked():
        resnet.data = resnet.data.__class__(dict(name="synthetic_images",
                                                 image_shape=(32, 32, 3), num_classes=10))
    return {"mlp": quickstart.get_config(), "resnet": resnet,
            "vit": vit_digits.get_config(), "lm": lm_recall.get_config()}


def time_model(config, steps: int, repeats: int) -> dict:
    """Compile time, median step time and examples/s of ``config``'s train step."""
    t = make_trainer(config)
    with jax.set_mesh(t.mesh):
        state = t.init(jax.random.PRNGKey(0))
        it = BatchIterator(t.dataset.train, config.batch_size, 0)
        batches = [t.device_batch(next(it)) for _ in range(4)]
        t0 = time.perf_counter()
        state, stats = t.step(state, batches[0])
        jax.block_until_ready(stats)
        compile_s = time.perf_counter() - t0
        windows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(steps):
                state, stats = t.step(state, batches[i % len(batches)])
            jax.block_until_ready((state, stats))
            windows.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(windows)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {"params": n_params, "batch_size": config.batch_size, "compile_s": compile_s,
            "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(windows),
            "examples_per_sec": config.batch_size / step_s}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    configs = bench_configs()
    unknown = set(FLAGS.models) - set(configs)
    if unknown:
        raise app.UsageError(f"unknown models {sorted(unknown)}; known: {sorted(configs)}")
    results = {}
    for name in FLAGS.models:
        cfg = configs[name]
        if FLAGS.batch_size:
            with cfg.unlocked():
                cfg.batch_size = FLAGS.batch_size
        results[name] = r = time_model(cfg, FLAGS.steps, FLAGS.repeats)
        print(f"{name:7s} params={r['params']:>9,d} batch={r['batch_size']:4d} "
              f"step={r['step_ms']:8.2f} ms  {r['examples_per_sec']:10.1f} ex/s  "
              f"(compile {r['compile_s']:.1f} s)", flush=True)
    out = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
           "num_devices": jax.device_count(), "jax": jax.__version__,
           "host": platform.node(), "steps": FLAGS.steps, "repeats": FLAGS.repeats,
           "results": results}
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
