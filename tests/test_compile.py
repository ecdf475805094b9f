"""torch.compile traces a machine through the compiled kernels, registered as `torch.library` custom ops
(`elsfast::cpu_reduce`, `elsfast::cpu_reduce_shifts`, `elsfast::cuda_reduce`) with fake implementations, and gives
the eager result; it once segfaulted in a dynamo resume around the raw-pointer kernel call, so the compiled run
happens in a subprocess. Dynamo's `eager` compiler backend keeps these tests fast (tracing, fake tensors and graph
breaks are what failed; inductor's code generation is not elsfast's)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from elsfast import ScoreMachine
    g = torch.Generator().manual_seed(3)
    train = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    x = torch.randn(2, 1, 8, 8, generator=g)
    machine = ScoreMachine(train, backend=sys.argv[1])
    compiled = torch.compile(machine.denoise, backend=sys.argv[2])
    for abar in (0.3, 0.7):
        got, want = compiled(x, abar, 3), machine.denoise(x, abar, 3)
        assert torch.equal(got, want), (abar, (got - want).abs().max().item())
    print("equal")
    """
)


@pytest.mark.parametrize(
    ("backend", "compiler"), [("torch", "eager"), ("cpu", "eager"), ("cpu", "aot_eager"), ("shifts", "eager")]
)
def test_compiled_denoise_equals_eager(backend, compiler):
    if backend != "torch":
        pytest.importorskip("elsfast._cpu", reason="the CPU extension is not compiled")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, compiler], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "equal"


def kernel_arguments() -> tuple:
    """Inputs of a small patch reduction (`partials.kernel_inputs`): q, images, key and value offsets, key_scale."""
    from elsfast.reduce import PatchDictionary
    from elsfast.reduce.partials import kernel_inputs

    g = torch.Generator().manual_seed(4)
    dictionary = PatchDictionary(torch.rand(5, 2, 6, 6, generator=g), 3, "zeros", torch.arange(36).view(2, 18))
    return tuple(kernel_inputs(torch.randn(2, 7, 18, generator=g), dictionary, 0.6))


def test_cpu_custom_ops_pass_opcheck(cpu_ext):
    """The custom ops' schemas, fake (meta) implementations and autograd registration agree with their kernels
    (`torch.library.opcheck`); provenance on, so that every output is written."""
    import elsfast.reduce.cpu_ext  # noqa: F401  (registers the ops)

    q, images, key_offsets, value_offsets, key_scale = kernel_arguments()
    args = (q, images, key_offsets, value_offsets, None, key_scale, 2, 1, True, 1, cpu_ext.isas()[0])
    torch.library.opcheck(torch.ops.elsfast.cpu_reduce, args)
    bias = torch.rand(images.shape[0])
    torch.library.opcheck(torch.ops.elsfast.cpu_reduce, (*args[:4], bias, *args[5:]))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 8, 8, generator=g)  # two 6 x 6 query images zero-padded for P = 3
    groups = torch.tensor([[0, 6, 0, 6]], dtype=torch.int32)  # one group: all 36 positions
    shifts = (x, torch.rand(5, 2, 6, 6, generator=g), groups, 72, 3, 1.5, 0.4, 2, 1, cpu_ext.isas()[0])
    torch.library.opcheck(torch.ops.elsfast.cpu_reduce_shifts, shifts)


def test_cuda_custom_op_passes_opcheck_on_the_host():
    """As the CPU ops, for the CUDA kernel's op on CPU tensors (its host algorithm, the same source)."""
    pytest.importorskip("elsfast._cuda", reason="the CUDA extension is not compiled (no nvcc at install)")
    import elsfast.reduce.cuda_ext  # noqa: F401  (registers the op)

    q, images, key_offsets, value_offsets, key_scale = kernel_arguments()
    torch.library.opcheck(
        torch.ops.elsfast.cuda_reduce, (q, images, key_offsets, value_offsets, key_scale, 2, 96, True)
    )
