"""The one place elsfast writes files: atomic replacement, and never over a file elsfast did not write.

`atomic_write(path, write)` runs `write` on a fresh temporary file next to `path` (fsync'ed) and renames it over
`path` with `os.replace`, so a run killed at any moment leaves either the old file or the new one (plus, after a
SIGKILL, a stray `.NAME.PID.HEX.tmp` that the next write to `path` removes once its process is gone).

Ownership. Before replacing an existing `path`, `atomic_write` checks that elsfast wrote it: either its SHA-256
is recorded in the directory's manifest `.elsfast-files.json` (every write with the default
`replace="elsfast"` records the new file's digest there), or the file is recognisably elsfast's own (a torch
file or JSON document whose `format` entry names an elsfast format, e.g. a training checkpoint or a comparison's
`results.json`). Any other file raises `FileExistsError` naming the file and saying what it looks like
(`describe_file`), and is left untouched. `replace="any"` skips the check: for elsfast's own cache directories,
and for files the caller has already decided may go (`elsfast train --overwrite`).

The manifest is updated so that a kill at any point still recognises the file: the new digest is added before
the rename (next to the old one) and the old one dropped after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

__all__ = [
    "MANIFEST_NAME",
    "atomic_write",
    "check_replaceable",
    "describe_file",
    "elsfast_format",
    "open_npz",
    "sha256_file",
    "written_by_elsfast",
]

MANIFEST_NAME = ".elsfast-files.json"
"""Per-directory record of the files elsfast wrote there: `{"format": ..., "files": {name: [sha256, ...]}}`."""
_MANIFEST_FORMAT = "elsfast-files/1"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_SNIFF_BYTES = 1 << 20  # how much of a torch file's pickle is searched for its format entry

_FORMAT_WORDS = {
    "elsfast-checkpoint": "an elsfast network checkpoint written by `elsfast train` (trained weights)",
    "elsfast-sampling-state": "an elsfast sampling checkpoint (the state of an unfinished `elsfast sample` run)",
    "elsfast-compare": "an elsfast comparison (`results.json` of `elsfast compare`)",
    "elsfast-calibration": "an elsfast calibration (`elsfast calibrate`)",
    "elsfast-machine": "an elsfast machine config (`save_pretrained`)",
}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_pickle(path: Path) -> bytes | None:
    """The first MiB of the pickle inside a torch zip file (`*/data.pkl`), or None when it is not one."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            with z.open(name) as f:
                return f.read(_SNIFF_BYTES)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def elsfast_format(path: str | os.PathLike) -> str | None:
    """The elsfast format a file declares (`"elsfast-checkpoint"`, `"elsfast-sampling-state"`, ...), read
    without loading it (a torch file's pickle is searched, a JSON document parsed), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    pickle = _torch_pickle(path)
    if pickle is not None:
        found = [name for name in _FORMAT_WORDS if name.encode() in pickle]
        return max(found, key=len) if found else None
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            if head not in (b"{", b"["):
                return None
            doc = json.loads(head + f.read())
    except (OSError, ValueError):
        return None
    value = doc.get("format") if isinstance(doc, dict) else None
    if isinstance(value, str):
        base = value.split("/")[0]
        if base.startswith("elsfast-"):
            return base
    return None


def describe_file(path: str | os.PathLike) -> str:
    """What an existing file looks like, in words, for error messages (`"a PNG image"`, `"an elsfast network
    checkpoint written by `elsfast train` (trained weights)"`, `"a file of 17 bytes of unknown format"`)."""
    path = Path(path)
    if not path.exists():
        return "no file"
    if path.is_dir():
        return "a directory"
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    fmt = elsfast_format(path)
    if fmt is not None:
        return _FORMAT_WORDS.get(fmt, f"an elsfast file (format {fmt!r})")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"an unreadable file ({err.strerror or err})"
    if _torch_pickle(path) is not None:
        return "a torch file (torch.save) not written by elsfast"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive (a truncated torch or .npz file?)"
        if names and all(n.endswith(".npy") for n in names):
            return f"a numpy .npz archive (arrays {', '.join(n[:-4] for n in names[:4])})"
        return "a zip archive"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    if head.startswith(b"\x80"):
        return "a pickle (an old-style torch file?)"
    if head[:1] in (b"{", b"["):
        return "a JSON/text document"
    return f"a file of {size:,} bytes of unknown format"


def open_npz(path: str | os.PathLike):
    """`numpy.load(path, allow_pickle=False)` of an .npz archive (use it as a context manager). A file that is
    not a readable zip of .npy arrays raises ValueError naming it and saying what it looks like, instead of
    numpy's fallback message about pickled data."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .npz archive: it looks like {describe_file(path)}")
    try:
        archive = np.load(path, allow_pickle=False)
        archive.files  # noqa: B018 - the directory of a damaged archive fails here
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is a damaged .npz archive ({type(err).__name__}: {err})") from None
    return archive


