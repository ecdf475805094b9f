"""Sharded dictionaries: two CPU processes (gloo) give the single-process answer (issue #6, part 4), with the
stats of the whole dictionary and the same provenance on ties (issue #17, part 4): identical patches tie exactly
wherever the shards, chunks and tiles put them, and the lowest global id wins; the README's torchrun example."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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
            s = m.last_stats
            results[(machine, padding, conditional, "stats")] = (s.ranks, s.exact_pairs, s.queries, s.chunks)
    # exact ties across ranks: the lowest global id wins, wherever it lives (rank 0 holds 7 and 5, rank 1 holds 2
    # and 9, for four queries; the last query has no entries on rank 1)
    from elsfast.reduce.distributed import all_merge_
    from elsfast.reduce.state import ReduceState
    tie = ReduceState(torch.tensor([[1.0, 1.0, 2.0, 1.0]], dtype=torch.float64),
                      torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 4, 1, dtype=torch.float64),
                      torch.tensor([[7, 5, 4, 3]]) if rank == 0 else torch.tensor([[2, 9, 8, -1]]),
                      torch.zeros(1, 4, dtype=torch.float64))
    if rank == 1:
        tie.m[0, 2], tie.m[0, 3], tie.l[0, 3], tie.acc[0, 3] = 3.0, -float("inf"), 0.0, 0.0
    results["ties"] = all_merge_(tie, dist.group.WORLD).best
    torch.save(results, dest)
    dist.barrier()  # both ranks done before either tears gloo down (else gloo may abort at exit)
    dist.destroy_process_group()
    """
)


def run_two_ranks(tmp_path, worker: str, data: dict, tries: int = 2) -> list[dict]:
    """Run `worker` (the source of a script: rank, world size, init method, data path, output path) as two gloo
    ranks over `data`; returns each rank's saved results.

    A rank that aborts with "terminate called without an active exception" (SIGABRT from a C++ thread left
    running, seen once in 20 runs of the sharded-gradient worker on a loaded 2-core machine, never reproduced alone)
    gets the whole run tried again, once: a wrong result or any other failure fails at once."""
    try:
        return _two_ranks(tmp_path / f"try{tries}", worker, data)
    except RankAborted:
        if tries <= 1:
            raise
        return run_two_ranks(tmp_path, worker, data, tries - 1)


class RankAborted(AssertionError):
    """A rank died of SIGABRT."""


def _two_ranks(tmp_path, worker: str, data: dict) -> list[dict]:
    tmp_path.mkdir(parents=True)
    torch.save(data, tmp_path / "d.pt")
    script = tmp_path / "worker.py"
    script.write_text(worker)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores: one thread each
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / "d.pt"), str(tmp_path / f"out{r}.pt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        if p.returncode == -signal.SIGABRT and "terminate called without an active exception" in output:
            raise RankAborted(output)
        assert p.returncode == 0, output
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]


needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing"
)


