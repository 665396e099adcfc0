"""Data: embedded datasets that need no download, tensorflow-datasets, and batching.

Every dataset is a pair of ``Source`` objects (train, eval) with ``len`` and
``get(indices) -> {'inputs', 'targets', 'weights'}``. Batches are a pure function of
``(seed, step)``: the global batch of step ``i`` is a slice of a per-epoch permutation
seeded by ``(seed, epoch)``. The iterator position is therefore the step count, a
resumed run reads exactly the batches it would have read, and each process takes its
own contiguous slice of the global batch (``process_index``).

Embedded defaults: ``digits`` (scikit-learn's 8×8 handwritten digits, shipped with the
package), ``synthetic_images`` and ``synthetic_tokens`` (random, for benchmarks), ``associative_recall`` and ``copy`` (synthetic sequence tasks), and ``text``
(bytes of any plain text file). Real datasets: ``tfds`` (``tfds.data_source``, so no
TensorFlow is needed; prepare with ``--file_format=array_record``) and ``tokens`` (a corpus
through a BPE tokenizer into ArrayRecord shards, ``train.tokens``).

A source stored in shards may give each process only its own (``HostSharded``): then
each process draws its share of every global batch from its own records, by the same
``(seed, step)`` rule, and ``eval_batches`` walks its own records.

Example:

    >>> from ml_collections import ConfigDict
    >>> from sparsejax.train.data import BatchIterator, get_dataset
    >>> ds = get_dataset(ConfigDict({'name': 'digits'}))
    >>> it = BatchIterator(ds.train, global_batch=32, seed=0)
    >>> batch = next(it)
    >>> {k: v.shape for k, v in batch.items()}
    {'inputs': (32, 8, 8, 1), 'targets': (32,), 'weights': (32,)}
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol

import numpy as np

from sparsejax.base import check_int

Batch = dict[str, np.ndarray]


class DataInfo(NamedTuple):
    """What a model needs to know about its data.

    ``task`` is 'classification' (inputs ``[B, *input_shape]``, integer labels) or 'lm'
    (token inputs ``[B, T]``, next-token targets); ``num_classes`` is the vocabulary
    size for 'lm'.

    Example:

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import DataInfo, copy_task
        >>> info = DataInfo(task='lm', input_shape=(64,), num_classes=256)
        >>> copy_task(ConfigDict({'seq_len': 32, 'vocab': 255})).info == info
        True
    """

    task: str
    input_shape: tuple
    num_classes: int


class Source(Protocol):
    """A random-access split: ``len(source)`` examples, ``source.get(indices)`` a batch."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> Batch: ...


class HostSharded(Protocol):
    """A ``Source`` whose records are split between processes (``tokens.TokenSource``).

    ``host_view(p, P)`` is the ``Source`` of process ``p``'s own records, and
    ``host_lengths(P)`` every process's record count. ``BatchIterator`` and
    ``eval_batches`` read only the view of their process, so a process never opens
    another's shards; with one process the view is the whole source, in order, and
    batches equal those of any other source of the same records.

    Example:

        >>> import numpy as np
        >>> from sparsejax.train.data import ArraySource, BatchIterator
        >>> class Halves(ArraySource):   # process p holds the p-th half
        ...     def host_view(self, p, count):
        ...         n = len(self) // count
        ...         return ArraySource(self.get(np.arange(p * n, (p + 1) * n)))
        ...     def host_lengths(self, count):
        ...         return [len(self) // count] * count
        >>> src = Halves({'inputs': np.arange(8), 'targets': np.arange(8), 'weights': np.ones(8)})
        >>> [next(BatchIterator(src, 4, seed=0, process_index=p, process_count=2))['inputs'].tolist()
        ...  for p in range(2)]
        [[0, 2], [4, 6]]
    """

    def host_view(self, process_index: int, process_count: int) -> Source: ...

    def host_lengths(self, process_count: int) -> list[int]: ...


def _host_view(source: Source, process_index: int, process_count: int) -> Source | None:
    """The process's own view of a ``HostSharded`` source, None for any other source."""
    if not hasattr(source, "host_view"):
        return None
    return source.host_view(process_index, process_count)


