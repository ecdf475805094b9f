"""The paper's experiments on top of the machines and networks: `calibrate` (P(t) by cosine similarity to a
network), `compare` (network vs machine images, Table 1's Pearson r), `reproduce` (train -> calibrate -> compare
presets), `creativity` (how far a sample is from its nearest training patches), `explain` (per-pixel provenance of
a sample), `departure` (where a compared network leaves the machine's mosaic), `metrics` (the correlations they
report), `protocols` (the paper's step counts for the network and the machines, Table 1's and Table 2's). May
import every lower layer (`common`, `reduce`, `datasets`, `plots`, `machine`, `sampling`, `nets`) and
`integrations` (a diffusers model as the network); nothing below imports it.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.reduce`, `elsfast.datasets`,
`elsfast.plots`, `elsfast.machine`, `elsfast.sampling`, `elsfast.nets`, `elsfast.integrations`.
"""
