"""Where elsfast keeps its on-disk caches: one policy for every cache (decoded datasets, top-k indexes).

`cache_dir(kind)` is `$ELSFAST_CACHE`, else `$XDG_CACHE_HOME/elsfast`, else `~/.cache/elsfast` (with `kind`, a
sub-folder of it); `None` when `$ELSFAST_CACHE` is `off`, `0`, `none`, `false`, `no` or empty, which means no
disk cache anywhere: callers then keep what they built in memory only and write nothing. The folder is elsfast's
own (see `elsfast.common.fileio.atomic_write(..., replace="any")`). This module imports only the standard
library.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_CACHE", "OFF_VALUES", "cache_dir"]

ENV_CACHE = "ELSFAST_CACHE"
"""Environment variable naming the on-disk cache folder (`off`/`0`/`none`/`false`/`no`/empty: no disk cache)."""

OFF_VALUES = frozenset({"", "0", "off", "none", "false", "no"})
"""Values of `$ELSFAST_CACHE` (any case, surrounding spaces ignored) that turn every disk cache off."""


def cache_dir(kind: str | None = None) -> Path | None:
    """The on-disk cache folder, or its sub-folder `kind` (e.g. `"indexes"`); None when disk caching is off.

    `$ELSFAST_CACHE`, else `$XDG_CACHE_HOME/elsfast`, else `~/.cache/elsfast`. The folder is not created here
    (the writer creates it when it first writes).
    """
    if kind is not None and (not kind or kind in (".", "..") or "/" in kind or os.sep in kind):
        raise ValueError(f"kind must be a plain folder name, got {kind!r}")
    env = os.environ.get(ENV_CACHE)
    if env is not None:
        if env.strip().lower() in OFF_VALUES:
            return None
        base = Path(env).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "elsfast"
    return base if kind is None else base / kind
