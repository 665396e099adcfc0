"""The tokenised LM data path: tokenizer, windows, shards per host, determinism, errors."""

import hashlib
import json
import threading

import ml_collections as mc
import numpy as np
import pytest

from configs import lm_text
from sparsejax.train import read_jsonl, train_and_evaluate
from sparsejax.train import data as D
from sparsejax.train import tokens as T

JSON = "stdlib/json/*.py"  # five real modules, about 50 kB


def settings(**kw):
    base = dict(corpus=(JSON,), vocab_size=400, seq_len=32, num_shards=4, eval_fraction=0.2)
    return T.Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return T.prepare(settings(), tmp_path_factory.mktemp("tokens"), progress=False)


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_tokenizer_round_trips_real_stdlib_text(prepared):
    tok = T.load_tokenizer(prepared)
    docs = T.corpus_files(["stdlib/*.py"])
    texts = [T.read_text(d) for d in docs[:40]]  # not the corpus it was trained on
    texts.append(next(t for t in map(T.read_text, docs) if any(ord(c) > 127 for c in t)))
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # BPE compresses: merges were learnt
    assert tok.get_vocab_size() == 400 and tok.token_to_id(T.EOS) == 0


def test_windows_match_an_independent_tokenisation(prepared):
    manifest = T.load_manifest(prepared)
    tok = T.load_tokenizer(prepared)
    docs = {d.name: d for d in T.corpus_files([JSON])}
    assert sorted(manifest["documents"]["train"] + manifest["documents"]["eval"]) == sorted(docs)
    for split in T.SPLITS:
        stream = []
        for name in manifest["documents"][split]:  # one encode() call per document
            stream += tok.encode(docs[name].path.read_text()).ids + [0]
        want = [stream[i * 32:i * 32 + 33] for i in range((len(stream) - 1) // 32)]
        src = T.TokenSource(prepared, split)
        got = src.records(np.arange(len(src)))
        assert got.tolist() == want and len(want) == manifest["splits"][split]["records"]
        b = src.get(np.array([1, 0]))
        np.testing.assert_array_equal(b["inputs"], np.asarray(want)[[1, 0], :-1])
        np.testing.assert_array_equal(b["targets"], np.asarray(want)[[1, 0], 1:])
        assert {k: v.dtype for k, v in b.items()} == {
            "inputs": np.int32, "targets": np.int32, "weights": np.float32}


def test_split_is_by_document_and_deterministic(prepared):
    manifest = T.load_manifest(prepared)
    train, ev = manifest["documents"]["train"], manifest["documents"]["eval"]
    assert len(ev) == 1 and not set(train) & set(ev)
    assert T.split_documents(sorted(train + ev), 0.2) == (train, ev)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_host_views_partition_the_records(prepared, count):
    for split in T.SPLITS:
        full = T.TokenSource(prepared, split)
        views = [full.host_view(p, count) for p in range(count)]
        owned = np.concatenate([v.global_indices() for v in views])
        assert sorted(owned.tolist()) == list(range(len(full)))  # disjoint, and all of them
        assert [len(v) for v in views] == full.host_lengths(count)
        for p, v in enumerate(views):
            assert all(s % count == p for s in v.shards)
            np.testing.assert_array_equal(v.records(np.arange(len(v))),
                                          full.records(v.global_indices()))
    with pytest.raises(ValueError, match="4 shards, fewer than the 5 processes"):
        full.host_view(0, 5)


def test_batches_are_deterministic_and_resume(prepared):
    src = T.TokenSource(prepared, "train")
    one = [next(D.BatchIterator(src, 16, seed=3, position=7))["inputs"] for _ in range(2)]
    np.testing.assert_array_equal(*one)
    walked = D.BatchIterator(src, 16, seed=3)
    steps = len(src) // 16 + 2  # crosses an epoch boundary
    batches = [next(walked) for _ in range(steps)]
    resumed = D.BatchIterator(src, 16, seed=3, position=5)
    for b in batches[5:]:
        got = next(resumed)
        for k in b:
            np.testing.assert_array_equal(got[k], b[k])
    other = next(D.BatchIterator(src, 16, seed=4))["inputs"]
    assert not np.array_equal(other, batches[0]["inputs"])
    # one process: the batches any source of the same records gives
    same = D.ArraySource(src.get(np.arange(len(src))))
    plain = D.BatchIterator(same, 16, seed=3)
    for b in batches:
        np.testing.assert_array_equal(next(plain)["inputs"], b["inputs"])


def test_each_process_reads_only_its_shards(prepared):
    src = T.TokenSource(prepared, "train")
    full = src.records(np.arange(len(src)))
    for p in range(2):
        mine = {r.tobytes() for r in full[src.host_view(p, 2).global_indices()]}
        it = D.BatchIterator(src, 16, seed=0, position=3, process_index=p, process_count=2)
        fresh = D.BatchIterator(src, 16, seed=0, process_index=p, process_count=2)
        for _ in range(3):
            next(fresh)
        for _ in range(4):
            b, f = next(it), next(fresh)
            np.testing.assert_array_equal(b["inputs"], f["inputs"])  # resumes per process
            rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).astype(full.dtype)
            assert len(b["inputs"]) == 8 and all(r.tobytes() in mine for r in rows)
        opened = set(it._local._readers)  # readers exist only for this process's shards
        assert opened and all(it._local.shards[k] % 2 == p for k in opened)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_eval_batches_cover_each_record_once_across_processes(prepared, count):
    src = T.TokenSource(prepared, "eval")
    full = src.records(np.arange(len(src)))
    seen, lengths = [], []
    for p in range(count):
        batches = list(D.eval_batches(src, 8, p, count))
        lengths.append(len(batches))
        for b in batches:
            keep = b["weights"][:, 0] > 0
            seen += [r.tobytes() for r in np.concatenate(
                [b["inputs"], b["targets"][:, -1:]], axis=1)[keep].astype(full.dtype)]
    assert len(set(lengths)) == 1  # every process runs as many eval steps
    assert sorted(seen) == sorted(r.tobytes() for r in full)


def test_prepare_reuses_and_keys_by_settings(prepared):
    root = prepared.parent
    assert T.prepare(settings(), root, progress=False) == prepared
    before = digest(prepared)
    other = T.prepare(settings(seq_len=16), root, progress=False)
    assert other != prepared and digest(prepared) == before
    assert T.load_manifest(other)["settings"]["seq_len"] == 16
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_corpus_contents_are_part_of_the_key(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"line {i} of text\n" * 80)
    s = settings(corpus=(str(tmp_path / "*.txt"),), vocab_size=300, seq_len=8, num_shards=2)
    a = T.prepare(s, tmp_path / "data", progress=False)
    (tmp_path / "1.txt").write_text("edited\n" * 200)
    b = T.prepare(s, tmp_path / "data", progress=False)
    assert a != b and a.exists()


def test_concurrent_prepares_end_with_one_copy(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"value_{i} = {i}\n" * 200)
    s = settings(corpus=(str(tmp_path / "*.txt"),), vocab_size=300, seq_len=8, num_shards=2)
    out, errors = [], []

    def run():
        try:
            out.append(T.prepare(s, tmp_path / "data", progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(out)) == 1
    assert [p.name for p in (tmp_path / "data").iterdir()] == [out[0].name]
    T.TokenSource(out[0], "train").verify()


def test_get_dataset_and_lm_text_config(prepared):
    cfg = mc.ConfigDict({"name": "tokens", "corpus": JSON, "vocab_size": 400, "seq_len": 32,
                         "num_shards": 4, "eval_fraction": 0.2,
                         "data_dir": str(prepared.parent)})
    ds = D.get_dataset(cfg)
    assert ds.info == D.DataInfo("lm", (32,), 400)
    assert ds.train.directory == prepared and len(ds.train) > len(ds.eval) > 0
    tiny = lm_text.get_config("tiny")
    assert tiny.data.name == "tokens" and tiny.model_name == "lm"
    assert set(cfg) <= set(tiny.data)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("corpus,message", [
    (("/nonexistent/dir/*.txt",), r"config.data.corpus: '/nonexistent/dir/\*.txt' matches no file"),
    (("stdlib/no_such_module/*.py",), "matches no file"),
    ((), "config.data.corpus is empty"),
])
def test_corpus_that_names_nothing(tmp_path, corpus, message):
    with pytest.raises(ValueError, match=message):
        T.prepare(settings()._replace(corpus=corpus), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_empty_files_are_an_empty_corpus(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text("")
    with pytest.raises(ValueError, match="the 2 file\\(s\\) it matches are empty"):
        T.prepare(settings(corpus=(str(tmp_path / "*.txt"),)), tmp_path / "data",
                  progress=False)
    assert not any((tmp_path / "data").iterdir())


def test_one_document_cannot_be_split(tmp_path):
    (tmp_path / "a.txt").write_text("text " * 500)
    with pytest.raises(ValueError, match="1 document\\(s\\); a train/eval split"):
        T.prepare(settings(corpus=(str(tmp_path / "a.txt"),)), tmp_path / "d", progress=False)


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=256 is too small: .* at least 257"):
        T.prepare(settings(vocab_size=256), tmp_path, progress=False)
    with pytest.raises(ValueError, match="vocab_size=10 is too small"):
        D.get_dataset(mc.ConfigDict({"name": "tokens", "corpus": JSON, "vocab_size": 10,
                                     "data_dir": str(tmp_path)}))


def test_seq_len_too_long_leaves_existing_data_untouched(prepared):
    root = prepared.parent
    before = {p.name: digest(p) for p in root.iterdir()}
    with pytest.raises(ValueError, match=r"seq_len=100000 is too long for the corpus: the "
                                         r"train split .* fewer than num_shards=4"):
        T.prepare(settings(seq_len=100_000), root, progress=False)
    assert {p.name: digest(p) for p in root.iterdir()} == before  # no temp dir either


def test_edited_shard_is_an_error_naming_it(tmp_path):
    path = T.prepare(settings(), tmp_path, progress=False)
    shard = path / "train-00001-of-00004.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = mc.ConfigDict({"name": "tokens", "corpus": JSON, "vocab_size": 400, "seq_len": 32,
                         "num_shards": 4, "eval_fraction": 0.2, "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="train-00001-of-00004.array_record does not match "
                                         "the manifest's sha256 .*delete"):
        D.get_dataset(cfg)
    src = T.TokenSource(path, "train")
    src.host_view(0, 2).records(np.arange(3))  # shards 0 and 2 are intact and readable
    with pytest.raises(ValueError, match="does not match the manifest's sha256"):
        src.host_view(1, 2).records(np.arange(3))
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="has .* bytes, the manifest says"):
        T.TokenSource(path, "train").verify()
    assert T.prepare(settings(), tmp_path, progress=False) == path  # never silently rebuilt


def test_edited_or_corrupt_manifest_is_an_error(tmp_path):
    path = T.prepare(settings(), tmp_path, progress=False)
    manifest = json.loads((path / T.MANIFEST).read_text())
    manifest["key"] = "0" * 64
    (path / T.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json does not match: .* delete"):
        T.prepare(settings(), tmp_path, progress=False)
    (path / T.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is corrupt"):
        T.prepare(settings(), tmp_path, progress=False)
    (path / T.MANIFEST).unlink()
    (path / "stray").write_text("x")  # a directory in the way that is not prepared data
    with pytest.raises(FileExistsError, match="holds no manifest.json"):
        T.prepare(settings(), tmp_path, progress=False)
    assert (path / "stray").exists()


def test_edited_tokenizer_is_an_error(tmp_path):
    path = T.prepare(settings(), tmp_path, progress=False)
    with open(path / T.TOKENIZER, "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="tokenizer.json does not match the manifest"):
        T.prepare(settings(), tmp_path, progress=False)


# ----------------------------------------------------------------------------- training


def test_lm_text_tiny_trains(tmp_path):
    cfg = lm_text.get_config("tiny")
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.num_steps, cfg.eval_every, cfg.checkpoint_every = 10, 10, 10
    summary = train_and_evaluate(cfg, tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0] and np.isfinite(summary["eval_loss"])
    assert train[0] < np.log(512) + 1  # next-token loss over the 512-token vocabulary