def _read_manifest(directory: Path) -> dict[str, list[str]]:
    try:
        doc = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == _MANIFEST_FORMAT else None
    return {k: list(v) for k, v in files.items() if isinstance(v, list)} if isinstance(files, dict) else {}


def _write_manifest(directory: Path, files: dict[str, list[str]]) -> None:
    text = json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True).encode()
    _replace_atomically(directory / MANIFEST_NAME, lambda f: f.write(text))


def written_by_elsfast(path: str | os.PathLike) -> bool:
    """Whether elsfast wrote the file at `path` as it is now (its digest is in the directory's manifest, or it
    declares an elsfast format)."""
    path = Path(path)
    if not path.is_file():
        return False
    if elsfast_format(path) is not None:
        return True
    digests = _read_manifest(path.parent).get(path.name)
    return bool(digests) and sha256_file(path) in digests


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise `FileExistsError` (naming `path` and what it looks like) when `path` exists and elsfast did not
    write it, so that `atomic_write(path, ...)` would refuse it; call it before long work that ends in a write."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if path.exists() and not written_by_elsfast(path):
        raise FileExistsError(
            f"{path} already exists and was not written by elsfast (it looks like {describe_file(path)}); "
            "elsfast never replaces such a file: move it away or choose another path"
        )


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of earlier writes to `path` whose process no longer runs (killed mid-write)."""
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = _TMP.match(entry.name)
            if m is None or m["name"] != path.name:
                continue
            pid = int(m["pid"])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                entry.unlink(missing_ok=True)
            except OSError:
                pass  # alive under another user: not ours to judge


def _replace_atomically(path: Path, write: Callable[[IO[bytes]], None], before: Callable[[Path], None] | None = None):
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before is not None:
            before(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    *,
    replace: Literal["elsfast", "any"] = "elsfast",
) -> Path:
    """Run `write(file)` on a fresh temporary file next to `path`, then rename it to `path` (parents created).

    The temporary file is created with mode 0o666 minus the umask, like an ordinary new file, and removed if
    `write` raises (KeyboardInterrupt included). With `replace="elsfast"` (default) an existing `path` that
    elsfast did not write raises `FileExistsError` (naming it and what it looks like) before anything is
    written, and the new file's SHA-256 is recorded in the directory's manifest; `replace="any"` replaces
    whatever is there and records nothing (cache directories, or a replacement the user asked for).
    Returns `path`.
    """
    path = Path(path)
    if replace not in ("elsfast", "any"):
        raise ValueError(f"replace must be 'elsfast' or 'any', got {replace!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if path.name == MANIFEST_NAME:
        raise ValueError(f"{path} is elsfast's record of the files it wrote; choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    if replace == "any":
        _replace_atomically(path, write)
        return path
    check_replaceable(path)
    directory, name = path.parent, path.name

    def record(tmp: Path) -> None:  # the new digest joins the old ones before the rename
        # entries of files deleted since they were written are dropped (a new file of that name is not elsfast's)
        files = {k: v for k, v in _read_manifest(directory).items() if k == name or (directory / k).is_file()}
        files[name] = [*files.get(name, [])[-1:], sha256_file(tmp)]
        _write_manifest(directory, files)

    _replace_atomically(path, write, before=record)
    files = _read_manifest(directory)
    if len(files.get(name, [])) > 1:
        files[name] = files[name][-1:]
        with contextlib.suppress(OSError):
            _write_manifest(directory, files)
    return path
