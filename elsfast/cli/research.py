"""The reproduction commands of the `elsfast` command line: `train`, `calibrate`, `compare`, `reproduce` (SPEC
section 3).

`add_commands(subparsers)` adds the four sub-commands; `_cmd_train`, `_cmd_calibrate`, `_cmd_compare` and
`_cmd_reproduce` run them, with the argument types only they use (positive floats, channel lists). This module
may import `elsfast.cli.args` (the shared argument types, groups, checks and `CLIError`) and the library
(`elsfast.nets`, `elsfast.research`, lazily inside the commands); no other cli module.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..common.checks import check_device
from ..plots.style import check_figure_path, matplotlib_missing
from .args import (
    PROG,
    CLIError,
    add_data_args,
    at_least,
    check_outputs,
    checkpoint_training_set,
    integer,
    load_dataset,
    network_spec,
    odd_patch_size,
    seed_arg,
)

__all__ = ["add_commands"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _channels(text: str) -> int | list[int]:
    values = [integer(part) for part in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"channel counts must be positive, got {text!r}")
    return values[0] if len(values) == 1 else values


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _checkpoint_minutes_arg(p, default: float | None) -> None:
    p.add_argument(
        "--checkpoint-minutes",
        type=_non_negative_float,
        default=default,
        metavar="M",
        help="also write the training checkpoint after M minutes of wall time since the last one (0: off; "
        "default: 5); Ctrl-C and SIGTERM write it too",
    )


_NETWORK_HELP = (
    "a diffusers UNet2DModel or pipeline directory on disk (read offline), run on its own scheduler's noise schedule"
)


def _network_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint PATH.pt or --network diffusers:DIR (one of them), and the data of a --network run."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH.pt", help="network checkpoint from 'elsfast train'")
    which.add_argument("--network", type=network_spec, metavar="diffusers:DIR", help=_NETWORK_HELP)
    g = p.add_argument_group("data of a --network run (a --checkpoint names its own)")
    g.add_argument(
        "--dataset",
        metavar="NAME|PATH",
        help="the machines' training set (required with --network): mnist, fashion-mnist, cifar10, faces, "
        "mnist-embedded, or an .npz file or image folder",
    )
    g.add_argument("--pad-to", type=at_least(1), metavar="SIZE", help="zero-pad the images to SIZE x SIZE")
    g.add_argument("--limit", type=at_least(1), metavar="N", help="use only the first N training images")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto: cuda when available (default)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _grid_arg(p: argparse.ArgumentParser) -> None:
    from ..sampling.ddim import GRIDS

    p.add_argument(
        "--grid",
        choices=tuple(GRIDS),
        default="machine",
        help="step grid of the network and the machines, the same for both: "
        + "; ".join(f"{k}: {v}" for k, v in GRIDS.items())
        + " (default: machine)",
    )


def _protocol_arg(p: argparse.ArgumentParser, default_help: str) -> None:
    from ..research.protocols import PROTOCOLS

    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        help="the paper's step counts, the network from the same noise at the machines' first t: "
        + "; ".join(f"{k}: {v.description}" for k, v in PROTOCOLS.items())
        + f" ({default_help})",
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `train`, `calibrate`, `compare` and `reproduce` to the `elsfast` sub-command parser."""
    from ..nets.models import ARCHS
    from ..research.reproduce import PRESETS

    t = commands.add_parser(
        "train",
        help="train the paper's ResNet/UNet diffusion network (resumable)",
        description="Train an epsilon-prediction network with the paper's objective and hyperparameters (SPEC "
        "section 3; each overridable). Checkpoints are written atomically every --checkpoint-every steps; "
        "--resume continues a stopped run exactly.",
    )
    add_data_args(t)
    g = t.add_argument_group("network")
    g.add_argument(
        "--arch",
        default="resnet",
        choices=ARCHS,
        help="unet-sa: the UNet with self-attention at 16x16 and 8x8 on 32x32 images (default: resnet)",
    )
    g.add_argument("--padding", default="zeros", choices=("zeros", "circular"), help="(default: zeros)")
    g.add_argument("--conditional", action="store_true", help="class-conditional on the dataset's labels")
    g.add_argument("--channels", type=_channels, help="ResNet width (256) or UNet widths, e.g. 64,128,256")
    g.add_argument("--blocks", type=at_least(1), help="ResNet residual layers (6) / UNet blocks per level (1)")
    g = t.add_argument_group("optimisation (defaults: the paper's)")
    g.add_argument("--batch-size", type=at_least(1), default=128)
    g.add_argument("--lr", type=_positive_float, default=1e-4)
    g.add_argument("--lr-decay", type=_positive_float, default=0.999965, help="factor per step")
    g.add_argument("--epochs", type=at_least(1), default=300)
    g.add_argument("--max-steps", type=at_least(1), help="stop after this many steps in total")
    g.add_argument("--max-minutes", type=_positive_float, help="stop this run after this many minutes")
    g.add_argument("--seed", type=seed_arg, default=0)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    g = t.add_argument_group("checkpoint")
    g.add_argument("--out", required=True, metavar="PATH.pt", help="checkpoint file")
    g.add_argument("--checkpoint-every", type=at_least(0), default=1000, metavar="STEPS", help="(0: only at the end)")
    _checkpoint_minutes_arg(g, 5.0)
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    once.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing network checkpoint at --out (without it, or --resume, it is refused; a file "
        "that is not an elsfast network checkpoint is never replaced)",
    )
    _common(t)
    t.set_defaults(func=_cmd_train)

    c = commands.add_parser(
        "calibrate",
        help="calibrate a machine's patch sizes P(t) against a trained network",
        description="Run the network's own reverse trajectories; at every step pick the patch size whose machine "
        "eps is most cosine-similar to the network's; write the per-step median (and every seed's choice) as "
        "JSON, usable as a patch-size list, and a plot of P(t).",
    )
    _network_args(c)
    c.add_argument("--machine", default="els", choices=("els", "ls"), help="(default: els)")
    c.add_argument("--sizes", type=odd_patch_size, nargs="+", default=[3, 5, 7, 9, 11, 13, 15, 17], metavar="P")
    c.add_argument("--seeds", type=at_least(1), default=10, metavar="N", help="seeds 0..N-1 (default: 10)")
    c.add_argument("--steps", type=at_least(2), default=20)
    c.add_argument("--out", required=True, metavar="PATH.json")
    c.add_argument(
        "--plot",
        metavar="PATH.png",
        help="figure of P(t): .png, .svg or .pdf (default: the --out path with .png; needs elsfast[plots])",
    )
    c.add_argument("--data-root", metavar="DIR", help="data directory of the named datasets ($ELSFAST_DATA)")
    _common(c)
    c.set_defaults(func=_cmd_calibrate)

    m = commands.add_parser(
        "compare",
        help="compare a trained network with the ELS, LS and IS machines seed by seed (resumable)",
        description="Run the network and each machine from the same seeds; write per-seed Pearson r and R^2, a "
        "summary table in the layout of the paper's Table 1, image grids and plots into --out-dir. Finished "
        "seeds are not recomputed when the command is run again.",
    )
    _network_args(m)
    m.add_argument(
        "--scales",
        default="3",
        metavar="FILE|NAME|P",
        help="calibration JSON, published list name (NAME or NAME:shifted), or one odd P",
    )
    m.add_argument("--seeds", type=at_least(1), default=100, metavar="N", help="seeds 0..N-1 (default: 100)")
    m.add_argument("--steps", type=at_least(2), default=20, help="machine steps (default: 20)")
    m.add_argument(
        "--network-steps",
        type=at_least(2),
        help="network steps, from the machines' first t (default: --steps; the paper's Table 1: 150)",
    )
    _protocol_arg(m, "default: none, the steps given; --steps and --network-steps must agree with it")
    m.add_argument("--machines", default="els,ls,is", help="comma list of machines (default: els,ls,is)")
    _grid_arg(m)
    m.add_argument("--out-dir", required=True, metavar="DIR")
    m.add_argument("--data-root", metavar="DIR", help="data directory of the named datasets ($ELSFAST_DATA)")
    _common(m)
    m.set_defaults(func=_cmd_compare)

    r = commands.add_parser(
        "reproduce",
        help="train, calibrate and compare in one resumable command",
        description="Presets: "
        + "; ".join(f"{name}: {preset.notes} (protocol {preset.protocol})" for name, preset in PRESETS.items())
        + ". Run the same command again to resume: a finished stage is never redone (the training time limit counts "
        "all runs together), and a finished reproduction prints its results. Paper-scale presets need a GPU "
        "(--force to run one without).",
    )
    r.add_argument("preset", choices=tuple(PRESETS))
    r.add_argument("--out-dir", required=True, metavar="DIR")
    r.add_argument("--train-minutes", type=_positive_float, help="training time limit (preset's default otherwise)")
    r.add_argument(
        "--train-steps",
        type=at_least(1),
        help="training steps in all, from step 0 (preset's default otherwise); a network.pt copied from another run "
        "of the preset trains on to it",
    )
    r.add_argument("--seeds", type=at_least(1), help="comparison seeds (preset's default otherwise)")
    _checkpoint_minutes_arg(r, None)
    r.add_argument(
        "--force",
        action="store_true",
        help="run a paper-scale preset without a GPU (refused otherwise, with its estimated training time)",
    )
    r.add_argument("--data-root", metavar="DIR", help="data directory ($ELSFAST_DATA)")
    r.add_argument(
        "--network",
        type=network_spec,
        metavar="diffusers:DIR",
        help=_NETWORK_HELP + ": calibrated and compared on the preset's data and settings, with no training stage",
    )
    _grid_arg(r)
    _protocol_arg(r, "default: the preset's")
    _common(r)
    r.set_defaults(func=_cmd_reproduce)


