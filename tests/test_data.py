"""IDX parsing, checksum verification, the bundled subset and label noise, on the real MNIST files."""

import gzip
import hashlib
import shutil

import numpy as np
import pytest

from gradstore.errors import DataError
from pipelines.data import (
    MNIST_FILES,
    TEST_ID_OFFSET,
    apply_label_noise,
    load_mnist,
    load_mnist_dir,
    parse_idx,
    read_idx,
)


def test_full_mnist_shapes_and_checksums(mnist_full):
    assert mnist_full.train_images.shape == (60000, 28, 28)
    assert mnist_full.test_images.shape == (10000, 28, 28)
    assert mnist_full.train_images.dtype == np.uint8
    assert set(np.unique(mnist_full.train_labels)) == set(range(10))
    assert np.array_equal(mnist_full.test_ids, TEST_ID_OFFSET + np.arange(10000))
    # The first training label of MNIST is a 5, the first test label a 7 (well known).
    assert mnist_full.train_labels[0] == 5 and mnist_full.test_labels[0] == 7


def test_raw_and_gzipped_files_read_alike(mnist_dir, tmp_path):
    stem, md5 = MNIST_FILES["test_labels"]
    raw = tmp_path / stem
    with gzip.open(mnist_dir / f"{stem}.gz", "rb") as src:
        raw.write_bytes(src.read())
    assert hashlib.md5(raw.read_bytes()).hexdigest() == md5
    assert np.array_equal(read_idx(raw, md5=md5), read_idx(mnist_dir / f"{stem}.gz", md5=md5))


def _copy_dir(mnist_dir, tmp_path):
    out = tmp_path / "mnist"
    shutil.copytree(mnist_dir, out)
    for f in out.iterdir():
        f.chmod(0o644)
    return out


def test_altered_file_fails_checksum(mnist_dir, tmp_path):
    d = _copy_dir(mnist_dir, tmp_path)
    stem = MNIST_FILES["test_labels"][0]
    with gzip.open(d / f"{stem}.gz", "rb") as fh:
        raw = bytearray(fh.read())
    raw[100] = (raw[100] + 1) % 10  # change one label
    with gzip.open(d / f"{stem}.gz", "wb") as fh:
        fh.write(bytes(raw))
    with pytest.raises(DataError, match="md5"):
        load_mnist_dir(d)


def test_truncated_file_is_reported(mnist_dir, tmp_path):
    d = _copy_dir(mnist_dir, tmp_path)
    stem = MNIST_FILES["test_images"][0]
    gz = d / f"{stem}.gz"
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])  # truncated gzip stream
    with pytest.raises(DataError, match="cannot read|md5|truncated"):
        load_mnist_dir(d)
    # An uncompressed truncated file fails the header check when no checksum is asked for.
    with gzip.open(mnist_dir / f"{stem}.gz", "rb") as fh:
        raw = fh.read()
    with pytest.raises(DataError, match="truncated"):
        parse_idx(raw[:-5], name="x")


def test_missing_dir_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="has no train-images"):
        load_mnist_dir(tmp_path)


def test_not_idx():
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x1f\x8b\x08\x00garbage", name="x")


def test_bundled_subset_is_a_stratified_subset_of_the_real_files(mnist_subset, mnist_full):
    assert mnist_subset.train_images.shape == (10000, 28, 28)
    assert mnist_subset.test_images.shape == (2000, 28, 28)
    assert np.array_equal(np.bincount(mnist_subset.train_labels), np.full(10, 1000))
    assert np.array_equal(np.bincount(mnist_subset.test_labels), np.full(10, 200))
    # Same ids, same pixels, same labels as the full files.
    assert np.array_equal(mnist_subset.train_images, mnist_full.train_images[mnist_subset.train_ids])
    assert np.array_equal(mnist_subset.train_labels, mnist_full.train_labels[mnist_subset.train_ids])
    test_idx = mnist_subset.test_ids - TEST_ID_OFFSET
    assert np.array_equal(mnist_subset.test_images, mnist_full.test_images[test_idx])
    assert len(np.unique(mnist_subset.train_ids)) == 10000


def test_load_mnist_prefers_argument_then_env(monkeypatch, mnist_dir):
    monkeypatch.delenv("GRADSTORE_DATA", raising=False)
    assert load_mnist().source == "bundled subset"
    monkeypatch.setenv("GRADSTORE_DATA", "/definitely/not/here")
    with pytest.raises(DataError, match="does not exist"):
        load_mnist()


@pytest.mark.parametrize("noise", [0.0, 0.25, 0.5, 1.0])
def test_label_noise_permutes_labels_among_a_chosen_fraction(mnist_subset, noise):
    labels = mnist_subset.train_labels
    out = apply_label_noise(labels, noise, seed=3)
    n = len(labels)
    assert len(out.chosen) == round(noise * n)
    untouched = np.setdiff1d(np.arange(n), out.chosen)
    assert np.array_equal(out.train_labels[untouched], labels[untouched])
    # A permutation among the chosen: same multiset of labels there.
    assert np.array_equal(np.sort(out.train_labels[out.chosen]), np.sort(labels[out.chosen]))
    assert np.array_equal(out.corrupt, out.train_labels != labels)
    assert not out.corrupt[untouched].any()
    assert np.array_equal(out.true_labels, labels)
    # Proper accuracy about 1 - p + p/10 (balanced classes); binomial tolerance.
    expected = 1 - noise + noise / 10
    assert out.proper_accuracy == pytest.approx(expected, abs=0.02)


def test_label_noise_is_deterministic_by_seed(mnist_subset):
    a = apply_label_noise(mnist_subset.train_labels, 0.5, seed=1)
    b = apply_label_noise(mnist_subset.train_labels, 0.5, seed=1)
    c = apply_label_noise(mnist_subset.train_labels, 0.5, seed=2)
    assert np.array_equal(a.train_labels, b.train_labels)
    assert not np.array_equal(a.train_labels, c.train_labels)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_label_noise_rejects_bad_levels(bad):
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        apply_label_noise(np.arange(10) % 10, bad, seed=0)


def test_damaged_gzip_stream_is_a_data_error_naming_the_file(mnist_dir, tmp_path):
    """Finding 15: a .gz whose deflate stream is damaged raised zlib.error before the md5 check."""
    d = _copy_dir(mnist_dir, tmp_path)
    gz = d / f"{MNIST_FILES['test_labels'][0]}.gz"
    data = bytearray(gz.read_bytes())
    for i in range(40, 60):  # inside the compressed blocks, after the 10-byte gzip header
        data[i] ^= 0xFF
    gz.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged or truncated gzip") as exc:
        load_mnist_dir(d)
    assert str(gz) in str(exc.value) and "\n" not in str(exc.value)
