"""The GPU kernels proven in one call (issues 19, 24): build, test and benchmark elsfast on a lent GPU machine.

    bash scripts/gpu_check.sh                 # on the device machine; writes to $OUT (else out/gpu-check/)
    bash scripts/gpu_check.sh --dry-run       # rehearsal on a machine without a GPU: tiny sizes, about 3 minutes
    python scripts/gpu_check.py --fill-data   # copy CIFAR-10's and MNIST's training sets into data/device/ (carry it)

Stages, each with a hard wall-time budget inside one overall budget (345 s on the device, so that a rerun fits the
15 device minutes; 200 s in the rehearsal), each run whatever became of the one before it:

1. environment  device, driver, Python, torch, triton, nvcc, setuptools versions (nvidia-smi, nvcc, python)
2. build        `elsfast._cuda` for sm_90 only (ELSFAST_CUDA=1 ELSFAST_CUDA_ARCHS=90: a missing nvcc is an error);
                `python setup.py build_ext --inplace` run from a scratch folder that links the sources but holds
                no pyproject.toml, because setuptools older than 77 rejects its `license = "MIT"` even there and
                the image's setuptools version is unknown; no pip, no build isolation, nothing installed: the
                stages import elsfast from the checkout (PYTHONPATH). The CPU extension is not built (the GPU
                stages do not use it). Runs beside the precompile stage (nvcc and Triton's compiles are CPU work;
                the device has 16 cores); the accuracy stage waits for it. The rehearsal builds into a scratch
                folder and leaves the checkout's alone.
3. precompile   scripts/gpu_precompile.py: the Triton kernels the later stages launch, compiled first (in parallel
                processes) into a Triton cache of this run's own (TRITON_CACHE_DIR), so compile time is reported
                apart; every stage then reports `compiles`, the kernels it added to that cache (a launch the
                precompile did not foresee). The rehearsal runs the same launcher, split planning and tuning code
                through Triton's interpreter on CPU tensors.
4. accuracy     tests/test_kernel_scale.py's `gpu` cases first: both kernels on all 60,000 MNIST and 50,000
                CIFAR-10 training images (data/device, from --fill-data) against float64
5. kernel-tests the `aot` and `gpu` tests of KERNEL_TEST_FILES, selected by file (collecting the whole suite
                would import tests/test_fuzz.py, whose hypothesis the device image lacks) and cut by KERNEL_TEST_K
                to what fits (LEFT_OUT says what is not run); the summary counts each marker apart, and skipped
                tests say why. The rehearsal adds the files' `interpreter` tests (the kernel on CPU tensors).
6. benchmarks   benchmarks/bench_kernels.py at sizes that fit its budget (set below, overridable through the same
                environment variables), pytest-benchmark JSON with the device name
Every pytest stage runs with a per-test deadline (scripts/pytest_deadline.py) so one stuck test cannot eat the
stage, and the benchmarks skip what would start too close to the end of their budget.

$OUT receives at most four files: gpu_check.log (everything printed), kernels-benchmark.json (pytest-benchmark),
summary.json and summary.md (what ran, what failed and why, what was left out, compiles, versions, sizes, data).
The summary is rewritten after every stage, so a run killed from outside still leaves one. Exit status: 0 when no
stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_DATA = REPO / "data" / "device"
SHARED_DATA = Path(os.environ.get("ELSFAST_DATA", REPO.parent / "shared" / "data"))
CIFAR_NPZ = Path("cifar10") / "cifar10_train_jpeg.npz"
MNIST_TRAIN = [Path("mnist") / "train-images-idx3-ubyte.gz", Path("mnist") / "train-labels-idx1-ubyte.gz"]

TOTAL_BUDGET_S = {"device": 345, "rehearsal": 200}
# the seconds each stage may take at most (less when the overall budget has less left). On the device the build
# runs beside the precompile stage: 20 + max(100, 90) + 60 + 75 + 90 = 345 s.
STAGE_BUDGET_S = {
    "device": {
        "environment": 20,
        "build": 100,
        "precompile": 90,
        "accuracy": 60,
        "kernel-tests": 75,
        "benchmarks": 90,
    },
    "rehearsal": {
        "environment": 30,
        "build": 100,
        "precompile": 40,
        "accuracy": 20,
        "kernel-tests": 80,
        "benchmarks": 45,
    },
}
# per-test deadline of the pytest stages (setup and call each)
TEST_DEADLINE_S = {"device": 60, "rehearsal": 60}
# no benchmark case starts later than this before the end of the benchmark stage (about one case's length)
BENCH_CASE_S = {"device": 20, "rehearsal": 5}
SUMMARY_RESERVE_S = 3
KILL_GRACE_S = 10
MARKERS = ("aot", "gpu", "interpreter")
STAGES = ["environment", "build", "precompile", "accuracy", "kernel-tests", "benchmarks"]
OUTCOMES = {None: "passed", "failure": "failed", "error": "errors", "skipped": "skipped"}  # junit tag -> outcome

# The tests the device check runs, by file: each file holds `gpu` or `aot` cases and imports only what the device
# image has (torch, triton, numpy, pytest; no hypothesis, matplotlib, faiss, diffusers). Cheapest first, the
# 360-case conformance suite last, so that the stage's budget cuts the conformance cases, not the kernel ones.
ACCURACY_TEST_FILES = ["tests/test_kernel_scale.py"]
KERNEL_TEST_FILES = [
    "tests/test_kernels.py",
    "tests/test_tuning.py",
    "tests/test_provenance.py",
    "tests/test_backends.py",
]
# of the conformance suite's `gpu` variants, those of the GPU kernels (triton, cuda, and auto, which picks them)
KERNEL_TEST_K = "not test_conformance or conformance[triton- or conformance[cuda- or conformance[auto-"
# the rehearsal adds the files' `interpreter` tests but the three slowest (20, 7 and 6 s on a 2-core CPU; CI runs them)
REHEARSAL_K = f"({KERNEL_TEST_K}) and not resident_query_chunks and not feature_major_keys and not splits_and_tiles"
LEFT_OUT = [
    "tests/test_backends.py: the 240 `gpu` conformance variants of the CPU backends (cpu, dedup, shifts, topk, "
    "torch) on CUDA tensors (KERNEL_TEST_K); the CI machine runs them on the CPU",
    "tests/test_gpu_kernels_static.py: no `gpu` or `aot` case (the static cost tool compiles without a GPU; CI)",
    "every other test file: no `gpu` or `aot` case; tests/test_fuzz.py imports hypothesis, which the image lacks",
    "tests/test_kernel_scale.py's CPU cases (the CUDA source's host path, the interpreter; CI runs them)",
]

# benchmarks/bench_kernels.py sizes. Device: the SPEC section 5 problem (64 noisy CIFAR-10 images against all
# 50,000) for the fused kernels at P = 3 and 11; the launch-bound torch path, SDPA (dictionary materialised) and the
# float64 reference on subsets of the dictionary; a 10-image sample. Rehearsal: tiny, on the CPU.
BENCH_ENV = {
    "device": {
        "ELSFAST_BENCH_DEVICE": "cuda",
        "ELSFAST_BENCH_N": "50000",
        "ELSFAST_BENCH_BATCH": "64",
        "ELSFAST_BENCH_P": "3,11",
        "ELSFAST_BENCH_TORCH_IMAGES": "1000",
        "ELSFAST_BENCH_SDPA_IMAGES": "2000",
        "ELSFAST_BENCH_REF_IMAGES": "500",
        "ELSFAST_BENCH_ROUNDS": "2",
        "ELSFAST_BENCH_SAMPLES": "10",
        "ELSFAST_BENCH_STEPS": "20",
    },
    "rehearsal": {
        "ELSFAST_BENCH_DEVICE": "cpu",
        "ELSFAST_BENCH_N": "24",
        "ELSFAST_BENCH_BATCH": "2",
        "ELSFAST_BENCH_P": "3",
        "ELSFAST_BENCH_TORCH_IMAGES": "24",
        "ELSFAST_BENCH_SDPA_IMAGES": "24",
        "ELSFAST_BENCH_REF_IMAGES": "12",
        "ELSFAST_BENCH_ROUNDS": "1",
        "ELSFAST_BENCH_SAMPLES": "2",
        "ELSFAST_BENCH_STEPS": "2",
    },
}

ENVIRONMENT_PROBE = r"""
import importlib, json, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
for name in ("torch", "triton", "numpy", "setuptools", "pybind11", "pytest", "pytest_benchmark", "pytest_timeout"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as error:
        info[name] = f"missing ({type(error).__name__}: {error})"
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
except Exception as error:
    info["cuda_available"] = False
    info["torch_error"] = repr(error)
print("ENVIRONMENT " + json.dumps(info))
"""


class Check:
    """Runs the stages, tees their output to the log and keeps the summary."""

    def __init__(self, out: Path, rehearsal: bool, python: str, total_s: float):
        self.out, self.rehearsal, self.python = out, rehearsal, python
        self.mode = "rehearsal" if rehearsal else "device"
        self.started = time.monotonic()
        self.deadline = self.started + total_s
        # --budget scales every stage's budget and the per-test deadline alike (a slower or busier machine)
        self.scale = total_s / TOTAL_BUDGET_S[self.mode]
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.log = open(out / "gpu_check.log", "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        self.summary: dict = {
            "mode": self.mode,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_budget_s": total_s,
            "python": python,
            "environment": {},
            "data": None,
            "benchmark_sizes": {},
            "left_out": LEFT_OUT,
            "stages": [],
        }
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "scripts"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        # a Triton cache of this run's own, so that each stage's compiles can be counted, and an elsfast cache
        # (tuning choices) that the precompile stage fills for the benchmarks and that outlives nothing
        self.triton_cache = self.scratch / "triton-cache"
        self.env["TRITON_CACHE_DIR"] = str(self.triton_cache)
        self.env["ELSFAST_CACHE"] = str(self.scratch / "elsfast-cache")
        if "ELSFAST_DATA" not in os.environ and any((DEVICE_DATA / f).is_file() for f in [CIFAR_NPZ, *MNIST_TRAIN]):
            self.env["ELSFAST_DATA"] = str(DEVICE_DATA)  # what --fill-data copied, carried to the device
        if rehearsal:  # Triton on CPU tensors (tests/conftest.py sets it too, but scripts/gpu_precompile.py needs it)
            self.env["TRITON_INTERPRET"] = "1"
        self.cuda = False
        self.lock = threading.Lock()  # the log and the summary, written by the rehearsal's two threads
        self.held = threading.local()  # a stage run beside the others keeps its output here until it ends

    # --- output ---------------------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        held = getattr(self.held, "lines", None)
        if held is not None:
            held.append(text)
            return
        with self.lock:
            print(text, flush=True)
            self.log.write(text + "\n")

    def write_summary(self) -> None:
        with self.lock:
            self.summary["stages"].sort(key=lambda s: STAGES.index(s["name"]))
            self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.summary["failed_stages"] = [s["name"] for s in self.summary["stages"] if s["status"] == "failed"]
            _write_atomic(self.out / "summary.json", json.dumps(self.summary, indent=2) + "\n")
            _write_atomic(self.out / "summary.md", _markdown(self.summary))

    # --- running commands -----------------------------------------------------------------------------------

    def budget(self, stage: str) -> float:
        left = self.deadline - time.monotonic() - SUMMARY_RESERVE_S - KILL_GRACE_S
        return max(0.0, min(STAGE_BUDGET_S[self.mode][stage] * self.scale, left))

    def run(self, cmd: list[str], seconds: float, env: dict | None = None, cwd: Path = REPO) -> tuple[int, bool, str]:
        """Run `cmd` in its own process group, its output teed to the log; after `seconds` the group gets SIGINT
        (pytest then stops cleanly and still writes its reports), KILL_GRACE_S later SIGKILL.
        Returns (exit status, timed out, output)."""
        self.say("$ " + shlex.join(cmd))
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env or self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as error:
            self.say(f"cannot start: {error}")
            return 127, False, str(error)
        expired = threading.Event()

        def watchdog() -> None:
            if _wait(proc, seconds) is None:
                expired.set()
                _signal_group(proc, signal.SIGINT)
                if _wait(proc, KILL_GRACE_S) is None:
                    _signal_group(proc, signal.SIGKILL)

        threading.Thread(target=watchdog, daemon=True).start()
        lines = []
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            self.say(line)
        rc = proc.wait()
        return rc, expired.is_set(), "\n".join(lines)

    def stage(self, name: str, body, beside: bool = False) -> None:
        """Run one stage under its budget and record it; `beside`: it runs in a thread beside the next stages, its
        output held back and written as one block when it ends."""
        if beside:
            self.held.lines = []
        seconds = self.budget(name)
        self.say()
        self.say(f"=== {name} (budget {seconds:.0f} s, {time.monotonic() - self.started:.0f} s elapsed)")
        record = {"name": name, "budget_s": round(seconds, 1)}
        started, kernels = time.monotonic(), self.compiled()
        if seconds < 5:
            record.update(status="skipped", reason="no time left in the overall budget")
        else:
            try:
                record.update(body(seconds))
            except Exception as error:  # a stage's own bug must not stop the next stage
                record.update(status="failed", reason=f"gpu_check.py: {type(error).__name__}: {error}")
        record["seconds"] = round(time.monotonic() - started, 1)
        if name != "build":  # the build runs beside the precompile stage: its count would be that stage's
            record["compiles"] = self.compiled() - kernels
        self.summary["stages"].append(record)
        self.say(f"--- {name}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""))
        if beside:
            lines, self.held.lines = self.held.lines, None
            self.say("\n".join(lines))
        self.write_summary()

    def compiled(self) -> int:
        """Kernels in this run's Triton cache (one cubin each; none under the interpreter)."""
        return sum(1 for _ in self.triton_cache.rglob("*.cubin")) if self.triton_cache.is_dir() else 0

    # --- the stages -----------------------------------------------------------------------------------------

    def environment(self, seconds: float) -> dict:
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
            rc, _, text = self.run([smi, f"--query-gpu={query}", "--format=csv"], min(seconds, 20))
            self.summary["environment"]["nvidia_smi"] = text.strip() if rc == 0 else f"failed ({rc})"
        else:
            self.summary["environment"]["nvidia_smi"] = "not found"
            self.say("nvidia-smi: not found")
        nvcc = _find_nvcc()
        if nvcc:
            rc, _, text = self.run([nvcc, "--version"], min(seconds, 20))
            self.summary["environment"]["nvcc"] = text.strip().splitlines()[-1] if rc == 0 and text else "failed"
        self.summary["environment"]["nvcc_path"] = nvcc or "not found"
        rc, timed_out, text = self.run([self.python, "-c", ENVIRONMENT_PROBE], seconds)
        probe = next((ln for ln in text.splitlines() if ln.startswith("ENVIRONMENT ")), None)
        if probe is None:
            return {"status": "failed", "reason": _why(rc, timed_out, text, "the Python probe")}
        info = json.loads(probe.removeprefix("ENVIRONMENT "))
        self.summary["environment"].update(info)
        if "torch_error" in info:
            return {"status": "failed", "reason": f"{self.python} cannot import torch: {info['torch_error']}"}
        self.cuda = bool(info.get("cuda_available"))
        device = info.get("device", "no CUDA device")
        if not self.cuda and not self.rehearsal:
            return {"status": "failed", "reason": f"torch sees no CUDA device on the device machine ({device})"}
        return {"status": "passed", "reason": f"{device}; torch {info.get('torch')}, triton {info.get('triton')}"}

    def build(self, seconds: float) -> dict:
        link = REPO / "elsfast" / "kernels"
        if not link.exists():  # git-ignored link (setup.py maps elsfast.kernels to kernels/ for installs)
            link.symlink_to(Path("..") / "kernels")
            self.say(f"linked {link.relative_to(REPO)} -> ../kernels (path import)")
        nvcc = _find_nvcc()
        if nvcc is None:
            return {"status": "failed", "reason": "nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"}
        env = dict(self.env, ELSFAST_CPU="0", ELSFAST_CUDA="1", ELSFAST_CUDA_ARCHS="90")
        if shutil.which("nvcc") is None:  # found only under a toolkit root: tell setup.py where
            env.setdefault("CUDA_HOME", str(Path(nvcc).parents[1]))
        src = self.scratch / "build-src"
        src.mkdir()
        for name in ("setup.py", "csrc", "elsfast", "kernels"):
            (src / name).symlink_to(REPO / name)
        lib = self.scratch / "build-lib"
        where = ["--build-lib", str(lib)] if self.rehearsal else ["--inplace"]
        cmd = [self.python, "setup.py", "build_ext", *where, "--build-temp", str(self.scratch / "build-temp")]
        rc, timed_out, text = self.run(cmd, seconds, env=env, cwd=src)
        if rc != 0 or timed_out:
            return {"status": "failed", "reason": _why(rc, timed_out, text, "the _cuda build")}
        built = sorted((lib if self.rehearsal else REPO).glob("elsfast/_cuda*.so"))
        if not built:
            return {"status": "failed", "reason": "the build reported success but wrote no elsfast/_cuda*.so"}
        load = (
            "import importlib.util, sys; s = importlib.util.spec_from_file_location('elsfast._cuda', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print('imported', m.__name__, 'from', sys.argv[1], 'with', sorted(n for n in dir(m) if n[0] != '_'))"
        )
        rc, timed_out, text = self.run([self.python, "-c", load, str(built[-1])], 60)
        if rc != 0:
            return {"status": "failed", "reason": _why(rc, timed_out, text, "importing the built _cuda")}
        placed = "scratch folder (rehearsal)" if self.rehearsal else "elsfast/ (in place)"
        return {"status": "passed", "reason": f"sm_90 {built[-1].name} built into the {placed} and imported"}

    def pytest_stage(self, name: str, args: list[str], seconds: float, env: dict | None = None) -> dict:
        xml = self.scratch / f"{name}.xml"
        cmd = [self.python, "-m", "pytest", *args, "-p", "pytest_deadline"]
        cmd += ["--deadline", f"{TEST_DEADLINE_S[self.mode] * self.scale:.0f}", "-rfEs", "-p", "no:cacheprovider"]
        cmd.append("--continue-on-collection-errors")  # one module that fails to import must not stop the rest
        if self.rehearsal:  # triton 3.6's interpreter on elsfast's kernel (see that module)
            cmd += ["-p", "triton_interpreter_compat"]
        rc, timed_out, text = self.run([*cmd, f"--junitxml={xml}"], seconds, env=env)
        tests = _junit(xml)
        record = {"exit_status": rc, "tests": tests}
        counts = tests.get("counts", {})
        if timed_out:
            record.update(status="failed", reason=f"ran past its {seconds:.0f} s budget (stopped with SIGINT)")
        elif rc == 5:
            record.update(status="failed", reason="pytest collected no test (markers or paths changed?)")
        elif rc not in (0, 1):
            record.update(status="failed", reason=_why(rc, False, text, "pytest"))
        elif counts.get("failed") or counts.get("errors"):
            names = ", ".join(f["test"] for f in tests["failures"][:5])
            record.update(
                status="failed", reason=f"{counts.get('failed', 0)} failed, {counts.get('errors', 0)} errors: {names}"
            )
        elif counts.get("passed"):
            record.update(status="passed", reason=f"{counts['passed']} passed, {counts.get('skipped', 0)} skipped")
        else:
            record.update(
                status="skipped",
                reason=f"all {counts.get('skipped', 0)} tests skipped: "
                + "; ".join(sorted({s["reason"] for s in tests.get("skips", [])})[:3]),
            )
        return record

    def precompile(self, seconds: float) -> dict:
        env = dict(self.env)
        for k, v in BENCH_ENV[self.mode].items():  # the benchmark sizes, whose launches it compiles
            env.setdefault(k, v)
        cmd = [self.python, "scripts/gpu_precompile.py", *(["--tiny"] if self.rehearsal else [])]
        rc, timed_out, text = self.run(cmd, seconds, env=env)
        cases = [json.loads(ln.removeprefix("PRECOMPILE ")) for ln in text.splitlines() if ln.startswith("PRECOMPILE ")]
        record = {"exit_status": rc, "cases": cases}
        failed = [c["case"] + ": " + c.get("error", "") for c in cases if c["status"] == "failed"]
        how = "through the interpreter (nothing compiled)" if self.rehearsal else "compiled"
        if timed_out:
            record.update(status="failed", reason=f"ran past its {seconds:.0f} s budget ({len(cases)} cases done)")
        elif failed:
            record.update(
                status="failed", reason=f"{len(failed)} of {len(cases)} cases failed: {'; '.join(failed)[:400]}"
            )
        elif rc != 0 or not cases:
            record.update(status="failed", reason=_why(rc, False, text, "scripts/gpu_precompile.py"))
        else:
            record.update(status="passed", reason=f"{len(cases)} launch cases {how}")
        return record

    def accuracy(self, seconds: float) -> dict:
        return self.marker_stage("accuracy", [*ACCURACY_TEST_FILES, "-m", "gpu", "-q"], seconds)

    def kernel_tests(self, seconds: float) -> dict:
        markers, k = ("aot or gpu or interpreter", REHEARSAL_K) if self.rehearsal else ("aot or gpu", KERNEL_TEST_K)
        return self.marker_stage("kernel-tests", [*KERNEL_TEST_FILES, "-m", markers, "-k", k, "-q"], seconds)

    def marker_stage(self, name: str, args: list[str], seconds: float) -> dict:
        """A pytest stage whose results are counted per marker."""
        record = self.pytest_stage(name, args, seconds)
        cases = record["tests"].get("cases", [])
        if not cases:  # pytest did not get to run anything: its own reason stands
            return record
        by_marker = {m: _count([c for c in cases if m in c["markers"]]) for m in MARKERS}
        record["by_marker"] = {m: c for m, c in by_marker.items() if any(c.values())}
        parts = [f"{m}: {_say_counts(c)}" for m, c in record["by_marker"].items()]
        gpu = by_marker["gpu"]
        if not self.cuda and gpu["skipped"] and not gpu["passed"] and not gpu["failed"] and not gpu["errors"]:
            parts = [
                f"gpu: skipped: no CUDA device ({gpu['skipped']} tests)" if p.startswith("gpu:") else p for p in parts
            ]
        record["reason"] = "; ".join(parts) + (f" ({record['reason']})" if record["status"] == "failed" else "")
        return record

    def benchmarks(self, seconds: float) -> dict:
        env = dict(self.env)
        env.pop("TRITON_INTERPRET", None)  # the rehearsal's Triton formulations skip (at these sizes: minutes)
        sizes = {k: env.setdefault(k, v) for k, v in BENCH_ENV[self.mode].items()}
        env["ELSFAST_BENCH_DEADLINE"] = str(time.time() + seconds - BENCH_CASE_S[self.mode] * self.scale)
        self.summary["benchmark_sizes"] = sizes
        self.summary["data"] = _data_note(Path(env.get("ELSFAST_DATA", SHARED_DATA)))
        result = self.out / "kernels-benchmark.json"
        args = ["benchmarks/bench_kernels.py", "-m", "benchmark", "--benchmark-only", "--benchmark-enable"]
        record = self.pytest_stage("benchmarks", [*args, f"--benchmark-json={result}", "-q"], seconds, env=env)
        record["json"] = result.name if result.is_file() else "not written"
        if self.rehearsal and record["status"] == "passed":
            record["reason"] += " on the CPU at rehearsal sizes (GPU formulations skipped: no CUDA device)"
        return record


def _wait(proc: subprocess.Popen, seconds: float) -> int | None:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ([Path(home) / "bin" / "nvcc"] if home else []) + [Path("/usr/local/cuda/bin/nvcc")]:
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def _why(rc: int, timed_out: bool, text: str, what: str) -> str:
    if timed_out:
        return f"{what} ran past its budget"
    last = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in last if "error" in ln.lower()]
    return f"{what} exited with {rc}: {(errors or last or ['no output'])[-1][:300]}"