class ArraySource:
    """An in-memory split: a dict of equal-length arrays.

    Example:

        >>> import numpy as np
        >>> from sparsejax.train.data import ArraySource
        >>> x, y = np.zeros((10, 8, 8, 1), np.float32), np.arange(10)
        >>> src = ArraySource({'inputs': x, 'targets': y, 'weights': np.ones(len(y))})
        >>> batch = src.get(np.array([0, 5]))
        >>> len(src), batch['inputs'].shape, batch['targets']
        (10, (2, 8, 8, 1), array([0, 5]))
    """

    def __init__(self, arrays: Batch):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays have different lengths: {lengths}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get(self, indices: np.ndarray) -> Batch:
        return {k: v[indices] for k, v in self.arrays.items()}


class Dataset(NamedTuple):
    """A train and an eval ``Source`` plus the ``DataInfo`` models are built from.

    Example:

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import get_dataset
        >>> ds = get_dataset(ConfigDict({'name': 'copy', 'seq_len': 8, 'train_size': 64}))
        >>> ds.info.task, len(ds.train), len(ds.eval)
        ('lm', 64, 1000)
    """

    train: Source
    eval: Source
    info: DataInfo


# ----------------------------------------------------------------------------- batching


def batch_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Indices of the global batch at ``step``: epoch ``step // steps_per_epoch`` is a
    fresh permutation seeded by ``(seed, epoch)``; the last partial batch is dropped.

    Example:

        >>> import numpy as np
        >>> from sparsejax.train.data import batch_indices
        >>> idx = batch_indices(100, 10, seed=0, step=3)   # 10 distinct ints in [0, 100)
        >>> len(set(idx.tolist())), bool(((idx >= 0) & (idx < 100)).all())
        (10, True)
        >>> epoch = np.concatenate([batch_indices(100, 10, seed=0, step=s) for s in range(10)])
        >>> sorted(epoch.tolist()) == list(range(100))   # an epoch sees every example once
        True
    """
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global batch size {global_batch} exceeds the split's "
                         f"{num_examples} examples")
    epoch, within = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[within * global_batch:(within + 1) * global_batch]


def local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous share of a global batch.

    Example:

        >>> from sparsejax.train.data import local_slice
        >>> local_slice(8, process_index=1, process_count=2)
        slice(4, 8, None)
    """
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by "
                         f"{process_count} processes")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


class BatchIterator:
    """Deterministic, resumable iterator over a ``Source``; ``position`` is the next step.

    Example:

        >>> import numpy as np
        >>> from sparsejax.train.data import ArraySource, BatchIterator, batch_indices
        >>> src = ArraySource({'inputs': np.arange(256), 'targets': np.arange(256),
        ...                    'weights': np.ones(256)})
        >>> it = BatchIterator(src, global_batch=64, seed=0, position=1000)  # resumes
        >>> batch = next(it); it.position
        1001
        >>> batch['inputs'].tolist() == sorted(batch_indices(256, 64, seed=0, step=1000).tolist())
        True
    """

    def __init__(self, source: Source, global_batch: int, seed: int, position: int = 0,
                 process_index: int = 0, process_count: int = 1):
        self.source, self.global_batch, self.seed = source, global_batch, seed
        self.position = position
        self._slice = local_slice(global_batch, process_index, process_count)
        self._local = _host_view(source, process_index, process_count)
        if self._local is None:
            batch_indices(len(source), global_batch, seed, 0)  # validates the sizes now
        elif len(self._local) < global_batch // process_count:
            raise ValueError(f"the per-process batch {global_batch // process_count} exceeds "
                             f"the {len(self._local)} examples of process {process_index}'s "
                             "shards")

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        step, self.position = self.position, self.position + 1
        if self._local is not None:  # this process's own records, its share of the batch
            per = self._slice.stop - self._slice.start
            return self._local.get(np.sort(batch_indices(len(self._local), per, self.seed, step)))
        idx = batch_indices(len(self.source), self.global_batch, self.seed, step)
        return self.source.get(np.sort(idx[self._slice]))


