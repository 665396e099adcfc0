"""What the results-table scripts (``experiments/{dst,nm,ift,act}_table.py``) share.

Each script trains a grid of runs and writes a JSON file with every per-seed number and a
Markdown page rendered from that JSON. A script declares two things and calls ``main``:

- a ``Table``: the Markdown page as data (title, setup notes, how runs are grouped into
  rows, the columns and their formats, extra sections, the length of the Reading).
  ``render`` is the one renderer: JSON payload + ``Table`` → Markdown.
- a function of the output paths that returns a ``Sweep`` built from the script's flags:
  the plan of runs, how to run one, how to describe it in the progress bar, and how the
  finished runs become the JSON (``finish``).

``main`` does the rest: ``--render_only`` (Markdown, and the plot where the script has
one, from the existing JSON, no training); otherwise the ``--quick`` output paths, the
tqdm bar over the plan (``run_plan``), the JSON (``command`` and ``machine`` first), the
Markdown and the plot.

Other pieces:

- ``run_config``: one ``train_and_evaluate`` call in a temporary workdir (deleted
  afterwards), returning the summary and the ``metrics.jsonl`` rows;
  ``final_state_hook`` keeps the host copy of the last step's state.
- ``mean_std``/``pm`` (mean ± sample std, ddof = 1), ``group``, ``finite`` (NaN → None
  so the JSON is strict).
- ``machine`` (CPU, devices, versions, git commit) and ``command``.
- ``dense_flops``: per-example inference FLOPs of a config's model by parameter path.
- ``Task``, ``task_config`` and ``select_task``: what a ``--task`` flag trains (config,
  page stem, metric, shortened schedule) and where its page goes.
- ``verdict``, ``verdict_line`` and ``claims``: a paper's claim judged from paired seeds.
- Markdown: ``header`` (title, command, machine line), ``md_table``, ``reading_section``
  and ``existing_reading``: the "Reading" is prose written by a person, kept between the
  ``reading:begin``/``reading:end`` markers across reruns.

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
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from absl import app, flags, logging
from flax import nnx
from tqdm.auto import tqdm

from sparsejax import flops
from sparsejax.train import build_model, train_and_evaluate
from sparsejax.train.data import get_dataset
from sparsejax.train.metrics import read_jsonl

FLAGS = flags.FLAGS
READING_BEGIN, READING_END = "<!-- reading:begin -->", "<!-- reading:end -->"


# ----------------------------------------------------------------------------- running


def start(argv) -> None:
    """The common start of a table script's ``main``: no stray arguments, quiet orbax."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO


def final_state_hook(num_steps: int, into: dict) -> Callable:
    """A ``train_and_evaluate`` hook that stores the host copy of the state after the
    last step as ``into['state']`` (params, optimizer/sparsity state, step, rng)."""

    def hook(step, state):
        if step == num_steps:
            into["state"] = jax.device_get(state)

    return hook


def run_config(config, *, hooks: Sequence[Callable] = (), prefix: str = "table_"
               ) -> tuple[dict, list[dict]]:
    """Trains ``config`` in a temporary workdir that is deleted afterwards.

    Returns the loop's summary and the rows of its ``metrics.jsonl`` (train and eval).
    """
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        summary = train_and_evaluate(config, workdir, hooks=list(hooks), progress=False)
        rows = read_jsonl(Path(workdir) / "metrics.jsonl")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summary, rows


def _quiet_worker() -> None:
    logging.set_verbosity(logging.WARNING)


def run_plan(plan: Sequence[tuple], run: Callable[..., dict], describe: Callable[[tuple], str],
             report: Callable[[dict], str], jobs: int = 1) -> tuple[list[dict], float]:
    """Calls ``run(*item)`` for every item of ``plan`` under a tqdm bar, writing
    ``describe(item) + report(result)`` after each; returns the results (in plan order)
    and the wall time. ``jobs > 1`` runs that many items at once in fresh processes
    (``run`` must then be picklable: a module-level function or a ``partial`` of one);
    a small model on a 2-core CPU keeps only about 1.3 cores busy."""
    t0 = time.time()
    bar = tqdm(total=len(plan), desc="runs", unit="run", dynamic_ncols=True)
    if jobs <= 1:
        runs = []
        for item in plan:
            bar.set_postfix_str(describe(item))
            runs.append(r := run(*item))
            bar.write(f"{describe(item)} {report(r)}")
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_quiet_worker) as pool:
            futures = {pool.submit(run, *item): i for i, item in enumerate(plan)}
            done: dict[int, dict] = {}
            for f in as_completed(futures):
                i = futures[f]
                done[i] = f.result()
                bar.write(f"{describe(plan[i])} {report(done[i])}")
                bar.update(1)
        runs = [done[i] for i in range(len(plan))]
    bar.close()
    return runs, time.time() - t0


