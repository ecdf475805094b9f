"""Image datasets for elsfast: MNIST, Fashion-MNIST, CIFAR-10, faces, an embedded MNIST subset, npz files
and image folders, all returned as one uint8 ``[N, C, H, W]`` tensor.

Quick start::

    from elsfast import datasets
    ds = datasets.load("mnist-embedded", pad_to=32)      # 2,000 MNIST digits, ships with the package
    ds = datasets.load("cifar10", root="/data")          # or set ELSFAST_DATA=/data
    ds = datasets.load("my_images.npz", as_float=True)   # any npz with an ``images`` array
    ds = datasets.load("photos/")                        # a folder of png/jpg/bmp, optionally per class
    x = datasets.to_float(ds.images)                     # uint8 -> float32 in [-1, 1]

Where the named datasets are looked for (``root`` is the ``root=`` argument, else ``$ELSFAST_DATA``):

==================  =================================================================================
``mnist``           ``root/mnist/``, ``root/``, ``root/MNIST/raw/`` (torchvision layout): the IDX files
                    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
                    ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not; the ``train-images.idx3-ubyte``
                    spelling is accepted too.
``fashion-mnist``   ``root/fashion-mnist/``, ``root/FashionMNIST/raw/``: same IDX file names as MNIST.
``cifar10``         the official python pickle batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``)
                    in ``root/cifar10/cifar-10-batches-py/``, ``root/cifar-10-batches-py/`` or
                    ``root/cifar10/``; else ``root/cifar10/cifar10_{train,test}_jpeg.npz`` (JPEG-compressed
                    copy: keys ``jpeg``, ``offsets``, ``labels``). When both exist the pickle batches (the
                    original, lossless pixels) win.
``faces``           ``root/faces/lfw_32x32.npz`` or ``root/lfw_32x32.npz`` (LFW, 32x32 grey; split
                    ``"train"`` only; returned as 1 channel).
``mnist-embedded``  the 2,000-image MNIST subset in ``elsfast/assets/mnist_embedded.npz``; needs no root.
==================  =================================================================================

Decoding the CIFAR-10 JPEG copy takes a few seconds, so the decoded uint8 array is cached in memory
(keyed on path, mtime and size) and on disk as ``.npy`` under ``$ELSFAST_CACHE`` (default
``~/.cache/elsfast``; set ``ELSFAST_CACHE=off`` to disable the disk cache; see ``elsfast.common.cache``).

The package holds one module per format and re-exports the public names here: ``base`` (``Dataset``,
``DatasetNotFoundError``, the data root), ``idx`` (``read_idx``, MNIST and Fashion-MNIST), ``cifar`` (pickle
batches, the JPEG npz and its decoded cache), ``faces`` (LFW 32x32), ``embedded`` (the shipped MNIST subset),
``files`` (npz files and image folders), ``cache`` (the disk cache of decoded arrays) and ``loader`` (``load``,
``available``, the names). The format modules import ``base``/``cache`` and ``elsfast.common`` only; ``loader``
imports them all; no module here imports an elsfast package other than ``elsfast.common``.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`.
"""

from __future__ import annotations

from ..common.cache import ENV_CACHE, cache_dir
from ..common.pixels import to_float
from .base import ENV_DATA, SPLITS, Dataset, DatasetNotFoundError
from .cifar import clear_memory_cache
from .embedded import EMBEDDED_MNIST_PATH
from .files import IMAGE_EXTENSIONS
from .idx import read_idx
from .loader import NAMED_DATASETS, available, load

__all__ = [
    "EMBEDDED_MNIST_PATH",
    "ENV_CACHE",
    "ENV_DATA",
    "IMAGE_EXTENSIONS",
    "NAMED_DATASETS",
    "SPLITS",
    "Dataset",
    "DatasetNotFoundError",
    "available",
    "cache_dir",
    "clear_memory_cache",
    "load",
    "read_idx",
    "to_float",
]
