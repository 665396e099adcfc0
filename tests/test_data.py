"""Data: determinism, resumption, process splits, eval coverage, tasks, tfds offline."""

import ml_collections as mc
import numpy as np
import pytest

from sparsejax.train import data as D


def test_batches_are_a_function_of_seed_and_step():
    a = D.batch_indices(103, 10, seed=3, step=17)
    np.testing.assert_array_equal(a, D.batch_indices(103, 10, seed=3, step=17))
    assert not np.array_equal(a, D.batch_indices(103, 10, seed=4, step=17))


def test_each_epoch_visits_distinct_examples():
    n, b = 53, 8
    spe = n // b
    for epoch in range(3):
        seen = np.concatenate([D.batch_indices(n, b, 0, epoch * spe + i) for i in range(spe)])
        assert len(np.unique(seen)) == spe * b  # no repeats within an epoch
    e0 = D.batch_indices(n, b, 0, 0)
    e1 = D.batch_indices(n, b, 0, spe)
    assert not np.array_equal(e0, e1)  # reshuffled per epoch


def test_iterator_resumes_exactly():
    src = D.ArraySource({"inputs": np.arange(50.0), "targets": np.arange(50),
                         "weights": np.ones(50)})
    full = D.BatchIterator(src, 8, seed=1)
    batches = [next(full) for _ in range(9)]
    resumed = D.BatchIterator(src, 8, seed=1, position=5)
    for b in batches[5:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], b["inputs"])
    assert resumed.position == 9


def test_processes_split_the_global_batch():
    src = D.ArraySource({"inputs": np.arange(40.0), "targets": np.arange(40),
                         "weights": np.ones(40)})
    whole = next(D.BatchIterator(src, 8, seed=2))["inputs"]
    parts = [next(D.BatchIterator(src, 8, 2, 0, i, 4))["inputs"] for i in range(4)]
    assert all(len(p) == 2 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(whole))
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        D.BatchIterator(src, 8, 0, 0, 0, 3)


def test_eval_batches_cover_each_example_once():
    src = D.ArraySource({"inputs": np.arange(23.0), "targets": np.arange(23),
                         "weights": np.ones(23)})
    got = []
    for b in D.eval_batches(src, 8):
        assert b["inputs"].shape == (8,)
        got.extend(b["inputs"][b["weights"] > 0].tolist())
    assert sorted(got) == list(range(23))


def test_digits_embedded():
    ds = D.get_dataset(mc.ConfigDict({"name": "digits"}))
    assert (len(ds.train), len(ds.eval)) == (1437, 360)
    b = ds.train.get(np.arange(len(ds.train)))
    assert b["inputs"].shape[1:] == (8, 8, 1) and 0 <= b["inputs"].min() and b["inputs"].max() <= 1
    assert set(np.unique(b["targets"])) == set(range(10))


def test_digits_random_labels_keep_inputs_and_eval_labels():
    true = D.get_dataset(mc.ConfigDict({"name": "digits"}))
    rand = D.get_dataset(mc.ConfigDict({"name": "digits", "random_labels": True}))
    idx = np.arange(len(true.train))
    t, r = true.train.get(idx), rand.train.get(idx)
    np.testing.assert_array_equal(t["inputs"], r["inputs"])
    # random labels agree with the true ones about 1 time in 10, not always
    assert 0.05 < np.mean(t["targets"] == r["targets"]) < 0.15
    e = np.arange(len(true.eval))
    np.testing.assert_array_equal(true.eval.get(e)["targets"], rand.eval.get(e)["targets"])


def test_associative_recall_answer_is_the_bound_value():
    cfg = mc.ConfigDict({"num_pairs": 5, "num_keys": 9, "num_values": 7, "train_size": 64,
                         "eval_size": 8})
    ds = D.associative_recall(cfg)
    b = ds.train.get(np.arange(64))
    for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
        keys, vals = x[0:10:2], x[1:10:2]
        assert len(set(keys.tolist())) == 5 and keys.max() < 9 and vals.min() >= 9
        assert x[10] == 9 + 7  # separator
        query = x[11]
        assert y[-1] == vals[keys.tolist().index(query)]
        assert w.sum() == 1 and w[-1] == 1


def test_copy_task_targets_repeat_the_prefix():
    ds = D.copy_task(mc.ConfigDict({"seq_len": 6, "vocab": 5, "train_size": 16, "eval_size": 4}))
    b = ds.train.get(np.arange(16))
    x, y, w = b["inputs"], b["targets"], b["weights"]
    np.testing.assert_array_equal(y[:, 6:], x[:, :6])  # predicted copy == prefix
    np.testing.assert_array_equal(w[:, 6:], 1)
    np.testing.assert_array_equal(w[:, :6], 0)


def test_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 4)
    ds = D.text_file(mc.ConfigDict({"path": str(path), "seq_len": 16}))
    b = ds.train.get(np.array([0, 1]))
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["inputs"][1, :3], [16, 17, 18])
    with pytest.raises(FileNotFoundError, match="config.data.path"):
        D.text_file(mc.ConfigDict({"path": str(tmp_path / "nope.txt")}))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'digitz'"):
        D.get_dataset(mc.ConfigDict({"name": "digitz"}))


