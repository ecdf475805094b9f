"""The GPU kernels checked from their compiled code, without a GPU (issue 20): the static cost tool
(benchmarks/static_cost.py) on its CI subset must find no spill in a config `auto` can launch; the shared-memory
estimate that re-plans tiles before launch must bound what the compiler allocates; and the correctness fixes that
need no device (launch configs, the precision bound, split planning, the fp16 query split, provenance ties).

Compiles run in a subprocess without TRITON_INTERPRET (conftest.py sets it for the interpreter tests)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elsfast.reduce import PatchDictionary, softmax_reduce
from elsfast.reduce.partials import plan_splits
from elsfast.reduce.triton_backend import Triton, dot_precision

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="compiling the Triton kernel needs triton")
needs_toolchain = pytest.mark.skipif(
    not HAS_TRITON or shutil.which("nvcc") is None,
    reason="the static cost tool needs triton (ptxas, cuobjdump) and nvcc on PATH",
)


def _without_interpreter() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@needs_toolchain
@pytest.mark.slow
def test_static_cost_tool_finds_no_spill_in_configs_auto_launches(tmp_path):
    out = tmp_path / "static-cost.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "static_cost.py"), "--quick", "--out", str(out)],
        env=_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {r["config"]["kernel"] for r in results} == {"triton", "cuda"}
    for r in results:
        name = r["config"]["name"]
        assert r["main_loop"]["pairs_per_iteration"] > 0 and r["warp_instructions_per_pair"] > 0, name
        assert r["ctas_per_sm"] >= 1, f"{name}: does not fit an SM"
        if r["config"]["auto"]:
            assert not r["spills"], f"{name}: {r['spill_store_bytes']} bytes of spill stores"
        if r["config"]["kernel"] == "triton":  # compiled as the CIFAR-10 launch specialises it (issue 24)
            spec = r["specialisation"]
            assert spec["G"] == "constant 1", name
            for integer in ("M", "N", "S", "pixels_per_image", "M_PAD"):
                assert spec[integer].endswith("(divisible by 16)"), (name, integer, spec[integer])
            assert r["compile_seconds"] > 0 and r["serialised"]["tile_cycles"] > 0, name
            # the serialised estimate never beats the roofline it is floored by
            assert r["serialised"]["predicted_pairs_per_s"] <= r["predicted_pairs_per_s"] * (1 + 1e-9), name


def _static_cost_module():
    spec = importlib.util.spec_from_file_location("static_cost", ROOT / "benchmarks" / "static_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sample_prediction_uses_the_samplers_own_steps_and_pair_counts():
    """The CIFAR-10 sample's 19 evaluations are the sampler's i = 19..1 (published P(t) entries 1 to 19, not 0 to
    18), and each step's pairs follow its P's border classes (zero padding), counted here independently."""
    import elsfast

    steps = _static_cost_module().sample_steps()
    published = elsfast.reference_scales()["CIFAR10_ResNet_zeros_conditional"]
    assert [s["i"] for s in steps] == list(range(19, 0, -1))
    assert [s["P"] for s in steps] == [published[i] for i in range(19, 0, -1)]

    def pairs(P: int) -> int:  # interior (32 - 2r)^2 positions, 4 edges of 32 - 2r, r^2 corner classes x 4 ...
        r, inner = P // 2, 32 - 2 * (P // 2)
        # border classes: rows/columns split into r top classes of 1, the interior band, r bottom classes of 1
        sizes = [inner * inner] + [inner] * (4 * r) + [1] * (4 * r * r)
        return 100 * 50_000 * sum(size * size for size in sizes)

    assert [s["pairs"] for s in steps] == [pairs(s["P"]) for s in steps]
    assert steps[-1]["pairs"] == 100 * 50_000 * (900**2 + 4 * 30**2 + 4)  # P = 3: 4.07e12
    assert steps[0]["pairs"] < steps[-1]["pairs"] / 10  # P = 17: 3.7e11, not an even share


@needs_triton
def test_specialisation_follows_tritons_launch_rule():
    """Integers equal to 1 become constants, multiples of 16 get the divisibility hint, others none; pointers
    are aligned; the tool derives them from the launcher's own integer arguments."""
    from elsfast.kernels.softmax_reduce import kernel_integers, launch_config

    config = launch_config(27, 3, is_uint8=True, provenance=False, dot_precision="fp16x2")
    integers = kernel_integers(1, 100, 50_000, 33, 3072, 7, config)
    assert integers["M_PAD"] == 256
    signature, constants, attrs, described = _static_cost_module().specialisation(integers, uint8=True)
    assert constants == {"G": 1} and signature["G"] == "constexpr" and signature["img_ptr"] == "*u8"
    assert described["N"] == "50000 (divisible by 16)" and described["S"] == "33 (no hint)"
    assert described["M"] == "100 (no hint)" and described["M_PAD"] == "256 (divisible by 16)"
    names = __import__("elsfast.kernels.softmax_reduce", fromlist=["x"]).softmax_reduce_kernel.arg_names
    hinted = {names[key[0]] for key in attrs}
    assert {"N", "pixels_per_image", "M_PAD", "q_ptr", "img_ptr"} <= hinted
    assert not {"M", "S", "tiles_per_split", "G"} & hinted


