"""Test setup: run the Triton kernels through the interpreter on CPU tensors."""
import contextlib
import os

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



@contextlib.contextmanager
def _poisoned_allocations():
    """Every torch.empty inside the block comes back full of NaN, so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


@pytest.fixture
def poisoned_allocations():
    """``with poisoned_allocations(): ...``: see _poisoned_allocations."""
    return _poisoned_allocations


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
