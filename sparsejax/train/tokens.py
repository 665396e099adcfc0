"""A tokenised language-modelling data path: BPE tokens in ArrayRecord shards.

``prepare`` runs once per setting, offline:

1. the corpus (default: the Python standard library's own ``.py`` sources, no download)
   is resolved to a sorted list of documents and split into train and eval *by
   document*, deterministically (the documents whose name hashes lowest go to eval);
2. a byte-level BPE tokenizer (HuggingFace ``tokenizers``) is trained on the train
   documents and saved as ``tokenizer.json``;
3. each split is tokenised into one stream (every document followed by ``<|endoftext|>``)
   and cut into windows of ``seq_len + 1`` tokens at stride ``seq_len`` (inputs
   ``w[:-1]``, targets ``w[1:]``, as the byte-level ``text`` dataset does);
4. the windows go, in order, into ``num_shards`` contiguous ArrayRecord shards per
   split (``group_size:1``, for random access), and ``manifest.json`` records the
   settings, the corpus hash, the tokenizer hash and every shard's record count, size
   and SHA-256.

The directory is ``<data_dir>/tokens-<hash>``, the hash taken over the settings and the
corpus contents, so other settings or an edited corpus never reuse it. ``prepare``
writes into a temporary directory beside it and renames it into place, so two processes
preparing at once both end with one complete copy, and a prepare that fails leaves
nothing behind and every existing directory untouched. ``data_dir`` defaults to
``$XDG_CACHE_HOME/sparsejax/tokens`` (``~/.cache/sparsejax/tokens``).

Reading: ``TokenSource`` is a ``data.Source`` over one split, reading records by index.
Shard ``s`` belongs to process ``s % process_count``; ``host_view(p, P)`` reads only
process ``p``'s shards (with one process: everything, in order), and
``data.BatchIterator`` and ``data.eval_batches`` use it, so on several hosts each process
reads only its own shards. Batches stay a pure function of ``(seed, step)`` (and the
process count), so runs resume exactly from the iterator position.

Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from ml_collections import ConfigDict
    >>> from sparsejax.train.data import BatchIterator, get_dataset
    >>> d = Path(tempfile.mkdtemp())
    >>> for i in range(4):
    ...     _ = (d / f'doc{i}.txt').write_text(f'def f{i}(x):\\n    return x + {i}\\n' * 40)
    >>> cfg = ConfigDict({'name': 'tokens', 'corpus': str(d / '*.txt'), 'vocab_size': 300,
    ...                   'seq_len': 16, 'num_shards': 2, 'data_dir': str(d / 'data')})
    >>> ds = get_dataset(cfg)
    >>> ds.info
    DataInfo(task='lm', input_shape=(16,), num_classes=300)
    >>> batch = next(BatchIterator(ds.train, global_batch=4, seed=0))
    >>> {k: (v.shape, v.dtype.name) for k, v in batch.items()}
    {'inputs': ((4, 16), 'int32'), 'targets': ((4, 16), 'int32'), 'weights': ((4, 16), 'float32')}
    >>> bool((batch['inputs'][:, 1:] == batch['targets'][:, :-1]).all())
    True
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from sparsejax.train.data import Batch, DataInfo, Dataset

FORMAT = 1
"""The on-disk format; part of the directory hash, so a new format never reads old data."""
EOS = "<|endoftext|>"
"""The special token after every document (id 0)."""
MIN_VOCAB = 257
"""A byte-level BPE needs the 256 byte tokens plus ``EOS``."""
STDLIB = "stdlib"
"""The corpus entry naming the standard library's ``.py`` sources; ``stdlib/<glob>``
names files under the standard library's directory, e.g. ``stdlib/json/*.py``."""
STDLIB_EXCLUDED = ("site-packages", "dist-packages", "test", "tests", "idle_test")
"""Folders of the standard library directory left out of the ``stdlib`` corpus: installed
packages are not the standard library, and the test suites hold deliberately broken
files."""
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0"
SPLITS = ("train", "eval")


class Document(NamedTuple):
    """One corpus file: ``name`` (``stdlib/<relative path>`` or the path as matched) and
    its ``path``."""

    name: str
    path: Path