@dataclass(frozen=True)
class Task:
    """What a table trains: its config file and module, its output stem, the metric its
    claims are judged on, and the table's changes to the config: ``num_steps``,
    ``batch_size``, ``eval_every`` and ``method.update_every`` (where the method has it).

    Example::

        Task('configs/lm_bytes.py', lm_bytes, 'nm_lm', 'eval_loss', False,
             {'num_steps': 500, 'batch_size': 16, 'eval_every': 0})
    """
    config: str
    module: ModuleType
    stem: str
    metric: str
    higher_is_better: bool
    overrides: dict = field(default_factory=dict)

    @property
    def lm(self) -> bool:
        """Whether the task is a language model (judged on eval loss, in bits per byte)."""
        return self.metric == "eval_loss"


def task_config(task: Task, arg: str | None, num_steps: int = 0):
    """The task's config for ``arg`` with the table's overrides (``num_steps`` > 0 wins;
    ``eval_every = 0`` evaluates after the last step only)."""
    config = task.module.get_config(arg)
    config.num_steps = num_steps or task.overrides.get("num_steps", config.num_steps)
    config.eval_every = task.overrides.get("eval_every", config.eval_every)
    config.batch_size = task.overrides.get("batch_size", config.batch_size)
    if "update_every" in task.overrides and "update_every" in config.method:
        config.method.update_every = task.overrides["update_every"]
    return config


LM_DATA_NOTE = ("Data: the pinned standard-library corpus (`stdlib_bytes`: 167 modules, 4.7 MB; "
                "every file's last 10% is eval), windows of {cfg[data][seq_len]} bytes; eval "
                "over the whole eval split. Bits per byte = loss / ln 2.")
"""The LM pages' setup note on the data (a ``Table.setup`` template)."""


def model_summary(config) -> str:
    """One line on a table config's model: the byte LM's or the digits MLP's shape.

    Example::

        model_summary(lm_bytes.get_config())   # 'decoder LM, 2 layers, d_model 128, ...'
    """
    m = config.model
    if config.model_name == "lm":
        return (f"decoder LM, {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} "
                f"heads, d_ff {m.d_ff}, {m.activation}, bytes (vocabulary 256), "
                f"context {config.data.seq_len}")
    return f"MLP {' → '.join(map(str, (64, *m.hidden, 10)))}, {m.activation}"


def select_task(tasks: dict[str, Task]) -> Task:
    """The ``--task`` flag's task: points ``--out_md``/``--out_json``/``--out_png`` left
    at their defaults to the task's page (``docs/results/<stem>.*``), and with
    ``--render_only`` refuses a JSON made by another task (the page would describe other
    runs)."""
    task = tasks[FLAGS.task]
    stem = Path(FLAGS["out_json"].default).stem  # the script's default page
    for name in ("out_md", "out_json", "out_png"):
        if name in FLAGS:
            old = Path(FLAGS[name].default)
            FLAGS.set_default(name, str(old.with_name(old.name.replace(stem, task.stem, 1))))
    if FLAGS.render_only:
        made = json.loads(Path(FLAGS.out_json).read_text())["config"].get("task", "digits")
        if made != FLAGS.task:
            raise app.UsageError(f"{FLAGS.out_json} holds --task={made} runs; render it "
                                 f"with --task={made}, not --task={FLAGS.task}")
    return task


def dense_flops(config) -> dict:
    """Per-example inference FLOPs of the config's model, by parameter path (an LM's
    example is one sequence of ``input_shape`` tokens)."""
    info = get_dataset(config.data).info
    model = build_model(config.model_name, config.model, info, nnx.Rngs(params=0))
    x = jnp.ones((1, *info.input_shape), jnp.int32 if info.task == "lm" else jnp.float32)
    return flops.model_flops(model, lambda m: m(x))


