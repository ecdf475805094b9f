import os
import random
import signal
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton kernels run on CPU tensors only through its interpreter, which must be switched on before triton is imported.
# Without a GPU it is switched on here. With one it stays off (unless the environment sets it): the `gpu` tests then
# compile and run the real kernels, and the tests marked `interpreter` skip (the interpreter would also run the
# kernels of CUDA tensors, and triton 3.6's, the device image's, fails on this kernel: issue 19).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow_ci` the conformance cases of Triton's interpreter over ELS with circular padding (every pixel
    against every patch: 25-85 s each on a 2-core CPU); the default run skips them and CI runs them apart."""
    for item in items:
        case = getattr(item, "callspec", None)
        if getattr(item, "originalname", None) != "test_conformance" or case is None:
            continue
        # float64 is refused by Triton at once: only the float32 cases run the interpreter
        if case.id.startswith("triton-els-circular") and "-float32-" in case.id and case.id.endswith("-cpu"):
            item.add_marker(pytest.mark.slow_ci)


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


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this process and reaches the processes it starts, even when pytest itself
    was started with SIGINT ignored (`nohup ... &` from a non-interactive shell: children inherit the ignore)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def cpu_ext():
    """The compiled CPU kernels (`elsfast._cpu`); skips the test where they are not built or the CPU lacks AVX2."""
    ext = pytest.importorskip("elsfast._cpu", reason="the CPU extension is not compiled (no C++ compiler at install)")
    if not ext.isas():
        pytest.skip("this CPU lacks AVX2 + FMA")
    return ext


@pytest.fixture(autouse=True)
def seeded_rngs(request):
    """Seed torch's, numpy's and Python's global generators for every test from its id (CRC-32, the same in every
    process and whatever else runs), so a test that draws from them draws the same problem each run."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    request.node.rng_seed = seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names the seed of the global generators (the fixture above)."""
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "rng_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("seed", f"global generators seeded with {seed} (CRC-32 of {item.nodeid!r})"))


def pytest_terminal_summary(terminalreporter) -> None:
    """After the conformance suite: how many cases each backend variant computed and refused, per device."""
    suite = sys.modules.get("test_backends")
    if suite is None or not (suite.OUTCOMES or suite.COMPUTED):
        return
    terminalreporter.write_sep("-", "conformance cases computed / refused per backend")
    for name, device in sorted(set(suite.OUTCOMES) | set(suite.COMPUTED)):
        outcome = suite.OUTCOMES.get((name, device), {})
        line = f"{name:>12} on {device}: conformance {outcome.get('computed', 0)} computed"
        line += f", {outcome.get('refused', 0)} refused"
        if (name, device) in suite.COMPUTED:
            line += (
                f"; computed {suite.COMPUTED[name, device]} of {len(suite.ALL_CASES)} (at least {suite.MIN_COMPUTED})"
            )
        terminalreporter.write_line(line)
