"""The shared vocabulary of the `elsfast` command line: argument types, argument groups and checks.

It holds `PROG`, the defaults every command shares, `CLIError` (a bad command line: one `elsfast: error: ...`
line, exit status 2), the `Parser` whose errors raise it, the argument types (`integer`, `at_least`,
`odd_patch_size`, `byte_count`, `labels_spec`, `scales_name`, `network_spec`), the argument groups
(`add_data_args`, `add_machine_args`, `add_sampling_args`) and the checks and loads more than one command runs
(`check_outputs`, `load_dataset`, `checkpoint_training_set`). Every other module of `elsfast.cli` imports from here;
this module imports only argparse and the library (`elsfast.common`, and lazily `elsfast.machine`,
`elsfast.reduce`, `elsfast.datasets`, `elsfast.integrations`), never another cli module.
"""

from __future__ import annotations

import argparse

from ..common.checks import check_seed, parse_bytes

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_OUT",
    "DEFAULT_PATCH_SIZE",
    "PROG",
    "CLIError",
    "Parser",
    "add_data_args",
    "add_machine_args",
    "add_sampling_args",
    "at_least",
    "byte_count",
    "check_outputs",
    "checkpoint_training_set",
    "integer",
    "labels_spec",
    "load_dataset",
    "network_spec",
    "odd_patch_size",
    "scales_name",
]

PROG = "elsfast"
DEFAULT_DATASET = "mnist-embedded"
DEFAULT_OUT = "samples.png"
DEFAULT_PATCH_SIZE = 3


class CLIError(Exception):
    """A bad command line: reported as one `elsfast: error: ...` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        hint = "" if "(see '" in message else f" (see '{self.prog} --help')"
        raise CLIError(f"{message}{hint}")


# ------------------------------------------------------------------------------------------------------------
# argument types


def integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def seed_arg(text: str) -> int:
    """A seed for the command line: an integer in torch's seed range (`elsfast.common.checks.check_seed`)."""
    value = integer(text)
    try:
        return check_seed(value, "the seed")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def at_least(minimum: int):
    def parse(text: str) -> int:
        value = integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def odd_patch_size(text: str) -> int:
    value = integer(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"the patch size must be an odd positive integer, got {value}")
    return value


def byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def labels_spec(text: str) -> int | list[int] | str:
    """`cycle`, one int, or a comma list of ints (non-negative)."""
    text = text.strip()
    if text.lower() == "cycle":
        return "cycle"
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one class index, a comma list of class indices or 'cycle', got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"class indices must be non-negative, got {text!r}")
    return values[0] if len(values) == 1 else values


def scales_name(text: str) -> str:
    from ..common.scales import parse_scales_name

    try:
        parse_scales_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (see 'elsfast scales')") from None
    return text


# ------------------------------------------------------------------------------------------------------------
# argument groups


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--dataset, --data-root, --pad-to, --limit (read by `load_dataset`)."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        metavar="NAME|PATH",
        help=(
            "training set: mnist, fashion-mnist, cifar10, faces, mnist-embedded (2,000 MNIST digits shipped "
            "with the package, needs no data), or the path of an .npz file or image folder "
            f"(default: {DEFAULT_DATASET})"
        ),
    )
    g.add_argument("--data-root", metavar="DIR", help="data directory of the named datasets ($ELSFAST_DATA)")
    g.add_argument("--pad-to", type=at_least(1), metavar="SIZE", help="zero-pad the images to SIZE x SIZE (28 -> 32)")
    g.add_argument("--limit", type=at_least(1), metavar="N", help="use only the first N training images")


