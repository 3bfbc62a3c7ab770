"""Shared fixtures: the real MNIST files (../shared/data/mnist from the project root) and the bundled subset."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("GRADSTORE_TEST_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with the four real MNIST IDX files; tests needing it skip where it is absent."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not found at {MNIST_DIR} (set GRADSTORE_TEST_MNIST)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist_full(mnist_dir):
    from pipelines.data import load_mnist_dir

    return load_mnist_dir(mnist_dir)


@pytest.fixture(scope="session")
def mnist_subset():
    from pipelines.data import load_bundled_subset

    return load_bundled_subset()


@pytest.fixture
def exact_float32():
    """TF32 convolutions and matmuls on CUDA (cuDNN's default) round inputs to 10 mantissa bits: off,
    for checks at 1e-4 in float32."""
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before

