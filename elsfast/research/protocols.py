"""The paper's two comparison protocols, by name: how many DDIM steps the network and the machines run.

The paper's Table 1 runs the network for 150 DDIM steps and the machines for 20, Table 2 both for 20; in both the
network and the machines start from the same noise at the same t (`elsfast.sampling.ddim.grid_times`: the
network's steps divide the machines' first t). `compare(..., protocol=)`, `reproduce(..., protocol=)` and the
`--protocol` option of `elsfast compare` and `elsfast reproduce` take these names; a comparison records the name
its step counts match (`protocol_of`), or None for other counts.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROTOCOLS", "Protocol", "protocol_of", "protocol_steps"]


@dataclass(frozen=True)
class Protocol:
    """A comparison protocol: the network's and the machines' DDIM step counts, and where it comes from."""

    network_steps: int
    steps: int
    description: str


PROTOCOLS = {
    "table1": Protocol(150, 20, "the paper's Table 1: the network 150 DDIM steps, the machines 20"),
    "table2": Protocol(20, 20, "the paper's Table 2: the network and the machines 20 DDIM steps each"),
}
"""The paper's protocols by name."""


def protocol_of(steps: int, network_steps: int) -> str | None:
    """The name of the protocol with these step counts (machines `steps`, network `network_steps`), or None."""
    return next((k for k, p in PROTOCOLS.items() if (p.steps, p.network_steps) == (steps, network_steps)), None)


def protocol_steps(protocol: str | None, steps: int, network_steps: int | None) -> tuple[int, int]:
    """(steps, network_steps) of a comparison: the named `protocol`'s (`steps` and `network_steps`, when given,
    must agree with it: ValueError otherwise), or without a protocol `steps` and `network_steps` (default
    `steps`)."""
    if protocol is None:
        return int(steps), int(steps if network_steps is None else network_steps)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    if int(steps) != p.steps or (network_steps is not None and int(network_steps) != p.network_steps):
        given = f"steps={steps}" + ("" if network_steps is None else f", network_steps={network_steps}")
        raise ValueError(
            f"protocol {protocol!r} runs the machines for {p.steps} steps and the network for {p.network_steps}, "
            f"but {given} was given: leave them out, or give no protocol"
        )
    return p.steps, p.network_steps
