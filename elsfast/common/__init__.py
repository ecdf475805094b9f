"""The vocabulary every other part of elsfast shares; imports only torch, numpy and the standard library.

`pixels` (float/uint8 conversion), `checks` (input validation: pixel ranges, labels, devices, byte sizes),
`fileio` (atomic writes that never replace a file elsfast did not write), `cache` (where the on-disk caches live:
`$ELSFAST_CACHE`, `off` for none), `imageio` (PNG grids and sample tensors), `threads` (OpenMP and kernel thread
counts), `schedules` (noise schedules abar(t)), `scales` (patch-size specifications P(t) and the calibrated lists
of the paper), `provenance` (the record of which training patch explains a pixel). Nothing here imports another
elsfast package.

Imports of other elsfast packages (tests/test_layout.py): nothing.
"""
