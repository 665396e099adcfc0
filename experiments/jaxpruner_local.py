"""JaxPruner (google-research/jaxpruner) as a local, patched checkout, for comparisons.

JaxPruner is not a dependency of sparsejax and none of its code is in this repository:
``third_party/`` is in ``.gitignore``. Its last commit (April 2024) no longer runs on
current JAX, so a user who wants the JaxPruner rows of ``experiments/bench_sparsity``
gets it and patches the local copy with this module, from the repository root::

    git clone https://github.com/google-research/jaxpruner.git third_party/jaxpruner
    git -C third_party/jaxpruner checkout f133ee50f31a03d0152b8b272edb534065152f5d
    python -m experiments.jaxpruner_local --src third_party/jaxpruner

The last command rewrites the checkout's ``jaxpruner/**/*.py`` in place with the
substitutions in ``PATCHES`` (ours; see each one's ``why``), adds one small module of
ours to it (``jaxpruner/_chex_lite.py``, used only when chex is not installed) and
prints every change; run again, it changes nothing. ``--dry_run`` only prints.
It was checked with that commit on jax 0.10.2 (Python 3.11, optax 0.2.8, flax 0.12.8,
no chex); other JAX versions were not tried. Nothing is installed: ``import_jaxpruner`` puts the checkout on ``sys.path``.

What the benchmark uses (``jaxpruner_variants``, whose docstring has the exact
signature): JaxPruner's ``StaticRandomSparse`` (fixed random masks),
``MagnitudePruning``, ``SET`` and ``RigL`` (their one mask update scheduled at step
``never``), all with JaxPruner's own ERK distribution, each as ``(init, step)`` for a
hand-written loop, as JaxPruner's docs show it: ``tx = pruner.wrap_optax(inner)``, then
``pruner.post_gradient_update`` after ``optax.apply_updates``. SET/RigL mask updates
need the ``set-none-masks`` patch; with it they were run (masks change, sparsity kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

JAXPRUNER_URL = "https://github.com/google-research/jaxpruner.git"
JAXPRUNER_COMMIT = "f133ee50f31a03d0152b8b272edb534065152f5d"
DEFAULT_PATH = "third_party/jaxpruner"
REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANT_NAMES = ("jaxpruner_static", "jaxpruner_magnitude", "jaxpruner_set", "jaxpruner_rigl")
UPDATE_VARIANT_NAMES = ("jaxpruner_set_update", "jaxpruner_rigl_update")

_import_failure: str | None = None


# ----------------------------------------------------------------------------- patches


@dataclasses.dataclass(frozen=True)
class Patch:
    """One regex substitution applied to every ``.py`` file of the checkout's package.

    A patch must be idempotent: its ``pattern`` must not match its own output.

    Example::

        Patch("name", "why it is needed", r"\\bold_api\\(", "new_api(")
    """

    name: str
    why: str
    pattern: str
    repl: str
    flags: int = 0

    def apply(self, text: str) -> tuple[str, int]:
        """``(new_text, number_of_substitutions)``.

        Example:

            >>> from experiments.jaxpruner_local import PATCHES
            >>> old = "jax.tree" + "_map"   # the removed alias, as JaxPruner spells it
            >>> PATCHES[0].apply(f"y = {old}(f, x)")
            ('y = jax.tree.map(f, x)', 1)
        """
        return re.subn(self.pattern, self.repl, text, flags=self.flags)


# Written into the checkout as jaxpruner/_chex_lite.py: what JaxPruner takes from chex
# (type aliases for annotations and isinstance checks, and a debug-only assertion).
CHEX_LITE = '''\
"""What jaxpruner uses from chex, for when chex is not installed.

