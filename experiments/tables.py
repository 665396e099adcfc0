"""Shared pieces of the results-table scripts (``experiments/dst_table.py``,
``experiments/nm_table.py``).

Each script trains a grid of ``configs/quickstart.py`` runs and writes a JSON file with
every per-seed number plus a Markdown page. This module holds what they have in common:

- ``run_config``: one ``train_and_evaluate`` call in a temporary workdir (deleted
  afterwards), returning the summary and the ``metrics.jsonl`` rows;
  ``final_state_hook`` keeps the host copy of the last step's state.
- ``mean_std``/``pm`` (mean ± sample std, ddof = 1), ``group``, ``finite`` (NaN → None
  so the JSON is strict).
- ``machine`` (CPU, devices, versions, git commit) and ``command``.
- ``dense_flops``: per-example inference FLOPs of a config's model by parameter path.
- Markdown: ``header`` (title, command, machine line), ``md_table``, ``reading_section``
  and ``existing_reading``: the "Reading" is prose written by a person, kept between the
  ``reading:begin``/``reading:end`` markers across reruns.
- ``run_plan`` (the tqdm loop over runs), ``write_outputs`` and ``render_only``.

Example::

    from experiments import tables
    summary, rows = tables.run_config(quickstart.get_config('nm_ste,2:4'))
    tables.pm([0.98, 0.99, 0.97], 100)   # '98.00 ± 1.00'
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from absl import logging

READING_BEGIN, READING_END = "<!-- reading:begin -->", "<!-- reading:end -->"


# ----------------------------------------------------------------------------- running


def start(argv) -> None:
    """The common start of a table script's ``main``: no stray arguments, quiet orbax.

    Example::

        def main(argv):
            tables.start(argv)
    """
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO


def final_state_hook(num_steps: int, into: dict) -> Callable:
    """A ``train_and_evaluate`` hook that stores the host copy of the state after the
    last step as ``into['state']`` (params, optimizer/sparsity state, step, rng)."""
    import jax

    def hook(step, state):
        if step == num_steps:
            into["state"] = jax.device_get(state)

    return hook


def run_config(config, *, hooks: Sequence[Callable] = (), prefix: str = "table_"
               ) -> tuple[dict, list[dict]]:
    """Trains ``config`` in a temporary workdir that is deleted afterwards.

    Returns the loop's summary and the rows of its ``metrics.jsonl`` (train and eval).
    """
    from sparsejax.train import train_and_evaluate
    from sparsejax.train.metrics import read_jsonl

    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        summary = train_and_evaluate(config, workdir, hooks=list(hooks), progress=False)
        rows = read_jsonl(Path(workdir) / "metrics.jsonl")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summary, rows


def run_plan(plan: Sequence[tuple], run: Callable[..., dict], describe: Callable[[tuple], str],
             report: Callable[[dict], str]) -> tuple[list[dict], float]:
    """Calls ``run(*item)`` for every item of ``plan`` under a tqdm bar, writing
    ``describe(item) + report(result)`` after each; returns the results and the wall time."""
    from tqdm.auto import tqdm

    runs, t0 = [], time.time()
    bar = tqdm(plan, desc="runs", unit="run", dynamic_ncols=True)
    for item in bar:
        bar.set_postfix_str(describe(item))
        runs.append(r := run(*item))
        bar.write(f"{describe(item)} {report(r)}")
    return runs, time.time() - t0


def dense_flops(config) -> dict:
    """Per-example inference FLOPs of the config's model, by parameter path."""
    import jax.numpy as jnp
    from flax import nnx

    from sparsejax import flops
    from sparsejax.models import build_model
    from sparsejax.train.data import get_dataset

    info = get_dataset(config.data).info
    model = build_model(config.model, info, nnx.Rngs(params=0))
    x = jnp.ones((1, *info.input_shape), jnp.float32)
    return flops.model_flops(model, lambda m: m(x))


# ----------------------------------------------------------------------------- statistics


