import dataclasses
from pathlib import Path

import pytest
import torch

from elsfast.common.schedules import abar_cosine_legacy
from elsfast.nets.models import ResNet
from elsfast.nets.train import (
    TrainConfig,
    abar_table,
    diffusion_loss,
    load_checkpoint,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=16, size=8, seed=0):
    """Smooth-ish random uint8 images: vertical and horizontal bars at random positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    rows = torch.randint(0, size, (n,), generator=g)
    cols = torch.randint(0, size, (n,), generator=g)
    for i in range(n):
        x[i, 0, rows[i], :] = 255
        x[i, 0, :, cols[i]] = 200
    labels = torch.arange(n) % 3
    return x, labels


def _config(tmp_path, name="model.pt", **kw):
    base = {"dataset": "bars", "channels": 16, "blocks": 2, "batch_size": 6, "out": str(tmp_path / name)}
    return TrainConfig(**{**base, **kw})


def test_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.batch_size, c.lr, c.lr_decay, c.epochs, c.schedule) == (128, 1e-4, 0.999965, 300, "cosine-legacy")


def test_abar_table_is_the_legacy_cosine_on_the_1000_step_grid():
    table = abar_table()
    assert table.shape == (1000,)
    assert table[0] == 1.0
    assert table[500].item() == pytest.approx(abar_cosine_legacy(0.5))


def test_a_few_steps_decrease_the_loss(tmp_path):
    images, _ = _images(32)
    x0 = images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(123)
    k = torch.randint(0, 1000, (4, 32), generator=g)
    noise = torch.randn(4, *x0.shape, generator=g)

    def fixed_loss(model):
        with torch.no_grad():
            return sum(float(diffusion_loss(model, x0, k[i], noise[i])) for i in range(4)) / 4

    config = _config(tmp_path, batch_size=8, lr=1e-3, max_steps=0)
    assert train(config, images=images, progress=False)["steps"] == 0
    before = fixed_loss(load_checkpoint(config.out)[0])
    summary = train(dataclasses.replace(config, max_steps=30), images=images, resume=True, progress=False)
    assert summary["steps"] == 30 and summary["finished"]
    after = fixed_loss(load_checkpoint(config.out)[0])
    assert after < 0.8 * before


def test_resume_equals_an_uninterrupted_run(tmp_path):
    images, labels = _images(16)
    # 16 images in batches of 6: 3 steps per epoch with a short last batch; stop mid-epoch at step 5.
    full = _config(tmp_path, "full.pt", max_steps=10, conditional=True, checkpoint_every=4)
    summary = train(full, images=images, labels=labels, progress=False)
    assert summary == {**summary, "steps": 10, "epoch": 3, "finished": True}

    part = _config(tmp_path, "part.pt", max_steps=5, conditional=True, checkpoint_every=4)
    assert train(part, images=images, labels=labels, progress=False)["finished"]
    resumed = dataclasses.replace(part, max_steps=10)
    assert train(resumed, images=images, labels=labels, resume=True, progress=False)["steps"] == 10

    _, _, a = load_checkpoint(full.out)
    _, config, b = load_checkpoint(part.out)
    assert config["model"]["num_classes"] == 3 and config["max_steps"] == 10
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-6, rtol=0)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(pa["exp_avg_sq"], pb["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 10
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])


def test_resume_refuses_a_different_setup(tmp_path):
    images, _ = _images(8)
    config = _config(tmp_path, max_steps=1)
    train(config, images=images, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(dataclasses.replace(config, lr=1e-3, max_steps=2), images=images, resume=True, progress=False)
    with pytest.raises(ValueError, match="different images"):
        train(dataclasses.replace(config, max_steps=2), images=_images(8, seed=1)[0], resume=True, progress=False)


def test_checkpoint_is_plain_and_loads_with_weights_only(tmp_path):
    images, _ = _images(8)
    config = _config(tmp_path, max_steps=2)
    train(config, images=images, progress=False)
    ckpt = torch.load(config.out, weights_only=True)
    assert ckpt["format"] == "elsfast-checkpoint" and ckpt["step"] == 2
    model, conf, _ = load_checkpoint(config.out)
    assert isinstance(model, ResNet) and not model.training
    assert conf["model"]["channels"] == 16 and conf["dataset"] == "bars"


def test_bad_checkpoints_raise_a_clear_error(tmp_path):
    images, _ = _images(8)
    config = _config(tmp_path, max_steps=1)
    train(config, images=images, progress=False)
    data = Path(config.out).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path in (truncated, garbage, foreign):
        with pytest.raises(ValueError, match=path.name) as err:
            load_checkpoint(path)
        assert "not a usable elsfast checkpoint" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="truncated"):
        train(dataclasses.replace(config, out=str(truncated)), images=images, resume=True, progress=False)


def test_conditional_training_needs_labels(tmp_path):
    images, _ = _images(8)
    with pytest.raises(ValueError, match="labels"):
        train(_config(tmp_path, conditional=True, max_steps=1), images=images, progress=False)


def test_trains_on_the_embedded_mnist_subset(tmp_path):
    config = _config(tmp_path, dataset="mnist-embedded", limit=12, pad_to=32, arch="unet", channels=[4, 8, 8])
    for conditional, num_classes, labels in ((False, None, None), (True, 10, torch.tensor([1]))):
        run = dataclasses.replace(config, max_steps=2, conditional=conditional)
        summary = train(run, overwrite=conditional, progress=False)  # the second run replaces the first's file
        assert summary["steps"] == 2 and summary["loss"] > 0
        model, conf, _ = load_checkpoint(config.out)
        assert conf["model"]["arch"] == "unet" and conf["model"]["num_classes"] == num_classes
        assert model(torch.zeros(1, 1, 32, 32), torch.tensor([0.5]), labels).shape == (1, 1, 32, 32)


def test_an_existing_checkpoint_is_never_replaced_without_resume_or_overwrite(tmp_path):
    images, _ = _images(8)
    config = _config(tmp_path, max_steps=1)
    train(config, images=images, progress=False)
    trained = Path(config.out).read_bytes()
    with pytest.raises(FileExistsError, match=r"model\.pt already exists \(it looks like an elsfast network"):
        train(config, images=images, progress=False)
    assert Path(config.out).read_bytes() == trained
    with pytest.raises(ValueError, match="exclude each other"):
        train(config, images=images, resume=True, overwrite=True, progress=False)
    assert train(dataclasses.replace(config, seed=1), images=images, overwrite=True, progress=False)["steps"] == 1
    assert Path(config.out).read_bytes() != trained
    foreign = tmp_path / "notes.pt"
    foreign.write_bytes(b"my notes")
    with pytest.raises(FileExistsError, match="unknown format"):
        train(dataclasses.replace(config, out=str(foreign)), images=images, progress=False)
    assert foreign.read_bytes() == b"my notes"


def test_checkpoints_with_the_old_data_hash_still_resume(tmp_path):
    """Before one training-set hash, a checkpoint recorded the SHA-256 of the float images' bytes alone."""
    import hashlib

    from elsfast.common.pixels import to_float

    images, _ = _images(8)
    config = _config(tmp_path, max_steps=1)
    train(config, images=images, progress=False)
    ckpt = torch.load(config.out, weights_only=True)
    assert ckpt["data"]["sha256"] != hashlib.sha256(to_float(images).numpy().tobytes()).hexdigest()
    ckpt["data"]["sha256"] = hashlib.sha256(to_float(images).numpy().tobytes()).hexdigest()
    torch.save(ckpt, config.out)
    resumed = train(dataclasses.replace(config, max_steps=2), images=images, resume=True, progress=False)
    assert resumed["steps"] == 2 and resumed["seconds"] < resumed["total_seconds"]  # one step was saved
    with pytest.raises(ValueError, match="different images"):
        train(dataclasses.replace(config, max_steps=3), images=_images(8, seed=1)[0], resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- issue 27


def test_checkpoints_every_few_minutes_of_wall_time(tmp_path, monkeypatch):
    """Issue 27: besides every `checkpoint_every` steps, a checkpoint is written once `checkpoint_minutes` of wall
    time have passed since the last one (0: off)."""
    import elsfast.nets.train as training

    writes = []
    real = training.atomic_write
    monkeypatch.setattr(training, "atomic_write", lambda *a, **k: writes.append(1) or real(*a, **k))
    images, _ = _images(8)
    base = _config(tmp_path, max_steps=4, checkpoint_every=0)
    train(dataclasses.replace(base, checkpoint_minutes=0), images=images, progress=False)
    assert len(writes) == 1  # only at the end
    writes.clear()
    train(dataclasses.replace(base, checkpoint_minutes=1e-9), images=images, overwrite=True, progress=False)
    assert len(writes) == 4  # after steps 1, 2, 3 (the time is up at once) and at the end
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        train(dataclasses.replace(base, checkpoint_minutes=-1), images=images, overwrite=True, progress=False)


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_writes_the_checkpoint_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    """Issue 27: SIGINT during the loop stops it between two steps and writes the checkpoint (stopped
    "interrupted") before the KeyboardInterrupt; resumed, the run ends with an uninterrupted run's weights."""
    import os
    import signal

    import elsfast.nets.train as training

    images, labels = _images(16)
    full = _config(tmp_path, "full.pt", max_steps=6, conditional=True, checkpoint_every=0, checkpoint_minutes=0)
    train(full, images=images, labels=labels, progress=False)

    calls = []
    real = training.diffusion_loss

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", loss_then_ctrl_c)
    part = dataclasses.replace(full, out=str(tmp_path / "part.pt"))
    with pytest.raises(KeyboardInterrupt):
        train(part, images=images, labels=labels, progress=False)
    monkeypatch.undo()
    summary = training.checkpoint_summary(part.out)
    assert summary["steps"] == 3 and summary["stopped"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    assert train(part, images=images, labels=labels, resume=True, progress=False)["steps"] == 6
    a, b = torch.load(full.out, weights_only=True)["model"], torch.load(part.out, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_progress_bar_shows_the_time_limit_that_will_stop_it(tmp_path, capsys):
    """Issue 27: a time-limited run far from its last step counts towards the time limit, says so, and says when."""
    images, _ = _images(8)
    config = _config(tmp_path, epochs=10_000, max_minutes=0.02, checkpoint_every=0)
    done = train(config, images=images, progress=True)
    err = capsys.readouterr().err
    assert done["stopped"] == "time limit" and not done["finished"]
    assert "training (time limit 0.02 min)" in err and "time limit in" in err, err
    assert training_total(err) < done["total_steps"]


def training_total(err: str) -> int:
    """The total of the last progress-bar line in `err` ("... 37/52 ...")."""
    import re

    return int(re.findall(r"\d+/(\d+)", err)[-1])


def test_train_checks_its_folder_before_loading_anything(tmp_path):
    """Issue 27: an --out under a file (no folder can be made there) fails before the data is loaded."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    config = TrainConfig(dataset="no-such-dataset", out=str(blocker / "n.pt"))
    with pytest.raises(NotADirectoryError, match="not a folder"):
        train(config, progress=False)