class Settings(NamedTuple):
    """Everything a prepared directory depends on besides the corpus contents.

    Example:

        >>> from sparsejax.train.tokens import Settings
        >>> Settings.from_config({'seq_len': 64})
        Settings(corpus=('stdlib',), vocab_size=4096, seq_len=64, num_shards=8, eval_fraction=0.05)
    """

    corpus: tuple[str, ...] = (STDLIB,)
    vocab_size: int = 4096
    seq_len: int = 128
    num_shards: int = 8
    eval_fraction: float = 0.05

    @classmethod
    def from_config(cls, cfg) -> Settings:
        """The settings a ``config.data`` section names (defaults for the rest); a string
        corpus is comma-separated.

        Example:

            >>> from sparsejax.train.tokens import Settings
            >>> Settings.from_config({'corpus': 'stdlib/json/*.py, a.txt'}).corpus
            ('stdlib/json/*.py', 'a.txt')
        """
        d = cls._field_defaults
        corpus = cfg.get("corpus", None) or d["corpus"]
        if isinstance(corpus, str):
            corpus = tuple(c.strip() for c in corpus.split(",") if c.strip())
        return cls(tuple(str(c) for c in corpus), int(cfg.get("vocab_size", d["vocab_size"])),
                   int(cfg.get("seq_len", d["seq_len"])),
                   int(cfg.get("num_shards", d["num_shards"])),
                   float(cfg.get("eval_fraction", d["eval_fraction"])))


# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    """The standard library's directory (``sysconfig.get_paths()['stdlib']``).

    Example:

        >>> from sparsejax.train.tokens import stdlib_dir
        >>> (stdlib_dir() / 'json' / '__init__.py').exists()
        True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(corpus: Sequence[str]) -> list[Document]:
    """The documents a corpus names, sorted by name, each once.

    Each entry is ``'stdlib'`` (every ``.py`` file of the standard library, without
    ``STDLIB_EXCLUDED`` folders), ``'stdlib/<glob>'`` (a glob under the standard
    library's directory) or a glob (``**`` recurses, ``~`` expands). An entry that
    matches no file is an error naming it.

    Example:

        >>> from sparsejax.train.tokens import corpus_files
        >>> [d.name for d in corpus_files(['stdlib/json/*.py'])][:2]
        ['stdlib/json/__init__.py', 'stdlib/json/decoder.py']
        >>> corpus_files(['/nonexistent/*.txt'])
        Traceback (most recent call last):
        ...
        ValueError: config.data.corpus: '/nonexistent/*.txt' matches no file
    """
    if not corpus:
        raise ValueError("config.data.corpus is empty: name 'stdlib' or files/globs")
    root = stdlib_dir()
    docs: dict[str, Document] = {}
    for entry in corpus:
        if entry == STDLIB:
            found = [p for p in root.rglob("*.py")
                     if not set(p.relative_to(root).parts[:-1]) & set(STDLIB_EXCLUDED)]
            named = [(f"{STDLIB}/{p.relative_to(root).as_posix()}", p) for p in found]
        elif entry.startswith(STDLIB + "/"):
            pattern = entry[len(STDLIB) + 1:]
            found = [Path(p) for p in glob.glob(str(root / pattern), recursive=True)]
            named = [(f"{STDLIB}/{p.relative_to(root).as_posix()}", p) for p in found]
        else:
            found = [Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True)]
            named = [(p.as_posix(), p) for p in found]
        named = [(n, p) for n, p in named if p.is_file()]
        if not named:
            raise ValueError(f"config.data.corpus: {entry!r} matches no file")
        for name, path in named:
            docs.setdefault(name, Document(name, path))
    return [docs[n] for n in sorted(docs)]


def read_text(doc: Document) -> str:
    """A document's text: UTF-8, undecodable bytes replaced (U+FFFD).

    Example:

        >>> from sparsejax.train.tokens import corpus_files, read_text
        >>> read_text(corpus_files(['stdlib/json/__init__.py'])[0])[:3]
        'r""'
    """
    return doc.path.read_bytes().decode("utf-8", errors="replace")