Written by sparsejax's experiments/jaxpruner_local.py; not part of JaxPruner.
"""
from typing import Any, Union

import jax
import numpy as np

Array = Union[jax.Array, np.ndarray, np.bool_, np.number]
ArrayNumpy = np.ndarray
ArrayTree = Any


def assert_trees_all_close(*trees, rtol=1e-6, atol=0.0):
  """Raises AssertionError unless all trees have one structure and close leaves."""
  first, *rest = trees
  for other in rest:
    if jax.tree.structure(first) != jax.tree.structure(other):
      raise AssertionError("tree structures differ")
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
'''
CHEX_LITE_NAME = "_chex_lite.py"

PATCHES: tuple[Patch, ...] = (
    Patch(
        "jax-tree-aliases",
        "jax.tree_map and the other top-level jax.tree_* aliases were deprecated in "
        "jax 0.4.26 and removed (jax.tree_map in 0.6.0): AttributeError at the first "
        "mask or ERK computation. jax.tree.* (since 0.4.25) takes the same arguments.",
        r"\bjax\.tree_(map|leaves|structure|flatten|unflatten|transpose)\b",
        r"jax.tree.\1"),
    Patch(
        "optional-chex",
        "chex is a declared dependency of JaxPruner but no longer comes with optax or "
        "flax, and is not installed here (ModuleNotFoundError at import). JaxPruner "
        "only uses type aliases, isinstance checks and one debug-only assertion from "
        "it: import chex when present, else _chex_lite (written next to the package).",
        r"^import chex[ \t]*$",
        "try:\n  import chex\nexcept ImportError:  # added by sparsejax's "
        "experiments/jaxpruner_local.py\n  from jaxpruner import _chex_lite as chex",
        re.M),
    Patch(
        "set-none-masks",
        "SET.update_state (and so RigL's) maps _update_masks over the masks tree first, "
        "whose unpruned leaves (biases under ERK) are None, i.e. empty subtrees: current "
        "jax.tree.map rejects the param-shaped score trees at those paths ('pytree "
        "structure error: different types'), so every mask update fails to trace. Map "
        "with None as a leaf and keep None masks None.",
        r"jax\.tree[._]map\(\s*update_masks_fn,\s*sparse_state\.masks,\s*drop_scores,"
        r"\s*grow_scores\s*\)",
        "jax.tree.map(  # None-mask handling added by sparsejax's "
        "experiments/jaxpruner_local.py\n"
        "        lambda m, d, g: None if m is None else update_masks_fn(m, d, g),\n"
        "        sparse_state.masks, drop_scores, grow_scores,\n"
        "        is_leaf=lambda m: m is None,\n"
        "    )"),
)


def patch_text(text: str) -> tuple[str, list[tuple[str, int]]]:
    """Applies every patch in ``PATCHES`` to one file's text.

    Returns the new text and ``[(patch_name, count), ...]`` for the patches that matched.

    Example:

        >>> from experiments.jaxpruner_local import patch_text
        >>> old = "jax.tree" + "_map"   # the removed alias, as JaxPruner spells it
        >>> new, changes = patch_text(f"import chex\\nm = {old}(abs, p)\\n")
        >>> changes
        [('jax-tree-aliases', 1), ('optional-chex', 1)]
        >>> patch_text(new)[1]   # idempotent
        []
    """
    changes = []
    for p in PATCHES:
        text, n = p.apply(text)
        if n:
            changes.append((p.name, n))
    return text, changes


def _package_dir(src: str | Path) -> Path:
    pkg = Path(src) / "jaxpruner"
    if not (pkg / "__init__.py").is_file():
        raise FileNotFoundError(f"{src} is not a JaxPruner checkout (no jaxpruner/__init__.py); "
                                f"get it with: git clone {JAXPRUNER_URL} {src}")
    return pkg


def _checkout_commit(src: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def patch_checkout(src: str | Path = DEFAULT_PATH, *, dry_run: bool = False,
                   log: Callable[[str], None] | None = print) -> list[tuple[str, str, int]]:
    """Patches a JaxPruner checkout in place for current JAX; idempotent.

    Rewrites ``src/jaxpruner/**/*.py`` with ``PATCHES`` and writes ``_chex_lite.py``
    into the package. Returns ``[(relative_path, patch_name, count), ...]`` for what
    changed (or would change, with ``dry_run``); an empty list means already patched.
    ``log`` (default ``print``; None for silence) gets one line per change.

    Example:

        >>> import tempfile, pathlib
        >>> from experiments.jaxpruner_local import patch_checkout
        >>> src = pathlib.Path(tempfile.mkdtemp())
        >>> (src / 'jaxpruner').mkdir()
        >>> _ = (src / 'jaxpruner' / '__init__.py').write_text('import chex\\n')
        >>> patch_checkout(src, log=None)
        [('jaxpruner/__init__.py', 'optional-chex', 1), ('jaxpruner/_chex_lite.py', 'write', 1)]
        >>> patch_checkout(src, log=None)
        []
    """
    say = log or (lambda _: None)
    src = Path(src)
    pkg = _package_dir(src)
    commit = _checkout_commit(src)
    if commit and commit != JAXPRUNER_COMMIT:
        say(f"note: {src} is at {commit[:12]}, the patches were checked at "
            f"{JAXPRUNER_COMMIT[:12]}")
    done: list[tuple[str, str, int]] = []
    verb = "would patch" if dry_run else "patched"
    for path in sorted(pkg.rglob("*.py")):
        if path.name == CHEX_LITE_NAME:
            continue
        text = path.read_text(encoding="utf-8")
        new, changes = patch_text(text)
        if not changes:
            continue
        rel = path.relative_to(src).as_posix()
        for name, n in changes:
            done.append((rel, name, n))
            say(f"{verb} {rel}: {name} x{n}")
        if not dry_run:
            path.write_text(new, encoding="utf-8")
    lite = pkg / CHEX_LITE_NAME
    if not lite.is_file() or lite.read_text(encoding="utf-8") != CHEX_LITE:
        rel = lite.relative_to(src).as_posix()
        done.append((rel, "write", 1))
        say(f"{'would write' if dry_run else 'wrote'} {rel}")
        if not dry_run:
            lite.write_text(CHEX_LITE, encoding="utf-8")
    if not done:
        say(f"{src}: already patched, nothing to change")
    return done


# ----------------------------------------------------------------------------- import


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def import_failure_reason() -> str | None:
    """Why the last ``import_jaxpruner`` call returned None (None after a success).

    Example:

        >>> from experiments.jaxpruner_local import import_jaxpruner, import_failure_reason
        >>> import_jaxpruner('/nonexistent/jaxpruner') is None
        True
        >>> import_failure_reason()
        'no JaxPruner checkout at /nonexistent/jaxpruner (no jaxpruner/__init__.py there); ...'
        >>> import_jaxpruner('third_party/jaxpruner') is not None or bool(import_failure_reason())
        True
    """
    return _import_failure


def import_jaxpruner(path: str | Path = DEFAULT_PATH):
    """The ``jaxpruner`` module from a patched local checkout, or None.

    ``path`` (relative to the working directory, else to the repository root) is put
    first on ``sys.path``. Returns None, with the reason in ``import_failure_reason()``,
    when the checkout is missing, not patched (see the module docstring), fails to
    import, or when another ``jaxpruner`` was already imported from elsewhere.

    Example:

        >>> from experiments.jaxpruner_local import import_jaxpruner
        >>> jp = import_jaxpruner('/nonexistent/jaxpruner')   # a module when present
        >>> jp is None
        True
    """
    global _import_failure
    _import_failure = None
    src = _resolve(path)
    if not (src / "jaxpruner" / "__init__.py").is_file():
        _import_failure = (f"no JaxPruner checkout at {path} (no jaxpruner/__init__.py "
                           f"there); to get one, see experiments/jaxpruner_local.py: git "
                           f"clone {JAXPRUNER_URL} {path}, check out {JAXPRUNER_COMMIT[:12]}, "
                           f"python -m experiments.jaxpruner_local --src {path}")
        return None
    try:
        pending = patch_checkout(src, dry_run=True, log=None)
    except OSError as e:
        _import_failure = f"cannot read {src}: {e}"
        return None
    if pending:
        _import_failure = (f"{src} is not patched for this JAX ({len(pending)} pending "
                           f"changes): run python -m experiments.jaxpruner_local --src {path}")
        return None
    loaded = sys.modules.get("jaxpruner")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", "") or "").resolve()
        if src in where.parents:
            return loaded
        _import_failure = f"another jaxpruner is already imported, from {where}"
        return None
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        import jaxpruner  # noqa: PLC0415  (optional, from the checkout)
    except Exception as e:  # noqa: BLE001  (any import failure means "not available")
        for name in [m for m in sys.modules if m == "jaxpruner" or m.startswith("jaxpruner.")]:
            del sys.modules[name]
        _import_failure = f"import jaxpruner from {src} failed: {type(e).__name__}: {e}"
        return None
    return jaxpruner


# ----------------------------------------------------------------------------- variants


class JaxPrunerCarry(NamedTuple):
    """What a variant's ``step`` maps to the next one: one training state.

    ``params``: the (masked) parameters, a tree like the template; ``opt_state``:
    JaxPruner's ``SparseState`` (``.masks``: uint8 0/1 arrays, None for layers it does
    not prune; ``.inner_state``: the inner optax state; ``.count``: steps taken, int32);
    ``loss``: the loss of the last step's batch at the params before it (NaN after init).
    """

    params: Any
    opt_state: Any
    loss: jax.Array


def _make_variant(pruner, loss_fn, make_inner, *, sparsify_at_init: str):
    """``(init, step)`` for one pruner, used as JaxPruner's docs show."""
    tx = pruner.wrap_optax(make_inner())

    # Jitted: one compile instead of many eager ops; its outputs are new buffers (the
    # template is not consumed) and every leaf is an array (ERK's sparsities are NumPy
    # floats), so the first step's input types match the later ones' (one compile).
    @jax.jit
    def init(params) -> JaxPrunerCarry:
        opt_state = tx.init(params)
        if sparsify_at_init == "instant_sparsify":  # masks start all-ones
            params, masks = pruner.instant_sparsify(params)
            opt_state = opt_state._replace(masks=masks)
        params = pruner.post_gradient_update(params, opt_state)
        return JaxPrunerCarry(params, opt_state, jnp.float32(jnp.nan))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry: JaxPrunerCarry, batch) -> JaxPrunerCarry:
        params, opt_state, _ = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = pruner.post_gradient_update(params, opt_state)
        return JaxPrunerCarry(params, opt_state, jnp.asarray(loss, jnp.float32))

    return init, step