@dataclass(frozen=True)
class Outputs:
    """Where a script writes: ``--out_md``, ``--out_json`` and ``--out_png`` (None for
    scripts without a plot)."""
    md: Path
    json: Path
    png: Path | None = None


def outputs(quick: bool) -> Outputs:
    """The output flags; with ``quick``, those left at their defaults go to
    ``runs/<name>_quick…`` (``docs/results/nm_digits_flip_rate.png`` →
    ``runs/nm_digits_quick_flip_rate.png``) instead of ``docs/``."""
    stem = Path(FLAGS["out_json"].default).stem

    def path(name: str) -> Path | None:
        if name not in FLAGS:
            return None
        p = Path(FLAGS[name].value)
        if quick and FLAGS[name].using_default_value:
            p = Path("runs") / p.name.replace(stem, f"{stem}_quick", 1)
        return p

    return Outputs(path("out_md"), path("out_json"), path("out_png"))


@dataclass(frozen=True)
class Sweep:
    """One table's runs, built from its flags: ``run(*item)`` for every ``item`` of
    ``plan``; ``describe(item)`` and ``report(run)`` make the progress lines;
    ``finish(runs, total_time_s)`` returns the JSON after ``command`` and ``machine``;
    ``jobs`` runs at once (``run_plan``)."""
    plan: Sequence[tuple]
    run: Callable[..., dict]
    describe: Callable[[tuple], str]
    report: Callable[[dict], str]
    finish: Callable[[list[dict], float], dict]
    jobs: int = 1


@dataclass(frozen=True)
class Script:
    """A table script: its module (for the command line in the JSON), its Markdown
    ``Table``, its plot (``plot(result, path)``, or None) and whether its JSON puts every
    list of plain numbers on one line (training curves)."""
    module: str
    table: Table
    plot: Callable[[dict, Path], None] | None = None
    compact_number_lists: bool = False


def main(argv, script: Script, sweep: Callable[[Outputs], Sweep]) -> None:
    """A table script's ``main``: ``--render_only``, or the sweep built by ``sweep`` from
    the (``--quick``-adjusted) output paths, then the JSON, the Markdown and the plot."""
    start(argv)
    if FLAGS.render_only:
        out = outputs(quick=False)
        result = render_only(out.md, out.json, script.table)
        if script.plot is not None:
            script.plot(result, out.png)
            print(f"wrote {out.png}")
        return
    out = outputs(FLAGS.quick)
    s = sweep(out)
    runs, total_time = run_plan(s.plan, s.run, s.describe, s.report, s.jobs)
    result = {"command": command(script.module), "machine": machine(),
              **s.finish(runs, total_time)}
    write_outputs(result, out.md, out.json, script.table, script.compact_number_lists)
    if script.plot is not None:
        script.plot(finite(result), out.png)
    paths = [str(p) for p in (out.md, out.json, out.png) if p is not None]
    print(f"{len(runs)} runs in {total_time:.0f} s; wrote "
          f"{', '.join(paths[:-1])} and {paths[-1]}")


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


def pm(xs: Sequence[float], scale: float = 1.0, digits: int = 2, fmt: str = "f",
       thousands: bool = False) -> str:
    """``'mean ± std'`` of ``xs × scale`` (just the mean for one value); ``thousands``
    adds thousands separators."""
    m, s = mean_std([x * scale for x in xs])
    spec = f"{',' if thousands else ''}.{digits}{fmt}"
    return f"{m:{spec}}" if math.isnan(s) else f"{m:{spec}} ± {s:{spec}}"


def group(runs: Iterable[dict], keys: Sequence[str],
          order: Callable[[tuple], Any] | None = None) -> dict[tuple, list[dict]]:
    """Runs grouped by the values of ``keys``, in first-seen order, or stably sorted by
    ``order(key)``."""
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out if order is None else dict(sorted(out.items(), key=lambda kv: order(kv[0])))


def rank(seq: Sequence, x) -> int:
    """Position of ``x`` in ``seq`` (``len(seq)`` if absent): a sort key for ``order``."""
    return seq.index(x) if x in seq else len(seq)


class Verdict(NamedTuple):
    """A claim's verdict from paired per-seed differences: ``effect`` is their mean (in
    the claim's direction: positive means ``a`` did better), ``half_width`` the one-sided
    95% Student-t bound's distance from it, ``n`` the number of seeds."""
    verdict: str
    effect: float
    half_width: float
    n: int


