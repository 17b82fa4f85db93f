"""IDX loading, verification, caching and the train/valid split, on tiny generated files."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from conftest import compose_cfg, make_tiny_set, write_idx
from fmnist_exp import data

CPU = torch.device("cpu")


def load(root, **kw):
    args = dict(system_dir=root / "no-system-copy", download=False, valid_size=100, split_seed=0, device=CPU)
    args.update(kw)
    return data.load(root, **args)


@pytest.mark.parametrize("layout", ["gz", "raw", "torchvision"])
def test_tiny_files_load_exactly(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    made = make_tiny_set(folder, n_train=300, n_test=50, gz=layout != "raw")
    ds = load(tmp_path)
    assert ds.split_sizes() == {"train": 200, "valid": 100, "test": 50}
    assert ds.train_x.shape == (200, 1, 28, 28) and ds.train_x.dtype == torch.uint8  # stored as in the files
    x = data.pixels(ds.train_x)
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    images, labels = made["t10k"]
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(images))
    torch.testing.assert_close(data.pixels(ds.test_x)[:, 0], torch.from_numpy(images).float() / 255)
    assert ds.test_y.tolist() == labels.tolist()
    # train + valid together are exactly the 300 training examples, each once
    all_y = torch.cat([ds.train_y, ds.valid_y]).sort().values
    assert all_y.tolist() == sorted(made["train"][1].tolist())
    assert ds.source == str(folder.resolve())


def test_truncated_file_is_an_error_naming_it(tmp_path):
    make_tiny_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte: truncated.*fetch it again"):
        load(tmp_path, cache=False)


def test_truncated_gzip_is_an_error_naming_it(tmp_path):
    make_tiny_set(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz: cannot be read or decompressed"):
        load(tmp_path, cache=False)


def test_wrong_magic_is_an_error_naming_it(tmp_path):
    make_tiny_set(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((600, 28, 28), np.uint8), 0x0803)
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte.gz: wrong IDX magic number 0x00000803"):
        load(tmp_path, cache=False)


def test_labels_out_of_range_are_an_error(tmp_path):
    make_tiny_set(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(200, 11, np.uint8), 0x0801)
    with pytest.raises(data.DataError, match="label 11 out of range"):
        load(tmp_path, cache=False)


def test_full_size_file_with_wrong_content_fails_the_checksum(tmp_path):
    make_tiny_set(tmp_path, n_test=10000)
    with pytest.raises(data.DataError, match="t10k-.*checksum mismatch"):
        load(tmp_path, cache=False)


def test_nothing_found_names_places_and_both_fixes(tmp_path):
    with pytest.raises(data.DataError) as e:
        load(tmp_path / "empty")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "empty") in message and "no-system-copy" in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "data.download=true" in message


def test_root_comes_before_the_system_copy(tmp_path):
    make_tiny_set(tmp_path / "root", n_train=300, seed=1)
    make_tiny_set(tmp_path / "system", n_train=500, seed=2)
    assert load(tmp_path / "root", system_dir=tmp_path / "system").split_sizes()["train"] == 200
    assert load(tmp_path / "elsewhere", system_dir=tmp_path / "system").split_sizes()["train"] == 400


def test_a_partial_copy_in_root_is_named_before_another_copy_is_used(tmp_path, caplog):
    """data.root with a download cut short: the run trains on the system copy, and says so."""
    make_tiny_set(tmp_path / "system", n_train=500, seed=2)
    make_tiny_set(tmp_path / "root", n_train=300, seed=1)
    (tmp_path / "root" / "t10k-labels-idx1-ubyte.gz").unlink()
    with caplog.at_level("WARNING", logger="fmnist_exp.data"):
        assert load(tmp_path / "root", system_dir=tmp_path / "system").split_sizes()["train"] == 400
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == (f"{tmp_path / 'root'} holds 3 of the 4 Fashion-MNIST files (missing t10k-labels-idx1-ubyte): "
                       f"using the complete set in {tmp_path / 'system'}")
    caplog.clear()
    with caplog.at_level("WARNING", logger="fmnist_exp.data"):  # an empty or absent root is the usual case: quiet
        load(tmp_path / "elsewhere", system_dir=tmp_path / "system")
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "best_model.pt"
    data.write_atomic(path, lambda f: f.write(b"old"))

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt  # a second Ctrl-C inside torch.save

    with pytest.raises(KeyboardInterrupt):
        data.write_atomic(path, interrupted)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["best_model.pt"]


def test_cache_is_used_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    make_tiny_set(tmp_path)
    first = load(tmp_path)
    assert (tmp_path / "cache" / "meta.json").is_file()
    calls = []
    monkeypatch.setattr(data, "read_idx", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    again = load(tmp_path)  # served from the cache: read_idx is never called
    assert calls == [] and torch.equal(first.train_x, again.train_x) and first.digest == again.digest
    monkeypatch.undo()
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz: truncated"):
        load(tmp_path)


def test_split_depends_on_split_seed_not_train_seed(tiny_root):
    """Two jobs of a sweep that differ in train.seed hold the same validation examples; data.split_seed moves them."""
    from conftest import tiny_overrides
    from fmnist_exp import job
    def valid_labels(*overrides):
        cfg = compose_cfg(*tiny_overrides(tiny_root), *overrides)
        return job.ProcessSettings().dataset(cfg, CPU).valid_y.tolist()  # a fresh process: nothing cached
    assert valid_labels("train.seed=0") == valid_labels("train.seed=7")
    assert valid_labels("data.split_seed=0") != valid_labels("data.split_seed=1")


def test_each_job_has_its_own_order_covering_every_index_once():
    gens = [torch.Generator().manual_seed(s) for s in (0, 0, 1)]
    order = data.orders(1050, gens, CPU)
    assert order.shape == (3, 1050) and all(sorted(o.tolist()) == list(range(1050)) for o in order)
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])  # same seed, same order
    assert [len(p) for p in order[0].split(data.batch_sizes(1050, 100))] == [100] * 10 + [50]


def test_a_remainder_of_one_example_is_left_out_of_the_epoch():
    """BatchNorm cannot train on a batch of one: that example waits for another epoch (the shuffle varies it)."""
    assert data.batch_sizes(501, 100) == [100] * 5 and data.batch_sizes(502, 100) == [100] * 5 + [2]
    assert data.batch_sizes(1, 16) == [1]  # a data set of one example still trains
    g = torch.Generator().manual_seed(0)
    left_out = [set(data.orders(501, [g], CPU)[0, 500:].tolist()) for _ in range(3)]
    assert all(len(s) == 1 for s in left_out) and len(set.union(*left_out)) > 1


@pytest.mark.slow
def test_real_files_verify(real_data, tmp_path):
    arrays, digest, source = data.load_arrays(tmp_path, real_data, download=False, cache=False)
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["test_labels"].shape == (10000,)
    assert arrays["train_labels"][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # Fashion-MNIST's first labels
    assert np.bincount(arrays["train_labels"]).tolist() == [6000] * 10
    assert source == str(real_data)