def _cmd_train(args: argparse.Namespace) -> int:
    from .. import datasets
    from ..nets.train import TrainConfig, train

    # before the data is loaded: a writable folder, and no file there but a network checkpoint
    if args.resume and Path(args.out).exists():
        from ..common.fileio import check_writable

        check_writable(Path(args.out).parent)  # the file is read, and refused unless it is a checkpoint, by train
    else:
        check_outputs({"--out": (args.out, "network")})
    if not args.resume and not args.overwrite and Path(args.out).exists():
        from ..common.fileio import describe_file

        raise CLIError(
            f"argument --out: {args.out!r} already exists (it looks like {describe_file(args.out)}): add --resume "
            "to continue it or --overwrite to replace it"
        )

    device = check_device(args.device, name="argument --device")
    if args.bf16 and (device or check_device("auto")).type != "cuda":
        print(f"{PROG}: warning: --bf16 is bfloat16 autocast on CUDA only; on this CPU training runs in float32",
              file=sys.stderr)  # fmt: skip
    config = TrainConfig(
        dataset=args.dataset,
        root=args.data_root,
        pad_to=args.pad_to,
        limit=args.limit,
        arch=args.arch,
        channels=args.channels,
        blocks=args.blocks,
        padding=args.padding,
        conditional=args.conditional,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        out=args.out,
        device=str(device),
        bf16=args.bf16,
    )
    data = datasets.load(args.dataset, root=args.data_root, pad_to=args.pad_to, limit=args.limit)
    if args.conditional and data.labels is None:
        raise CLIError(f"--conditional needs a labelled dataset; {data.name} has no labels")
    done = train(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        images=data.images,
        labels=data.labels,
    )
    state = "finished" if done["finished"] else "stopped (resume with --resume)"
    print(
        f"{PROG}: trained {done['steps']}/{done['total_steps']} steps ({state}), loss {done['loss']:.4f}, "
        f"{done['seconds']:.0f} s -> {done['checkpoint']}"
    )
    return 0


