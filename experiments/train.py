"""Train from a config file.

    python -m experiments.train --config configs/quickstart.py --workdir runs/quickstart
    python -m experiments.train --config configs/quickstart.py:tiny --workdir /tmp/qs \
        --config.num_steps=50

Logs are quiet: a progress bar, the summary, and one ``error: ...`` line (exit 1) if the
run fails; ``--verbose`` shows library logs and full tracebacks. SIGTERM saves a
checkpoint and exits with 143; rerun the same command to resume.

Multi-host: JAX's own runtime. With no flags, ``jax.distributed.initialize()`` auto-detects
clusters (SLURM, TPU pods) when ``--multihost`` is given; on plain machines pass
``--coordinator_address=host:port --num_processes=N --process_id=i``.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparsejax.train import train_and_evaluate
from sparsejax.train.loop import Preempted
from sparsejax.train.workdir import failure_line

config_flags.DEFINE_config_file("config", None, "config file (path.py or path.py:arg)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (auto-detect)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.DEFINE_bool("verbose", False, "library logs (orbax, jax) and full tracebacks")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.ERROR)
    if FLAGS.coordinator_address or FLAGS.multihost:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    try:
        summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(143)
    except Exception as e:  # one line; --verbose for the traceback
        if FLAGS.verbose:
            raise
        print(failure_line(e), file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        width = max(len(k) for k in summary)
        print("\n== summary ==")
        for k, v in summary.items():
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    app.run(main)
