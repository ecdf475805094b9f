"""A per-test time limit for pytest without pytest-timeout (the device image may lack it): `-p pytest_deadline
--deadline SECONDS` (with this folder on PYTHONPATH, as scripts/gpu_check.py runs it).

Each test's setup and call get SECONDS of wall time each (a SIGALRM timer, main thread, POSIX only); a test that
runs past it fails with `DeadlineExceeded` and the session goes on, so pytest-benchmark still writes its JSON and
the junit XML still lists every test (with each test's markers as a `markers` property, which gpu_check.py uses to
split one run's results by marker). The alarm is raised only when the interpreter next runs Python code: a
single CUDA synchronisation or a compiled call that runs long overshoots by its own length, which is why
gpu_check.py also bounds each stage as a whole.
"""

import contextlib
import signal

import pytest


class DeadlineExceeded(Exception):
    """The test ran past its --deadline."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--deadline", type=float, default=0.0, help="seconds each test's setup and call may take (0: no limit)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.user_properties.append(("markers", ",".join(sorted({m.name for m in item.iter_markers()}))))


@contextlib.contextmanager
def _deadline(item: pytest.Item, phase: str):
    """An alarm that fails `phase` of `item` past its --deadline (none when 0 or without setitimer)."""
    seconds = item.config.getoption("--deadline")
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise DeadlineExceeded(f"{item.nodeid}: {phase} ran past its {seconds:g} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _deadline(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _deadline(item, "call"):
        yield