def verdict(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True,
            margin: float = 0.0) -> Verdict:
    """Whether "``a`` is at least as good as ``b``, less ``margin``" holds, from per-seed
    values paired by position (the same seed in both lists).

    With ``d = a − b`` per seed (``b − a`` when lower is better), mean ``m`` and standard
    error ``se``, and ``h = t(0.95, n − 1) · se``: *reproduced* when ``m − h > −margin``
    (the claim holds at one-sided 95%), *not reproduced* when ``m + h < −margin`` (its
    opposite does), else *inconclusive* (the spread covers both, or one seed). ``margin
    = 0`` tests "a ≥ b"; a positive margin tests "a matches b within margin".

    Example:

        >>> from experiments.tables import verdict
        >>> verdict([0.90, 0.91, 0.92], [0.80, 0.80, 0.81]).verdict      # a clear win
        'reproduced'
        >>> verdict([2.0, 2.1, 2.05], [1.9, 2.0, 1.92], higher_is_better=False).verdict
        'not reproduced'
        >>> verdict([0.5, 0.7, 0.6], [0.6, 0.5, 0.7]).verdict            # overlapping
        'inconclusive'
    """
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError(f"a claim compares paired seeds: got {len(a)} and {len(b)} values")
    d = [(x - y) if higher_is_better else (y - x) for x, y in zip(a, b)]
    n, m = len(d), statistics.fmean(d)
    if n < 2:
        return Verdict("inconclusive", m, math.inf, n)
    h = float(stats.t.ppf(0.95, n - 1)) * statistics.stdev(d) / math.sqrt(n)
    v = ("reproduced" if m - h > -margin else "not reproduced" if m + h < -margin
         else "inconclusive")
    return Verdict(v, m, h, n)


def verdict_line(claim: str, v: Verdict, unit: str = "", scale: float = 1.0,
                 digits: int = 3) -> str:
    """One Markdown bullet: the claim, its verdict, the effect and its spread.

    Example:

        >>> from experiments.tables import verdict, verdict_line
        >>> verdict_line('RigL ≥ SET at 90%', verdict([1.0, 1.1, 1.2], [0.9, 0.9, 1.0]), ' nats')
        '- RigL ≥ SET at 90%: **reproduced** (effect +0.167 nats, one-sided 95% bound ±0.097, 3 seeds)'
    """
    return (f"- {claim}: **{v.verdict}** (effect {v.effect * scale:+.{digits}f}{unit}, "
            f"one-sided 95% bound ±{v.half_width * scale:.{digits}f}, {v.n} seed"
            f"{'s' if v.n != 1 else ''})")


def claims(pairs: Sequence[tuple[str, str]] | Callable[[dict], Sequence[tuple[str, str]]],
           labels: dict[str, str],
           keys: tuple[str, str] = ("method", "sparsity"), levels: str = "sparsities",
           fmt: str = "{:g}", within: str | None = None,
           pairing: str = "same seed: same init and data order") -> Section:
    """Section "Claims": for every level in ``result[levels]`` and pair ``(a, b)``, the
    verdict on "a ≥ b" (``verdict``) from the runs paired by seed, on the metric the
    JSON's config names (``metric``, ``higher_is_better``; eval accuracy in points, eval
    loss in bits per byte). ``keys`` = (compared key, level key) of the runs; with
    ``within`` (a third key, e.g. the method when ``keys[0]`` is the distribution) the
    pairs are compared separately for each of its values. ``pairs`` may be a function
    of the JSON (e.g. every family against dense); dense runs have level None and are
    compared at every level. ``pairing`` says what a shared seed shares."""

    def section(result, ctx):
        cfg, runs = result["config"], result["runs"]
        ps = pairs(result) if callable(pairs) else pairs
        metric, higher = cfg.get("metric", "eval_accuracy"), cfg.get("higher_is_better", True)
        by = {(r[keys[0]], r[keys[1]], r[within] if within else None, r["seed"]): r[metric]
              for r in runs}
        inside = list(dict.fromkeys(w for (a, _, w, _) in by if any(a in p for p in ps)))
        scale, unit, digits = ((100, " points of accuracy", 2) if metric == "eval_accuracy"
                               else (1 / math.log(2), " bits per byte", 4))
        lines = []
        for lv in result[levels]:
            for w in inside:
                for a, b in ps:
                    la, lb = (None if x == "dense" else lv for x in (a, b))  # dense: one level
                    seeds = [k for k in result["seeds"]
                             if (a, la, w, k) in by and (b, lb, w, k) in by]
                    if not seeds:
                        continue
                    v = verdict([by[(a, la, w, k)] for k in seeds],
                                [by[(b, lb, w, k)] for k in seeds], higher_is_better=higher)
                    claim = (f"{labels.get(a, a)} ≥ {labels.get(b, b)}"
                             + (f" ({labels.get(w, w)})" if within else "")
                             + f" at {fmt.format(lv)}")
                    lines.append(verdict_line(claim, v, unit, scale, digits))
        if not lines:
            return []
        better = "higher" if higher else "lower"
        return ["", "## Claims", "",
                f"Verdicts on {metric.replace('_', ' ')} ({better} is better), per-seed "
                f"pairs ({pairing}). The effect is the mean paired "
                "difference in the claim's favour; *reproduced* when its one-sided 95% "
                "Student-t bound is above 0, *not reproduced* when the bound on the other "
                "side is below 0, else *inconclusive* (`experiments.tables.verdict`).", "",
                *lines]

    return section