def add_machine_args(p: argparse.ArgumentParser, *, scales: bool, patch_help: str | None = None) -> None:
    """--machine, --padding, --patch-size (and --scales when `scales`), --backend, --device, --memory-budget."""
    from ..machine import MACHINES
    from ..reduce.patches import PADDINGS

    g = p.add_argument_group("machine")
    g.add_argument("--machine", default="els", choices=MACHINES, help="which machine (default: els)")
    g.add_argument("--padding", default="zeros", choices=PADDINGS, help="patch border padding (default: zeros)")
    g.add_argument(
        "--dictionary",
        default="same",
        choices=("same", "valid"),
        help="ELS dictionary: same (the paper's, default) or valid (only patches inside the images, as in the "
        "authors' code)",
    )
    sizes = g.add_mutually_exclusive_group() if scales else g
    sizes.add_argument(
        "--patch-size",
        type=odd_patch_size,
        metavar="P",
        help=patch_help
        or f"odd patch size used at every step (default: {DEFAULT_PATCH_SIZE}; is/es check it, do not use it)",
    )
    if scales:
        sizes.add_argument(
            "--scales",
            type=scales_name,
            metavar="NAME[:shifted]",
            help="a published calibrated patch-size list P(t) instead of --patch-size (see 'elsfast scales'); "
            "NAME:shifted reads it one step earlier, entry i-1 at t = i/n (docs/reproduction.md)",
        )
    g.add_argument("--backend", default="auto", help="reduction backend, or auto (default; see 'elsfast info')")
    g.add_argument("--topk", type=at_least(1), metavar="K", help="with --backend topk: entries kept per query (128)")
    g.add_argument(
        "--tolerance",
        type=float,
        metavar="EPS",
        help="with --backend topk: largest certified neglected posterior mass; pixels above it run exactly (1e-4)",
    )
    g.add_argument("--topk-index", choices=("ivf", "flat"), help="with --backend topk: FAISS index kind (default: ivf)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto: cuda when available (default)")
    g.add_argument(
        "--memory-budget",
        type=byte_count,
        metavar="BYTES",
        help="working memory per reduction, e.g. 512M or 2G (default: 512M)",
    )
    g.add_argument(
        "--threads",
        type=at_least(1),
        metavar="N",
        help="CPU threads of the kernels and torch (default: $ELSFAST_NUM_THREADS, else torch's; at most the CPUs "
        "this process may use)",
    )


_LABELS_HELP = (
    "class-conditional sampling (labelled datasets only): one class for all samples, a comma list "
    "of N classes, or 'cycle' (sample i gets class i %% num_classes)"
)


def add_sampling_args(p: argparse.ArgumentParser, *, n_default: int) -> None:
    """--n, --steps, --schedule, --seed, --labels."""
    from ..common.schedules import SCHEDULES

    g = p.add_argument_group("sampling")
    g.add_argument(
        "--n", type=at_least(1), default=n_default, metavar="N", help=f"number of samples (default: {n_default})"
    )
    g.add_argument("--steps", type=at_least(2), default=20, metavar="K", help="DDIM steps (default: 20)")
    g.add_argument(
        "--schedule",
        default="cosine-legacy",
        choices=tuple(SCHEDULES),
        help="noise schedule (default: %(default)s)",
    )
    g.add_argument("--seed", type=seed_arg, default=0, help="seed of the initial noise (default: 0)")
    g.add_argument("--labels", type=labels_spec, metavar="L", help=_LABELS_HELP)


# ------------------------------------------------------------------------------------------------------------
# checks shared by several commands


def check_outputs(outputs: dict[str, tuple[str | None, str | None]]) -> None:
    """Refuse, before any work, the outputs `{flag: (path, kind)}` that could not be written at the end: a folder
    elsfast cannot write in, a file elsfast did not write, or one of another kind than `kind` (a key of
    `elsfast.common.fileio.KINDS`; see `check_replaceable`). A None path is skipped."""
    from ..common.fileio import check_replaceable

    for flag, (path, kind) in outputs.items():
        if path is None:
            continue
        try:
            check_replaceable(path, kind)
        except OSError as e:
            raise CLIError(f"argument {flag}: {e}") from None


def load_dataset(args: argparse.Namespace):
    """The training set named by the data group (--dataset, --data-root, --pad-to, --limit)."""
    return _load_training_set(args.dataset, args.data_root, args.pad_to, args.limit)


def checkpoint_training_set(config: dict, data_root: str | None):
    """The training set a network checkpoint was trained on (`config`: its stored train config), read from
    `data_root` (--data-root) or else the root it was trained from."""
    root = data_root or config.get("root")
    return _load_training_set(config["dataset"], root, config.get("pad_to"), config.get("limit"))


def _load_training_set(name, root, pad_to, limit):
    from .. import datasets

    try:
        return datasets.load(name, "train", root, pad_to=pad_to, limit=limit)
    except datasets.DatasetNotFoundError as e:
        raise CLIError(f"{e} On the command line: --data-root DIR.") from None


def network_spec(text: str) -> str:
    """Argument type of --network: a spec `diffusers:DIR` naming a diffusers model or pipeline directory."""
    from ..integrations.diffusers_network import SPEC_PREFIX, is_network_spec

    if not is_network_spec(text) or len(text) == len(SPEC_PREFIX):
        raise argparse.ArgumentTypeError(
            f"expected {SPEC_PREFIX}DIR (a diffusers model or pipeline directory), got {text!r}"
        )
    return text
