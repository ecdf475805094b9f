"""Shared styling and output of elsfast's figures: one palette, one figure factory, one writer.

Figures are `matplotlib.figure.Figure` objects on an Agg canvas (`FigureCanvasAgg`), never pyplot's global
state, so drawing works in threads and headless processes and leaves no figure behind. `save_figure` writes PNG,
SVG or PDF by the path's extension through `elsfast.common.fileio.atomic_write` (which never replaces a file
elsfast did not write), without time stamps, so the same data give the same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..common.fileio import atomic_write

__all__ = [
    "FIGURE_FORMATS",
    "INSTALL_HINT",
    "MACHINE_COLORS",
    "MACHINE_NAMES",
    "PALETTE",
    "check_figure_path",
    "figure_format",
    "machine_color",
    "machine_name",
    "matplotlib_missing",
    "new_figure",
    "require_matplotlib",
    "save_figure",
    "styled",
]

INSTALL_HINT = "pip install elsfast[plots]"
FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
"""Output formats by file extension (case-insensitive); PNG is the default of every command."""

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
"""Categorical colours (matplotlib's tab10 order), used in turn for anything without a colour of its own."""

MACHINE_COLORS = {"network": "#3c3c3c", "els": PALETTE[0], "ls": PALETTE[1], "is": PALETTE[2], "es": PALETTE[3]}
MACHINE_NAMES = {"network": "network", "els": "ELS", "ls": "LS", "is": "IS", "es": "ES"}

# one look for every figure: light grid, no top/right spines, legible at README size (~700 px wide)
_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e4e4",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "svg.hashsalt": "elsfast",  # stable element ids: the same figure gives the same SVG
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
}


def machine_name(name: str) -> str:
    """Display name of a machine ("els" -> "ELS"); unknown names as they are."""
    return MACHINE_NAMES.get(name, name)


def machine_color(name: str, k: int = 0) -> str:
    """The colour of a machine in every figure; machines without one take `PALETTE[k]`."""
    return MACHINE_COLORS.get(name, PALETTE[k % len(PALETTE)])


def matplotlib_missing() -> str | None:
    """None when figures can be drawn; otherwise why not, with the install command (for "figure skipped")."""
    try:
        require_matplotlib()
    except ImportError as err:
        return str(err)
    return None


def require_matplotlib():
    """Import and return matplotlib; ImportError saying `pip install elsfast[plots]` when it is not installed."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - the canvas every figure uses
    except ImportError as err:
        raise ImportError(f"elsfast's figures need matplotlib, which is not installed: {INSTALL_HINT}") from err
    return matplotlib


def figure_format(path: str | Path) -> str:
    """ "png", "svg" or "pdf" from the path's extension; ValueError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise ValueError(
            f"figures are written as PNG, SVG or PDF (chosen by the extension): the path must end in "
            f"{', '.join(FIGURE_FORMATS)}, got {str(path)!r}"
        )
    return FIGURE_FORMATS[suffix]


def check_figure_path(path: str | Path) -> Path:
    """`path` when a figure can be written there: a known extension (ValueError otherwise). Whether an existing
    file may be replaced is `elsfast.common.fileio.check_replaceable`'s question."""
    figure_format(path)
    return Path(path)


@contextlib.contextmanager
def styled() -> Iterator[None]:
    """matplotlib's rc settings of elsfast's figures, for the duration of drawing and saving."""
    mpl = require_matplotlib()
    with mpl.rc_context(_RC):
        yield


def new_figure(width: float, height: float, *, layout: str | None = "constrained"):
    """A `Figure` of `width` x `height` inches on its own Agg canvas (no pyplot); call inside `styled()`."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


_NO_DATES = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


def save_figure(figure, path: str | Path, *, dpi: float = 120, close: bool = True) -> Path:
    """Write `figure` at `path` (PNG, SVG or PDF by the extension) atomically, refusing to replace a file elsfast
    did not write (`FileExistsError`); `dpi` applies to PNG and to images inside SVG/PDF. With `close` the
    figure is cleared afterwards (its memory is freed). Returns the path."""
    fmt = figure_format(path)
    try:
        with styled():
            return atomic_write(
                path,
                lambda f: figure.savefig(f, format=fmt, dpi=dpi, facecolor="white", metadata=_NO_DATES[fmt]),
                kind="figure",
            )
    finally:
        if close:
            figure.clear()
