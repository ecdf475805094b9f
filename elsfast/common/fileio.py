"""The one place elsfast writes files: atomic replacement, and never over a file elsfast did not write.

`atomic_write(path, write)` runs `write` on a fresh temporary file next to `path` (fsync'ed) and renames it over
`path` with `os.replace`, so a run killed at any moment leaves either the old file or the new one (plus, after a
SIGKILL, a stray `.NAME.PID.HEX.tmp` that the next write to `path` removes once its process is gone).

Ownership. Before replacing an existing `path`, `atomic_write` checks that elsfast wrote it: either its SHA-256
is recorded in the directory's manifest `.elsfast-files.json` (every write with the default
`replace="elsfast"` records the new file's digest there), or the file is recognisably elsfast's own (a torch
file or JSON document whose `format` entry names an elsfast format, e.g. a training checkpoint or a comparison's
`results.json`). Any other file raises `FileExistsError` naming the file and saying what it looks like
(`describe_file`), and is left untouched. `replace="any"` skips the check: for elsfast's own cache directories.

Kinds. An elsfast file is replaced only by the same kind of output (`KINDS`: a network by a training run,
samples by samples, a calibration by a calibration, ...). `file_kind(path)` is the one place that decides the
kind of an existing file: the kind its declared format names, else the kind recorded next to its digest in the
manifest. A writer names the kind it writes (`atomic_write(..., kind="samples")`); without one, the kind is
read from the new file itself (its declared format, else its file type: "png file", "torch file", ...). A file
of another kind raises `FileExistsError` saying what it is and what replaces it. Files recorded by an older
elsfast (no kind in the manifest) are replaced by an output of the same file type.

The manifest itself is never replaced when it is not elsfast's (not JSON in its format): every write into that
directory is then refused. `check_replaceable(path, kind)` runs all these checks, and creates and removes a
probe file in the destination folder, before the work that ends in a write.

The manifest is updated so that a kill at any point still recognises the file: the new digest is added before
the rename (next to the old one) and the old one dropped after it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal, NamedTuple

__all__ = [
    "KINDS",
    "MANIFEST_NAME",
    "UNRECORDED_KIND",
    "atomic_write",
    "check_replaceable",
    "check_writable",
    "describe_file",
    "describe_kind",
    "elsfast_format",
    "file_kind",
    "open_npz",
    "sha256_file",
    "written_by_elsfast",
]

MANIFEST_NAME = ".elsfast-files.json"
"""Per-directory record of the files elsfast wrote there:
`{"format": "elsfast-files/1", "files": {name: [sha256, ...]}, "kinds": {sha256: kind}}`."""
_MANIFEST_FORMAT = "elsfast-files/1"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_SNIFF_BYTES = 1 << 20  # how much of a torch file's pickle is searched for its format entry

KINDS: dict[str, tuple[str, str]] = {
    "network": (
        "an elsfast network checkpoint written by `elsfast train` (trained weights)",
        "`elsfast train --out` with --resume (to continue it) or --overwrite (to train it anew)",
    ),
    "sampling-state": (
        "an elsfast sampling checkpoint (the state of an unfinished `elsfast sample` run)",
        "only the sampling run it belongs to, which resumes from it",
    ),
    "comparison": ("an elsfast comparison (`results.json` of `elsfast compare`)", "`elsfast compare --out-dir`"),
    "calibration": ("an elsfast calibration (`elsfast calibrate`)", "`elsfast calibrate --out`"),
    "machine": ("an elsfast machine config (`save_pretrained`)", "`ScoreMachine.save_pretrained`"),
    "samples": ("samples saved by `elsfast sample --save`", "`elsfast sample --save`"),
    "grid": ("a grid of samples written by `elsfast sample --out`", "`elsfast sample --out`"),
    "figure": (
        "a figure drawn by elsfast",
        "a figure of elsfast (`calibrate --plot`, `explain`, `compare`, `reproduce`)",
    ),
    "measures": (
        "creativity measures written by `elsfast measure --json` or `elsfast explain`",
        "`elsfast measure --json` or `elsfast explain`",
    ),
    "reproduction": ("the summary of `elsfast reproduce` (`reproduction.json`)", "`elsfast reproduce --out-dir`"),
    "departure": (
        "an elsfast departure analysis (`elsfast departure`: where the network leaves the mosaic)",
        "`elsfast departure` on the same comparison",
    ),
}
"""The kinds of output elsfast writes: kind -> (what such a file is, what may replace it), in words."""

UNRECORDED_KIND = "unrecorded"
"""The kind of a file an older elsfast recorded without one: replaced by an output of the same file type."""

_FORMAT_KINDS = {
    "elsfast-checkpoint": "network",
    "elsfast-sampling-state": "sampling-state",
    "elsfast-compare": "comparison",
    "elsfast-calibration": "calibration",
    "elsfast-machine": "machine",
    "elsfast-departure": "departure",
}
_TYPE_WORDS = {
    "empty": "an empty file",
    "torch": "a torch file (torch.save)",
    "damaged zip": "a damaged zip archive (a truncated torch or .npz file?)",
    "npz": "a numpy .npz archive",
    "zip": "a zip archive",
    "png": "a PNG image",
    "npy": "a numpy .npy array",
    "pickle": "a pickle (an old-style torch file?)",
    "json": "a JSON/text document",
    "unknown": "a file of unknown format",
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
        found = [name for name in _FORMAT_KINDS if name.encode() in pickle]
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


def _file_type(path: Path) -> str:
    """The type of an existing file's content, a key of `_TYPE_WORDS` (read from its first bytes)."""
    if path.stat().st_size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(8)
    if _torch_pickle(path) is not None:
        return "torch"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "damaged zip"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x80"):
        return "pickle"
    if head[:1] in (b"{", b"["):
        return "json"
    return "unknown"


