"""Tests for elsfast.datasets: IDX/npz/image-folder/CIFAR loaders, padding, the embedded MNIST subset,
error messages, the CIFAR JPEG caches, and (skipped when absent) the real datasets in ../shared/data."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elsfast import datasets
from elsfast.datasets import Dataset, DatasetNotFoundError, load, read_idx, to_float

EMBEDDED_IMAGES_SHA256 = "573bd264bb27a2355429e8dae6d9ef6caef28b7eb6033dc700a4da3cf847e159"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No data root from the developer's environment; disk cache in a temporary folder."""
    monkeypatch.delenv("ELSFAST_DATA", raising=False)
    monkeypatch.setenv("ELSFAST_CACHE", str(tmp_path / "cache"))
    datasets.clear_memory_cache()
    yield
    datasets.clear_memory_cache()


# ---------------------------------------------------------------------------------------------------------
# helpers


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False, code: int = 0x08) -> Path:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    raw += np.asarray(arr, dtype=dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_mnist_like(folder: Path, n: int = 7, size: int = 28, *, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz=gz)
        out[split] = (images, labels)
    return out


def write_cifar_batch(path: Path, hwc: np.ndarray, labels: np.ndarray) -> None:
    """One batch in the official format: rows of 1024 R, 1024 G, 1024 B values (each plane row-major)."""
    data = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)).reshape(len(hwc), 3072)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(hwc))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar_batches(folder: Path, per_batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        write_cifar_batch(folder / f"data_batch_{i}", x, y)
        train_x.append(x)
        train_y.append(y)
    tx = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
    ty = rng.integers(0, 10, per_batch)
    write_cifar_batch(folder / "test_batch", tx, ty)
    return (np.concatenate(train_x), np.concatenate(train_y)), (tx, ty)


def make_cifar_jpeg_npz(path: Path, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A miniature cifar10_*_jpeg.npz; returns the decoded HWC images (ground truth) and labels."""
    rng = np.random.default_rng(seed)
    blobs, decoded = [], []
    for _ in range(n):
        img = (rng.integers(0, 256, (4, 4, 3)).repeat(8, 0).repeat(8, 1)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=labels)
    return np.stack(decoded), labels


# ---------------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 255], np.uint8)
    got = read_idx(write_idx(tmp_path / "img.idx", images, gz=gz))
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, images)
    got.flags.writeable = True  # the result is an ordinary writable array
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "lbl.idx", labels, gz=gz)), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "img.idx", limit=2), images[:2])


def test_read_idx_other_dtypes(tmp_path):
    ints = np.array([[-5, 70000], [1, 2]], np.int32)
    got = read_idx(write_idx(tmp_path / "i.idx", ints, code=0x0C))
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, ints)
    floats = np.array([0.5, -2.25], np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f.idx", floats, code=0x0D)), floats)


def test_read_idx_bad_magic(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">i", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match=r"bad magic number 0x12340801"):
        read_idx(bad)
    gzbad = tmp_path / "bad.idx.gz"
    gzbad.write_bytes(gzip.compress(b"PK\x03\x04garbage"))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(gzbad)


def test_read_idx_size_errors(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2, 4, 4) + bytes(31))
    with pytest.raises(ValueError, match=r"truncated IDX file.*need 32 bytes.*found 31"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 2) + bytes(3))
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">i", 1) + bytes(1))
    with pytest.raises(ValueError, match="unsupported IDX element type 0x07"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">i", 1))
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="only 2 bytes"):
        read_idx(p)


# ---------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST layouts


@pytest.mark.parametrize("where", ["mnist", "", "MNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_lookup_locations(tmp_path, where, gz):
    root = tmp_path / "data"
    truth = make_mnist_like(root / where if where else root, gz=gz)
    for split in ("train", "test"):
        ds = load("mnist", split, root=root)
        images, labels = truth[split]
        assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels is not None and ds.labels.dtype == torch.int64
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)
        assert ds.name == "mnist" and ds.num_classes == 10 and len(ds) == 7


def test_mnist_kaggle_dotted_names_and_limit(tmp_path):
    images = np.full((5, 28, 28), 9, np.uint8)
    write_idx(tmp_path / "mnist" / "train-images.idx3-ubyte", images)
    write_idx(tmp_path / "mnist" / "train-labels.idx1-ubyte", np.arange(5, dtype=np.uint8))
    ds = load("MNIST", root=tmp_path, limit=3)
    assert ds.images.shape == (3, 1, 28, 28)
    assert ds.labels.tolist() == [0, 1, 2]


def test_fashion_mnist_and_env_root(tmp_path, monkeypatch):
    truth = make_mnist_like(tmp_path / "fashion-mnist", n=4, seed=3)
    monkeypatch.setenv("ELSFAST_DATA", str(tmp_path))
    ds = load("fashion-mnist", "test")
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), truth["test"][0])
    assert load("fashion_mnist").name == "fashion-mnist"  # name normalisation
    # Fashion-MNIST is not looked up directly in root (its files share MNIST's names).
    with pytest.raises(DatasetNotFoundError):
        load("mnist", root=tmp_path / "fashion-mnist" / "nope")


def test_mnist_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((2,), np.uint8))
    with pytest.raises(ValueError, match=r"3 images but .* 2 labels"):
        load("mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# npz files


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    chw = rng.integers(0, 256, (5, 3, 8, 6), dtype=np.uint8)
    labels = np.array([0, 2, 2, 1, 4])

    np.savez(tmp_path / "hwc.npz", images=chw.transpose(0, 2, 3, 1), labels=labels)
    np.savez(tmp_path / "chw.npz", images=chw, labels=labels)
    for f in ("hwc.npz", "chw.npz"):
        ds = load(str(tmp_path / f))
        assert ds.images.shape == (5, 3, 8, 6) and ds.images.is_contiguous()
        np.testing.assert_array_equal(ds.images.numpy(), chw)
        assert ds.labels.tolist() == labels.tolist() and ds.num_classes == 5
        assert ds.name == str(tmp_path / f)

    hw = chw[:, 0]
    np.savez(tmp_path / "hw.npz", images=hw)
    ds = load(tmp_path / "hw.npz")  # os.PathLike is fine too
    assert ds.images.shape == (5, 1, 8, 6) and ds.labels is None and ds.num_classes is None
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), hw)

    np.savez(tmp_path / "grey_hwc.npz", images=hw[..., None])
    assert load(str(tmp_path / "grey_hwc.npz")).images.shape == (5, 1, 8, 6)

    # tiny images: both axis 1 and 3 could be channels -> HWC by default, 'layout' key overrides
    tiny = rng.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", images=tiny)
    np.testing.assert_array_equal(load(str(tmp_path / "tiny.npz")).images.numpy(), tiny.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "tiny_chw.npz", images=tiny, layout="NCHW")
    np.testing.assert_array_equal(load(str(tmp_path / "tiny_chw.npz")).images.numpy(), tiny)

    # integer dtypes within 0..255 are accepted; limit; as_float
    np.savez(tmp_path / "int.npz", images=chw.astype(np.int64), labels=labels.astype(np.int16))
    ds = load(str(tmp_path / "int.npz"), limit=2, as_float=True)
    assert ds.images.dtype == torch.float32 and ds.images.shape == (2, 3, 8, 6)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 2]
    torch.testing.assert_close(ds.images, torch.from_numpy(chw[:2]).float() / 127.5 - 1)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "nokey.npz", x=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no 'images' array"):
        load(str(tmp_path / "nokey.npz"))
    np.savez(tmp_path / "ambig.npz", images=np.zeros((2, 8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="channel axis"):
        load(str(tmp_path / "ambig.npz"))
    np.savez(tmp_path / "mismatch.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.arange(3))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        load(str(tmp_path / "mismatch.npz"))
    np.savez(tmp_path / "ok.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="split='train'"):
        load(str(tmp_path / "ok.npz"), "test")
    with pytest.raises(DatasetNotFoundError, match=r"missing\.npz"):
        load(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------------------------------------------------
# image folders


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(2)
    truth = {}
    for cls, names in (("zebra", ["b.png", "a.png"]), ("ant", ["x.bmp"]), ("cat", ["k.png", "sub/j.png"])):
        for n in names:
            arr = rng.integers(0, 256, (6, 5), dtype=np.uint8)
            _save(tmp_path / "imgs" / cls / n, arr)
            truth[(cls, n)] = arr
    (tmp_path / "imgs" / "empty_dir").mkdir()
    (tmp_path / "imgs" / "zebra" / "notes.txt").write_text("not an image")

    ds = load(str(tmp_path / "imgs"))
    # classes in sorted folder order: ant=0, cat=1, zebra=2; files sorted by relative path within a class
    order = [("ant", "x.bmp"), ("cat", "k.png"), ("cat", "sub/j.png"), ("zebra", "a.png"), ("zebra", "b.png")]
    assert ds.images.shape == (5, 1, 6, 5) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 1, 1, 2, 2] and ds.num_classes == 3
    for i, key in enumerate(order):
        np.testing.assert_array_equal(ds.images[i, 0].numpy(), truth[key])
    assert load(str(tmp_path / "imgs"), limit=2).labels.tolist() == [0, 1]


def test_image_folder_flat_rgb_and_splits(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    grey = np.full((4, 4), 77, np.uint8)
    _save(tmp_path / "flat" / "1.png", rgb)
    _save(tmp_path / "flat" / "2.png", grey)
    ds = load(str(tmp_path / "flat"))
    assert ds.labels is None and ds.num_classes is None
    assert ds.images.shape == (2, 3, 4, 4)  # one colour image -> all RGB
    np.testing.assert_array_equal(ds.images[0].numpy(), rgb.transpose(2, 0, 1))
    assert (ds.images[1] == 77).all()
    with pytest.raises(ValueError, match="one split"):
        load(str(tmp_path / "flat"), "test")

    for split, v in (("train", 10), ("test", 20)):
        _save(tmp_path / "split" / split / "c0" / "a.png", np.full((3, 3), v, np.uint8))
    assert load(str(tmp_path / "split"), "test").images.flatten().unique().tolist() == [20]
    assert load(str(tmp_path / "split")).images.flatten().unique().tolist() == [10]


def test_image_folder_size_mismatch(tmp_path):
    _save(tmp_path / "imgs" / "a" / "ok.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "imgs" / "b" / "odd_one.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"odd_one\.png.*9x8.*must share one size"):
        load(str(tmp_path / "imgs"))


def test_image_folder_mixed_and_empty(tmp_path):
    _save(tmp_path / "mixed" / "a" / "x.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "mixed" / "y.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="class folder"):
        load(str(tmp_path / "mixed"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        load(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------
# padding, float conversion, the Dataset container


def test_pad_to():
    plain = load("mnist-embedded", limit=4)
    padded = load("mnist-embedded", limit=4, pad_to=32)
    assert padded.images.shape == (4, 1, 32, 32) and padded.images.dtype == torch.uint8
    torch.testing.assert_close(padded.images[:, :, 2:30, 2:30], plain.images)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert (border == 0).all()
    assert load("mnist-embedded", limit=1, pad_to=28).images.shape == (1, 1, 28, 28)
    f = load("mnist-embedded", limit=2, pad_to=32, as_float=True).images
    assert f.dtype == torch.float32 and (f[:, :, :2] == -1).all() and (f[:, :, :, 30:] == -1).all()
    with pytest.raises(ValueError, match="odd difference"):
        load("mnist-embedded", pad_to=31)
    with pytest.raises(ValueError, match="smaller"):
        load("mnist-embedded", pad_to=16)
    with pytest.raises(ValueError, match="pad_to"):
        load("mnist-embedded", pad_to=0)


def test_to_float():
    u = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    f = to_float(u)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, torch.tensor([-1.0, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0]))
    assert f[0] == -1.0 and f[-1] == 1.0
    x = torch.randn(3)
    assert to_float(x) is x
    with pytest.raises(TypeError):
        to_float(torch.zeros(2, dtype=torch.int32))


def test_dataset_container():
    ds = load("mnist-embedded", limit=3)
    assert isinstance(ds, Dataset) and len(ds) == 3 and ds.channels == 1 and ds.image_size == (28, 28)
    assert "uint8[3, 1, 28, 28]" in repr(ds)
    with pytest.raises(AttributeError):
        ds.name = "x"  # frozen
    ds.images[0] = 1  # a private copy: does not change what the next load returns
    assert not (load("mnist-embedded", limit=1).images == 1).all()


def test_bad_limit_and_split():
    with pytest.raises(ValueError, match="limit"):
        load("mnist-embedded", limit=-1)
    assert load("mnist-embedded", limit=0).images.shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match="split must be one of"):
        load("mnist-embedded", "validation")
    with pytest.raises(ValueError, match="only split='train'"):
        load("mnist-embedded", "test")


# ---------------------------------------------------------------------------------------------------------
# the embedded MNIST subset


def test_embedded_mnist():
    assert "ELSFAST_DATA" not in os.environ
    ds = load("mnist-embedded")
    assert ds.images.shape == (2000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert torch.bincount(ds.labels, minlength=10).tolist() == [200] * 10
    assert ds.labels[:5].tolist() == [5, 0, 4, 1, 9]  # original MNIST order
    assert ds.images.max() == 255 and ds.images.min() == 0
    digest = hashlib.sha256(ds.images.numpy().tobytes()).hexdigest()
    assert digest == EMBEDDED_IMAGES_SHA256, "mnist_embedded.npz changed; update MNIST_EMBEDDED.md"
    assert datasets.EMBEDDED_MNIST_PATH.stat().st_size < 1_000_000
    with np.load(datasets.EMBEDDED_MNIST_PATH) as z:
        assert np.all(np.diff(z["source_index"].astype(int)) > 0)


# ---------------------------------------------------------------------------------------------------------
# errors for missing/unknown datasets, available()


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load("mnist", root=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert str(tmp_path / "mnist") in msg and f"{tmp_path}," in msg
    assert "train-images-idx3-ubyte" in msg and "ELSFAST_DATA" in msg and "root=" in msg

    with pytest.raises(DatasetNotFoundError) as info:
        load("cifar10", "test", root=tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar10") in msg and "does not exist" in msg
    assert "test_batch" in msg and "cifar10_test_jpeg.npz" in msg

    with pytest.raises(DatasetNotFoundError, match=r"lfw_32x32\.npz"):
        load("faces", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "fashion-mnist"))):
        load("fashion-mnist", root=tmp_path)


def test_no_root_anywhere():
    with pytest.raises(DatasetNotFoundError, match=r"root=None and \$ELSFAST_DATA is not set"):
        load("cifar10")


def test_unknown_name_and_faces_split(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*mnist, fashion-mnist, cifar10, faces"):
        load("imagenet")
    with pytest.raises(ValueError, match="only split='train'"):
        load("faces", "test", root=tmp_path)


def test_available(tmp_path, monkeypatch):
    assert datasets.available() == {
        "mnist": False,
        "fashion-mnist": False,
        "cifar10": False,
        "faces": False,
        "mnist-embedded": True,
    }
    make_mnist_like(tmp_path / "mnist", n=2)
    make_cifar_jpeg_npz(tmp_path / "cifar10" / "cifar10_train_jpeg.npz", n=2)
    got = datasets.available(tmp_path)
    assert got["mnist"] and got["cifar10"] and not got["faces"] and not got["fashion-mnist"]
    monkeypatch.setenv("ELSFAST_DATA", str(tmp_path))
    assert datasets.available() == got


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10: official pickle batches and the JPEG npz (with caches)


@pytest.mark.parametrize("sub", ["cifar10/cifar-10-batches-py", "cifar-10-batches-py"])
def test_cifar_pickle_batches(tmp_path, sub):
    (train_x, train_y), (test_x, test_y) = make_cifar_batches(tmp_path / sub)
    ds = load("cifar10", root=tmp_path)
    assert ds.images.shape == (15, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == train_y.tolist() and ds.num_classes == 10
    # orientation: channel c of image n at row r, column k is the HWC pixel [n, r, k, c]
    np.testing.assert_array_equal(ds.images.numpy(), train_x.transpose(0, 3, 1, 2))
    assert ds.images[4, 2, 5, 7] == train_x[4, 5, 7, 2]
    ts = load("cifar10", "test", root=tmp_path)
    np.testing.assert_array_equal(ts.images.numpy(), test_x.transpose(0, 3, 1, 2))
    assert ts.labels.tolist() == test_y.tolist()
    lim = load("cifar10", root=tmp_path, limit=4)  # spans two batches
    np.testing.assert_array_equal(lim.images.numpy(), train_x[:4].transpose(0, 3, 1, 2))


def test_cifar_pickle_known_pixel_layout(tmp_path):
    """A hand-made row: 1024 red values, then green, then blue, each row-major."""
    folder = tmp_path / "cifar-10-batches-py"
    row = np.zeros(3072, np.uint8)
    row[0] = 11  # red, (0, 0)
    row[1] = 12  # red, (0, 1)
    row[32] = 13  # red, (1, 0)
    row[1024 + 33] = 21  # green, (1, 1)
    row[2048 + 1023] = 31  # blue, (31, 31)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        folder.mkdir(exist_ok=True)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": row[None], b"labels": [3]}, f, protocol=2)
    img = load("cifar10", "test", root=tmp_path).images[0]
    assert (img[0, 0, 0], img[0, 0, 1], img[0, 1, 0], img[1, 1, 1], img[2, 31, 31]) == (11, 12, 13, 21, 31)
    assert int(img.sum()) == 11 + 12 + 13 + 21 + 31


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_batches(folder, per_batch=1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load global"):
        load("cifar10", "test", root=tmp_path)


def test_cifar_jpeg_npz_and_caches(tmp_path):
    npz = tmp_path / "data" / "cifar10" / "cifar10_train_jpeg.npz"
    truth, labels = make_cifar_jpeg_npz(npz, n=6)
    cache = tmp_path / "cache"

    part = load("cifar10", root=tmp_path / "data", limit=2)  # a prefix: decoded directly, nothing cached
    np.testing.assert_array_equal(part.images.numpy(), truth[:2].transpose(0, 3, 1, 2))
    assert not list(cache.glob("*.npy"))

    ds = load("cifar10", root=tmp_path / "data")
    assert ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(ds.images.numpy(), truth.transpose(0, 3, 1, 2))
    files = list(cache.glob("cifar10_train_jpeg-*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    np.testing.assert_array_equal(np.load(files[0]), truth)

    # memory cache: a second load does not touch the disk cache
    files[0].unlink()
    np.testing.assert_array_equal(load("cifar10", root=tmp_path / "data").images.numpy(), ds.images.numpy())
    assert not files[0].exists()

    # corrupt / partial disk cache files are ignored and rebuilt
    datasets.clear_memory_cache()
    load("cifar10", root=tmp_path / "data")
    good = files[0].read_bytes()
    for corrupt in (good[: len(good) // 2], b"garbage", b""):
        files[0].write_bytes(corrupt)
        datasets.clear_memory_cache()
        again = load("cifar10", root=tmp_path / "data")
        np.testing.assert_array_equal(again.images.numpy(), truth.transpose(0, 3, 1, 2))
        assert files[0].read_bytes() == good
    # a well-formed cache of the wrong shape is ignored too
    np.save(files[0], np.zeros((5, 32, 32, 3), np.uint8))
    datasets.clear_memory_cache()
    np.testing.assert_array_equal(load("cifar10", root=tmp_path / "data").images.numpy(), ds.images.numpy())

    # with a disk cache present, a limited load reads it instead of decoding
    datasets.clear_memory_cache()
    np.testing.assert_array_equal(load("cifar10", root=tmp_path / "data", limit=3).labels.numpy(), labels[:3])


def test_cifar_disk_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ELSFAST_CACHE", "off")
    assert datasets.cache_dir() is None
    truth, _ = make_cifar_jpeg_npz(tmp_path / "cifar10" / "cifar10_test_jpeg.npz", n=3)
    ds = load("cifar10", "test", root=tmp_path)
    np.testing.assert_array_equal(ds.images.numpy(), truth.transpose(0, 3, 1, 2))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none", "false", "no", "", "  Off "])
def test_cache_dir_off_values(monkeypatch, value):
    from elsfast.common.cache import cache_dir

    monkeypatch.setenv("ELSFAST_CACHE", value)
    assert cache_dir() is None and cache_dir("indexes") is None


def test_cache_dir_locations(tmp_path, monkeypatch):
    from elsfast.common.cache import cache_dir

    monkeypatch.setenv("ELSFAST_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir("indexes") == tmp_path / "c" / "indexes"
    assert datasets.cache_dir is cache_dir
    monkeypatch.delenv("ELSFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("indexes") == tmp_path / "xdg" / "elsfast" / "indexes"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "elsfast"
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="kind"):
            cache_dir(bad)


@pytest.mark.parametrize("setting", ["off", "folder"])
def test_one_cache_policy_for_decoded_datasets_and_topk_indexes(tmp_path, monkeypatch, setting):
    """ELSFAST_CACHE=off: neither the CIFAR-10 JPEG decode nor a top-k index writes anything (not even a relative
    folder named 'off' in the working directory); ELSFAST_CACHE=DIR: both write under DIR, nowhere else."""
    pytest.importorskip("faiss")
    import elsfast
    from elsfast.reduce import TopK

    make_cifar_jpeg_npz(tmp_path / "data" / "cifar10" / "cifar10_test_jpeg.npz", n=3)
    cwd, home, cache = tmp_path / "cwd", tmp_path / "home", tmp_path / "cache"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("ELSFAST_CACHE", "off" if setting == "off" else str(cache))

    load("cifar10", "test", root=tmp_path / "data")
    train = torch.randint(0, 256, (30, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    backend = TopK(k=4, index="flat", min_entries=1, min_pass_fraction=0.0, progress=False)
    machine = elsfast.ScoreMachine(train, backend=backend)
    machine.denoise(to_float(train[:2]), 0.9999, 3)
    assert machine.last_stats.approximate_queries > 0  # an index was built (and saved, when there is a cache)

    assert list(cwd.iterdir()) == [] and not home.exists()
    if setting == "off":
        assert not cache.exists()
    else:
        files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
        assert [f for f in files if "/" not in f and f.endswith(".npy")], files  # the decoded CIFAR-10 copy
        assert [f for f in files if f.startswith("indexes/") and f.endswith(".faissidx")], files
        assert all(f.endswith(".npy") or f.startswith("indexes/") for f in files), files


def test_cifar_pickle_preferred_over_jpeg(tmp_path):
    (train_x, _), _ = make_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=2)
    make_cifar_jpeg_npz(tmp_path / "cifar10" / "cifar10_train_jpeg.npz", n=4)
    np.testing.assert_array_equal(load("cifar10", root=tmp_path).images.numpy(), train_x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------
# the real datasets (skipped when ../shared/data is absent)

REAL_DATA = Path(os.environ.get("ELSFAST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def _real_root(sub: str) -> Path:
    if not (REAL_DATA / sub).is_dir():
        pytest.skip(
            f"real dataset folder {REAL_DATA / sub} not found "
            "(point ELSFAST_DATA at a data root holding it to run this test)"
        )
    return REAL_DATA


def test_real_mnist():
    root = _real_root("mnist")
    ds = load("mnist", root=root)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert torch.bincount(ds.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test = load("mnist", "test", root=root, limit=5)
    assert test.images.shape == (5, 1, 28, 28) and test.labels.tolist() == [7, 2, 1, 0, 4]
    # the embedded subset is exactly MNIST's images at its source indices
    emb = load("mnist-embedded")
    with np.load(datasets.EMBEDDED_MNIST_PATH) as z:
        idx = torch.from_numpy(z["source_index"].astype(np.int64))
    assert torch.equal(ds.images[idx], emb.images) and torch.equal(ds.labels[idx], emb.labels)


def test_real_fashion_mnist():
    root = _real_root("fashion-mnist")
    ds = load("fashion-mnist", root=root)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.num_classes == 10
    assert load("fashion-mnist", "test", root=root).images.shape == (10000, 1, 28, 28)


def test_real_faces():
    ds = load("faces", root=_real_root("faces"))
    assert ds.images.shape == (13233, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (13233,) and ds.num_classes == 5749


@pytest.mark.slow
def test_real_cifar10(monkeypatch):
    root = _real_root("cifar10")
    monkeypatch.setenv("ELSFAST_CACHE", "off")  # no 180 MB disk cache for a one-off test
    train = load("cifar10", root=root)
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    test = load("cifar10", "test", root=root)
    assert test.images.shape == (10000, 3, 32, 32)
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # a limited load (decoded directly: no memory or disk cache) agrees with the cached full decode
    datasets.clear_memory_cache()
    assert torch.equal(load("cifar10", "test", root=root, limit=8).images, test.images[:8])
    # channel order: CIFAR's first training image (a frog) is warmer (red) than blue on average
    img = train.images[0].float()
    assert img[0].mean() > img[2].mean()
