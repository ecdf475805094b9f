"""The informational commands of the `elsfast` command line: `info` and `scales`.

`add_commands(subparsers)` adds them; `_cmd_info` prints versions, devices, reduction backends (and the auto
dispatch rules), integrations, datasets and calibrated scale lists; `_cmd_scales` prints the published patch-size
lists. This module may import `elsfast.cli.args` and the library (lazily, inside the commands); no other cli
module.
"""

from __future__ import annotations

import argparse
import platform

__all__ = ["add_commands"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `info` and `scales` to the `elsfast` sub-command parser."""
    i = commands.add_parser(
        "info",
        help="versions, devices, backends, datasets and calibrated scale lists",
        description="Print versions, devices, reduction backends, datasets and calibrated scale lists.",
    )
    i.add_argument("--data-root", metavar="DIR", help="data directory of the named datasets ($ELSFAST_DATA)")
    i.set_defaults(func=_cmd_info)

    c = commands.add_parser(
        "scales",
        help="list the published calibrated patch-size lists",
        description="List the published calibrated patch-size lists P(t) (entry i belongs to t = i / 20).",
    )
    c.set_defaults(func=_cmd_scales)


def _backend_table() -> list[tuple[str, dict[str, str]]]:
    """For every registered backend, per device tried, 'yes' or 'no (reasons)'."""
    import torch

    from ..reduce.dictionary import PatchDictionary
    from ..reduce.registry import backend_names, backend_reasons

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table: dict[str, dict[str, str]] = {name: {} for name in backend_names()}
    for dev in devices:
        try:
            queries = torch.zeros(1, 1, 1, device=dev)
            dictionary = PatchDictionary(
                torch.zeros(1, 1, 1, 1, device=dev), 1, "zeros", torch.zeros(1, 1, dtype=torch.long)
            )
            reasons = backend_reasons(queries, dictionary)
        except Exception as e:  # a broken backend must not break `info`
            reasons = {name: [f"{type(e).__name__}: {e}"] for name in table}
        for name, why in reasons.items():
            table.setdefault(name, {})[dev] = "yes" if not why else f"no ({'; '.join(why)})"
    return list(table.items())


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__, datasets
    from ..common.scales import reference_scales

    print(f"elsfast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {_version_of('numpy')}")
    print("devices:")
    print("  cpu: yes")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]
        print(f"  cuda: yes ({len(names)}: {', '.join(names)}; CUDA {torch.version.cuda})")
    else:
        print("  cuda: no")
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    print(f"  mps: {'yes' if mps else 'no'}")
    from ..reduce.policy import RULES

    print("backends:")
    for name, per_device in _backend_table():
        print(f"  {name}: " + ", ".join(f"{dev} {state}" for dev, state in per_device.items()))
    print("auto (exact backends only; the first rule that applies and whose backend can run):")
    for k, rule in enumerate(RULES, 1):
        print(f"  {k}. {rule.backend.NAME}: {rule.taken_when} ({rule.evidence})")
    from ..integrations import integration_status

    print("integrations (optional libraries; one that is installed but fails to import counts as missing):")
    for name, state in integration_status().items():
        print(f"  {name}: {state}")
    from ..datasets.base import ENV_DATA, resolve_root

    root, source = resolve_root(args.data_root)
    where = (
        f"not found under {root} (the data root, from {source.replace('root=', '--data-root')})"
        if root is not None
        else f"not found: no data root (pass --data-root DIR or set ${ENV_DATA})"
    )
    print("datasets:")
    for name, ok in datasets.available(args.data_root).items():
        print(f"  {name}: {'available' if ok else where}")
    print("calibrated scales:")
    for name in sorted(reference_scales()):
        print(f"  {name}")
    return 0


def _version_of(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "?"


def _cmd_scales(args: argparse.Namespace) -> int:
    from ..common.scales import reference_scales

    scales = reference_scales()
    width = max(map(len, scales))
    for name in sorted(scales):
        print(f"{name:<{width}}  {','.join(map(str, scales[name]))}")
    return 0