# ----------------------------------------------------------------------------- provenance


def machine() -> dict:
    """CPU, JAX backend and devices, library versions and the git commit."""
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


# ----------------------------------------------------------------------------- markdown spec

Cell = Callable[[tuple, list[dict]], str]  # (group key, the group's runs) → cell text
Section = Callable[[dict, dict], list[str]]  # (JSON payload, template context) → lines


@dataclass(frozen=True)
class Column:
    """A column of the results table: its header, its cell (see ``level``, ``pm_of``,
    ``mean_of``, ``first_of``) and, optionally, the context flag it needs."""
    head: str
    cell: Cell
    when: str | None = None


@dataclass(frozen=True)
class If:
    """A setup note shown only when the context flag ``flag`` is true (else
    ``otherwise``, if given)."""
    flag: str
    then: str
    otherwise: str | None = None


@dataclass(frozen=True)
class Table:
    """A results page as data; ``render`` turns it and the JSON into Markdown.

    ``setup`` holds ``str.format`` templates (one bullet each, or an ``If``) filled from the
    context: ``cfg`` (the JSON's ``config``), ``result`` (the whole JSON), ``seeds``
    ("0, 1, 2"), ``n_seeds``, ``eval_size``, ``has_flops``, ``dense_flops`` (the integer
    dense total) and what ``context(result)`` adds. The results table has one row per
    ``group_by`` group (first-seen order, or sorted by ``order(key, result)``) and
    ``columns``; ``sections`` follow it (``paired``, ``image``, ``text`` or any
    function of ``(result, context)``), then the Reading (``reading``: its length in
    sentences for the placeholder)."""
    title: str
    setup: Sequence[str | If]
    group_by: tuple[str, ...]
    columns: Sequence[Column]
    sections: Sequence[Section] = ()
    order: Callable[[tuple, dict], Any] | None = None
    context: Callable[[dict], dict] | None = None
    reading: str = "3–5"


def level(i: int, fmt: str = "{}", labels: dict | None = None) -> Cell:
    """Cell: the group key's ``i``-th value as ``fmt.format(label, value)`` ("—" for
    None), ``label`` from ``labels`` (else the value)."""

    def cell(key, runs):
        v = key[i]
        return "—" if v is None else fmt.format(labels.get(v, v) if labels else v, v)

    return cell


def pm_of(key: str, scale: float = 1.0, digits: int = 2, fmt: str = "f",
          thousands: bool = False) -> Cell:
    """Cell: ``pm`` of the runs' ``key`` ("—" if a run has no ``key``)."""

    def cell(_, runs):
        if any(key not in r for r in runs):
            return "—"
        return pm([r[key] for r in runs], scale, digits, fmt, thousands)

    return cell


def mean_of(key: str, spec: str) -> Cell:
    """Cell: the mean of the runs' ``key``, formatted with ``spec``."""
    return lambda _, runs: f"{statistics.fmean(r[key] for r in runs):{spec}}"


def first_of(key: str, spec: str = "") -> Cell:
    """Cell: the first run's ``key`` (identical across seeds), formatted with ``spec``."""
    return lambda _, runs: f"{runs[0][key]:{spec}}"


