"""Triton 3.6's interpreter (the device image's triton) run on elsfast's kernel: a rehearsal-only fix, loaded by
scripts/gpu_check.py in its rehearsal (`-p triton_interpreter_compat` for pytest, an import in
scripts/gpu_precompile.py) when TRITON_INTERPRET=1.

In triton 3.6 the interpreter turns a loop bound computed in the kernel (`range(first, last)` with `last =
tl.minimum(...)`) into a Python int with `int(array)` on a one-element array of shape (1,), which numpy 2 refuses
("only 0-dimensional arrays can be converted to Python scalars"); triton 3.9's interpreter runs the kernel. The
compiled path on a GPU has no such step, so the rehearsal replaces the interpreter's `tensor.__index__` with one
that takes the single element of a one-element array, and nothing else. Importing this module does nothing where
the interpreter is off or triton has no such hook.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy as np
    from triton.runtime import interpreter

    if hasattr(interpreter, "_patch_lang_tensor"):
        patch_tensor = interpreter._patch_lang_tensor

        def index(tensor) -> int:
            data = np.asarray(tensor.handle.data)
            return int(data.reshape(()) if data.size == 1 else data)

        def patch_lang_tensor(tensor, scope) -> None:
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", index)

        interpreter._patch_lang_tensor = patch_lang_tensor