def eval_batches(source: Source, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
    """Every eval example exactly once, in order; the last batch is padded with
    weight-0 copies of example 0 so all batches have the same shape. A ``HostSharded``
    source gives each process its own records in order, padded to as many batches as
    the process with the most records needs.

    Example:

        >>> import numpy as np
        >>> from sparsejax.train.data import ArraySource, eval_batches
        >>> src = ArraySource({'inputs': np.zeros((70, 2)), 'targets': np.zeros(70, np.int32),
        ...                    'weights': np.ones(70)})
        >>> batches = list(eval_batches(src, 32))
        >>> [len(b['inputs']) for b in batches], float(sum(b['weights'].sum() for b in batches))
        ([32, 32, 32], 70.0)
    """
    n = len(source)
    sl = local_slice(global_batch, process_index, process_count)
    local = _host_view(source, process_index, process_count)
    if local is None:
        spans = (np.arange(s, s + global_batch)[sl] for s in range(0, n, global_batch))
    else:  # this process's own records; every process yields as many batches
        per = sl.stop - sl.start
        spans = (np.arange(s, s + per)
                 for s in range(0, max(source.host_lengths(process_count)), per))
        source, n = local, len(local)
    for idx in spans:
        valid = idx < n
        batch = source.get(np.where(valid, idx, 0))
        w = batch["weights"]
        batch["weights"] = (w * valid.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        yield batch


# ----------------------------------------------------------------------------- datasets


def _classification(x: np.ndarray, y: np.ndarray) -> ArraySource:
    return ArraySource({"inputs": x.astype(np.float32), "targets": y.astype(np.int32),
                        "weights": np.ones(len(y), np.float32)})


def digits(cfg) -> Dataset:
    """scikit-learn's 1,797 8×8 digits (shipped with the package), pixels scaled to [0,1];
    a fixed split keeps ``eval_size`` (default 360) examples for evaluation.
    ``random_labels=True`` replaces the training labels by uniform random ones (the
    memorisation setting of the Lazy Neuron paper); evaluation keeps the true labels.

    Example:

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import digits
        >>> ds = digits(ConfigDict({'name': 'digits'}))
        >>> ds.info.input_shape, len(ds.train), len(ds.eval)
        ((8, 8, 1), 1437, 360)
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0)[..., None]
    perm = np.random.default_rng(0).permutation(len(x))
    n_eval = cfg.get("eval_size", 360)
    tr, ev = perm[n_eval:], perm[:n_eval]
    info = DataInfo("classification", (8, 8, 1), 10)
    y_train = d.target[tr]
    if cfg.get("random_labels", False):  # memorisation: no signal, eval labels stay true
        y_train = np.random.default_rng(1).integers(0, 10, len(tr))
    return Dataset(_classification(x[tr], y_train), _classification(x[ev], d.target[ev]), info)


def synthetic_images(cfg) -> Dataset:
    """Random images with random labels, for benchmarks and shape tests (no signal to learn).

    Example:

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import synthetic_images
        >>> ds = synthetic_images(ConfigDict({'image_shape': (32, 32, 3), 'num_classes': 10,
        ...                                   'train_size': 64, 'eval_size': 16}))
        >>> ds.info, len(ds.train), len(ds.eval)
        (DataInfo(task='classification', input_shape=(32, 32, 3), num_classes=10), 64, 16)
    """
    shape, classes = tuple(cfg.get("image_shape", (32, 32, 3))), cfg.get("num_classes", 10)

    def make(n, seed):
        rng = np.random.default_rng(seed)
        return _classification(rng.random((n, *shape), np.float32), rng.integers(0, classes, n))

    seed = cfg.get("seed", 0)
    return Dataset(make(cfg.get("train_size", 2048), [seed, 0]),
                   make(cfg.get("eval_size", 256), [seed, 1]),
                   DataInfo("classification", shape, classes))


def _lm_source(seqs: np.ndarray, weights: np.ndarray) -> ArraySource:
    """Next-token pairs from full sequences: inputs ``s[:-1]``, targets ``s[1:]``."""
    return ArraySource({"inputs": seqs[:, :-1].astype(np.int32),
                        "targets": seqs[:, 1:].astype(np.int32),
                        "weights": weights.astype(np.float32)})


def synthetic_tokens(cfg) -> Dataset:
    """Random token sequences, for benchmarks and compile-only runs at any vocabulary and
    length (``vocab_size``, ``seq_len``; no signal to learn).

    Example:

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import synthetic_tokens
        >>> ds = synthetic_tokens(ConfigDict({'vocab_size': 32000, 'seq_len': 1024,
        ...                                   'train_size': 64, 'eval_size': 8}))
        >>> ds.info, ds.train.get([0])['inputs'].shape, int(ds.train.get([0])['inputs'].max()) < 32000
        (DataInfo(task='lm', input_shape=(1024,), num_classes=32000), (1, 1024), True)
    """
    vocab, seq_len = cfg.get("vocab_size", 256), cfg.get("seq_len", 128)
    check_int(**{"data.vocab_size": vocab, "data.seq_len": seq_len})

    def make(n, seed):
        seqs = np.random.default_rng(seed).integers(0, vocab, (n, seq_len + 1), np.int32)
        return _lm_source(seqs, np.ones((n, seq_len), np.float32))

    seed = cfg.get("seed", 0)
    return Dataset(make(cfg.get("train_size", 256), [seed, 0]),
                   make(cfg.get("eval_size", 64), [seed, 1]),
                   DataInfo("lm", (seq_len,), vocab))


def associative_recall(cfg) -> Dataset:
    """Associative recall: ``k1 v1 … kn vn SEP q`` → the value bound to key ``q``.

    Keys are tokens ``[0, K)``, values ``[K, K+V)``, SEP is ``K+V``; keys in a sequence
    are distinct; only the answer position carries loss weight.

    Example:

        >>> import numpy as np
        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import associative_recall
        >>> ds = associative_recall(ConfigDict({'num_pairs': 8, 'num_keys': 16, 'num_values': 16}))
        >>> ds.info.input_shape
        (18,)
        >>> b = ds.eval.get(np.array([0]))
        >>> seq, answer = b['inputs'][0].tolist(), int(b['targets'][0, -1])
        >>> pairs = dict(zip(seq[0:16:2], seq[1:16:2]))   # key -> value
        >>> seq[16], pairs[seq[17]] == answer, b['weights'][0].tolist().count(1.0)   # SEP, q
        (32, True, 1)
    """
    n_pairs, n_keys, n_vals = cfg.get("num_pairs", 8), cfg.get("num_keys", 16), cfg.get("num_values", 16)
    if n_pairs > n_keys:
        raise ValueError(f"config.data.num_pairs={n_pairs} exceeds num_keys={n_keys}")
    sep = n_keys + n_vals

    def make(n, seed):
        rng = np.random.default_rng(seed)
        keys = np.argsort(rng.random((n, n_keys)), axis=1)[:, :n_pairs]
        vals = n_keys + rng.integers(0, n_vals, (n, n_pairs))
        q = rng.integers(0, n_pairs, n)
        pairs = np.stack([keys, vals], axis=2).reshape(n, 2 * n_pairs)
        seqs = np.concatenate([pairs, np.full((n, 1), sep), keys[np.arange(n), q][:, None],
                               vals[np.arange(n), q][:, None]], axis=1)
        w = np.zeros((n, seqs.shape[1] - 1))
        w[:, -1] = 1.0
        return _lm_source(seqs, w)

    seed = cfg.get("seed", 0)
    info = DataInfo("lm", (2 * n_pairs + 2,), sep + 1)
    return Dataset(make(cfg.get("train_size", 20000), [seed, 0]),
                   make(cfg.get("eval_size", 1000), [seed, 1]), info)


def copy_task(cfg) -> Dataset:
    """Copy: ``x SEP x`` with ``x`` of ``seq_len`` random tokens from ``[0, vocab)``;
    loss weight only on the copied half.

    Example:

        >>> import numpy as np
        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import copy_task
        >>> ds = copy_task(ConfigDict({'seq_len': 8, 'vocab': 10}))
        >>> ds.info
        DataInfo(task='lm', input_shape=(16,), num_classes=11)
        >>> ds.train.get(np.array([0]))['weights'][0].tolist()   # the copied half
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    length, vocab = cfg.get("seq_len", 16), cfg.get("vocab", 16)

    def make(n, seed):
        x = np.random.default_rng(seed).integers(0, vocab, (n, length))
        seqs = np.concatenate([x, np.full((n, 1), vocab), x], axis=1)
        w = np.zeros((n, 2 * length))
        w[:, length:] = 1.0
        return _lm_source(seqs, w)

    seed = cfg.get("seed", 0)
    info = DataInfo("lm", (2 * length,), vocab + 1)
    return Dataset(make(cfg.get("train_size", 20000), [seed, 0]),
                   make(cfg.get("eval_size", 1000), [seed, 1]), info)


def text_file(cfg) -> Dataset:
    """Byte-level language modelling on any plain text file (vocabulary 256).

    Windows of ``seq_len + 1`` bytes at stride ``seq_len``; the last 10% of the file is
    the eval split.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import text_file
        >>> path = Path(tempfile.mkdtemp()) / 'text.txt'
        >>> _ = path.write_bytes(b'hello world! ' * 100)   # 1300 bytes
        >>> ds = text_file(ConfigDict({'path': str(path), 'seq_len': 64}))
        >>> ds.info, len(ds.train), len(ds.eval)
        (DataInfo(task='lm', input_shape=(64,), num_classes=256), 18, 2)
        >>> bytes(ds.train.get(np.array([0]))['inputs'][0, :12].astype(np.uint8))
        b'hello world!'
    """
    path = cfg.get("path", "")
    if not path:
        raise ValueError("config.data.path must name a text file for the 'text' dataset")
    try:
        raw = np.frombuffer(open(path, "rb").read(), np.uint8)
    except OSError as e:
        raise FileNotFoundError(f"config.data.path: cannot read text file {path!r}: {e}") from e
    t = cfg.get("seq_len", 128)
    n_train = int(len(raw) * 0.9)

    def windows(a):
        n = (len(a) - 1) // t
        if n < 1:
            raise ValueError(f"text file {path!r} is too short for seq_len={t}")
        idx = np.arange(n)[:, None] * t + np.arange(t + 1)[None]
        return _lm_source(a[idx], np.ones((n, t)))

    return Dataset(windows(raw[:n_train]), windows(raw[n_train:]), DataInfo("lm", (t,), 256))


STDLIB_BYTES_PYTHON = "3.11.7"
"""The interpreter whose standard library ``stdlib_bytes`` is pinned to."""
STDLIB_BYTES_MODULES = tuple("""
__future__ __hello__ _aix_support _bootsubprocess _collections_abc _compat_pickle
_compression _markupbase _osx_support _py_abc _pydecimal _pyio _sitebuiltins
_strptime _threading_local _weakrefset abc aifc antigravity argparse ast asynchat
asyncore base64 bdb bisect bz2 cProfile calendar cgi cgitb chunk cmd code codecs
codeop colorsys compileall configparser contextlib contextvars copy copyreg crypt
csv dataclasses datetime decimal difflib dis doctest enum filecmp fileinput fnmatch
fractions ftplib functools genericpath getopt getpass gettext glob graphlib gzip
hashlib heapq hmac imaplib imghdr imp inspect io ipaddress keyword linecache locale
lzma mailbox mailcap mimetypes modulefinder netrc nntplib ntpath nturl2path numbers
opcode operator optparse os pathlib pdb pickle pickletools pipes pkgutil platform
plistlib poplib posixpath pprint profile pstats pty py_compile pyclbr pydoc queue
quopri random reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil
signal site smtpd smtplib sndhdr socket socketserver sre_compile sre_constants
sre_parse ssl stat statistics string stringprep struct subprocess sunau symtable
sysconfig tabnanny tarfile telnetlib tempfile textwrap this threading timeit token
tokenize trace traceback tracemalloc tty turtle types typing uu uuid warnings wave
weakref webbrowser xdrlib zipapp zipfile zipimport
""".split())
"""The ``stdlib_bytes`` corpus: these top-level modules of the standard library
(``<stdlib>/<name>.py``; 167 files, 4.7 MB; the generated, platform-specific
``_sysconfigdata*`` left out)."""
STDLIB_BYTES_SHA256 = "9698cc91f257897ffe6c22209ec8d5032a173d645b8624a5342e369604200d7a"
"""``train.tokens.corpus_hash`` of those files under CPython 3.11.7."""
STDLIB_BYTES_EVAL_FRACTION = 0.1
"""The eval split: the last 10% of every document's bytes (the first 90% train), so both
splits come from the same modules and their losses compare (held-out whole modules
differ in kind: ``stringprep``'s tables, ``decimal``'s docs)."""
DOCUMENT_END = 0
"""The byte after every document (NUL, which no source file holds)."""


def pinned_stdlib() -> list:
    """The ``stdlib_bytes`` documents (``train.tokens.Document``), checked against the
    pinned file list and content hash: missing files are an error naming them, changed
    contents one giving both hashes; never a silently different corpus.

    Example (under CPython 3.11.7; elsewhere the error says what differs):

        >>> from sparsejax.train.data import pinned_stdlib
        >>> docs = pinned_stdlib()                      # doctest: +SKIP
        >>> len(docs), docs[0].name                     # doctest: +SKIP
        (167, 'stdlib/__future__.py')
    """
    import platform

    from sparsejax.train.tokens import STDLIB, Document, corpus_hash, stdlib_dir

    root = stdlib_dir()
    where = (f"the 'stdlib_bytes' corpus is pinned to CPython {STDLIB_BYTES_PYTHON}'s "
             f"standard library; this is {platform.python_implementation()} "
             f"{platform.python_version()} ({root})")
    missing = [m for m in STDLIB_BYTES_MODULES if not (root / f"{m}.py").is_file()]
    if missing:
        raise ValueError(f"{where}: {len(missing)} pinned file(s) missing, e.g. "
                         f"{[m + '.py' for m in missing[:5]]}. Train on another corpus "
                         "with data.name='text' (bytes of one file) or 'tokens' (any files)")
    docs = [Document(f"{STDLIB}/{m}.py", root / f"{m}.py") for m in STDLIB_BYTES_MODULES]
    sha = corpus_hash(docs)
    if sha != STDLIB_BYTES_SHA256:
        raise ValueError(f"{where}: its content hash is {sha}, not the pinned "
                         f"{STDLIB_BYTES_SHA256}, so results would not be comparable. "
                         "Train on another corpus with data.name='text' or 'tokens'")
    return docs


def stdlib_bytes(cfg) -> Dataset:
    """Byte-level language modelling on a pinned corpus every CPython 3.11.7 has: the
    standard library's top-level modules (``STDLIB_BYTES_MODULES``; vocabulary 256, no
    download, no tokenizer). Every document's first 90% of bytes is train and its last
    10% eval (``STDLIB_BYTES_EVAL_FRACTION``); each split is its parts in name order,
    each followed by ``DOCUMENT_END``, cut into windows of ``seq_len + 1`` bytes at
    stride ``seq_len``. The loss in nats per token is nats per byte: bits per byte is
    ``loss / ln 2``.

    Example (under CPython 3.11.7):

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import stdlib_bytes
        >>> ds = stdlib_bytes(ConfigDict({'seq_len': 128}))  # doctest: +SKIP
        >>> ds.info, len(ds.train), len(ds.eval)             # doctest: +SKIP
        (DataInfo(task='lm', input_shape=(128,), num_classes=256), 32777, 3643)
    """
    t = int(cfg.get("seq_len", 128))
    if t < 1:
        raise ValueError(f"config.data.seq_len={t} must be positive")
    texts = [d.path.read_bytes() for d in pinned_stdlib()]
    cuts = [len(x) - int(np.ceil(STDLIB_BYTES_EVAL_FRACTION * len(x))) for x in texts]
    end = bytes([DOCUMENT_END])

    def windows(parts):
        stream = np.frombuffer(b"".join(p + end for p in parts), np.uint8)
        n = (len(stream) - 1) // t
        idx = np.arange(n)[:, None] * t + np.arange(t + 1)[None]
        return _lm_source(stream[idx], np.ones((n, t)))

    return Dataset(windows([x[:c] for x, c in zip(texts, cuts)]),
                   windows([x[c:] for x, c in zip(texts, cuts)]), DataInfo("lm", (t,), 256))


class TfdsSource:
    """A tensorflow-datasets split read by random access (``tfds.data_source``).

    Images become float32 in [0, 1]; ``image_key``/``label_key`` name the features.

    Example (``tfds.data_source('mnist', data_dir=d)['train']`` in a run; here a list
    of two examples that reads like one):

        >>> import numpy as np
        >>> from sparsejax.train.data import TfdsSource
        >>> class DataSource(list):
        ...     def __getitems__(self, indices):
        ...         return [self[i] for i in indices]
        >>> examples = [{'image': np.full((28, 28, 1), 255, np.uint8), 'label': 7},
        ...             {'image': np.zeros((28, 28, 1), np.uint8), 'label': 1}]
        >>> src = TfdsSource(DataSource(examples))
        >>> batch = src.get(np.array([1, 0]))
        >>> len(src), batch['inputs'].shape, float(batch['inputs'].max()), batch['targets'].tolist()
        (2, (2, 28, 28, 1), 1.0, [1, 7])
    """

    def __init__(self, source, image_key: str = "image", label_key: str = "label"):
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def get(self, indices: np.ndarray) -> Batch:
        examples = self.source.__getitems__([int(i) for i in indices])
        x = np.stack([np.asarray(e[self.image_key]) for e in examples])
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        y = np.asarray([e[self.label_key] for e in examples], np.int32)
        return {"inputs": x.astype(np.float32), "targets": y,
                "weights": np.ones(len(y), np.float32)}


def tfds_dataset(cfg) -> Dataset:
    """A prepared tensorflow-datasets image classification dataset (mnist, cifar10, …).

    Config: ``tfds_name``, ``data_dir``, ``train_split`` ('train'), ``eval_split``
    ('test'), ``image_key``, ``label_key``. Nothing is downloaded here: prepare the data
    once with ``tfds build NAME --data_dir=DIR --file_format=array_record``.

    Example (with an empty ``data_dir``, so it names the build command):

        >>> import tempfile
        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import tfds_dataset
        >>> d = tempfile.mkdtemp()
        >>> tfds_dataset(ConfigDict({'name': 'tfds', 'tfds_name': 'mnist', 'data_dir': d}))
        Traceback (most recent call last):
        ...
        FileNotFoundError: config.data: tfds dataset 'mnist' is not prepared ... tfds build mnist ...
    """
    import tensorflow_datasets as tfds

    name, data_dir = cfg.get("tfds_name", ""), cfg.get("data_dir", None) or None
    if not name:
        raise ValueError("config.data.tfds_name must name a tensorflow-datasets dataset")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError lists every dataset: keep the first line
        raise FileNotFoundError(f"config.data.tfds_name: {str(e).splitlines()[0]}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"config.data: tfds dataset {name!r} is not prepared under data_dir="
            f"{data_dir!r} (looked in {builder.data_dir}). Prepare it once with: tfds build "
            f"{name} --data_dir=<dir> --file_format=array_record")
    splits = {}
    for which in ("train_split", "eval_split"):
        split = cfg.get(which, "train" if which == "train_split" else "test")
        try:
            src = builder.as_data_source(split=split)
        except NotImplementedError as e:
            raise ValueError(f"config.data: {name!r} is stored as {builder.info.file_format}; "
                             "random access needs array_record: rebuild with "
                             "--file_format=array_record") from e
        splits[which] = TfdsSource(src, cfg.get("image_key", "image"), cfg.get("label_key", "label"))
    feat = builder.info.features
    image_key, label_key = cfg.get("image_key", "image"), cfg.get("label_key", "label")
    info = DataInfo("classification", tuple(feat[image_key].shape), feat[label_key].num_classes)
    return Dataset(splits["train_split"], splits["eval_split"], info)


def tokens(cfg) -> Dataset:
    """A corpus through a byte-level BPE tokenizer, read from ArrayRecord shards, each
    process reading its own (``train.tokens.tokens_dataset``, which lists the keys).

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import tokens
        >>> d = Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     _ = (d / f'{i}.txt').write_text(f'a{i} = b + {i}\\n' * 50)
        >>> ds = tokens(ConfigDict({'corpus': str(d / '*.txt'), 'vocab_size': 270,
        ...                         'seq_len': 8, 'num_shards': 2, 'data_dir': str(d / 'data')}))
        >>> ds.info, len(ds.eval) > 0
        (DataInfo(task='lm', input_shape=(8,), num_classes=270), True)
    """
    from sparsejax.train.tokens import tokens_dataset

    return tokens_dataset(cfg)


DATASETS = {"digits": digits, "synthetic_images": synthetic_images,
            "synthetic_tokens": synthetic_tokens,
            "associative_recall": associative_recall, "copy": copy_task, "text": text_file,
            "stdlib_bytes": stdlib_bytes,
            "tfds": tfds_dataset, "tokens": tokens}


def get_dataset(cfg) -> Dataset:
    """Builds the dataset named ``cfg.name`` (one of ``DATASETS``).

    Example:

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.data import get_dataset
        >>> get_dataset(ConfigDict({'name': 'digits'})).info
        DataInfo(task='classification', input_shape=(8, 8, 1), num_classes=10)
        >>> get_dataset(ConfigDict({'name': 'mnist'}))
        Traceback (most recent call last):
        ...
        ValueError: config.data.name: unknown dataset 'mnist'; known: ['associative_recall', ...]
    """
    if cfg.name not in DATASETS:
        raise ValueError(f"config.data.name: unknown dataset {cfg.name!r}; known: "
                         f"{sorted(DATASETS)}")
    return DATASETS[cfg.name](cfg)