def _make_tiny_tfds(data_dir):
    import tensorflow_datasets as tfds

    class SparsejaxTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((4, 4, 1), 10 * i, np.uint8), "label": i % 3}

    SparsejaxTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_loading_offline(tmp_path):
    _make_tiny_tfds(tmp_path)
    cfg = mc.ConfigDict({"name": "tfds", "tfds_name": "sparsejax_tiny_images",
                         "data_dir": str(tmp_path)})
    ds = D.get_dataset(cfg)
    assert ds.info == D.DataInfo("classification", (4, 4, 1), 3)
    assert (len(ds.train), len(ds.eval)) == (12, 5)
    b = ds.train.get(np.arange(12))
    # each example's pixels are 10*i/255 and its label i % 3, whatever the stored order
    i = np.rint(b["inputs"][:, 0, 0, 0] * 255 / 10).astype(int)
    np.testing.assert_array_equal(sorted(i), np.arange(12))
    np.testing.assert_array_equal(b["targets"], i % 3)
    assert b["inputs"].dtype == np.float32


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared .*tfds build mnist"):
        D.get_dataset(mc.ConfigDict({"name": "tfds", "tfds_name": "mnist",
                                     "data_dir": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="not found"):
        D.get_dataset(mc.ConfigDict({"name": "tfds", "tfds_name": "no_such_dataset_xyz",
                                     "data_dir": str(tmp_path)}))


PINNED = D.STDLIB_BYTES_PYTHON
on_pinned_python = pytest.mark.skipif(
    __import__("platform").python_version() != PINNED,
    reason=f"the stdlib_bytes corpus is pinned to CPython {PINNED}'s standard library")


@on_pinned_python
def test_stdlib_bytes_is_the_pinned_files_split_within_each_document():
    from sparsejax.train.tokens import stdlib_dir

    t = 64
    ds = D.get_dataset(mc.ConfigDict({"name": "stdlib_bytes", "seq_len": t}))
    assert ds.info == D.DataInfo("lm", (t,), 256)
    # the reference: every pinned module's bytes, read here, 90% / 10% by hand
    texts = [(stdlib_dir() / f"{m}.py").read_bytes() for m in D.STDLIB_BYTES_MODULES]
    assert len(texts) == 167 and all(b"\0" not in x for x in texts)
    cut = [len(x) - -(-len(x) // 10) for x in texts]  # ceil(10%) goes to eval
    train = b"".join(x[:c] + b"\0" for x, c in zip(texts, cut))
    ev = b"".join(x[c:] + b"\0" for x, c in zip(texts, cut))
    for source, stream in ((ds.train, train), (ds.eval, ev)):
        assert len(source) == (len(stream) - 1) // t
        i = np.array([0, len(source) - 1])
        b = source.get(i)
        for row, k in enumerate(i):
            np.testing.assert_array_equal(b["inputs"][row], list(stream[k * t:k * t + t]))
            np.testing.assert_array_equal(b["targets"][row], list(stream[k * t + 1:k * t + t + 1]))
    assert train.startswith(texts[0][:100]) and ev.endswith(texts[-1][-50:] + b"\0")
    # deterministic: a second build is the same arrays
    again = D.get_dataset(mc.ConfigDict({"name": "stdlib_bytes", "seq_len": t}))
    np.testing.assert_array_equal(again.eval.get(np.arange(5))["inputs"],
                                  ds.eval.get(np.arange(5))["inputs"])


def _fake_stdlib(tmp_path, monkeypatch, content):
    from sparsejax.train import tokens

    root = tmp_path / "lib"
    root.mkdir()
    for m in D.STDLIB_BYTES_MODULES:
        (root / f"{m}.py").write_bytes(content(m))
    monkeypatch.setattr(tokens, "stdlib_dir", lambda: root)
    return root


def test_stdlib_bytes_with_other_contents_is_a_clear_error_and_touches_nothing(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path, monkeypatch, lambda m: f"# {m}\n".encode())
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(ValueError, match=r"pinned to CPython 3\.11\.7.*content hash is [0-9a-f]{64}, "
                                         rf"not the pinned {D.STDLIB_BYTES_SHA256}"):
        D.get_dataset(mc.ConfigDict({"name": "stdlib_bytes"}))
    (root / "zipfile.py").unlink()
    (root / "abc.py").unlink()
    with pytest.raises(ValueError, match=r"2 pinned file\(s\) missing, e.g. \['abc.py', 'zipfile.py'\]"):
        D.get_dataset(mc.ConfigDict({"name": "stdlib_bytes"}))
    assert {p.name: p.read_bytes() for p in root.iterdir()} == {
        k: v for k, v in before.items() if k not in ("abc.py", "zipfile.py")}


@on_pinned_python
def test_stdlib_bytes_one_changed_byte_is_caught(tmp_path, monkeypatch):
    from sparsejax.train.tokens import stdlib_dir

    real = stdlib_dir()
    _fake_stdlib(tmp_path, monkeypatch, lambda m: (real / f"{m}.py").read_bytes())
    assert len(D.pinned_stdlib()) == 167  # an exact copy passes
    path = tmp_path / "lib" / "this.py"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="content hash"):
        D.pinned_stdlib()
