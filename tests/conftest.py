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


@pytest.fixture(scope="session")
def synthct(tmp_path_factory):
    """SynthCT: 16 cases at 16x32x32 (M3D-Cap JSON, M3D-VQA and CT-RATE CSVs), written once per session."""
    from med3dvlm.data.synth import generate

    out = tmp_path_factory.mktemp("synthct")
    generate(out, n=16, size=(16, 32, 32), seed=0)
    return out


@pytest.fixture(scope="session")
def smollm():
    """The real offline LM, SmolLM2-135M-Instruct, and its tokenizer, loaded once per session (converted
    to the cache on first use). Tests that change them work on copies."""
    from med3dvlm.models.vlm import offline_lm

    return offline_lm()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
