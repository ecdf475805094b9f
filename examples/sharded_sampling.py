"""Sample with a training set sharded across processes (torch.distributed): each rank holds only its shard.

    torchrun --standalone --nproc_per_node 2 examples/sharded_sampling.py --check      # 2 CPU processes (gloo)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/sharded_sampling.py --dataset cifar10 --data-root /data                    # 2 machines x 8 GPUs

Every rank builds `ScoreMachine(its_shard, process_group=WORLD)` and calls `elsfast.sample` with the same
arguments (the same seed, so the same noise); every reduction then merges the ranks' partial softmax states
exactly (`elsfast.reduce.distributed.all_merge_`), so every rank gets the images, provenance and stats of the
whole training set. Rank r holds rows [r * N / W, (r + 1) * N / W) of the N training images (W ranks); nothing
else is divided: each rank holds the batch being sampled and computes every query against its own shard. The
backend is gloo on CPUs and NCCL on GPUs (one GPU per rank: cuda:LOCAL_RANK).

With `--check`, rank 0 also runs one process over the whole training set and compares: the images agree to
rounding (the merge adds the same terms in another order) and the provenance names the same training image and
pixel everywhere (the dominant entry is the lowest global entry id among equal maxima, on one rank or several, and
identical patches have equal logits wherever the shards put them).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import elsfast
from elsfast import datasets
from elsfast.common.imageio import save_grid


def compare_sources(train: torch.Tensor, a, b, patch_size: int) -> tuple[int, int]:
    """How many pixels two `Provenance`s attribute to another source (training image or pixel), and how many of
    those to another patch (zero padding), as opposed to an identical copy of the same patch."""
    other = (a.source_image.cpu() != b.source_image) | (a.source_y.cpu() != b.source_y)
    other |= a.source_x.cpu() != b.source_x
    r = patch_size // 2
    padded = torch.nn.functional.pad(datasets.to_float(train), (r, r, r, r))
    different = 0
    for n, y, x in other.nonzero().tolist():
        patches = [padded[p.source_image[n, y, x], :, p.source_y[n, y, x] :, p.source_x[n, y, x] :] for p in (a, b)]
        different += not torch.equal(*(q[:, : 2 * r + 1, : 2 * r + 1] for q in patches))
    return int(other.sum()), different


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist-embedded", help="an elsfast.datasets name (default mnist-embedded)")
    parser.add_argument("--data-root", default=None, help="data directory (else $ELSFAST_DATA)")
    parser.add_argument("--limit", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--samples", type=int, default=4, help="images to sample (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    parser.add_argument("--patch-size", default="MNIST_ResNet_zeros", help="an odd int or a calibrated list name")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--conditional", action="store_true", help="sample digits 0, 1, 2, ... (class labels)")
    parser.add_argument("--check", action="store_true", help="rank 0 compares with one process")
    parser.add_argument("--out", type=Path, default=None, help="rank 0 writes the images as a PNG grid here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    # This rank's shard. datasets.load reads the first --limit images; a loader for a dataset too large for one
    # machine would read only rows [lo, hi) here.
    data = datasets.load(args.dataset, root=args.data_root, limit=args.limit)
    lo, hi = rank * len(data) // world, (rank + 1) * len(data) // world
    images, labels = data.images[lo:hi], data.labels[lo:hi] if args.conditional else None
    dtype = getattr(torch, args.dtype)
    patch_size = int(args.patch_size) if args.patch_size.isdigit() else args.patch_size
    machine = elsfast.ScoreMachine(images, labels, dtype=dtype, device=device, process_group=dist.group.WORLD)
    kwargs = {
        "steps": args.steps,
        "patch_size": patch_size,
        "labels": torch.arange(args.samples) % 10 if args.conditional else None,
        "seed": 0,
        "progress": False,
    }
    samples = elsfast.sample(machine, args.samples, **kwargs)
    stats = machine.last_stats  # the last evaluation, over the whole training set (all ranks)
    print(
        f"rank {rank}/{world}: images [{lo}, {hi}) of {len(data)}; sampled {list(samples.shape)}; last call over "
        f"{stats.ranks} ranks: {stats.exact_pairs:,} query-entry pairs, backends {sorted(stats.backends)}",
        flush=True,
    )
    # one evaluation with provenance: which training image each pixel's dominant patch comes from
    noisy = torch.randn(samples.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    probe = (noisy, 0.5, 5, kwargs["labels"])
    _, provenance = machine.denoise(*probe, return_provenance=True)
    status = 0
    if rank == 0:
        if args.out is not None:
            print(f"wrote {save_grid(samples, args.out)}")
        if args.check:
            whole = elsfast.ScoreMachine(data.images, data.labels if args.conditional else None, dtype=dtype)
            expected = elsfast.sample(whole, args.samples, **kwargs)
            same_stats = whole.last_stats.exact_pairs == stats.exact_pairs
            _, expected_provenance = whole.denoise(*probe, return_provenance=True)
            gap = (samples.cpu() - expected).abs().max().item()
            other, different = compare_sources(data.images, provenance, expected_provenance, probe[2])
            pixels = expected_provenance.source_image.numel()
            print(
                f"check against one process: images max |difference| {gap:.1e}; provenance names another source at "
                f"{other} of {pixels} pixels (another patch at {different}); whole-dictionary pairs "
                f"{'equal' if same_stats else 'DIFFERENT'}"
            )
            # the sampler amplifies the rounding of the merge (another order of the same sums) over its steps
            tolerance = 1e-3 if dtype == torch.float32 else 1e-9
            status = 0 if gap <= tolerance and other == 0 and same_stats else 1
            print("same as one process" if status == 0 else "DIFFERENT from one process")
    dist.barrier()  # every rank done before gloo is torn down
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