def describe_file(path: str | os.PathLike) -> str:
    """What an existing file looks like, in words, for error messages (`"a PNG image"`, `"an elsfast network
    checkpoint written by `elsfast train` (trained weights)"`, `"a file of 17 bytes of unknown format"`)."""
    path = Path(path)
    if not path.exists():
        return "no file"
    if path.is_dir():
        return "a directory"
    fmt = elsfast_format(path)
    if fmt is not None:
        kind = _FORMAT_KINDS.get(fmt)
        return KINDS[kind][0] if kind else f"an elsfast file (format {fmt!r})"
    try:
        kind = _file_type(path)
    except OSError as err:
        return f"an unreadable file ({err.strerror or err})"
    if kind == "torch":
        return "a torch file (torch.save) not written by elsfast"
    if kind == "npz":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return f"a numpy .npz archive (arrays {', '.join(n[:-4] for n in names[:4])})"
    if kind == "unknown":
        return f"a file of {path.stat().st_size:,} bytes of unknown format"
    return _TYPE_WORDS[kind]


def _content_kind(path: Path) -> str:
    """The kind of a file read from its content alone: its declared format's kind, else "<type> file"."""
    fmt = elsfast_format(path)
    if fmt is not None:
        return _FORMAT_KINDS.get(fmt, fmt)
    return f"{_file_type(path)} file"


def describe_kind(kind: str) -> str:
    """A kind of output (`KINDS`, or a file type "png file", ...) in words: what such a file is."""
    if kind in KINDS:
        return KINDS[kind][0]
    if kind == UNRECORDED_KIND:
        return "a file elsfast wrote (its kind unrecorded)"
    type_ = kind.removesuffix(" file")
    return f"an elsfast output ({_TYPE_WORDS[type_]})" if type_ in _TYPE_WORDS else f"an elsfast {kind}"


def _replaced_by(kind: str) -> str:
    if kind in KINDS:
        return KINDS[kind][1]
    return "the command that wrote it"


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


class _Manifest(NamedTuple):
    files: dict[str, list[str]]  # name -> SHA-256 digests (the current file's, and during a write the new one's)
    kinds: dict[str, str]  # SHA-256 digest -> kind


def _read_manifest(directory: Path, *, strict: bool = False) -> _Manifest:
    """The directory's manifest (empty when there is none). A file at the manifest's path that is not one (not
    elsfast's JSON format) counts as empty, or with `strict` raises FileExistsError: it is never replaced."""
    path = directory / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return _Manifest({}, {})
    try:
        doc = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        doc = None
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == _MANIFEST_FORMAT else None
    kinds = doc.get("kinds", {}) if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not isinstance(kinds, dict):
        if strict:
            raise FileExistsError(
                f"{path} is not elsfast's record of the files it wrote in {directory} (it looks like "
                f"{describe_file(path)}); elsfast never replaces it and so writes nothing in that folder: move it "
                "away or write to another folder"
            )
        return _Manifest({}, {})
    return _Manifest(
        {k: list(v) for k, v in files.items() if isinstance(v, list)},
        {k: v for k, v in kinds.items() if isinstance(v, str)},
    )


def _write_manifest(directory: Path, manifest: _Manifest) -> None:
    _read_manifest(directory, strict=True)  # never over a user's own file of that name
    used = {digest for digests in manifest.files.values() for digest in digests}
    kinds = {digest: kind for digest, kind in manifest.kinds.items() if digest in used}
    doc = {"format": _MANIFEST_FORMAT, "files": manifest.files, "kinds": kinds}
    text = json.dumps(doc, indent=1, sort_keys=True).encode()
    _replace_atomically(directory / MANIFEST_NAME, lambda f: f.write(text))


