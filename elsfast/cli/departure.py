"""The `elsfast departure` command: where a compared network leaves the machine's patch mosaic
(`elsfast.research.departure`, paper Figs. 23/24), for a finished `elsfast compare` / `elsfast reproduce` report.

`add_commands(subparsers)` adds the sub-command; `_cmd_departure` runs it. The machines' training set comes from
the network checkpoint (`--checkpoint`, by default the checkpoint the comparison names when it is a file) or from
the data options (`--dataset`, ...); its SHA-256 is checked against the comparison's. A comparison of a diffusers
network ran on that network's noise schedule: it is read from the network (`--network diffusers:DIR`, by default
the directory the comparison names). This module may import
`elsfast.cli.args` and the library (lazily inside the command); no other cli module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import PROG, CLIError, at_least, checkpoint_training_set, load_dataset, network_spec

__all__ = ["add_commands"]


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `departure` to the `elsfast` sub-command parser."""
    from ..research.departure import DEFAULT_TOLERANCE

    d = commands.add_parser(
        "departure",
        help="where a compared network leaves the ELS mosaic: |network - ELS| beside the ELS provenance (resumable)",
        description="For the seeds of a finished comparison (REPORT_DIR, the --out-dir of 'elsfast compare' or "
        "the report/ of 'elsfast reproduce'): re-run each seed's machine trajectory exactly as the comparison did, "
        "with provenance at the end (checked against the stored image), and write into REPORT_DIR/departure/ the "
        "per-pixel |network - machine| beside the provenance, the mean departure on mosaic boundaries versus "
        "inside consistent regions (departure.json), one figure per seed and worst.png. Finished seeds are not "
        "recomputed when the command is run again.",
    )
    d.add_argument("report_dir", metavar="REPORT_DIR", help="the comparison's folder (results.json, samples/)")
    g = d.add_argument_group("training set (the comparison's; its SHA-256 is checked)")
    g.add_argument(
        "--checkpoint",
        metavar="PATH.pt",
        help="network checkpoint whose dataset the machines used (default: the checkpoint results.json names, "
        "when it is a file; else --dataset)",
    )
    g.add_argument("--dataset", metavar="NAME|PATH", help="the training set, when there is no checkpoint")
    g.add_argument("--data-root", metavar="DIR", help="data directory of the named datasets ($ELSFAST_DATA)")
    g.add_argument("--pad-to", type=at_least(1), metavar="SIZE", help="with --dataset: zero-pad to SIZE x SIZE")
    g.add_argument("--limit", type=at_least(1), metavar="N", help="with --dataset: the first N training images")
    d.add_argument(
        "--network",
        type=network_spec,
        metavar="diffusers:DIR",
        help="the comparison's diffusers network, whose noise schedule the machine re-runs on (default: the "
        "directory results.json names, for a comparison of a diffusers network)",
    )
    d.add_argument(
        "--seeds", type=at_least(1), metavar="N", help="only the first N seeds of the comparison (default: all)"
    )
    d.add_argument("--worst", type=at_least(0), default=6, metavar="K", help="seeds in worst.png (default: 6)")
    d.add_argument("--machine", default="els", help="the compared machine whose mosaic is examined (default: els)")
    d.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        metavar="T",
        help=f"largest |re-run - stored| pixel difference accepted (default: {DEFAULT_TOLERANCE:g})",
    )
    d.add_argument(
        "--device", default=None, help="the machine's device (default: the comparison's, the CPU; cpu, cuda, ...)"
    )
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_departure)


def _named_checkpoint(report_dir: Path) -> str | None:
    """The checkpoint the comparison names (`elsfast compare` records its path, `elsfast reproduce` "PATH at step
    N"), when that is an elsfast network checkpoint on disk."""
    from ..common.fileio import file_kind
    from ..research.compare import load_results

    results = load_results(report_dir)
    tag = (results or {}).get("config", {}).get("network")
    if not isinstance(tag, str):
        return None
    path = Path(tag.rsplit(" at step ", 1)[0])
    return str(path) if file_kind(path) == "network" else None


