"""Sharded dictionaries: two CPU processes (gloo) give the single-process answer (issue #6, part 4)."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from elsfast import ScoreMachine

WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from elsfast import ScoreMachine
    rank, world, init, data, dest = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    d = torch.load(data)
    bounds = d["bounds"]
    lo, hi = bounds[rank], bounds[rank + 1]
    results = {}
    for machine, padding in [("els", "zeros"), ("els", "circular"), ("ls", "zeros"), ("is", "zeros")]:
        m = ScoreMachine(d["train"][lo:hi], d["train_labels"][lo:hi], machine=machine, padding=padding,
                         dtype=torch.float64, memory_budget=1, process_group=dist.group.WORLD)
        for conditional in (False, True):
            labels = d["labels"] if conditional else None
            out, prov = m.denoise(d["x"], 0.7, 3, labels, return_provenance=True)
            results[(machine, padding, conditional)] = (out, prov.source_image, prov.source_y, prov.source_x,
                                                        prov.weight, prov.entropy)
    torch.save(results, dest)
    dist.barrier()  # both ranks done before either tears gloo down (else gloo may abort at exit)
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_two_gloo_ranks_match_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(11, 1, 6, 5, generator=g, dtype=torch.float64) * 2 - 1
    # class 2 lives only on rank 1: rank 0 contributes nothing to those samples
    train_labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 0, 1, 2])
    x = torch.randn(4, 1, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2])
    bounds = [0, 6, 11]  # unequal shards
    torch.save(
        {"train": train, "train_labels": train_labels, "x": x, "labels": labels, "bounds": bounds}, tmp_path / "d.pt"
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / "d.pt"), str(tmp_path / f"out{r}.pt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output
    shards = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    for (machine, padding, conditional), got in shards[0].items():
        m = ScoreMachine(train, train_labels, machine=machine, padding=padding, dtype=torch.float64)
        out, prov = m.denoise(x, 0.7, 3, labels if conditional else None, return_provenance=True)
        expected = (out, prov.source_image, prov.source_y, prov.source_x, prov.weight, prov.entropy)
        for name, a, b, c in zip(
            ("out", "image", "y", "x", "weight", "entropy"),
            got,
            shards[1][(machine, padding, conditional)],
            expected,
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: ranks disagree")
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12, msg=f"{machine} {padding} {conditional} {name}")