def jaxpruner_variants(params, loss_fn, make_inner, sparsity: float, never: int, *,
                       prune=None, update_variants: bool = False, jaxpruner=None,
                       path: str | Path = DEFAULT_PATH) -> dict:
    """JaxPruner's sparse train steps for a hand-written loop: ``{name: (init, step)}``.

    Signature, all positional: ``jaxpruner_variants(params, loss_fn, make_inner,
    sparsity, never)``:

    * ``params``: the dense parameter template, a nested dict (or ``FrozenDict``) of
      arrays, e.g. ``nnx.split(model, nnx.Param)[1].to_pure_dict()``. JaxPruner prunes
      every leaf with ``ndim > 1`` (the head's kernel too) unless ``prune`` is given,
      and leaves the others (biases) dense.
    * ``loss_fn(params, batch) -> scalar``: differentiated w.r.t. ``params``; ``batch``
      is whatever the caller passes to ``step`` (a tuple ``(x, y)``, a dict, ...).
    * ``make_inner() -> optax.GradientTransformation``: the inner optimizer, e.g.
      ``lambda: optax.adamw(1e-3)``; each variant gets its own.
    * ``sparsity``: in [0, 1), the target over the pruned leaves, spread by JaxPruner's
      ERK (``sparsity_distributions.erk``; it may leave small layers dense).

    Keyword ``prune(key, param) -> bool`` (JaxPruner's ``filter_fn``) picks the pruned
    leaves instead; ``key`` is the leaf's ``flax.traverse_util.flatten_dict`` tuple,
    e.g. ``('l0', 'kernel')``. To prune what a benchmark's ``sparse_paths`` names:
    ``prune=lambda k, p: '/'.join(map(str, k)) in sparse_paths``.
    * ``never``: a positive int32 step count: the step of the one scheduled mask
      update of the magnitude / SET / RigL variants. Pass a count no run reaches (the
      benchmark's ``NEVER = 10**9``) and every timed step is a non-update step.

    Returns ``{name: (init, step)}`` with these names, in this order:

    * 'jaxpruner_static': ``StaticRandomSparse``: fixed random masks, masked gradients.
    * 'jaxpruner_magnitude': ``MagnitudePruning`` with ``PolynomialSchedule(never,
      never, never)``; its masks are set at init by ``instant_sparsify`` (magnitude).
    * 'jaxpruner_set', 'jaxpruner_rigl': ``SET`` / ``RigL`` (random masks at init,
      masked gradients, default drop fraction 0.3) with ``PeriodicSchedule(never,
      never, never)``: drop-and-grow only at step ``never``.
    * only with ``update_variants=True``: 'jaxpruner_set_update',
      'jaxpruner_rigl_update': the same with a mask update at every step (for timing
      the update only: JaxPruner's SET/RigL skip the optimizer update on update steps
      and grow connections at weight 0, so these never train).

    ``init(params) -> JaxPrunerCarry`` builds the state from a template (copied, not
    consumed), already sparse. ``step(carry, batch) -> carry`` is one jitted train
    step (``tx = pruner.wrap_optax(make_inner())``, ``tx.update``,
    ``optax.apply_updates``, then ``pruner.post_gradient_update``, as JaxPruner's docs
    show a custom loop); it **donates** ``carry``, so use only the returned one. The
    carry is ``JaxPrunerCarry(params, opt_state, loss)`` (a NamedTuple; block on it
    with ``jax.block_until_ready``). ``step`` compiles once per batch shape/dtype.

    When JaxPruner cannot be imported (no checkout at ``path``, not patched, import
    error) this returns ``{}`` and does not raise: ``import_failure_reason()`` then
    says why. ``jaxpruner`` is the module to use instead of ``import_jaxpruner(path)``.
    ValueError for a bad ``sparsity`` or ``never``, a tree ERK cannot handle, or a
    tree with nothing to prune.

    Example::

        from experiments.jaxpruner_local import jaxpruner_variants, import_failure_reason
        variants = jaxpruner_variants(params, lambda p, b: loss(p, *b),
                                      lambda: optax.adamw(1e-3), 0.9, 10**9)
        if not variants:
            print('no JaxPruner rows:', import_failure_reason())
        for name, (init, step) in variants.items():
            carry = init(params)
            for batch in batches:            # batch = (x, y)
                carry = step(carry, batch)
            jax.block_until_ready(carry)
            print(name, float(carry.loss))
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if isinstance(never, bool) or not isinstance(never, (int, np.integer)) or \
            not 0 < int(never) < 2**31 - 1:
        raise ValueError(f"never must be a positive int32 step count, got {never!r}")
    jp = jaxpruner if jaxpruner is not None else import_jaxpruner(path)
    if jp is None:
        return {}
    never = int(never)
    erk_kw = {} if prune is None else {"filter_fn": prune}
    distribution = functools.partial(jp.sparsity_distributions.erk, sparsity=float(sparsity),
                                     **erk_kw)
    nothing = "no leaf has ndim > 1" + ("" if prune is None else " and passes prune")
    try:  # fail now, not at init, on a tree ERK cannot use
        targets = distribution(params)
    except ValueError as e:  # e.g. 'Variable shape dictionary should not be empty'
        raise ValueError(f"JaxPruner's ERK rejected params ({e}); {nothing}?") from e
    if all(t is None for t in jax.tree.leaves(targets, is_leaf=lambda t: t is None)):
        raise ValueError(f"no parameter is pruned: {nothing}")

    def at(step):
        return {"update_freq": step, "update_start_step": step, "update_end_step": step}

    every_step = {"update_freq": 1, "update_start_step": 0, "update_end_step": None}
    pruners = {
        "jaxpruner_static": jp.StaticRandomSparse(sparsity_distribution_fn=distribution),
        "jaxpruner_magnitude": jp.MagnitudePruning(
            sparsity_distribution_fn=distribution,
            scheduler=jp.PolynomialSchedule(**at(never))),
        "jaxpruner_set": jp.SET(sparsity_distribution_fn=distribution,
                                scheduler=jp.PeriodicSchedule(**at(never))),
        "jaxpruner_rigl": jp.RigL(sparsity_distribution_fn=distribution,
                                  scheduler=jp.PeriodicSchedule(**at(never))),
    }
    if update_variants:
        pruners["jaxpruner_set_update"] = jp.SET(
            sparsity_distribution_fn=distribution,
            scheduler=jp.PeriodicSchedule(**every_step))
        pruners["jaxpruner_rigl_update"] = jp.RigL(
            sparsity_distribution_fn=distribution,
            scheduler=jp.PeriodicSchedule(**every_step))
    return {name: _make_variant(
                p, loss_fn, make_inner,
                sparsify_at_init="instant_sparsify" if name == "jaxpruner_magnitude"
                else "post_gradient_update")
            for name, p in pruners.items()}


def _unpacked(mask, shape):
    m = np.asarray(mask)
    if m.shape != tuple(shape):  # use_packed_masks=True
        m = np.unpackbits(m)[:int(np.prod(shape))].reshape(shape)
    return m


def _sparsity_report(carry) -> dict:
    """Measured sparsity of the pruned leaves of a ``JaxPrunerCarry``."""
    params, state = carry[0], carry[1]
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    masks = jax.tree.leaves(state.masks, is_leaf=lambda m: m is None)
    if len(masks) != len(flat):
        raise ValueError("the masks tree does not match the params tree")
    zeros = size = mask_zeros = off_mask = 0
    per_leaf = {}
    for (key, p), m in zip(flat, masks):
        if m is None:
            continue
        p = np.asarray(p)
        m = _unpacked(m, p.shape)
        z = int(np.sum(p == 0))
        per_leaf[jax.tree_util.keystr(key)] = z / p.size
        zeros, size = zeros + z, size + p.size
        mask_zeros += int(np.sum(m == 0))
        off_mask += int(np.sum((m == 0) & (p != 0)))
    return {"measured": zeros / max(size, 1), "mask_sparsity": mask_zeros / max(size, 1),
            "per_leaf": per_leaf, "nonzeros_outside_mask": off_mask, "pruned_params": size}


def check_jaxpruner_sparsity(init, step, params, batch, sparsity: float, *, steps: int = 3,
                             tol: float = 0.01) -> dict:
    """Runs ``init`` and ``steps`` steps on ``batch``; checks ~``sparsity`` sparse params.

    Sparsity is measured as the fraction of exact zeros over the parameters JaxPruner
    prunes (those with a mask; ERK-dense layers included, as ERK counts them). Raises
    RuntimeError when the masks' own sparsity is off by more than ``tol``, when a weight
    is nonzero where its mask is 0, when the loss is not finite, or when the measured
    sparsity is off by more than ``tol`` (only below the target once a mask changed:
    SET/RigL grow connections with weight 0, and an update step skips the optimizer
    update, so grown weights stay 0 until their next non-update step). Returns
    ``{'measured', 'mask_sparsity', 'target', 'steps', 'per_leaf',
    'nonzeros_outside_mask', 'pruned_params', 'loss', 'masks_changed', 'compiles'}``
    (``masks_changed``: whether any mask differs from init's; ``compiles``: how many
    times ``step`` was traced, 1 when the carry's types are stable).

    Example::

        init, step = jaxpruner_variants(params, loss, make_inner, 0.9, 10**9)['jaxpruner_static']
        check_jaxpruner_sparsity(init, step, params, (x, y), 0.9)['measured']   # ~0.9
    """
    carry = init(params)
    masks0 = [None if m is None else np.asarray(m) for m in
              jax.tree.leaves(carry.opt_state.masks, is_leaf=lambda m: m is None)]
    for _ in range(steps):
        carry = step(carry, batch)
    jax.block_until_ready(carry)
    masks1 = jax.tree.leaves(carry.opt_state.masks, is_leaf=lambda m: m is None)
    report = _sparsity_report(carry)
    report.update(
        target=float(sparsity), steps=steps, loss=float(carry.loss),
        masks_changed=any(a is not None and not np.array_equal(a, np.asarray(b))
                          for a, b in zip(masks0, masks1)),
        compiles=step._cache_size() if hasattr(step, "_cache_size") else None)
    low = report["measured"] < sparsity - tol
    high = report["measured"] > sparsity + tol and not report["masks_changed"]
    bad = [f"pruned params {report['measured']:.4f} sparse" if low or high else "",
           f"masks {report['mask_sparsity']:.4f} sparse"
           if abs(report["mask_sparsity"] - sparsity) > tol else "",
           f"{report['nonzeros_outside_mask']} nonzero weights where the mask is 0"
           if report["nonzeros_outside_mask"] else "",
           f"loss {report['loss']}" if steps and not np.isfinite(report["loss"]) else ""]
    bad = [b for b in bad if b]
    if bad:
        raise RuntimeError(f"after {steps} steps (target sparsity {sparsity}, tol {tol}): "
                           + "; ".join(bad))
    return report


def sanity_check(sparsity: float = 0.9, *, hidden=(64, 64), steps: int = 3,
                 update_variants: bool = False, names=None,
                 path: str | Path = DEFAULT_PATH,
                 log: Callable[[str], None] | None = print) -> dict:
    """Runs every variant on a small dict-of-arrays MLP and checks its sparsity.

    The MLP maps 32 features through ``hidden`` ReLU layers to 10 classes (batch 16,
    inner optimizer ``optax.adam(1e-3)``). Every variant of ``jaxpruner_variants``
    (mask updates never fire) is checked with ``check_jaxpruner_sparsity``; with
    ``update_variants`` the SET/RigL ones are also checked with their update at step 1
    (masks must change), as 'jaxpruner_set@1' and 'jaxpruner_rigl@1'; ``names``, when
    given, keeps only those runs (each compile takes seconds on a CPU). Returns
    ``{name: report}``, ``{}`` when JaxPruner is not importable (reason in
    ``import_failure_reason()``); RuntimeError when a check fails. ``log`` gets one
    line per run.

    Example::

        python -m experiments.jaxpruner_local --src third_party/jaxpruner --check
    """
    say = log or (lambda _: None)
    if import_jaxpruner(path) is None:
        return {}
    keys = jax.random.split(jax.random.PRNGKey(0), len(hidden) + 3)
    widths = (32, *hidden, 10)
    params = {f"dense_{i}": {
        "kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
        "bias": jnp.zeros((b,))} for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}
    batch = (jax.random.normal(keys[-2], (16, 32)),
             jax.random.randint(keys[-1], (16,), 0, 10))

    def loss_fn(p, batch):
        h, y = batch
        for i in range(len(widths) - 1):
            h = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            h = jax.nn.relu(h) if i < len(widths) - 2 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    def variants(never):
        return jaxpruner_variants(params, loss_fn, lambda: optax.adam(1e-3), sparsity,
                                  never, path=path)

    runs = {name: (False, v) for name, v in variants(2**31 - 2).items()}  # no update
    if not runs:
        return {}
    if update_variants:  # SET/RigL with their one mask update at step 1
        runs.update({f"{name}@1": (True, v) for name, v in variants(1).items()
                     if name in ("jaxpruner_set", "jaxpruner_rigl")})
    if names is not None:
        unknown = set(names) - set(runs)
        if unknown:
            raise ValueError(f"unknown runs {sorted(unknown)}; there are {list(runs)}")
        runs = {n: r for n, r in runs.items() if n in names}
    out = {}
    for name, (updates, (init, step)) in runs.items():
        r = check_jaxpruner_sparsity(init, step, params, batch, sparsity, steps=steps)
        if r["masks_changed"] != updates:
            raise RuntimeError(f"{name}: masks changed is {r['masks_changed']}, but "
                               f"{'one' if updates else 'no'} mask update was scheduled")
        say(f"{name}: sparsity {r['measured']:.4f} (masks {r['mask_sparsity']:.4f}, "
            f"target {sparsity}), loss {r['loss']:.4f}, masks changed {r['masks_changed']}, "
            f"compiles {r['compiles']}")
        out[name] = r
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m experiments.jaxpruner_local --src third_party/jaxpruner``.

    Patches the checkout (see the module docstring), prints each change, then tries
    the import and prints the result. ``--dry_run`` only prints what would change;
    ``--check`` then runs ``sanity_check`` (a few seconds of compiles). Exit status 1
    when the checkout is missing or the import fails; a failed check raises.

    Example::

        python -m experiments.jaxpruner_local --src third_party/jaxpruner --dry_run
    """
    parser = argparse.ArgumentParser(prog="python -m experiments.jaxpruner_local",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=DEFAULT_PATH, help="the JaxPruner checkout")
    parser.add_argument("--dry_run", action="store_true", help="print, change nothing")
    parser.add_argument("--check", action="store_true",
                        help="then run sanity_check(): every variant on a small MLP")
    args = parser.parse_args(argv)
    try:
        patch_checkout(_resolve(args.src), dry_run=args.dry_run)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    jp = import_jaxpruner(args.src)
    if jp is None:
        print(f"import failed: {import_failure_reason()}", file=sys.stderr)
        return 1
    print(f"import jaxpruner OK from {Path(jp.__file__).parent} (jax {jax.__version__})")
    if args.check:
        sanity_check(path=args.src, update_variants=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
