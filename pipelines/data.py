"""MNIST from the standard IDX files, the bundled subset, and label noise (Coherent Gradients §2.1).

Every example has a stable integer id: the index in the full training file for training images
(0..59999) and 60000 + the index in the full test file for test images. The bundled subset keeps
the ids of the full files, so everything downstream keys on the same ids whatever the source.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gradstore.errors import DataError

#: md5 of the *uncompressed* IDX files (the canonical sums, see ../shared/data/mnist/README.md).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}
TEST_ID_OFFSET = 60_000
SUBSET_RESOURCE = "mnist_subset.npz"
_IDX_DTYPES = {0x08: np.uint8}


@dataclass(frozen=True)
class MNIST:
    """Images (n, 28, 28) uint8, labels int64 and stable ids int64, for train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    train_ids: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_ids: np.ndarray
    source: str


def parse_idx(raw: bytes, *, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file (unsigned-byte data only, as MNIST uses).

    Raises
    ------
    DataError
        If the magic number is wrong or the payload is shorter or longer than the header says.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number); use the original MNIST files")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{name} has IDX data type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated inside its header; replace it with an intact copy")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"{name} is {what} ({len(raw)} bytes, expected {expected} for shape {shape}); "
            "replace it with an intact copy"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def read_idx(path: Path, *, md5: str | None = None) -> np.ndarray:
    """Read an IDX file, gzipped (``.gz``) or raw, verifying the md5 of its uncompressed bytes.

    Raises
    ------
    DataError
        If the file cannot be read, its compressed stream is damaged or truncated (the checksums
        are of the uncompressed files, so a ``.gz`` must decompress before its md5 can be checked),
        its md5 differs from ``md5``, or it is not a valid IDX file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error) as exc:  # a damaged or truncated compressed stream
        raise DataError(f"{path} is a damaged or truncated gzip file ({exc or type(exc).__name__}); replace it "
                        "with an intact copy of the MNIST file") from None
    except OSError as exc:  # also gzip.BadGzipFile: a bad header or CRC
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; replace it with an intact copy of the MNIST "
                        "file") from None
    if md5 is not None:
        got = hashlib.md5(raw).hexdigest()
        if got != md5:
            raise DataError(
                f"{path} has md5 {got} but the MNIST file must have {md5}; the file is altered or "
                "truncated: replace it with the original"
            )
    return parse_idx(raw, name=str(path))


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{data_dir} has no {stem}[.gz]; point --data-dir (or GRADSTORE_DATA) at a folder holding "
        "the four MNIST IDX files"
    )


def load_mnist_dir(data_dir: str | os.PathLike) -> MNIST:
    """Load the full MNIST from a directory of the four standard IDX files (checksums verified)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist; pass --data-dir (or set GRADSTORE_DATA) to a "
            "folder holding the four MNIST IDX files, or leave both unset to use the bundled subset"
        )
    arrays = {key: read_idx(_find(data_dir, stem), md5=md5) for key, (stem, md5) in MNIST_FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{data_dir}: {n_img} {split} images but {n_lab} labels; use matching MNIST files")
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    return MNIST(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        train_ids=np.arange(n_train, dtype=np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        test_ids=TEST_ID_OFFSET + np.arange(n_test, dtype=np.int64),
        source=str(data_dir),
    )


def load_bundled_subset() -> MNIST:
    """The stratified 10,000 + 2,000 subset shipped in the package (made by scripts/make_mnist_subset.py)."""
    with resources.files("pipelines").joinpath("resources", SUBSET_RESOURCE).open("rb") as fh:
        with np.load(fh) as z:
            arrays = {k: z[k] for k in z.files}
    return MNIST(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        train_ids=arrays["train_ids"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        test_ids=arrays["test_ids"].astype(np.int64),
        source="bundled subset",
    )


def load_mnist(data_dir: str | os.PathLike | None = None) -> MNIST:
    """MNIST from ``data_dir``, else from ``$GRADSTORE_DATA``, else the bundled subset."""
    if data_dir is None:
        data_dir = os.environ.get("GRADSTORE_DATA") or None
    if data_dir is None:
        return load_bundled_subset()
    return load_mnist_dir(data_dir)


def stratified_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise DataError(f"class {c} has only {len(idx)} examples; ask for at most that many per class")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


@dataclass(frozen=True)
class NoisyLabels:
    """Training labels after label noise; ``corrupt`` marks train label != true label."""

    true_labels: np.ndarray
    train_labels: np.ndarray
    corrupt: np.ndarray
    chosen: np.ndarray  # indices whose labels were shuffled
    noise: float

    @property
    def proper_accuracy(self) -> float:
        """Fraction of training labels equal to the true label (about 1 − p + p/10 on MNIST)."""
        return float(np.mean(self.train_labels == self.true_labels))


def apply_label_noise(labels: np.ndarray, noise: float, seed: int) -> NoisyLabels:
    """Label noise as in Coherent Gradients §2.1.

    A fraction ``noise`` of the examples (``round(noise * n)``) is chosen at random and their
    labels are randomly permuted among them; the others keep their labels. ``noise = 1`` gives
    random labels with the original label histogram.
    """
    if not np.isfinite(noise) or not 0.0 <= noise <= 1.0:
        raise DataError(f"label noise must be a fraction in [0, 1], got {noise}; e.g. 0.5 for 50% noise")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_chosen = int(round(noise * len(labels)))
    chosen = np.sort(rng.choice(len(labels), size=n_chosen, replace=False))
    train = labels.copy()
    train[chosen] = labels[chosen][rng.permutation(n_chosen)]
    return NoisyLabels(labels, train, train != labels, chosen, float(noise))
