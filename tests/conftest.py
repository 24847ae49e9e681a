import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def pytest_configure(config):
    # the Triton interpreter runs kernels on CPU tensors; set before any test imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