def _network_schedule(args: argparse.Namespace, config: dict):
    """The noise schedule of the comparison's diffusers network (`--network`, else the directory results.json names),
    or None for a comparison on a named schedule; CLIError when it cannot be found or is not the comparison's."""
    from ..integrations.diffusers_network import SPEC_PREFIX, is_network_spec, load_diffusers_network

    recorded, tag = config["schedule"], config.get("network")
    spec = args.network
    if spec is None and isinstance(tag, str) and is_network_spec(tag):
        spec = tag.rsplit(" (module-sha256:", 1)[0]
    if spec is None:
        if recorded.startswith("diffusers-timesteps("):
            raise CLIError(f"the comparison ran on a diffusers network's schedule: pass --network {SPEC_PREFIX}DIR")
        return None
    try:
        schedule = load_diffusers_network(spec).schedule
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"argument --network: {e}") from None
    if repr(schedule) != recorded:
        raise CLIError(f"the network {spec} runs on {schedule!r}, but the comparison ran on {recorded}")
    return schedule


def _training_set(args: argparse.Namespace):
    """(images, labels) of the machines: from --dataset, else from the checkpoint's dataset."""
    if args.dataset is not None and args.checkpoint is not None:
        raise CLIError("give --checkpoint or --dataset, not both")
    if args.dataset is not None:
        data = load_dataset(args)
        return data.images, data.labels
    checkpoint = args.checkpoint or _named_checkpoint(Path(args.report_dir))
    if checkpoint is None:
        raise CLIError(
            f"the comparison in {args.report_dir} names no network checkpoint on disk: pass --checkpoint "
            "PATH.pt or --dataset NAME (and --data-root, --pad-to, --limit as for the comparison)"
        )
    from ..nets.train import load_checkpoint

    _, config, _ = load_checkpoint(checkpoint)
    data = checkpoint_training_set(config, args.data_root)
    return data.images, data.labels


def _cmd_departure(args: argparse.Namespace) -> int:
    from ..common.checks import check_device
    from ..research.compare import load_results
    from ..research.departure import departure

    report = Path(args.report_dir)
    results = load_results(report)
    if results is None:
        raise CLIError(f"argument REPORT_DIR: {report / 'results.json'} does not exist: run 'elsfast compare' first")
    schedule = _network_schedule(args, results["config"])
    images, labels = _training_set(args)
    if not results["config"]["conditional"]:
        labels = None
    seeds = sorted(int(row["seed"]) for row in results["rows"])
    options = {} if args.device is None else {"device": check_device(args.device, name="argument --device")}
    out = departure(
        report,
        images,
        labels,
        seeds=seeds[: args.seeds] if args.seeds else None,
        machine=args.machine,
        worst=args.worst,
        schedule=schedule,
        machine_options=options,
        tolerance=args.tolerance,
        progress=not args.quiet,
    )
    name = args.machine.upper()
    bitwise = sum(row["reproduced"]["bitwise"] for row in out["rows"] if row["seed"] in set(out["seeds"]))
    print(f"{PROG}: {len(out['seeds'])} seeds ({out['computed']} computed now); the re-run {name} images equal the "
          f"stored ones bit for bit on {bitwise}")  # fmt: skip
    for by, words in (("image", "between training images"), ("patch", "at every seam")):
        s = out["summary"][by]
        print(
            f"{PROG}: boundaries {words}: mean |network - {name}| {_fmt(s['pooled_boundary_mean'])} on them, "
            f"{_fmt(s['pooled_interior_mean'])} inside regions (ratio {_fmt(s['pooled_ratio'], 2)}; median per "
            f"seed {_fmt(s['median_ratio'], 2)}, above 1 on {_fmt(s['above_one'], 2)} of seeds)"
        )
    if out["figures_skipped"]:
        print(f"{PROG}: figures skipped: {out['figures_skipped']}")
    print(f"{PROG}: -> {out['files']['departure']}")
    return 0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
