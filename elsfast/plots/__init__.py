"""Every figure elsfast draws, with matplotlib: `calibration` (the calibrated patch size P(t) and the cosine
similarity of each candidate size over t), `comparison` (histograms of Pearson r per machine and the per-seed
scatter against IS), `provenance` (the figure of `elsfast explain`: sample, source map, offset colour wheel,
entropy over t, largest sources) and `style` (the one palette, the figure/canvas factory and the atomic writer:
PNG by default, SVG or PDF by the path's extension). matplotlib is the optional extra `elsfast[plots]`: it is
imported only when a figure is drawn (never by `import elsfast`), and a figure function called without it raises
ImportError naming `pip install elsfast[plots]`. May import only `elsfast.common`, numpy, torch and matplotlib,
never the machine, sampling or research layers: research imports plots, not the other way round.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`.
"""

from .style import FIGURE_FORMATS, matplotlib_missing, require_matplotlib

__all__ = ["FIGURE_FORMATS", "matplotlib_missing", "require_matplotlib"]