def finite(x):
    """NaN (the std of one seed) → None, recursively, so the JSON is strict."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def pm(xs: Sequence[float], scale: float = 1.0, digits: int = 2, fmt: str = "f") -> str:
    """``'mean ± std'`` of ``xs × scale`` (just the mean for one value)."""
    m, s = mean_std([x * scale for x in xs])
    spec = f".{digits}{fmt}"
    return f"{m:{spec}}" if math.isnan(s) else f"{m:{spec}} ± {s:{spec}}"


def group(runs: Iterable[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Runs grouped by the values of ``keys``, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# ----------------------------------------------------------------------------- provenance


def machine() -> dict:
    """CPU, JAX backend and devices, library versions and the git commit."""
    import flax
    import jax
    import optax

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
        commit = head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "git_commit": commit}


def command(module: str) -> str:
    """The command line that ran this script, as ``python -m <module> <args>``."""
    return " ".join([f"python -m {module}", shlex.join(sys.argv[1:])]).rstrip()


# ----------------------------------------------------------------------------- markdown


def header(title: str, result: dict) -> list[str]:
    """Title, the command in a code block, and the machine line (from ``result``'s
    ``command``, ``machine``, ``runs`` and ``total_time_s``)."""
    mach = result["machine"]
    return [
        f"# {title}",
        "",
        "Made by (from the repository root):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Machine: {mach['cpu']} ({mach['cpu_count']} cores), {mach['platform']} "
        f"({mach['num_devices']} device), Python {mach['python']}, jax {mach['jax']}, flax "
        f"{mach['flax']}, optax {mach['optax']}; git {mach['git_commit']}. "
        f"{len(result['runs'])} runs in {result['total_time_s'] / 60:.1f} min.",
        "",
    ]


def md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: header, separator, one line per row."""
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def reading_section(reading: str | None, sentences: str = "3–5") -> list[str]:
    """The "## Reading" section: the kept prose between the markers, or a placeholder."""
    return ["", "## Reading", "", READING_BEGIN,
            reading.strip() if reading else f"_Not written yet: add a {sentences} sentence "
            "reading of the numbers above between these markers._",
            READING_END, ""]


def existing_reading(path: Path) -> str | None:
    """The hand-written Reading of an existing Markdown file (None if absent or a
    placeholder)."""
    if not path.exists():
        return None
    text = path.read_text()
    if READING_BEGIN not in text or READING_END not in text:
        return None
    body = text.split(READING_BEGIN, 1)[1].split(READING_END, 1)[0].strip()
    return None if body.startswith("_Not written yet") else body


_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]")


def dumps(result: dict, compact_number_lists: bool = False) -> str:
    """Strict JSON with an indent of 2; ``compact_number_lists`` puts every list of
    plain numbers on one line (training curves)."""
    text = json.dumps(result, indent=2, allow_nan=False)
    if compact_number_lists:
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(
            x.strip() for x in m.group(1).split(",")) + "]", text)
    return text + "\n"


def write_outputs(result: dict, out_md: Path, out_json: Path,
                  markdown: Callable[[dict, str | None], str],
                  compact_number_lists: bool = False) -> None:
    """Writes strict JSON (NaN → null) and the Markdown, keeping the existing Reading of
    ``out_md`` with a warning to check it against the new numbers."""
    result = finite(result)
    reading = existing_reading(out_md)
    if reading:
        logging.warning("kept the hand-written Reading of %s: check it against the new "
                        "numbers", out_md)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(dumps(result, compact_number_lists))
    out_md.write_text(markdown(result, reading))


def render_only(out_md: Path, out_json: Path, markdown: Callable[[dict, str | None], str]
                ) -> dict[str, Any]:
    """Rewrites ``out_md`` from the existing ``out_json`` (no training); returns the JSON."""
    result = json.loads(out_json.read_text())
    out_md.write_text(markdown(result, existing_reading(out_md)))
    print(f"wrote {out_md} from {out_json}")
    return result
