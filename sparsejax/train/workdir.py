"""A run's workdir: its identity, its exclusive lock, and the one-line story of a failure.

A run is identified by its configuration. ``config.json`` records the whole config and
``run.json`` its fingerprint (a hash of every key except ``SAFE_TO_CHANGE``) and the
history of its starts. Resuming with a config whose identity differs is a ``RunMismatch``
that lists the differing keys, raised before anything is written. A ``WorkdirLock``
(``flock`` on ``<workdir>/.lock``, taken by process 0) makes a second run on the same
workdir fail at once, naming the holder.

Example:

    >>> import tempfile
    >>> from configs import quickstart
    >>> from sparsejax.train.workdir import config_changes, flat_config
    >>> old = flat_config(quickstart.get_config('rigl,0.9,tiny'))
    >>> new = flat_config(quickstart.get_config('rigl,0.5,tiny'))
    >>> config_changes(old, new)                  # what a resume would silently change
    {'method.sparsity': (0.9, 0.5)}
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

#: Config keys a resumed run may change: how long it runs, how often it reports, where
#: it runs, and what it does on a non-finite step. Everything else is the run's identity.
SAFE_TO_CHANGE = ("num_steps", "log_every", "eval_every", "checkpoint_every",
                  "max_checkpoints", "mesh", "sharding_rules", "on_nonfinite",
                  "max_consecutive_skips", "data.data_dir")


class RunMismatch(ValueError):
    """The workdir holds a run with another config; nothing was written."""


class WorkdirLocked(RuntimeError):
    """Another process holds the workdir's lock; nothing was written."""


