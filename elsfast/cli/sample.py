"""The sampling commands of the `elsfast` command line: `sample`, `explain` and `measure`.

`add_commands(subparsers)` adds the three sub-commands; `_cmd_sample`, `_cmd_explain` and `_cmd_measure` run
them, with the checks that only these commands share (the machine group's options, --labels, --resume-from).
This module may import `elsfast.cli.args` and the library (lazily, inside the commands, so that `elsfast --help`
stays fast); no other cli module.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..common.checks import check_device
from ..common.threads import limit_threads
from .args import (
    DEFAULT_OUT,
    DEFAULT_PATCH_SIZE,
    PROG,
    CLIError,
    add_data_args,
    add_machine_args,
    add_sampling_args,
    at_least,
    check_outputs,
    labels_spec,
    load_dataset,
)

__all__ = ["add_commands"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `sample`, `explain` and `measure` to the `elsfast` sub-command parser."""
    s = commands.add_parser(
        "sample",
        help="draw samples with an analytic machine and save them as a PNG grid",
        description=(
            "Draw samples with an analytic score machine (DDIM, eta = 0) over a training set and write them "
            f"as a PNG grid (--out, default {DEFAULT_OUT} unless only --save is given) and/or as raw float "
            "tensors in [-1, 1] (--save). Files are written only at the end, atomically."
        ),
    )
    add_data_args(s)
    add_machine_args(s, scales=True)
    add_sampling_args(s, n_default=16)

    g = s.add_argument_group("output")
    g.add_argument("--out", metavar="PATH.png", help=f"PNG grid of the samples (default: {DEFAULT_OUT})")
    g.add_argument("--save", metavar="PATH", help="also save the raw samples [n, C, H, W] as .pt or .npz")
    g.add_argument(
        "--resume-from",
        metavar="PATH|none",
        help="sampling checkpoint written after every step so that the same command, run again after a crash, "
        "resumes where it stopped; removed when the run finishes. Any other existing file there is refused, never "
        "replaced (default: the first output path + '.ckpt'; 'none': off)",
    )
    g.add_argument("--checkpoint", metavar="PATH|none", help="deprecated name of --resume-from (next release: gone)")
    g.add_argument("--nrow", type=at_least(1), metavar="K", help="images per grid row (default: ceil(sqrt(n)))")
    g.add_argument(
        "--scale",
        type=at_least(1),
        metavar="S",
        help="integer upscaling of the grid (default: 2 for images of at most 32 px, else 1)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sample)

    e = commands.add_parser(
        "explain",
        help="sample and explain every sample: sources, offsets, entropy, creativity measures",
        description=(
            "Draw samples with an analytic machine and explain each one as a mosaic of training patches: "
            "DIR/sample_K.png shows the sample, which training image every pixel came from, how far its patch "
            "moved, the posterior entropy over the sampling steps and the largest source images with the "
            "regions they provide; DIR/measures.json holds the creativity measures (nearest training image, "
            "memorisation, source regions, local consistency). Files are written only at the end, atomically."
        ),
    )
    add_data_args(e)
    add_machine_args(e, scales=True)
    add_sampling_args(e, n_default=4)
    g = e.add_argument_group("output")
    g.add_argument("--out-dir", required=True, metavar="DIR", help="directory of the figures and measures.json")
    g.add_argument("--top", type=at_least(1), default=4, metavar="K", help="largest source images shown (default: 4)")
    g.add_argument(
        "--scale",
        type=at_least(1),
        metavar="S",
        help="integer upscaling of the figures (default: 4 up to 32 px, 2 up to 64 px, else 1)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_explain)

    m = commands.add_parser(
        "measure",
        help="creativity measures of saved samples (from 'elsfast sample --save')",
        description=(
            "Compute the creativity measures of a batch of samples saved by 'elsfast sample --save' against a "
            "training set: nearest training image and RMS distance, memorisation, the regions of pixels whose "
            "nearest dictionary patch comes from the same training image, local consistency. Prints a table "
            "and, with --json, writes the measures atomically."
        ),
    )
    add_data_args(m)
    add_machine_args(
        m,
        scales=False,
        patch_help=(
            f"odd patch size of the nearest-patch provenance and the consistency check (default: "
            f"{DEFAULT_PATCH_SIZE}; use the last sampling step's)"
        ),
    )
    g = m.add_argument_group("samples")
    g.add_argument("--samples", required=True, metavar="PATH", help="samples [n, C, H, W] as .pt or .npz")
    g.add_argument(
        "--labels",
        type=labels_spec,
        metavar="L",
        help=(
            "the classes the samples were drawn from (their provenance then comes from their class only): one "
            "class, a comma list of n classes, or 'cycle'"
        ),
    )
    g.add_argument("--json", metavar="PATH", help="also write the measures as JSON")
    m.set_defaults(func=_cmd_measure)


# ------------------------------------------------------------------------------------------------------------
# checks and helpers of the sampling commands


def _check_machine_args(args: argparse.Namespace) -> None:
    """Cheap checks of the machine group, before any data is loaded."""
    from ..reduce.registry import check_backend_name

    if args.dictionary != "same" and args.machine != "els":
        raise CLIError(f"argument --dictionary: {args.dictionary} is an option of --machine els")
    if args.machine == "es" and args.padding == "zeros":
        raise CLIError(
            "the es machine is defined by circular translations and needs --padding circular "
            "(with zero padding it reduces to --machine is)"
        )
    try:
        check_backend_name(args.backend)
    except ValueError as e:
        raise CLIError(f"argument --backend: {e}") from None
    topk_options = {"--topk": args.topk, "--tolerance": args.tolerance, "--topk-index": args.topk_index}
    given = [flag for flag, value in topk_options.items() if value is not None]
    if given and args.backend != "topk":
        raise CLIError(f"argument {given[0]}: only with --backend topk")
    if args.tolerance is not None and not 0.0 < args.tolerance < 1.0:
        raise CLIError(f"argument --tolerance: must be in (0, 1), got {args.tolerance}")


def _backend_arg(args: argparse.Namespace):
    """--backend NAME, or a configured top-k backend from --topk/--tolerance/--topk-index."""
    if args.backend != "topk":
        return args.backend
    from ..reduce import TopK

    quiet = getattr(args, "quiet", False)
    options = {"k": args.topk, "tolerance": args.tolerance, "index": args.topk_index, "progress": not quiet}
    return TopK(**{name: value for name, value in options.items() if value is not None})


def _check_labels_count(labels, n: int) -> None:
    if isinstance(labels, list) and len(labels) != n:
        raise CLIError(f"argument --labels: a list needs one class per sample ({n}), got {len(labels)}")


def _check_sample_args(args: argparse.Namespace) -> None:
    """Cheap checks, before any data is loaded."""
    from ..common.imageio import SAMPLE_SUFFIXES

    _check_machine_args(args)
    if args.out is None and args.save is None:
        args.out = DEFAULT_OUT
    if args.out is not None:
        if Path(args.out).suffix.lower() != ".png":
            raise CLIError(f"argument --out: the grid is written as PNG, so the path must end in .png: {args.out!r}")
        if Path(args.out).is_dir():
            raise CLIError(f"argument --out: {args.out!r} is a directory")
    if args.save is not None:
        if Path(args.save).suffix.lower() not in SAMPLE_SUFFIXES:
            raise CLIError(
                f"argument --save: the format is chosen by the suffix, {' or '.join(SAMPLE_SUFFIXES)}: {args.save!r}"
            )
        if Path(args.save).is_dir():
            raise CLIError(f"argument --save: {args.save!r} is a directory")
    _check_labels_count(args.labels, args.n)
    resume = _resume_path(args)
    flag = "--checkpoint" if args.checkpoint is not None else "--resume-from"
    check_outputs({"--out": (args.out, "grid"), "--save": (args.save, "samples"), flag: (resume, "sampling-state")})
    if resume is not None and Path(resume).exists():
        from ..common.fileio import describe_file, elsfast_format

        if elsfast_format(resume) != "elsfast-sampling-state":
            raise CLIError(
                f"argument --resume-from: {resume!r} is not an elsfast sampling checkpoint: it looks like "
                f"{describe_file(resume)}; elsfast leaves it as it is (pass another path, or none)"
            )
    args.resume = resume


def _sample_labels(spec, data, n: int):
    """The per-sample labels `[n]` for --labels `spec`, checked against the training labels."""
    import torch

    if spec is None:
        return None
    if data.labels is None:
        raise CLIError(f"argument --labels: the dataset {data.name!r} has no labels, so it cannot be sampled by class")
    present = set(data.labels.unique().tolist())
    if min(present, default=0) < 0:
        raise CLIError(
            f"argument --labels: the labels of {data.name!r} must be class indices 0, 1, ..., got {min(present)}; "
            "relabel the dataset"
        )
    num_classes = data.num_classes if data.num_classes else max(present) + 1
    if spec == "cycle":
        labels = torch.arange(n, dtype=torch.int64) % num_classes
    elif isinstance(spec, int):
        labels = torch.full((n,), spec, dtype=torch.int64)
    else:
        labels = torch.tensor(spec, dtype=torch.int64)
    wanted = set(labels.tolist())
    too_big = sorted(v for v in wanted if v >= num_classes)
    if too_big:
        raise CLIError(
            f"argument --labels: class {too_big[0]} does not exist ({data.name!r} has {num_classes} classes)"
        )
    missing = sorted(wanted - present)
    if missing:
        which = f"class {missing[0]} has" if len(missing) == 1 else f"classes {', '.join(map(str, missing))} have"
        raise CLIError(
            f"argument --labels: {which} no training images among the {len(data.labels)} loaded (raise --limit?)"
        )
    return labels


def _make_machine(args: argparse.Namespace, data, device):
    """The machine of the machine group over `data`."""
    from ..machine import ScoreMachine
    from ..reduce import DEFAULT_MEMORY_BUDGET

    return ScoreMachine(
        data.images,
        data.labels,
        machine=args.machine,
        padding=args.padding,
        dictionary=args.dictionary,
        backend=_backend_arg(args),
        device=device,
        memory_budget=args.memory_budget or DEFAULT_MEMORY_BUDGET,
    )


def _patch_size_spec(args: argparse.Namespace):
    """--scales NAME or --patch-size P (default 3)."""
    if getattr(args, "scales", None) is not None:
        return args.scales
    return args.patch_size or DEFAULT_PATCH_SIZE


def _resume_path(args: argparse.Namespace) -> str | None:
    """--resume-from PATH|none (or its deprecated name --checkpoint); default: the first output + '.ckpt'."""
    given = args.resume_from
    if args.checkpoint is not None:
        if given is not None:
            raise CLIError("argument --checkpoint: give --resume-from only (--checkpoint is its deprecated name)")
        print(
            f"{PROG}: warning: 'sample --checkpoint' is deprecated and goes in the next release: use --resume-from "
            "(in calibrate/compare --checkpoint is the trained network)",
            file=sys.stderr,
        )
        given = args.checkpoint
    if given is not None:
        return None if given.lower() == "none" else given
    return f"{args.save if args.out is None else args.out}.ckpt"


# ------------------------------------------------------------------------------------------------------------
# commands


def _cmd_sample(args: argparse.Namespace) -> int:
    _check_sample_args(args)
    device = check_device(args.device, name="argument --device")

    import torch

    from ..common.imageio import save_grid, save_samples
    from ..sampling import sample

    started = time.perf_counter()
    data = load_dataset(args)
    labels = _sample_labels(args.labels, data, args.n)
    machine = _make_machine(args, data, device)
    patch_size = _patch_size_spec(args)
    written: list[str] = []

    def write_outputs(samples) -> None:  # before the sampling checkpoint goes: a kill here resumes
        samples = samples.cpu()
        if args.save is not None:
            written.append(str(save_samples(samples, args.save)))
        if args.out is not None:
            scale = args.scale or (2 if max(samples.shape[-2:]) <= 32 else 1)
            written.append(str(save_grid(samples, args.out, nrow=args.nrow, scale=scale)))

    samples = sample(
        machine,
        args.n,
        steps=args.steps,
        patch_size=patch_size,
        labels=labels,
        seed=args.seed,
        schedule=args.schedule,
        progress=not args.quiet,
        resume_from=args.resume,
        threads=args.threads,
        write_outputs=write_outputs,
    ).cpu()
    seconds = time.perf_counter() - started
    C, H, W = samples.shape[1:]
    if not torch.isfinite(samples).all():
        print("elsfast: warning: the samples contain NaN or infinite values", file=sys.stderr)
    size = args.scales if args.scales is not None else f"P={patch_size}"
    if args.machine in ("is", "es"):
        size = "whole images"
    print(
        f"elsfast: {args.n} samples [{C}, {H}, {W}] from {data.name} ({len(data)} images; {args.machine}, "
        f"{args.padding}, {size}, {args.steps} steps, {device}) in {seconds:.1f} s -> {', '.join(written)}"
    )
    stats = machine.total_stats
    if args.backend == "topk":
        print(
            f"elsfast: top-k answered {stats.approximate_queries:,} of {stats.queries:,} pixel evaluations "
            f"(largest certified neglected mass {stats.max_neglected:.2e}); the rest ran exactly"
        )
    return 0


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _summary(m: dict) -> str:
    """One line of the creativity measures of one sample."""
    return (
        f"nearest training image #{m['nearest_training_index']} (RMS {m['nearest_training_rms']:.3f}), "
        f"memorised {_yes_no(m['memorised'])}, {m['distinct_sources']} distinct sources, "
        f"largest region {m['largest_region_fraction']:.1%}, local consistency {m['local_consistency']:.3f}"
    )


def _cmd_explain(args: argparse.Namespace) -> int:
    _check_machine_args(args)
    _check_labels_count(args.labels, args.n)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"argument --out-dir: {args.out_dir!r} exists and is not a directory")
    device = check_device(args.device, name="argument --device")

    from ..research import explain

    started = time.perf_counter()
    data = load_dataset(args)
    labels = _sample_labels(args.labels, data, args.n)
    machine = _make_machine(args, data, device)
    with limit_threads(args.threads):
        measures = explain.explain(
            machine,
            args.n,
            seed=args.seed,
            steps=args.steps,
            patch_size=_patch_size_spec(args),
            labels=labels,
            out_dir=out_dir,
            schedule=args.schedule,
            progress=not args.quiet,
            top=args.top,
            scale=args.scale,
        )
    seconds = time.perf_counter() - started
    for m in measures:
        where = f"-> {out_dir / m['figure']}" if m["figure"] else "(figure skipped)"
        print(f"sample {m['sample']}: {_summary(m)} {where}")
    from ..plots import matplotlib_missing

    skipped = matplotlib_missing()
    if skipped:
        print(f"elsfast: figures skipped: {skipped}")
    C, H, W = machine.image_shape
    print(
        f"elsfast: explained {args.n} samples [{C}, {H}, {W}] from {data.name} ({len(data)} images; {args.machine}, "
        f"{args.padding}, {args.steps} steps, {device}) in {seconds:.1f} s -> {out_dir / 'measures.json'}"
    )
    return 0


def _read_samples(path: Path):
    """Samples `[n, C, H, W]` float in [-1, 1] from a file of `elsfast sample --save` (uint8 is converted)."""
    import torch

    from ..common.imageio import load_samples
    from ..common.pixels import to_float

    try:
        samples = load_samples(path)
    except Exception as e:  # a truncated or foreign file: one line, whatever the reader raised
        raise CLIError(f"argument --samples: cannot read {str(path)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[0] == 0:
        what = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise CLIError(f"argument --samples: {str(path)!r} must hold samples [n, C, H, W] (n >= 1), got {what}")
    if samples.dtype != torch.uint8 and not samples.is_floating_point():
        raise CLIError(f"argument --samples: the samples must be float in [-1, 1] (or uint8), got {samples.dtype}")
    return to_float(samples) if samples.dtype == torch.uint8 else samples


def _cmd_measure(args: argparse.Namespace) -> int:
    from ..common.fileio import atomic_write
    from ..common.imageio import SAMPLE_SUFFIXES

    _check_machine_args(args)
    path = Path(args.samples)
    if path.suffix.lower() not in SAMPLE_SUFFIXES:
        raise CLIError(
            f"argument --samples: the format is chosen by the suffix, {' or '.join(SAMPLE_SUFFIXES)}: {args.samples!r}"
        )
    if not path.is_file():
        raise CLIError(f"argument --samples: no such file: {args.samples!r}")
    if args.json is not None and Path(args.json).is_dir():
        raise CLIError(f"argument --json: {args.json!r} is a directory")
    check_outputs({"--json": (args.json, "measures")})
    device = check_device(args.device, name="argument --device")

    import json

    from ..research.creativity import measure

    started = time.perf_counter()
    samples = _read_samples(path)
    n = samples.shape[0]
    _check_labels_count(args.labels, n)
    data = load_dataset(args)
    if tuple(samples.shape[1:]) != tuple(data.images.shape[1:]):
        pad = f"--pad-to {args.pad_to}" if args.pad_to else "no --pad-to"
        raise CLIError(
            f"argument --samples: the samples are [C, H, W] = {list(samples.shape[1:])} but the training images of "
            f"{data.name} are {list(data.images.shape[1:])} ({pad}): measure against the training set they were "
            "drawn from"
        )
    labels = _sample_labels(args.labels, data, n)
    machine = _make_machine(args, data, device)
    patch_size = args.patch_size or DEFAULT_PATCH_SIZE
    with limit_threads(args.threads):
        measures = measure(machine, samples, patch_size=patch_size, labels=labels)
    seconds = time.perf_counter() - started

    rows = [
        {
            "sample": k,
            "label": None if labels is None else int(labels[k]),
            **m,
            "samples_file": str(path),
            "dataset": data.name,
            "pad_to": args.pad_to,
            "limit": args.limit,
            "machine": args.machine,
            "padding": args.padding,
            "patch_size": patch_size,
            "train_shape": list(machine.images.shape),
            "train_sha256": machine.fingerprint,
        }
        for k, m in enumerate(measures)
    ]
    header = ("sample", "nearest", "RMS", "memorised", "sources", "largest", "consistency", "entropy")
    table = [header] + [
        (
            str(r["sample"]),
            f"#{r['nearest_training_index']}",
            f"{r['nearest_training_rms']:.3f}",
            _yes_no(r["memorised"]),
            str(r["distinct_sources"]),
            f"{r['largest_region_fraction']:.1%}",
            f"{r['local_consistency']:.3f}",
            f"{r['mean_entropy_nats']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(row[j]) for row in table) for j in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    written = ""
    if args.json is not None:
        text = (json.dumps(rows, indent=2) + "\n").encode()
        written = f" -> {atomic_write(args.json, lambda f: f.write(text), kind='measures')}"
    C, H, W = samples.shape[1:]
    memorised = sum(r["memorised"] for r in rows)
    print(
        f"elsfast: measured {n} samples [{C}, {H}, {W}] against {data.name} ({len(data)} images; {args.machine}, "
        f"{args.padding}, P={patch_size}, {device}): {memorised} memorised, in {seconds:.1f} s{written}"
    )
    return 0
