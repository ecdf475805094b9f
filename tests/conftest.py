import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors only through its interpreter, which must be switched on before triton is imported.
# Without a GPU it is switched on here. With one it stays off (unless the environment sets it): the `gpu` tests then
# compile and run the real kernels, and the tests marked `interpreter` skip (the interpreter would also run the
# kernels of CUDA tensors, and triton 3.6's, the device image's, fails on this kernel: issue 19).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("interpreter") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "runs Triton on CPU tensors, which needs Triton's interpreter (TRITON_INTERPRET=1); it is off on a machine "
            "with a CUDA device, where the `gpu` tests run the compiled kernels instead"
        )


SHARED_DATA = Path(os.environ.get("ELSFAST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The real datasets (../shared/data or $ELSFAST_DATA); skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set ELSFAST_DATA to run this test)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: on a busy 2-core machine two OpenMP threads spin against
    other processes and run up to 100x slower, while one thread is as fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cpu_ext():
    """The compiled CPU kernels (`elsfast._cpu`); skips the test where they are not built or the CPU lacks AVX2."""
    ext = pytest.importorskip("elsfast._cpu", reason="the CPU extension is not compiled (no C++ compiler at install)")
    if not ext.isas():
        pytest.skip("this CPU lacks AVX2 + FMA")
    return ext