@needs_gloo
def test_two_gloo_ranks_match_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(11, 1, 6, 5, generator=g, dtype=torch.float64) * 2 - 1
    # class 2 lives only on rank 1: rank 0 contributes nothing to those samples
    train_labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 0, 1, 2])
    x = torch.randn(4, 1, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2])
    bounds = [0, 6, 11]  # unequal shards
    data = {"train": train, "train_labels": train_labels, "x": x, "labels": labels, "bounds": bounds}
    shards = run_two_ranks(tmp_path, WORKER, data)
    for rank in range(2):
        assert shards[rank].pop("ties").tolist() == [[2, 5, 8, 3]]
    for key, got in shards[0].items():
        if key[-1] == "stats":
            continue
        machine, padding, conditional = key
        m = ScoreMachine(train, train_labels, machine=machine, padding=padding, dtype=torch.float64)
        out, prov = m.denoise(x, 0.7, 3, labels if conditional else None, return_provenance=True)
        # last_stats describe the whole dictionary on every rank (issue #17): its pairs, not one shard's
        ranks, exact_pairs, queries, chunks = shards[0][(*key, "stats")]
        assert shards[1][(*key, "stats")] == (ranks, exact_pairs, queries, chunks)
        assert (ranks, exact_pairs, queries) == (2, m.last_stats.exact_pairs, m.last_stats.queries), key
        assert chunks >= 2
        expected = (out, prov.source_image, prov.source_y, prov.source_x, prov.weight, prov.entropy)
        for name, a, b, c in zip(
            ("out", "image", "y", "x", "weight", "entropy"),
            got,
            shards[1][(machine, padding, conditional)],
            expected,
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: ranks disagree")
            where = (a - c).abs() > 1e-12
            detail = f"{a[where].tolist()[:8]} instead of {c[where].tolist()[:8]}"
            assert not where.any(), f"{machine} {padding} {conditional} {name}: {int(where.sum())} differ, {detail}"


TIES_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from elsfast import ScoreMachine
    rank, world, init, data, dest = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    d = torch.load(data)
    lo, hi = d["bounds"][rank], d["bounds"][rank + 1]
    results = {}
    for key in d["configs"]:
        machine, padding, dtype, backend, budget, conditional = key
        dtype = getattr(torch, dtype)
        m = ScoreMachine(d["train"][lo:hi], d["train_labels"][lo:hi], machine=machine, padding=padding, dtype=dtype,
                         backend=backend, memory_budget=budget, process_group=dist.group.WORLD)
        labels = d["labels"] if conditional else None
        out, prov = m.denoise(d["x"].to(dtype), d["abar"], d["P"], labels, return_provenance=True)
        s = m.last_stats
        results[key] = (out, prov.source_image, prov.source_y, prov.source_x,
                        (s.ranks, s.exact_pairs, s.queries, s.chunks, sorted(s.backends)))
    torch.save(results, dest)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _cpu_kernel_runs() -> bool:
    try:
        import elsfast._cpu as ext
    except ImportError:
        return False
    return bool(ext.isas())


@needs_gloo
@pytest.mark.slow_ci
def test_sharded_provenance_names_the_same_sources_on_exact_ties(tmp_path):
    """Issue #17, part 4: MNIST digits (uint8, so identical patches abound: the background, and two digits copied
    onto rank 1) on two unequal shards name the same source image and pixel as one process at every pixel, in
    float64 and float32, on the torch path and the CPU kernel, at any budget; the later copies (ids 40, 41) are
    never named, since the originals (ids 3, 30) hold the same patches at lower ids. Before, identical patches got
    logits an ulp apart from matrix products of other shapes, and the torch path and the CPU kernel took a tile's
    first maximum rather than its lowest id: 7 (ELS), 3 (circular) and 126 (LS) of the 1,568 pixels named another
    source in float64 on the torch path, 5 in float32, 2 and 1 on the CPU kernel."""
    from elsfast import datasets

    mnist = datasets.load("mnist-embedded", limit=40)
    copies = [3, 30]  # image 3 lives on rank 0, image 30 on rank 1; both copies on rank 1
    train = torch.cat([mnist.images, mnist.images[copies]])
    train_labels = torch.cat([mnist.labels, mnist.labels[copies]])
    abar = 0.9
    g = torch.Generator().manual_seed(17)
    clean = train[copies].double() / 127.5 - 1
    x = abar**0.5 * clean + (1 - abar) ** 0.5 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    configs = [
        ("els", "zeros", "float64", "torch", 512 << 20, False),
        ("els", "zeros", "float64", "torch", 1 << 16, True),  # a few images a chunk, conditional
        ("els", "circular", "float64", "torch", 512 << 20, False),
        ("ls", "zeros", "float64", "torch", 512 << 20, False),
        ("els", "zeros", "float32", "torch", 1 << 20, False),
    ]
    if _cpu_kernel_runs():
        configs += [("els", "zeros", "float32", "cpu", 512 << 20, False), ("els", "zeros", "float32", "cpu", 1, True)]
    data = {"train": train, "train_labels": train_labels, "x": x, "labels": train_labels[copies], "abar": abar}
    data.update(P=5, bounds=[0, 19, 42], configs=configs)
    shards = run_two_ranks(tmp_path, TIES_WORKER, data)
    for key in configs:
        machine, padding, dtype, backend, budget, conditional = key
        dtype = getattr(torch, dtype)
        m = ScoreMachine(
            train, train_labels, machine=machine, padding=padding, dtype=dtype, backend=backend, memory_budget=budget
        )
        labels = data["labels"] if conditional else None
        out, prov = m.denoise(x.to(dtype), abar, 5, labels, return_provenance=True)
        expected = (prov.source_image, prov.source_y, prov.source_x)
        for rank, shard in enumerate(shards):
            got_out, *got, stats = shard[key]
            for name, a, b in zip(("image", "y", "x"), got, expected, strict=True):
                differ = a != b
                assert not differ.any(), f"{key} rank {rank}: {name} differs at {int(differ.sum())} of {a.numel()}"
            torch.testing.assert_close(got_out, out, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
            # the whole dictionary's stats on every rank
            assert stats[:3] == (2, m.last_stats.exact_pairs, m.last_stats.queries), (key, stats)
            assert stats[3] >= 2 and stats[4] == sorted(m.last_stats.backends), (key, stats)
        # the ties were there to be broken: many pixels come from the originals of the copies (most others from the
        # background, which image 0 holds at the lowest ids), none from a copy
        assert (prov.source_image.flatten(1) == torch.tensor(copies).unsqueeze(1)).float().mean() > 0.1, key
        assert not (prov.source_image >= 40).any(), key
    # and one process names the same sources whatever its budget (how the dictionary is cut into chunks)
    ref = ScoreMachine(train, dtype=torch.float64, backend="torch").denoise(x, abar, 5, return_provenance=True)[1]
    cut = ScoreMachine(train, dtype=torch.float64, backend="torch", memory_budget=1).denoise(
        x, abar, 5, return_provenance=True
    )[1]
    for name in ("source_image", "source_y", "source_x"):
        assert torch.equal(getattr(cut, name), getattr(ref, name)), name


def test_ties_go_to_the_lowest_entry_id_in_every_merge():
    """Equal maxima name the lowest id: in a tile (whatever the order of its ids), in a top-k list, in merge_ (both
    orders) and in fold_ over kernel splits, so that no way of splitting the dictionary changes the answer."""
    from elsfast.reduce.state import ReduceState

    values = torch.zeros(1, 5, 1, dtype=torch.float64)
    logits = torch.tensor([[[0.0, 2.0, 2.0, 1.0, 2.0]]], dtype=torch.float64)
    for ids in ([10, 11, 12, 13, 14], [14, 12, 11, 10, 13], [3, 9, 1, 0, 7]):
        state = ReduceState.from_logits(logits.clone(), values, torch.tensor(ids))
        assert state.best.item() == min(ids[1], ids[2], ids[4]), ids
    top = ReduceState.from_query_logits(
        logits, values.unsqueeze(1).expand(1, 1, 5, 1), torch.tensor([[[4, 8, 6, 1, 7]]])
    )
    assert top.best.item() == 6

    def single(m, best):
        one = torch.ones(1, 1, dtype=torch.float64)
        return ReduceState(
            torch.tensor([[m]], dtype=torch.float64), one, one.unsqueeze(-1), torch.tensor([[best]]), 0 * one
        )

    for a, b, expected in [
        ((1.0, 7), (1.0, 3), 3),
        ((1.0, 3), (1.0, 7), 3),
        ((1.0, 3), (2.0, 7), 7),
        ((2.0, 9), (1.0, 1), 9),
    ]:
        assert single(*a).merge_(single(*b)).best.item() == expected, (a, b)
    empty = ReduceState.empty(1, 1, 1, dtype=torch.float64, device=torch.device("cpu"), provenance=True)
    assert empty.merge_(single(1.0, 5)).best.item() == 5
    # fold_ of K = 5 kernel splits, the tie at splits 1 and 4: id 2 (split 4) beats id 6 (split 1)
    splits = [single(m, best) for m, best in [(0.0, 1), (3.0, 6), (1.0, 4), (3.0, 8), (3.0, 2)]]
    stacked = ReduceState(*(torch.stack([getattr(s, f) for s in splits]) for f in ("m", "l", "acc", "best", "u")))
    assert stacked.fold_().best.item() == 2
    # a kernel's splits hold local ids (row n of the dictionary's images, n * S + s); the tie is decided on the
    # global ids image_ids[n] * S + s: here rows 0 and 1 are training images 9 and 4, S = 2
    from elsfast.reduce import ImageDictionary
    from elsfast.reduce.partials import fold_partial_states

    dictionary = ImageDictionary(torch.zeros(2, 1, 1, 2), shifts=True, image_ids=torch.tensor([9, 4]))
    fields = [torch.stack([getattr(single(3.0, local), f) for local in (1, 3)]) for f in ("m", "l", "acc", "best", "u")]
    assert fold_partial_states(dictionary, *fields).best.item() == 4 * 2 + 1  # local 3 = row 1, s = 1


@pytest.mark.slow
def test_torchrun_example_matches_one_process(tmp_path):
    """The sharded example (docs/guide.md), run as a user would: `torchrun --standalone --nproc_per_node 2` (gloo on
    CPU), class-conditional; rank 0 compares images, provenance and whole-dictionary stats with one process."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(root / "examples" / "sharded_sampling.py"), "--check", "--conditional", "--limit", "60"]
    command += ["--samples", "3", "--steps", "4", "--out", str(tmp_path / "grid.png")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "same as one process" in output and "whole-dictionary pairs equal" in output, output
    assert output.count("last call over 2 ranks") == 2, output
    assert (tmp_path / "grid.png").is_file()


MISMATCH_WORKER = textwrap.dedent(
    """
    import os, sys, time, torch, torch.distributed as dist
    from elsfast import ScoreMachine
    from elsfast.reduce.collectives import CollectiveTimeout, set_collective_timeout
    rank, world, init, data, dest = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    d = torch.load(data)
    shard = d["train"][rank * 4 : (rank + 1) * 4]
    m = ScoreMachine(shard, dtype=torch.float64, process_group=dist.group.WORLD)
    x, results = d["x"], {}

    def attempt(name, *args, machine=m):
        try:
            results[name] = machine.denoise(*args)
        except (ValueError, CollectiveTimeout) as err:
            results[name] = f"{type(err).__name__}: {err}"

    attempt("same", x, 0.7, 3)
    attempt("noise", x + 1e-3 * (rank == 1), 0.7, 3)  # rank 1 was given other noise
    attempt("order", x.flip(0) if rank == 1 else x, 0.7, 3)  # the same images in another order
    attempt("abar", x, 0.7 if rank == 0 else 0.71, 3)
    attempt("patch", x, 0.7, 3 if rank == 0 else 5)
    circular = ScoreMachine(shard, dtype=torch.float64, process_group=dist.group.WORLD,
                            padding="circular" if rank == 1 else "zeros")
    attempt("machine", x, 0.7, 3, machine=circular)
    # a rank that does not make the call: the other one ends with a message after the timeout
    set_collective_timeout(2)
    start = time.monotonic()
    if rank == 0:
        attempt("hung", x, 0.7, 3)
        results["waited"] = time.monotonic() - start
    torch.save(results, dest)
    if rank == 1:
        time.sleep(4)  # alive but silent past rank 0's timeout
    os._exit(0)  # no gloo teardown after an abandoned collective
    """
)


@needs_gloo
def test_ranks_given_different_calls_refuse_and_a_hung_rank_times_out(tmp_path):
    """Issue 26, item 5: ranks given other noise, another order of the same images, another abar, patch size or
    kind of machine raise a ValueError on every rank naming the rank and what differs (they blended silently
    before); a rank that skips a call ends the other's wait after the (settable) timeout with a message."""
    g = torch.Generator().manual_seed(26)
    train = torch.rand(8, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64)
    shards = run_two_ranks(tmp_path, MISMATCH_WORKER, {"train": train, "x": x})
    expected = ScoreMachine(train, dtype=torch.float64).denoise(x, 0.7, 3)
    for rank, results in enumerate(shards):
        torch.testing.assert_close(results["same"], expected, rtol=0, atol=1e-13)
        for name, what in [
            ("noise", "queries"),
            ("order", "queries"),
            ("abar", "abar"),
            ("patch", "patch size"),
            ("machine", "machine"),
        ]:
            message = results[name]
            assert isinstance(message, str) and message.startswith("ValueError"), (rank, name, message)
            assert f"rank 1 ({what})" in message and "differ from rank 0" in message, (rank, name, message)
    hung = shards[0]["hung"]
    assert isinstance(hung, str) and hung.startswith("CollectiveTimeout"), hung
    assert "rank 0 of 2 did not complete within 2 s" in hung and "ELSFAST_COLLECTIVE_TIMEOUT" in hung, hung
    assert 1.5 < shards[0]["waited"] < 30


def test_collective_timeout_setting():
    from elsfast.reduce import collectives

    try:
        collectives.set_collective_timeout(5)
        assert collectives.collective_timeout() == 5.0
        collectives.set_collective_timeout(None)
        os.environ["ELSFAST_COLLECTIVE_TIMEOUT"] = "12.5"
        assert collectives.collective_timeout() == 12.5
        os.environ["ELSFAST_COLLECTIVE_TIMEOUT"] = "soon"
        with pytest.raises(ValueError, match="ELSFAST_COLLECTIVE_TIMEOUT must be a positive number"):
            collectives.collective_timeout()
        with pytest.raises(ValueError, match="positive, finite"):
            collectives.set_collective_timeout(0)
    finally:
        os.environ.pop("ELSFAST_COLLECTIVE_TIMEOUT", None)
        collectives.set_collective_timeout(None)
    assert collectives.collective_timeout() == collectives.DEFAULT_TIMEOUT