def file_kind(path: str | os.PathLike) -> str | None:
    """The kind of output the existing file at `path` is, or None when elsfast did not write it (or there is no
    file): the kind its declared elsfast format names (`"network"`, `"sampling-state"`, `"calibration"`, ...),
    else the kind recorded with its digest in the directory's manifest (`UNRECORDED_KIND` for an older record).
    The one place elsfast decides what an existing file is before it replaces it."""
    path = Path(path)
    if not path.is_file():
        return None
    fmt = elsfast_format(path)
    if fmt is not None:
        return _FORMAT_KINDS.get(fmt, fmt)
    manifest = _read_manifest(path.parent)
    digests = manifest.files.get(path.name)
    if not digests:
        return None
    digest = sha256_file(path)
    if digest not in digests:
        return None
    return manifest.kinds.get(digest, UNRECORDED_KIND)


def written_by_elsfast(path: str | os.PathLike) -> bool:
    """Whether elsfast wrote the file at `path` as it is now (its digest is in the directory's manifest, or it
    declares an elsfast format)."""
    return file_kind(path) is not None


def check_writable(directory: str | os.PathLike) -> None:
    """Create and remove a probe file in `directory` (in its nearest existing parent when it does not exist yet:
    that is where it would be created). Raise `PermissionError` (or another `OSError`) naming the folder when
    that fails, so that a long run never ends in a write that cannot happen."""
    folder = Path(directory)
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder, so no output can be written under it")
    probe = folder / f".elsfast-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        cls = PermissionError if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else OSError
        raise cls(
            f"cannot write in {folder} ({err.strerror or err}); elsfast checks every output folder before it "
            "starts: choose a writable folder"
        ) from None


def _refuse_kind(path: Path, old: str, new: str) -> FileExistsError:
    return FileExistsError(
        f"{path} is {describe_kind(old)}; it is replaced only by {_replaced_by(old)}, not by "
        f"{describe_kind(new)}: choose another path"
    )


def check_replaceable(path: str | os.PathLike, kind: str | None = None) -> None:
    """Check before long work that `atomic_write(path, ..., kind=kind)` will succeed: the folder is writable
    (`check_writable`), its manifest is elsfast's, and an existing `path` was written by elsfast (FileExistsError
    naming it and what it looks like otherwise) and, when `kind` is given, is of that kind (FileExistsError
    saying what it is and what replaces it)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if path.parent.is_dir():
        _read_manifest(path.parent, strict=True)
    check_writable(path.parent)
    if not path.exists() and not path.is_symlink():
        return
    old = file_kind(path)
    if old is None:
        raise FileExistsError(
            f"{path} already exists and was not written by elsfast (it looks like {describe_file(path)}); "
            "elsfast never replaces such a file: move it away or choose another path"
        )
    if kind is not None and old not in (kind, UNRECORDED_KIND):
        raise _refuse_kind(path, old, kind)


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
    kind: str | None = None,
) -> Path:
    """Run `write(file)` on a fresh temporary file next to `path`, then rename it to `path` (parents created).

    The temporary file is created with mode 0o666 minus the umask, like an ordinary new file, and removed if
    `write` raises (KeyboardInterrupt included). With `replace="elsfast"` (default) an existing `path` that
    elsfast did not write, or that is another kind of output than the new file, raises `FileExistsError`
    (naming it and what it is) and is left untouched; the new file's SHA-256 and `kind` (a key of `KINDS`, or
    None: read from the new file, see the module docstring) are recorded in the directory's manifest.
    `replace="any"` replaces whatever is there and records nothing (elsfast's cache directories).
    Returns `path`.
    """
    path = Path(path)
    if replace not in ("elsfast", "any"):
        raise ValueError(f"replace must be 'elsfast' or 'any', got {replace!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if path.name == MANIFEST_NAME:
        raise ValueError(f"{path} is elsfast's record of the files it wrote; choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    if replace == "any":
        _replace_atomically(path, write)
        return path
    check_replaceable(path, kind)
    old = file_kind(path)
    directory, name = path.parent, path.name

    def record(tmp: Path) -> None:  # the new digest joins the old ones before the rename
        new = kind or _content_kind(tmp)
        if old == UNRECORDED_KIND and _content_kind(tmp) != _content_kind(path):
            raise _refuse_kind(path, _content_kind(path), new)
        if old not in (None, UNRECORDED_KIND, new):
            raise _refuse_kind(path, old, new)
        manifest = _read_manifest(directory, strict=True)
        # entries of files deleted since they were written are dropped (a new file of that name is not elsfast's)
        files = {k: v for k, v in manifest.files.items() if k == name or (directory / k).is_file()}
        digest = sha256_file(tmp)
        files[name] = [*files.get(name, [])[-1:], digest]
        manifest.kinds[digest] = new
        _write_manifest(directory, manifest._replace(files=files))

    _replace_atomically(path, write, before=record)
    manifest = _read_manifest(directory)
    if len(manifest.files.get(name, [])) > 1:
        manifest.files[name] = manifest.files[name][-1:]
        with contextlib.suppress(OSError):
            _write_manifest(directory, manifest)
    return path
