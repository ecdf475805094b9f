"""The paper's trained diffusion networks: `models` (the ResNet and UNet of SPEC section 3, epsilon prediction)
and `train` (their resumable trainer). May import `elsfast.common` and, lazily, `elsfast.datasets`; never the
reduction or the machines, so loading a network does not load the reduction stack.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.datasets`.
"""