def corpus_hash(docs: Sequence[Document]) -> str:
    """SHA-256 over every document's name and contents: the corpus part of a directory's
    identity.

    Example:

        >>> from sparsejax.train.tokens import corpus_files, corpus_hash
        >>> docs = corpus_files(['stdlib/json/*.py'])
        >>> corpus_hash(docs) == corpus_hash(docs[::-1]), corpus_hash(docs) == corpus_hash(docs[1:])
        (True, False)
    """
    h = hashlib.sha256()
    for doc in sorted(docs):
        h.update(doc.name.encode() + b"\0" + hashlib.sha256(doc.path.read_bytes()).digest())
    return h.hexdigest()


def split_documents(names: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval) names, each sorted: the ``max(1, round(eval_fraction * n))`` names
    whose SHA-256 is lowest go to eval, so a document's split does not depend on which
    other documents the corpus holds.

    Example:

        >>> from sparsejax.train.tokens import split_documents
        >>> train, ev = split_documents([f'doc{i}' for i in range(10)], 0.2)
        >>> len(train), len(ev), sorted(train + ev) == [f'doc{i}' for i in range(10)]
        (8, 2, True)
        >>> split_documents(['only'], 0.1)
        Traceback (most recent call last):
        ...
        ValueError: config.data.corpus: 1 document(s); a train/eval split by document needs at least 2
    """
    if len(names) < 2:
        raise ValueError(f"config.data.corpus: {len(names)} document(s); a train/eval "
                         "split by document needs at least 2")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction={eval_fraction} must be in (0, 1)")
    n_eval = min(len(names) - 1, max(1, round(eval_fraction * len(names))))
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    ev = set(ranked[:n_eval])
    return sorted(n for n in names if n not in ev), sorted(ev)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``: no normaliser, so
    ``decode(encode(text)) == text`` for any text; ``EOS`` is id 0. Deterministic.

    Example:

        >>> from sparsejax.train.tokens import train_tokenizer
        >>> tok = train_tokenizer(['def f(x):\\n    return x\\n'] * 20, vocab_size=280)
        >>> text = 'def g(y): return "é"\\n'
        >>> tok.decode(tok.encode(text).ids) == text, tok.token_to_id('<|endoftext|>')
        (True, 0)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def check_vocab_size(vocab_size: int) -> None:
    """Raises unless ``vocab_size`` holds the byte alphabet and ``EOS``.

    Example:

        >>> from sparsejax.train.tokens import check_vocab_size
        >>> check_vocab_size(100)
        Traceback (most recent call last):
        ...
        ValueError: config.data.vocab_size=100 is too small: a byte-level BPE needs at least 257 (256 bytes + <|endoftext|>)
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"config.data.vocab_size={vocab_size} is too small: a byte-level BPE "
                         f"needs at least {MIN_VOCAB} (256 bytes + {EOS})")


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in a prepared directory.

    Example:

        >>> import tempfile
        >>> from sparsejax.train.tokens import TOKENIZER, load_tokenizer, train_tokenizer
        >>> d = tempfile.mkdtemp()
        >>> train_tokenizer(['abc abd abe'] * 5, 260).save(f'{d}/{TOKENIZER}')
        >>> load_tokenizer(d).get_vocab_size()
        260
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / TOKENIZER))


