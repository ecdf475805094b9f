"""`SamplingCheckpoint`: the file that lets a sampling run resume after a crash.

After every step the sampler's state is written atomically to one file (a torch file with `format`
"elsfast-sampling-state", a version, the run's key and the step). A run that finds the file resumes from it only
when the key matches: the key fingerprints everything that determines the run (machine, training set, noise,
steps, patch sizes, labels). Any other file at the path is left untouched and reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.fileio import atomic_write, describe_file, elsfast_format
from ..machine import ScoreMachine

__all__ = ["STATE_FORMAT", "STATE_VERSION", "SamplingCheckpoint"]

STATE_FORMAT = "elsfast-sampling-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class SamplingCheckpoint:
    """The checkpoint file `path` of one sampling run, identified by `key` (`SamplingCheckpoint.for_run`)."""

    path: Path
    key: str

    @classmethod
    def for_run(
        cls,
        path: str | Path,
        machine: ScoreMachine,
        noise: torch.Tensor,
        steps: int,
        schedule,
        sizes: list[int],
        labels: torch.Tensor | None,
    ) -> SamplingCheckpoint:
        """The checkpoint at `path` of the run of `machine` from `noise` over `steps` steps with patch sizes
        `sizes` (one per step) and per-sample `labels`."""
        digest = hashlib.sha256(machine.fingerprint.encode())
        for part in (
            machine.machine,
            machine.padding,
            machine.dictionary,
            machine.dtype,
            steps,
            schedule if isinstance(schedule, str) else repr(schedule),
            sizes,
        ):
            digest.update(repr(part).encode())
        for tensor in (noise, labels):
            if tensor is not None:
                digest.update(repr(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return cls(Path(path), digest.hexdigest())

    def _read(self) -> dict:
        """The checkpoint's content; ValueError naming the file and saying what it looks like when it is anything
        else (it is then left as it is)."""
        path = self.path
        if path.is_dir():
            raise ValueError(f"resume_from: {path} is a directory, not a sampling checkpoint")
        fmt = elsfast_format(path)
        if fmt != STATE_FORMAT:
            raise ValueError(
                f"resume_from: {path} is not an elsfast sampling checkpoint: it looks like {describe_file(path)}. "
                "elsfast leaves it as it is; pass another path (or none) to resume_from / --resume-from"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file of ours: report it, never delete it
            raise ValueError(f"resume_from: the sampling checkpoint {path} is damaged ({type(err).__name__})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(f"resume_from: {path} has sampling-checkpoint version {version!r}, not {STATE_VERSION}")
        return state

    def resume(self, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """The saved state and its step if the file holds a checkpoint of this run, else `(x, None)` when there
        is no file. Any other file (another run's checkpoint, a network checkpoint, anything) raises ValueError."""
        if not self.path.exists():
            return x, None
        state = self._read()
        if state.get("key") != self.key or not isinstance(state.get("x"), torch.Tensor) or state["x"].shape != x.shape:
            raise ValueError(
                f"resume_from: {self.path} holds the state of another sampling run (a different machine, training "
                "set, noise, steps, patch sizes or labels); elsfast leaves it as it is: delete it to start over, or "
                "pass another path"
            )
        return state["x"].to(x), int(state["i"])

    def save(self, i: int, x: torch.Tensor) -> None:
        """Write the state `x` at step `i` (atomically: a crash leaves the previous checkpoint)."""
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "key": self.key, "i": i, "x": x.cpu()}
        atomic_write(self.path, lambda f: torch.save(state, f))

    def remove(self) -> None:
        """Delete the file if it is a sampling checkpoint (anything else that appeared there stays)."""
        if elsfast_format(self.path) == STATE_FORMAT:
            self.path.unlink()