def _junit(path: Path) -> dict:
    """Counts, failures (test id, first line of the message) and skip reasons from pytest's junit XML."""
    if not path.is_file():
        return {"counts": {}, "note": "no junit XML written"}
    cases, failures, skips = [], [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds = float(case.get("time", 0))
        markers = next((p.get("value", "") for p in case.iter("property") if p.get("name") == "markers"), "")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        kind = OUTCOMES[getattr(outcome, "tag", None)]
        cases.append({"test": test, "outcome": kind, "markers": markers.split(","), "seconds": seconds})
        if outcome is None:
            continue
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        first = message[0][:300] if message else ""
        if kind == "skipped":
            skips.append({"test": test, "reason": first.removeprefix("Skipped: ")})
        else:
            failures.append({"test": test, "kind": outcome.tag, "message": first, "seconds": seconds})
    return {"counts": _count(cases), "failures": failures, "skips": skips, "cases": cases}


def _count(cases: list[dict]) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in cases:
        counts[case["outcome"]] += 1
    return counts


def _say_counts(counts: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no test"


def _data_note(root: Path) -> str:
    if (root / CIFAR_NPZ).is_file() or (root / "cifar10" / "cifar-10-batches-py").is_dir():
        cifar = f"CIFAR-10 from {root}"
    else:
        cifar = (
            "synthetic: random uint8 images of CIFAR-10's shape (no CIFAR-10 found; throughput does not depend on it)"
        )
    mnist = "MNIST" if all((root / f).is_file() for f in MNIST_TRAIN) else "no MNIST (its full-size cases skip)"
    return f"{cifar}; {mnist}"


def _markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        f"# gpu_check ({summary['mode']}, {summary['started_utc']})",
        "",
        f"- device: {env.get('device', 'no CUDA device')}; driver/GPU: {env.get('nvidia_smi', '?')!r}",
        f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"triton {env.get('triton')}, setuptools {env.get('setuptools')}, nvcc: {env.get('nvcc', 'not found')}",
        f"- data: {summary.get('data')}",
        f"- benchmark sizes: {summary.get('benchmark_sizes')}",
        f"- elapsed {summary.get('elapsed_s')} s of {summary['total_budget_s']} s; "
        f"failed stages: {', '.join(summary.get('failed_stages', [])) or 'none'}",
        "",
        "| stage | status | seconds | budget s | Triton compiles | why |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary["stages"]:
        why = str(s.get("reason", "")).replace("|", "/")
        row = [s["name"], s["status"], s.get("seconds", ""), s["budget_s"], s.get("compiles", ""), why]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    for s in summary["stages"]:
        for f in s.get("tests", {}).get("failures", []):
            lines.append(f"- {s['name']}: {f['kind']} {f['test']}: {f['message']}".replace("\n", " "))
        for c in s.get("cases", []):
            if c["status"] == "failed":
                lines.append(f"- {s['name']}: {c['case']}: {c.get('error', '')}".replace("\n", " "))
    lines += ["", "Left out (not run on the device):", *(f"- {item}" for item in summary.get("left_out", []))]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fill_data(source: Path) -> int:
    """Copy the CIFAR-10 training npz (46 MB) and MNIST's training images and labels (9.7 MB) into data/device/
    (git-ignored), each atomically; 56 MB of the device tool's 64 MiB."""
    missing = [str(source / f) for f in [CIFAR_NPZ, *MNIST_TRAIN] if not (source / f).is_file()]
    if missing:
        print(f"not found: {', '.join(missing)} (set ELSFAST_DATA or pass the data folder)", file=sys.stderr)
        return 1
    total = 0
    for name in [CIFAR_NPZ, *MNIST_TRAIN]:
        dst = DEVICE_DATA / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, dst)
        total += dst.stat().st_size
        print(f"{dst.relative_to(REPO)}: {dst.stat().st_size / 1e6:.1f} MB")
    print(f"{total / 2**20:.1f} MiB in data/device; name data/device in the run's carry")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="rehearse on this machine: tiny sizes, no GPU needed")
    parser.add_argument("--out", type=Path, help="output folder (default $OUT, else out/gpu-check)")
    parser.add_argument("--python", default=os.environ.get("ELSFAST_PYTHON", sys.executable))
    parser.add_argument("--budget", type=float, help="overall seconds (default 345 on the device, 200 rehearsing)")
    parser.add_argument(
        "--fill-data",
        nargs="?",
        const=SHARED_DATA,
        type=Path,
        metavar="DATA",
        help="copy DATA/cifar10/cifar10_train_jpeg.npz and DATA/mnist/train-*-ubyte.gz into data/device/ and exit",
    )
    args = parser.parse_args(argv)
    if args.fill_data:
        return fill_data(args.fill_data)
    rehearsal = args.dry_run or os.environ.get("ELSFAST_GPU_CHECK_DRY_RUN") == "1"
    out = args.out or Path(os.environ.get("OUT") or REPO / "out" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, rehearsal, args.python, args.budget or TOTAL_BUDGET_S["rehearsal" if rehearsal else "device"])
    check.say(f"gpu_check ({check.mode}) in {REPO}, output to {out}, {check.summary['total_budget_s']:.0f} s budget")
    try:
        check.stage("environment", check.environment)
        # the build (one nvcc process) runs beside the precompile stage (Triton's compiles): both are CPU work. On
        # the device the accuracy stage waits for it (its CUDA cases use what it builds); the rehearsal builds into
        # a scratch folder that no later stage uses, so there it runs beside every stage
        build = threading.Thread(target=check.stage, args=("build", check.build, True))
        build.start()
        check.stage("precompile", check.precompile)
        if not rehearsal:
            build.join()
        check.stage("accuracy", check.accuracy)
        check.stage("kernel-tests", check.kernel_tests)
        check.stage("benchmarks", check.benchmarks)
        build.join()
    finally:
        check.write_summary()
        shutil.rmtree(check.scratch, ignore_errors=True)
    check.say()
    check.say(_markdown(check.summary))
    return 1 if check.summary["failed_stages"] else 0


if __name__ == "__main__":
    sys.exit(main())