def _network_and_data(args: argparse.Namespace):
    """The network and the machines' training set: a checkpoint's network and the data it was trained on, or a
    diffusers network (`--network`) and `--dataset` (labelled when the network is class-conditional, zero
    padding)."""
    from ..nets.train import load_checkpoint

    device = check_device(args.device, name="argument --device")
    if args.network is not None:
        from ..integrations.diffusers_network import load_diffusers_network

        if args.dataset is None:
            raise CLIError("--network needs --dataset: the machines' training set")
        try:
            model = load_diffusers_network(args.network, device=device)
        except (OSError, ValueError) as err:
            raise CLIError(f"argument --network: {err}") from None
        data = load_dataset(args)
        if model.conditional and data.labels is None:
            raise CLIError(f"argument --network: the network is class-conditional, but {data.name} has no labels")
        labels = data.labels if model.conditional else None
        return model, {"model": {"padding": "zeros"}}, data, labels, device
    given = [f"--{k.replace('_', '-')}" for k in ("dataset", "pad_to", "limit") if getattr(args, k) is not None]
    if given:
        raise CLIError(f"{', '.join(given)}: a --checkpoint names its own training data (these go with --network)")
    model, config, _ = load_checkpoint(args.checkpoint, device=device)
    data = checkpoint_training_set(config, args.data_root)
    labels = data.labels if config.get("conditional") else None
    return model, config, data, labels, device


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ..machine import ScoreMachine
    from ..research.calibrate import calibrate

    if not args.out.endswith(".json"):
        raise CLIError(f"--out must end in .json, got {args.out!r}")
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    try:
        check_figure_path(plot)
    except ValueError as e:
        raise CLIError(f"argument --plot: {e}") from None
    # before the trajectories: a file elsfast did not write there stays
    check_outputs({"--out": (args.out, "calibration"), "--plot": (plot, "figure")})
    model, config, data, labels, device = _network_and_data(args)
    started = time.perf_counter()
    machine = ScoreMachine(data.images, labels, machine=args.machine, padding=config["model"]["padding"], device=device)
    result = calibrate(
        model,
        machine,
        sizes=sorted(set(args.sizes)),
        seeds=range(args.seeds),
        steps=args.steps,
        conditional=labels is not None,
        progress=not args.quiet,
    )
    skipped = matplotlib_missing()
    if skipped is None:
        result.plot(plot)
    result.to_json(args.out)
    seconds = time.perf_counter() - started
    print(f"{PROG}: P(t) for t = 0..{args.steps - 1}/{args.steps}: {result.scales} in {seconds:.0f} s")
    if skipped is None:
        print(f"{PROG}: -> {args.out}, {plot}")
    else:
        print(f"{PROG}: -> {args.out}; plot {plot} skipped: {skipped}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..common.scales import parse_scales_name, reference_scales
    from ..machine import MACHINES
    from ..research.calibrate import CalibrationResult
    from ..research.compare import compare
    from ..research.protocols import PROTOCOLS

    chosen = PROTOCOLS.get(args.protocol)
    if chosen is not None and (args.steps != chosen.steps or args.network_steps not in (None, chosen.network_steps)):
        raise CLIError(
            f"argument --protocol: {args.protocol} runs the network for {chosen.network_steps} steps and the machines "
            f"for {chosen.steps}, but --steps {args.steps}"
            + ("" if args.network_steps is None else f" --network-steps {args.network_steps}")
            + " was given: leave them out, or give no --protocol"
        )
    machines = tuple(m.strip() for m in args.machines.split(",") if m.strip())
    unknown = [m for m in machines if m not in MACHINES]
    if unknown or not machines:
        raise CLIError(f"--machines takes a comma list of {', '.join(MACHINES)}; got {args.machines!r}")
    if Path(args.scales).suffix == ".json":
        scales = CalibrationResult.from_json(args.scales)
    elif args.scales.partition(":")[0] in reference_scales():
        try:
            parse_scales_name(args.scales)
        except ValueError as err:
            raise CLIError(f"--scales: {err}") from None
        scales = args.scales
    else:
        try:
            scales = odd_patch_size(args.scales)
        except argparse.ArgumentTypeError as e:
            raise CLIError(
                f"argument --scales: {e}; expected a calibration file (.json), a published list name "
                f"({', '.join(sorted(reference_scales()))}) or one odd patch size"
            ) from None
    from ..common.fileio import check_writable

    try:  # before the network and the data are loaded (compare checks each of its files before the first seed)
        check_writable(args.out_dir)
    except OSError as e:
        raise CLIError(f"argument --out-dir: {e}") from None
    model, config, data, labels, _ = _network_and_data(args)
    report = compare(
        model,
        data.images,
        labels,
        out_dir=args.out_dir,
        scales=scales,
        seeds=range(args.seeds),
        steps=args.steps,
        network_steps=args.network_steps,
        conditional=labels is not None,
        machines=machines,
        padding=config["model"]["padding"],
        network=None if args.network is not None else str(Path(args.checkpoint).resolve()),
        progress=not args.quiet,
        grid=args.grid,
        protocol=args.protocol,
    )
    _print_protocol(report["config"])
    _print_summary(report["summary"])
    if report["figures_skipped"]:
        print(f"{PROG}: hist.png and scatter.png skipped: {report['figures_skipped']}")
    print(f"{PROG}: report -> {report['files']['summary']}")
    return 0


def _print_protocol(config: dict) -> None:
    """The protocol of a comparison (`config`: results.json's, or reproduction.json with the same keys)."""
    name = f"protocol {config['protocol']}" if config["protocol"] else "no protocol of the paper's"
    print(
        f"{PROG}: {name}: network {config['network_steps']} steps from t = {config['network_start_t']:.6g}, "
        f"machines {config['steps']} steps, the same noise"
    )


def _print_summary(summary: dict) -> None:
    for name, s in summary.items():
        beats = f", beats IS on {s['beats_is']:.0%} of seeds" if "beats_is" in s else ""
        print(
            f"{PROG}: {name.upper():>3}: median Pearson r {s['median_r']:.3f}, median R^2 {s['median_r2']:.3f}{beats}"
        )


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ..research.reproduce import OUTPUTS, reproduce

    out = Path(args.out_dir)
    for file, kind in OUTPUTS.items():  # before anything is loaded; an existing network.pt is resumed (and checked)
        if file != "network.pt" or not (out / file).exists():
            check_outputs({"--out-dir": (str(out / file), kind)})
    device = check_device(args.device, name="argument --device")
    if args.network is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("train_minutes", "train_steps") if getattr(args, k) is not None]
        if given:
            raise CLIError(f"{', '.join(given)}: there is no training with --network")
    summary = reproduce(
        args.preset,
        args.out_dir,
        root=args.data_root,
        device=str(device),
        train_minutes=args.train_minutes,
        train_steps=args.train_steps,
        comparison_seeds=args.seeds,
        progress=not args.quiet,
        grid=args.grid,
        checkpoint_minutes=args.checkpoint_minutes,
        force=args.force,
        protocol=args.protocol,
        network=args.network,
    )
    _print_protocol(summary)
    _print_summary(summary["summary"])
    print(f"{PROG}: reproduction -> {Path(args.out_dir) / 'reproduction.json'}")
    return 0