@needs_triton
def test_long_fp16x2_keys_default_to_tiles_that_did_not_spill():
    """As the launch compiles them (triton 3.6), feature-major 128 x 64 tiles spilled at every P from 9 to 17,
    and 128 x 128 tiles with provenance reached 255 registers from 5 chunks: the defaults avoid both."""
    from elsfast.kernels.softmax_reduce import launch_config

    for P in (9, 11, 13, 17):
        for provenance in (False, True):
            config = launch_config(3 * P * P, 3, is_uint8=True, provenance=provenance, dot_precision="fp16x2")
            assert not config["FEATURE_MAJOR"] and config["BLOCK_M"] == 128, (P, provenance)
            wide = not provenance or config["D_PAD"] // config["BLOCK_D"] < 5
            assert config["BLOCK_N"] == (128 if wide else 64), (P, provenance)


COMPILE = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from elsfast.kernels import softmax_reduce as k

for D, E, precision, block_m, block_n in json.loads(sys.argv[1]):
    config = k.launch_config(D, E, is_uint8=precision == "fp16x2", provenance=True, dot_precision=precision,
                             block_m=block_m, block_n=block_n)
    options = {name: config.pop(name) for name in ("num_warps", "num_stages")}
    signature = dict(k.KERNEL_SIGNATURE, **dict.fromkeys(config, "constexpr"))
    if precision == "fp16x2":
        signature["img_ptr"] = "*u8"
    for sm in (80, 90):
        out = triton.compile(ASTSource(k.softmax_reduce_kernel, signature, config), target=GPUTarget("cuda", sm, 32),
                             options=options)
        print(json.dumps([D, precision, sm, out.metadata.shared, k.shared_memory_estimate({**config, **options})]))
"""


@needs_triton
@pytest.mark.slow
def test_kernel_compiles_and_the_shared_memory_estimate_bounds_it():
    """sm_80 and sm_90 compiles of the tiles `auto` picks and of tiles asked for by name that used to fail with
    OutOfResources (128-query or 128-entry tiles with D > 64); the estimate that re-plans tiles before launch is
    an upper bound on the compiled shared memory, and every compiled kernel fits the limit."""
    cases = [(27, 3, "fp16x2", None, None), (363, 3, "fp16x2", None, 128), (147, 3, "tf32x3", 128, 128)]
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(cases)],
        env=_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 2 * len(cases)
    from elsfast.kernels.softmax_reduce import SHARED_MEMORY_LIMIT

    for D, precision, sm, shared, estimate in rows:
        assert shared <= estimate <= SHARED_MEMORY_LIMIT, (D, precision, sm, shared, estimate)


@needs_triton
def test_tiles_over_the_shared_memory_limit_are_replanned_before_launch():
    from elsfast.kernels.softmax_reduce import SHARED_MEMORY_LIMIT, launch_config, shared_memory_estimate

    config = launch_config(363, 3, is_uint8=False, provenance=False, dot_precision="tf32x3", block_m=512, block_n=512)
    assert shared_memory_estimate(config) <= SHARED_MEMORY_LIMIT
    assert config["BLOCK_M"] * config["BLOCK_N"] < 512 * 512


@needs_triton
def test_ieee_uses_chunks_that_do_not_spill():
    from elsfast.kernels.softmax_reduce import launch_config

    assert launch_config(363, 3, is_uint8=True, provenance=False, dot_precision="ieee")["BLOCK_D"] == 32


def test_fp16x2_needs_integer_keys():
    with pytest.raises(ValueError, match="uint8"):
        dot_precision("fp16x2", uint8=False)


def test_plan_splits_without_queries():
    assert plan_splits(1000, 64, 0, torch.device("cpu"), None) == (1, 1024)
    assert plan_splits(0, 64, 0, torch.device("cpu"), 4) == (1, 64)


@needs_triton
def test_query_split_is_fp32_grade():
    from elsfast.kernels.softmax_reduce import split_queries

    g = torch.Generator().manual_seed(3)
    for scale in (1e-3, 1.0, 1e5):
        q = torch.randn(2, 5, 27, generator=g) * scale
        q_hi, q_lo, dot_scale = split_queries(q, 16, 32)
        assert q_hi.shape == (2, 16, 32) and q_hi[:, 5:].abs().max() == 0
        back = (q_hi.double() + q_lo.double())[:, :5, :27] * dot_scale
        assert ((back - q.double()).abs() <= 2.0**-22 * q.double().abs() + 1e-30).all()


@needs_triton
def test_integer_keys_break_provenance_ties_like_torch():
    """Equal patches must give bit-equal logits (exact integer keys), so that the first entry wins as on torch:
    a dictionary of repeated uint8 images, queries that sit on those patches."""
    g = torch.Generator().manual_seed(4)
    base = torch.randint(0, 256, (2, 3, 5, 5), generator=g, dtype=torch.uint8)
    train = torch.cat([base, base, base.flip(0)])  # every patch three times
    d = PatchDictionary(train, patch_size=3, padding="zeros", positions=torch.arange(25).view(1, 25))
    keys, _ = d.entries(0, train.shape[0], torch.float32)
    q = keys[:, ::7].contiguous()  # queries equal to dictionary patches
    want = softmax_reduce(q, d, abar=0.99, backend="torch", provenance=True).best
    got = softmax_reduce(q, d, abar=0.99, backend=Triton(block_m=16, block_n=16, splits=2), provenance=True).best
    torch.testing.assert_close(got, want)