def text(template: str) -> Section:
    """Section: one paragraph, a template filled from the context."""
    return lambda result, ctx: ["", template.format_map(ctx)]


def paired(intro: str, keys: tuple[str, str], head: str, levels: str,
           pairs: Sequence[tuple[str, str]] | Callable[[dict], Sequence[tuple[str, str]]],
           labels: dict | None = None, fmt: str = "{}") -> Section:
    """Section: paired (same seed) differences of eval accuracy, in points, mean ± sample
    std over seeds. ``keys`` = (method key, level key) of the runs (dense runs have level
    None); one row per value of ``result[levels]`` (first cell ``fmt.format(level)``
    under ``head``), one column per pair ``(a, b)`` (a − b) whose methods both ran;
    nothing if no pair ran."""

    def section(result, ctx):
        runs = result["runs"]
        by = {(r[keys[0]], r[keys[1]], r["seed"]): r["eval_accuracy"] for r in runs}
        ran = {r[keys[0]] for r in runs}
        ps = [(a, b) for a, b in (pairs(result) if callable(pairs) else pairs)
              if a in ran and b in ran]
        seeds = sorted({r["seed"] for r in runs})
        rows = []
        for lv in result[levels] if ps else ():
            cells = [fmt.format(lv)]
            for a, b in ps:
                la, lb = (None if x == "dense" else lv for x in (a, b))
                d = [by[(a, la, k)] - by[(b, lb, k)] for k in seeds
                     if (a, la, k) in by and (b, lb, k) in by]
                cells.append(pm(d, 100) if d else "—")
            rows.append(cells)
        if not rows:
            return []
        name = (lambda m: labels.get(m, m)) if labels else str
        return ["", intro, "", *md_table([head, *(f"{name(a)} − {name(b)}" for a, b in ps)],
                                         rows)]

    return section


def image(alt: str, caption: str) -> Section:
    """Section: the JSON's ``plot`` (relative to the page when next to it) and a caption
    template (``png`` is the plot's path)."""

    def section(result, ctx):
        png = result.get("plot")
        if not png:
            return []
        rel = Path(png).name if Path(png).parent == Path(result["out_md"]).parent else png
        return ["", f"![{alt}]({rel})", "", caption.format_map({**ctx, "png": png})]

    return section


# ----------------------------------------------------------------------------- markdown


def context(result: dict, table: Table) -> dict:
    """The values the ``table``'s templates are filled from (see ``Table``)."""
    cfg, seeds, f = result["config"], result["seeds"], result.get("flops")
    ctx = {"result": result, "cfg": cfg, "seeds": ", ".join(map(str, seeds)),
           "n_seeds": len(seeds), "eval_size": cfg["data"].get("eval_size", 360),
           "has_flops": f is not None,
           "dense_flops": int(f["dense_total"]) if f is not None else None}
    if table.context is not None:
        ctx.update(table.context(result))
    return ctx


def render(result: dict, table: Table, reading: str | None) -> str:
    """The Markdown page of ``result`` (the JSON payload) as ``table`` describes it, with
    ``reading`` (or a placeholder) between the Reading markers."""
    ctx = context(result, table)
    lines = header(table.title, result) + ["## Setup", ""]
    for note in table.setup:
        if isinstance(note, If):
            note = note.then if ctx[note.flag] else note.otherwise
        if note is not None:
            lines.append("- " + note.format_map(ctx))
    lines += ["", "## Results", ""]
    columns = [c for c in table.columns if c.when is None or ctx[c.when]]
    order = None if table.order is None else (lambda key: table.order(key, result))
    lines += md_table([c.head for c in columns],
                      ([c.cell(key, rs) for c in columns]
                       for key, rs in group(result["runs"], table.group_by, order).items()))
    for section in table.sections:
        lines += section(result, ctx)
    lines += reading_section(reading, table.reading)
    return "\n".join(lines)


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


def write_outputs(result: dict, out_md: Path, out_json: Path, table: Table,
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
    out_md.write_text(render(result, table, reading))


def render_only(out_md: Path, out_json: Path, table: Table) -> dict[str, Any]:
    """Rewrites ``out_md`` from the existing ``out_json`` (no training); returns the JSON."""
    result = json.loads(out_json.read_text())
    out_md.write_text(render(result, table, existing_reading(out_md)))
    print(f"wrote {out_md} from {out_json}")
    return result