def token_stream(tokenizer, texts: Sequence[str], progress: bool = False) -> np.ndarray:
    """The texts' token ids, each text followed by ``EOS``, as one int64 array.

    Example:

        >>> from sparsejax.train.tokens import token_stream, train_tokenizer
        >>> tok = train_tokenizer(['ab ab ab'] * 5, 260)
        >>> s = token_stream(tok, ['ab', 'ab ab'])
        >>> tok.decode(s.tolist(), skip_special_tokens=False)
        'ab<|endoftext|>ab ab<|endoftext|>'
    """
    from tqdm.auto import tqdm

    eos = tokenizer.token_to_id(EOS)
    parts = []
    chunk = 64
    for start in tqdm(range(0, len(texts), chunk), desc="tokenising", unit="chunk",
                      disable=not progress, delay=2.0, leave=False):
        for enc in tokenizer.encode_batch(list(texts[start:start + chunk])):
            parts.append(np.asarray(enc.ids, np.int64))
            parts.append(np.asarray([eos], np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` (consecutive windows share
    one token: the last target of one is the first input of the next); the tail that
    does not fill a window is dropped.

    Example:

        >>> import numpy as np
        >>> from sparsejax.train.tokens import windows
        >>> windows(np.arange(10), 3).tolist()
        [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    """
    n = max(0, (len(stream) - 1) // seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    return stream[idx]


# ----------------------------------------------------------------------------- prepare


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/sparsejax/tokens``, or ``~/.cache/sparsejax/tokens``.

    Example:

        >>> from sparsejax.train.tokens import default_data_dir
        >>> default_data_dir().parts[-2:]
        ('sparsejax', 'tokens')
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sparsejax" / "tokens"


def settings_key(settings: Settings, corpus_sha: str) -> str:
    """The directory's identity: SHA-256 of the format, the settings and the corpus hash
    (not of how the corpus was spelt).

    Example:

        >>> from sparsejax.train.tokens import Settings, settings_key
        >>> a = settings_key(Settings(seq_len=64), 'c0ffee')
        >>> a == settings_key(Settings(seq_len=64), 'c0ffee'), a == settings_key(Settings(seq_len=32), 'c0ffee')
        (True, False)
    """
    ident = {"format": FORMAT, "corpus_sha256": corpus_sha,
             **{k: v for k, v in settings._asdict().items() if k != "corpus"}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _token_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<i4"


def _write_split(directory: Path, split: str, rows: np.ndarray, num_shards: int,
                 progress: bool) -> dict:
    from array_record.python import array_record_module
    from tqdm.auto import tqdm

    bounds = [len(rows) * s // num_shards for s in range(num_shards + 1)]
    shards = []
    bar = tqdm(total=len(rows), desc=f"writing {split}", unit="rec", disable=not progress,
               delay=2.0, leave=False)
    for s in range(num_shards):
        name = f"{split}-{s:05d}-of-{num_shards:05d}.array_record"
        writer = array_record_module.ArrayRecordWriter(str(directory / name), WRITER_OPTIONS)
        for row in rows[bounds[s]:bounds[s + 1]]:
            writer.write(row.tobytes())
        writer.close()
        bar.update(bounds[s + 1] - bounds[s])
        shards.append({"file": name, "records": bounds[s + 1] - bounds[s],
                       "bytes": (directory / name).stat().st_size,
                       "sha256": _file_sha(directory / name)})
    bar.close()
    return {"shards": shards, "records": len(rows)}


def _build(directory: Path, settings: Settings, docs: list[Document], key: str,
           corpus_sha: str, progress: bool) -> dict:
    """Writes tokenizer, shards and manifest into ``directory``; returns the manifest."""
    texts = {d.name: read_text(d) for d in docs}
    if not any(texts.values()):
        raise ValueError(f"config.data.corpus {list(settings.corpus)}: the {len(docs)} "
                         "file(s) it matches are empty")
    train_names, eval_names = split_documents(sorted(texts), settings.eval_fraction)
    tok = train_tokenizer([texts[n] for n in train_names], settings.vocab_size)
    tok.save(str(directory / TOKENIZER))
    dtype = _token_dtype(settings.vocab_size)
    manifest = {"format": FORMAT, "key": key, "settings": settings._asdict(),
                "corpus_sha256": corpus_sha,
                "tokenizer": {"file": TOKENIZER, "sha256": _file_sha(directory / TOKENIZER),
                              "vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(EOS)},
                "dtype": dtype, "documents": {"train": train_names, "eval": eval_names},
                "splits": {}}
    for split, names in zip(SPLITS, (train_names, eval_names)):
        stream = token_stream(tok, [texts[n] for n in names], progress)
        rows = windows(stream, settings.seq_len)
        if len(rows) < settings.num_shards:
            raise ValueError(
                f"config.data.seq_len={settings.seq_len} is too long for the corpus: the "
                f"{split} split ({len(names)} document(s)) holds {len(stream)} tokens, "
                f"{len(rows)} window(s) of {settings.seq_len + 1}, fewer than num_shards="
                f"{settings.num_shards}; use a shorter seq_len, fewer shards or a larger corpus")
        manifest["splits"][split] = {**_write_split(directory, split, rows.astype(dtype),
                                                    settings.num_shards, progress),
                                     "tokens": len(stream)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def prepare(settings: Settings, data_dir: str | Path | None = None,
            progress: bool = True) -> Path:
    """The prepared directory for ``settings``: reused when it exists, built otherwise.

    Building writes into a temporary directory beside the final one and renames it into
    place; when another process got there first its copy is kept. A failure removes the
    temporary directory and touches nothing else. An existing directory whose manifest
    does not match is an error (delete it to prepare again), never silently rebuilt.
    ``progress`` shows a bar for work that takes more than two seconds.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from sparsejax.train.tokens import Settings, prepare
        >>> d = Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     _ = (d / f'{i}.txt').write_text(f'x{i} = {i} + y\\n' * 50)
        >>> s = Settings(corpus=(str(d / '*.txt'),), vocab_size=260, seq_len=8, num_shards=2)
        >>> path = prepare(s, d / 'data')
        >>> sorted(p.name for p in path.iterdir())[:3]
        ['eval-00000-of-00002.array_record', 'eval-00001-of-00002.array_record', 'manifest.json']
        >>> prepare(s, d / 'data') == path          # the same settings reuse it
        True
        >>> prepare(s._replace(seq_len=16), d / 'data') == path
        False
    """
    check_vocab_size(settings.vocab_size)
    if settings.seq_len < 1 or settings.num_shards < 1:
        raise ValueError(f"config.data: seq_len={settings.seq_len} and num_shards="
                         f"{settings.num_shards} must be positive")
    docs = corpus_files(settings.corpus)
    corpus_sha = corpus_hash(docs)
    key = settings_key(settings, corpus_sha)
    root = Path(data_dir) if data_dir else default_data_dir()
    final = root / f"tokens-{key[:16]}"
    if (final / MANIFEST).exists():
        load_manifest(final, key)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _build(tmp, settings, docs, key, corpus_sha, progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise FileExistsError(f"{final} exists but holds no {MANIFEST}: it is not a "
                                      "prepared directory; move it away to prepare again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_manifest(final, key)
    return final


def load_manifest(directory: str | Path, key: str | None = None) -> dict:
    """A prepared directory's manifest, checked: it parses, it has this format and (when
    given) this settings ``key``, and the tokenizer file has its recorded hash. Shards
    are checked when they are read (``TokenSource.verify``).

    Example:

        >>> import tempfile
        >>> from sparsejax.train.tokens import load_manifest
        >>> load_manifest(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: ...manifest.json: no manifest; prepare the data first (tokens.prepare)
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; prepare the data first (tokens.prepare)")
    delete = f"; delete {directory} to prepare it again"
    try:
        manifest = json.loads(path.read_text())
        stored_key, fmt = manifest["key"], manifest["format"]
        tokenizer = manifest["tokenizer"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt ({e!r}){delete}") from e
    if fmt != FORMAT or (key is not None and stored_key != key):
        raise ValueError(f"{path} does not match: format {fmt}, key {stored_key[:16]}…, "
                         f"expected format {FORMAT}" + (f", key {key[:16]}…" if key else "")
                         + delete)
    tok_path = directory / tokenizer["file"]
    if not tok_path.exists() or _file_sha(tok_path) != tokenizer["sha256"]:
        raise ValueError(f"{tok_path} does not match the manifest's sha256{delete}")
    return manifest


# ----------------------------------------------------------------------------- reading


class TokenSource:
    """One split of a prepared directory as a ``data.Source``: record ``i`` is window
    ``i`` of the split, ``get`` returns ``inputs``/``targets`` (int32, ``[B, seq_len]``)
    and ``weights`` (float32 ones), the format of the other LM datasets.

    ``shards`` selects the shards this view reads (default all); its indices run over
    their records in shard order. ``host_view(p, P)`` is process ``p``'s view: shards
    ``s`` with ``s % P == p``. Readers open lazily, one per shard, and each shard is
    checked against the manifest (size and SHA-256, record count) before its first read.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from sparsejax.train.tokens import Settings, TokenSource, prepare
        >>> d = Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     _ = (d / f'{i}.txt').write_text(f'y{i} = {i} * x\\n' * 50)
        >>> path = prepare(Settings(corpus=(str(d / '*.txt'),), vocab_size=260, seq_len=8,
        ...                         num_shards=4), d / 'data')
        >>> src = TokenSource(path, 'train')
        >>> views = [src.host_view(p, 2) for p in range(2)]
        >>> [v.shards for v in views], sum(map(len, views)) == len(src)
        ([(0, 2), (1, 3)], True)
        >>> idx = views[1].global_indices()[:3]   # the same records, by either index
        >>> bool((views[1].get(np.arange(3))['inputs'] == src.get(idx)['inputs']).all())
        True
    """

    def __init__(self, directory: str | Path, split: str, shards: Sequence[int] | None = None,
                 manifest: dict | None = None):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: one of {SPLITS}")
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else load_manifest(self.directory)
        self.split = split
        info = self.manifest["splits"][split]["shards"]
        self.shards = tuple(range(len(info)) if shards is None else shards)
        self._info = [info[s] for s in self.shards]
        all_offsets = np.cumsum([0] + [s["records"] for s in info])
        self._global_start = [int(all_offsets[s]) for s in self.shards]
        self._offsets = np.cumsum([0] + [s["records"] for s in self._info])
        self.seq_len = int(self.manifest["settings"]["seq_len"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self._readers: dict[int, object] = {}
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def host_view(self, process_index: int, process_count: int) -> TokenSource:
        """Process ``process_index``'s shards (``s % process_count == process_index``).

        Example:

            >>> from sparsejax.train.tokens import TokenSource, _example_directory
            >>> src = TokenSource(_example_directory(num_shards=3), 'train')
            >>> [src.host_view(p, 2).shards for p in range(2)]
            [(0, 2), (1,)]
        """
        n = len(self.manifest["splits"][self.split]["shards"])
        if process_count > n:
            raise ValueError(f"{self.split} split of {self.directory} has {n} shards, fewer "
                             f"than the {process_count} processes: prepare with "
                             f"config.data.num_shards a multiple of the process count")
        mine = [s for s in range(n) if s % process_count == process_index]
        return TokenSource(self.directory, self.split, mine, self.manifest)

    def host_lengths(self, process_count: int) -> list[int]:
        """Every process's number of records (from the manifest; nothing is read).

        Example:

            >>> from sparsejax.train.tokens import TokenSource, _example_directory
            >>> src = TokenSource(_example_directory(num_shards=3), 'train')
            >>> lengths = src.host_lengths(2)
            >>> lengths == [len(src.host_view(p, 2)) for p in range(2)], sum(lengths) == len(src)
            (True, True)
        """
        info = self.manifest["splits"][self.split]["shards"]
        return [sum(s["records"] for i, s in enumerate(info) if i % process_count == p)
                for p in range(process_count)]

    def global_indices(self) -> np.ndarray:
        """The split-wide index of each of this view's records.

        Example:

            >>> from sparsejax.train.tokens import TokenSource, _example_directory
            >>> src = TokenSource(_example_directory(num_shards=2), 'train')
            >>> view = src.host_view(1, 2)
            >>> bool(view.global_indices()[0] == len(src.host_view(0, 2)))
            True
        """
        return np.concatenate([np.arange(g, g + s["records"])
                               for g, s in zip(self._global_start, self._info)]).astype(np.int64)

    def verify(self) -> None:
        """Checks every shard of this view against the manifest (size, SHA-256).

        Example:

            >>> from sparsejax.train.tokens import TokenSource, _example_directory
            >>> path = _example_directory()
            >>> TokenSource(path, 'eval').verify()        # intact
            >>> with open(path / 'eval-00000-of-00002.array_record', 'r+b') as f:
            ...     _ = f.seek(-1, 2); _ = f.write(b'!')
            >>> TokenSource(path, 'eval').verify()
            Traceback (most recent call last):
            ...
            ValueError: ...eval-00000-of-00002.array_record does not match the manifest's sha256 (corrupt or edited); delete ... to prepare it again
        """
        for k in range(len(self.shards)):
            self._verify(k)

    def _verify(self, k: int) -> None:
        if k in self._verified:
            return
        info = self._info[k]
        path = self.directory / info["file"]
        problem = None
        if not path.exists():
            problem = "is missing"
        elif path.stat().st_size != info["bytes"]:
            problem = f"has {path.stat().st_size} bytes, the manifest says {info['bytes']}"
        elif _file_sha(path) != info["sha256"]:
            problem = "does not match the manifest's sha256"
        if problem:
            raise ValueError(f"{path} {problem} (corrupt or edited); delete {self.directory} "
                             "to prepare it again")
        self._verified.add(k)

    def _reader(self, k: int):
        if k not in self._readers:
            from array_record.python import array_record_module

            self._verify(k)
            path = self.directory / self._info[k]["file"]
            reader = array_record_module.ArrayRecordReader(str(path), READER_OPTIONS)
            if reader.num_records() != self._info[k]["records"]:
                raise ValueError(f"{path} holds {reader.num_records()} records, the manifest "
                                 f"says {self._info[k]['records']}; delete {self.directory} "
                                 "to prepare it again")
            self._readers[k] = reader
        return self._readers[k]

    def records(self, indices: np.ndarray) -> np.ndarray:
        """The windows (``[len(indices), seq_len + 1]`` tokens) at this view's indices.

        Example:

            >>> from sparsejax.train.tokens import TokenSource, _example_directory
            >>> src = TokenSource(_example_directory(seq_len=8), 'train')
            >>> rows = src.records([0, 1])
            >>> rows.shape, bool(rows[0, -1] == rows[1, 0])   # consecutive windows share a token
            ((2, 9), True)
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"record index out of range [0, {len(self)})")
        out = np.empty((len(indices), self.seq_len + 1), self.dtype)
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        for k in np.unique(shard):
            where = np.flatnonzero(shard == k)
            pos = (indices[where] - self._offsets[k]).tolist()
            raw = self._reader(int(k)).read(pos)
            out[where] = np.frombuffer(b"".join(raw), self.dtype).reshape(len(pos), -1)
        return out

    def get(self, indices: np.ndarray) -> Batch:
        """Next-token pairs of the records at ``indices`` (``data.Source.get``).

        Example:

            >>> from sparsejax.train.tokens import TokenSource, _example_directory
            >>> b = TokenSource(_example_directory(seq_len=8), 'train').get([2, 0])
            >>> {k: (v.shape, v.dtype.name) for k, v in b.items()}
            {'inputs': ((2, 8), 'int32'), 'targets': ((2, 8), 'int32'), 'weights': ((2, 8), 'float32')}
        """
        rows = self.records(indices)
        return {"inputs": rows[:, :-1].astype(np.int32), "targets": rows[:, 1:].astype(np.int32),
                "weights": np.ones((len(rows), self.seq_len), np.float32)}


def _example_directory(num_shards: int = 2, seq_len: int = 8) -> Path:
    """A tiny prepared directory in a fresh temporary folder, for the examples."""
    d = Path(tempfile.mkdtemp())
    for i in range(3):
        (d / f"{i}.txt").write_text(f"v{i} = [{i}, x, {i}]\n" * 60)
    return prepare(Settings((str(d / "*.txt"),), 260, seq_len, num_shards), d / "data",
                   progress=False)


def tokens_dataset(cfg) -> Dataset:
    """The ``tokens`` dataset: ``prepare`` (or reuse) the data, then a ``TokenSource`` per
    split. Config keys: ``corpus`` ('stdlib', or files/globs, comma-separated or a tuple),
    ``vocab_size`` (4096), ``seq_len`` (128), ``num_shards`` (8, per split; a multiple of
    the process count), ``eval_fraction`` (0.05 of the documents), ``data_dir`` (''
    is ``default_data_dir()``). This process's shards are checked against the manifest
    here, before training starts.

    Example (the module's example runs it through ``data.get_dataset``):

        >>> from ml_collections import ConfigDict
        >>> from sparsejax.train.tokens import tokens_dataset
        >>> tokens_dataset(ConfigDict({'corpus': 'stdlib/json/*.py', 'vocab_size': 64}))
        Traceback (most recent call last):
        ...
        ValueError: config.data.vocab_size=64 is too small: ...
    """
    import jax

    settings = Settings.from_config(cfg)
    path = prepare(settings, cfg.get("data_dir", "") or None,
                   progress=jax.process_index() == 0)
    manifest = load_manifest(path)
    train, ev = (TokenSource(path, split, manifest=manifest) for split in SPLITS)
    for src in (train, ev):
        src.host_view(jax.process_index(), jax.process_count()).verify()
    return Dataset(train, ev, DataInfo("lm", (settings.seq_len,), settings.vocab_size))