def _plain(value: Any) -> Any:
    """JSON-normal form: tuples become lists, callables their name without an address."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


def flat_config(config) -> dict:
    """The config as ``{'section.key': value}`` with references resolved and values in
    JSON form; accepts a ``ConfigDict`` or the dict read back from ``config.json``.

    Example:

        >>> from configs import quickstart
        >>> from sparsejax.train.workdir import flat_config
        >>> flat = flat_config(quickstart.get_config('rigl,0.9,tiny'))
        >>> flat['method.sparsity'], flat['method.end_step'], flat['model.hidden']
        (0.9, 15, [256, 256])
    """
    tree = _plain(config.to_dict() if hasattr(config, "to_dict") else config)
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node

    walk("", tree)
    return out


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def fingerprint(flat: dict) -> str:
    """sha256 (16 hex digits) of the run's identity: every key of ``flat_config`` except
    ``SAFE_TO_CHANGE``.

    Example:

        >>> from configs import quickstart
        >>> from sparsejax.train.workdir import fingerprint, flat_config
        >>> a = quickstart.get_config('tiny')
        >>> b = quickstart.get_config('tiny')
        >>> b.log_every, b.checkpoint_every = 1, 2          # safe to change
        >>> fingerprint(flat_config(a)) == fingerprint(flat_config(b))
        True
        >>> b.num_steps = 40      # safe, but optimizer.decay_steps follows it: another run
        >>> fingerprint(flat_config(a)) == fingerprint(flat_config(b))
        False
    """
    identity = {k: v for k, v in sorted(flat.items()) if not _safe(k)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


_ABSENT = "<absent>"


def config_changes(old: dict, new: dict) -> dict:
    """``{key: (old, new)}`` for every identity key (not ``SAFE_TO_CHANGE``) that differs
    between two ``flat_config`` dicts; a key only one side has shows ``'<absent>'``.

    Example:

        >>> from sparsejax.train.workdir import config_changes
        >>> config_changes({'seed': 0, 'num_steps': 10, 'model.hidden': [8]},
        ...                {'seed': 0, 'num_steps': 99, 'model.hidden': [16], 'x': 1})
        {'model.hidden': ([8], [16]), 'x': ('<absent>', 1)}
    """
    keys = sorted((set(old) | set(new)) - {k for k in set(old) | set(new) if _safe(k)})
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def check_same_run(workdir: Path, flat: dict) -> dict | None:
    """Reads ``workdir/config.json`` (read-only) and raises ``RunMismatch`` listing the
    differing keys if the workdir holds a run of another config. Returns the recorded
    flat config, or None for a new run.

    Example:

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from sparsejax.train.workdir import check_same_run
        >>> workdir = Path(tempfile.mkdtemp())
        >>> _ = (workdir / 'config.json').write_text(json.dumps({'seed': 0, 'num_steps': 9}))
        >>> check_same_run(workdir, {'seed': 0, 'num_steps': 20})   # extending: same run
        {'seed': 0, 'num_steps': 9}
        >>> check_same_run(workdir, {'seed': 1, 'num_steps': 9})
        Traceback (most recent call last):
        ...
        sparsejax.train.workdir.RunMismatch: ... holds a run with another config: seed: 0 -> 1. ...
    """
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        old = flat_config(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise RunMismatch(f"{path} cannot be read ({e}); the run cannot be identified. "
                          "Nothing was written; use another --workdir") from e
    changes = config_changes(old, flat)
    if changes:
        both = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()
                if _ABSENT not in (a, b)]
        only_old = [k for k, (a, b) in changes.items() if b == _ABSENT]
        only_new = [k for k, (a, b) in changes.items() if a == _ABSENT]
        listed = "; ".join(both + [f"only in the recorded config: {', '.join(only_old)}"] *
                           bool(only_old) + [f"only in this config: {', '.join(only_new)}"] *
                           bool(only_new))
        pins = [f"--config.{k}={a}" for k, (a, b) in changes.items()
                if isinstance(a, (bool, int, float, str)) and a != _ABSENT]
        pin = (f" (e.g. {' '.join(pins)}; a method's end_step and optimizer.decay_steps "
               "follow num_steps, so extending a run changes them unless pinned)"
               if pins and len(pins) == len(changes) else "")
        raise RunMismatch(
            f"{workdir} holds a run with another config: {listed}. Nothing was written. "
            f"Resume with the recorded config ({path}){pin}, or use another --workdir. "
            f"Only {', '.join(SAFE_TO_CHANGE)} may change on resume")
    return old


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


class WorkdirLock:
    """An exclusive lock on a workdir: ``flock`` on ``<workdir>/.lock`` held by process 0
    for the whole run, with the holder (host, pid, start, command) written inside. The OS
    releases it when the holder dies, even by SIGKILL, so a stale lock never blocks a
    resume. With several processes, process 0's outcome is broadcast and every process
    raises the same ``WorkdirLocked``. ``flock`` needs a local or NFS filesystem.

    Example:

        >>> import tempfile
        >>> from sparsejax.train.workdir import WorkdirLock
        >>> workdir = tempfile.mkdtemp()
        >>> with WorkdirLock(workdir):
        ...     WorkdirLock(workdir).acquire()           # a second run on the same workdir
        Traceback (most recent call last):
        ...
        sparsejax.train.workdir.WorkdirLocked: ... is in use by pid ... started ...
        >>> with WorkdirLock(workdir):                   # free again once released
        ...     pass
    """

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / ".lock"
        self._file = None

    def _holder_text(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            h = {}
        if not h:
            return "another process"
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"

    def acquire(self) -> "WorkdirLock":
        ok = True
        if jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                ok = False
            else:
                f.seek(0)
                f.truncate()
                f.write(json.dumps(_holder()))
                f.flush()
                self._file = f
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if not ok:
            raise WorkdirLocked(f"{self.path.parent} is in use by {self._holder_text()}. "
                                "Nothing was written; wait for it, stop it, or use another "
                                "--workdir")
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # an idle workdir's lock file is empty
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def failure_line(exc: BaseException) -> str:
    """One line for a failed run: a full disk anywhere in the exception's chain is named
    as such (with the path), otherwise the exception's type and first line.

    Example:

        >>> import errno
        >>> from sparsejax.train.workdir import failure_line
        >>> try:
        ...     try:
        ...         raise OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt/20')
        ...     except OSError as e:
        ...         raise RuntimeError('async save failed') from e
        ... except RuntimeError as e:
        ...     print(failure_line(e))
        error: no space left on device writing /w/ckpt/20; free space and rerun the same command to resume from the last checkpoint
        >>> print(failure_line(ValueError('config.batch_size=12 is not divisible\\nmore')))
        error: ValueError: config.batch_size=12 is not divisible
    """
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = f" writing {e.filename}" if e.filename else ""
            return (f"error: no space left on device{where}; free space and rerun the same "
                    "command to resume from the last checkpoint")
        e = e.__cause__ or e.__context__
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first}"
