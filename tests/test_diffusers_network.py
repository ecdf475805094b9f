"""A diffusers model directory as the network of `calibrate`, `compare` and `reproduce`
(`elsfast.integrations.diffusers_network`): loading, the exact conversion of epsilon / sample / v outputs, the
schedule and timestep convention, refusals, and the research commands end to end on tiny random-weight models
(attention blocks included), through the API and the command line."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from elsfast import ScoreMachine
from elsfast.cli import main
from elsfast.common.schedules import x0_from_eps
from elsfast.integrations.diffusers import DIFFUSERS_UNAVAILABLE
from elsfast.integrations.diffusers_network import (
    DiffusersNetwork,
    TimestepSchedule,
    is_network_spec,
    load_diffusers_network,
)
from elsfast.integrations.scheduler_levels import convert_prediction, eps_from_prediction, table_abar
from elsfast.research.calibrate import calibrate
from elsfast.research.compare import compare, load_results
from elsfast.research.reproduce import Preset, reproduce

if not DIFFUSERS_UNAVAILABLE:
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel


pytestmark = pytest.mark.skipif(
    bool(DIFFUSERS_UNAVAILABLE), reason=f"diffusers cannot be used ({DIFFUSERS_UNAVAILABLE})"
)

SIZE = 8  # images 1 x 8 x 8


def tiny_unet(classes: int | None = None, seed: int = 0, channels: int = 1, size: int = SIZE, **extra):
    """A two-level UNet2DModel with self-attention at the lower resolution, random weights."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=classes,
        **extra,
    ).eval()


def trained_betas() -> list[float]:
    """A schedule given as betas: 1,000 values rising geometrically from 2e-4 to 0.03."""
    return np.geomspace(2e-4, 0.03, 1000).tolist()


def scheduler(schedule: str = "linear", prediction: str = "epsilon", **extra):
    betas = {"trained_betas": trained_betas()} if schedule == "trained_betas" else {"beta_schedule": schedule}
    return DDIMScheduler(
        **betas,
        prediction_type=prediction,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        **extra,
    )


def save_pipeline(path, unet, sched):
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


def training_set(n: int = 12, classes: int | None = None, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1
    labels = None if classes is None else torch.arange(n) % classes
    return images, labels


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("layout", ["pipeline", "unet-of-pipeline", "model-with-scheduler-config"])
def test_load_round_trip_gives_the_in_memory_models_outputs(tmp_path, layout):
    unet, sched = tiny_unet(classes=3), scheduler("scaled_linear")
    if layout == "model-with-scheduler-config":
        unet.save_pretrained(tmp_path / "m")
        sched.save_pretrained(tmp_path / "m")
        spec = f"diffusers:{tmp_path / 'm'}"
    else:
        save_pipeline(tmp_path / "p", unet, sched)
        spec = f"diffusers:{tmp_path / 'p'}" + ("/unet" if layout == "unet-of-pipeline" else "")
    net = load_diffusers_network(spec)
    assert net.image_shape == (1, SIZE, SIZE) and net.conditional and net.num_classes == 3
    assert net.prediction_type == "epsilon"
    assert torch.equal(net.schedule.alphas_cumprod, sched.alphas_cumprod.double())
    assert net.tag.startswith(f"diffusers:{tmp_path}") and "module-sha256:" in net.tag
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    abar = net.schedule(0.4)  # t = 0.4: timestep 399
    with torch.no_grad():
        expected = unet(x, torch.tensor([399, 399]), class_labels=labels).sample
    assert torch.equal(net(x, abar, labels), expected)
    # another network (other weights) has another tag
    other = save_pipeline(tmp_path / "q", tiny_unet(classes=3, seed=1), sched)
    assert load_diffusers_network(other).tag.split("module-sha256:")[1] != net.tag.split("module-sha256:")[1]


def test_a_model_without_a_scheduler_assumes_diffusers_default_ddpm_schedule(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="DDPMScheduler"):
        net = load_diffusers_network(tmp_path / "m")
    assert torch.equal(net.schedule.alphas_cumprod, DDPMScheduler().alphas_cumprod.double())
    # or the scheduler given explicitly, as an object or a directory
    scheduler("squaredcos_cap_v2").save_pretrained(tmp_path / "s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = load_diffusers_network(tmp_path / "m", scheduler=tmp_path / "s")
    assert torch.equal(given.schedule.alphas_cumprod, scheduler("squaredcos_cap_v2").alphas_cumprod.double())


# ------------------------------------------------------------------------------------------------ conversions


CASES = [(s, "epsilon") for s in ("linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas")]
CASES += [("squaredcos_cap_v2", p) for p in ("sample", "v_prediction")] + [("linear", "v_prediction")]


@pytest.mark.parametrize(("schedule", "prediction"), CASES)
def test_one_ddim_step_with_the_converted_eps_is_diffusers_ddim_step(schedule, prediction):
    """At every step of a 10-step DDIM run (eta 0, trailing spacing: timesteps 999, 899, ..., 99), elsfast's DDIM
    update with the network's eps (converted in float64 from the model's float32 output) equals diffusers'
    `DDIMScheduler.step` from the same state. diffusers computes in float32: the tolerance is 1e-6 * max(1, |x|)
    (about 16 float32 units in the last place; measured at most 2.1e-7)."""
    unet, sched = tiny_unet(classes=2), scheduler(schedule, prediction)
    net = DiffusersNetwork(unet, sched)
    n = 10
    sched.set_timesteps(n)
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 0])
    fed = []
    hook = unet.register_forward_pre_hook(lambda module, args: fed.append(args[1]))
    with torch.no_grad():
        for k, timestep in enumerate(sched.timesteps):
            i = n - k  # elsfast's grid index of this step: t = i / n
            abar, abar_prev = net.schedule(i / n), net.schedule((i - 1) / n)
            assert abar == float(sched.alphas_cumprod[int(timestep)])
            reference = sched.step(unet(x, timestep, class_labels=labels).sample, timestep, x, eta=0.0).prev_sample
            eps = net(x.double(), abar, labels)
            assert fed[-1].dtype == torch.int64 and torch.equal(fed[-1], torch.full((2,), int(timestep)))
            x0 = x0_from_eps(x.double(), eps, abar)
            mine = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps  # elsfast's DDIM update
            tolerance = 1e-6 * max(1.0, reference.abs().max().item())
            assert (mine - reference).abs().max().item() <= tolerance, (k, schedule, prediction)
            x = reference
    hook.remove()
    assert abar_prev == 1.0  # the last update lands on the clean image, as set_alpha_to_one=True


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_eps_from_prediction_inverts_convert_prediction(prediction):
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, 4, 4, generator=g).double()
    for abar in (0.999, 0.3, 1e-4):
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        out = convert_prediction(x, x0, abar, prediction)
        torch.testing.assert_close(eps_from_prediction(x, out, abar, prediction), eps, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        eps_from_prediction(x, x0, 0.5, "flow")


# ------------------------------------------------------------------------------------------------ schedule


def test_schedule_puts_every_step_on_a_training_timestep():
    alphas = scheduler("linear").alphas_cumprod
    schedule = TimestepSchedule(alphas, "linear")
    table = alphas.double().tolist()
    assert schedule(0.0) == 1.0 and schedule.timestep(0.0) == -1  # the clean image, never evaluated
    assert schedule(1.0) == table[999] and schedule.timestep(1.0) == 999  # the largest timestep at t = 1
    for steps in (20, 150, 7):
        for i in range(1, steps + 1):
            j = min(999, max(0, math.floor(i / steps * 1000 + 0.5) - 1))  # t N rounded half up, minus one
            assert schedule.timestep(i / steps) == j and schedule(i / steps) == table[j]
            fed = schedule.timestep_of_abar(schedule(i / steps))  # the network gets that very (integer) timestep
            assert isinstance(fed, int) and fed == j
    assert [schedule.timestep(i / 20) for i in (1, 2, 19)] == [49, 99, 949]
    assert schedule.timestep(0.0001) == 0  # any t > 0 is a noisy step
    assert "linear" in repr(schedule) and "N=1000" in repr(schedule)


def test_other_schedules_feed_fractional_timesteps_with_the_same_abar():
    """On another schedule (the caller's explicit choice) abar falls between training timesteps: the network gets
    the fractional timestep whose interpolated noise level (diffusers' Euler convention) is that abar."""
    sched = scheduler("scaled_linear")
    schedule = TimestepSchedule(sched.alphas_cumprod, "scaled_linear")
    for abar in (0.99, 0.5, 0.01, float(sched.alphas_cumprod[-1])):
        step = schedule.timestep_of_abar(abar)
        assert math.isclose(table_abar(sched, step), abar, rel_tol=1e-12)
    assert isinstance(schedule.timestep_of_abar(0.5), float)
    with pytest.raises(ValueError, match="outside the network's noise levels"):
        schedule.timestep_of_abar(0.99999)  # above alphas_cumprod[0] = 1 - 8.5e-4


# ------------------------------------------------------------------------------------------------ refusals


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers model directory"):
        load_diffusers_network(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model directory"):
        load_diffusers_network(tmp_path / "empty")
    scheduler().save_pretrained(tmp_path / "sched")  # a scheduler, not a model
    (tmp_path / "sched" / "config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match="not a diffusers UNet2DModel"):
        load_diffusers_network(tmp_path / "sched")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_diffusers_network(tmp_path / "garbage")
    pipe = save_pipeline(tmp_path / "p", tiny_unet(), scheduler())
    config = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "flow"}))
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        load_diffusers_network(pipe)
    with pytest.raises(ValueError, match="learned time embedding"):
        learned = DiffusersNetwork(tiny_unet(time_embedding_type="learned", num_train_timesteps=1000), scheduler())
        learned(torch.zeros(1, 1, SIZE, SIZE), 0.5)
    with pytest.raises(ValueError, match="no sample_size"):
        DiffusersNetwork(UNet2DModel(**{**tiny_unet().config, "sample_size": None}), scheduler())
    with pytest.raises(ValueError, match="output channels"):
        DiffusersNetwork(UNet2DModel(**{**tiny_unet().config, "out_channels": 2}), scheduler())
    net = DiffusersNetwork(tiny_unet(classes=3), scheduler())
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 8, 8\]"):
        net(torch.zeros(1, 1, 16, 16), net.schedule(0.5), torch.tensor([0]))
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        net(torch.zeros(1, 1, SIZE, SIZE), net.schedule(0.5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        net(torch.zeros(1, 1, SIZE, SIZE), net.schedule(0.5), torch.tensor([3]))
    assert is_network_spec("diffusers:x") and not is_network_spec("x.pt")


def test_research_refuses_a_network_that_does_not_fit(tmp_path):
    net = DiffusersNetwork(tiny_unet(classes=3), scheduler())
    images, labels = training_set(classes=3)
    big = ScoreMachine(torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4) % 3)
    with pytest.raises(ValueError, match=r"takes images of shape \(1, 8, 8\)"):
        calibrate(net, big, sizes=(3,), seeds=range(1), steps=3, progress=False)
    with pytest.raises(ValueError, match="is class-conditional and the run is unconditional"):
        calibrate(net, ScoreMachine(images), sizes=(3,), seeds=range(1), steps=3, progress=False)
    with pytest.raises(ValueError, match="knows 3 classes"):
        compare(net, images, torch.arange(12) % 5, out_dir=tmp_path / "r", seeds=[0], steps=3, progress=False)
    with pytest.raises(ValueError, match="must be a spec 'diffusers:DIR'"):
        calibrate("some/dir", ScoreMachine(images, labels), sizes=(3,), progress=False)


# ------------------------------------------------------------------------------------------------ end to end


def test_calibrate_and_compare_run_on_the_networks_schedule(tmp_path):
    pipe = save_pipeline(tmp_path / "p", tiny_unet(classes=3), scheduler("squaredcos_cap_v2", "v_prediction"))
    net = load_diffusers_network(pipe)
    images, labels = training_set(classes=3)
    fed = []
    net.unet.register_forward_pre_hook(lambda module, args: fed.append(args[1][0].item()))
    machine = ScoreMachine(images, labels)
    result = calibrate(net, machine, sizes=(3, 5), seeds=range(2), steps=4, progress=False)
    assert fed == [749, 499, 249]  # t = 3/4, 2/4, 1/4 on 1,000 timesteps, the two seeds batched
    assert result.schedule == repr(net.schedule) and result.network == net.tag
    assert len(result.scales) == 4 and set(result.scales) <= {3, 5}

    # the same through a spec string; compare records the network's schedule and tag, and refuses another network
    fed.clear()
    report = compare(
        f"diffusers:{pipe}", images, labels, out_dir=tmp_path / "r", scales=3, seeds=[0, 1], steps=4, progress=False
    )
    config = load_results(tmp_path / "r")["config"]
    assert config["schedule"] == repr(net.schedule) and config["network"] == net.tag
    assert report["computed"] == 2 and all(0 < abs(row["r"]["els"]) <= 1 for row in report["rows"])
    other = save_pipeline(tmp_path / "q", tiny_unet(classes=3, seed=1), scheduler("squaredcos_cap_v2", "v_prediction"))
    with pytest.raises(ValueError, match="another configuration"):
        compare(
            f"diffusers:{other}",
            images,
            labels,
            out_dir=tmp_path / "r",
            scales=3,
            seeds=[0, 1],
            steps=4,
            progress=False,
        )


def test_an_explicit_schedule_is_used_and_recorded(tmp_path):
    net = DiffusersNetwork(tiny_unet(), scheduler("linear"))
    images, _ = training_set()
    fed = []
    net.unet.register_forward_pre_hook(lambda module, args: fed.append(args[1][0].item()))
    result = calibrate(net, ScoreMachine(images), sizes=(3,), seeds=[0], steps=3, schedule="cosine", progress=False)
    assert result.schedule == "cosine" and all(isinstance(v, float) for v in fed)  # fractional timesteps
    with pytest.raises(ValueError, match="outside the network's noise levels"):  # abar(1/400) > alphas_cumprod[0]
        calibrate(net, ScoreMachine(images), sizes=(3,), seeds=[0], steps=400, schedule="cosine-legacy", progress=False)


def test_reproduce_with_a_given_network_skips_training(tmp_path):
    from elsfast.nets.train import TrainConfig

    npz = tmp_path / "data.npz"
    images, labels = training_set(n=10, classes=2)
    np.savez(npz, images=((images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), labels=labels.numpy())
    preset = Preset(
        train=TrainConfig(dataset=str(npz), conditional=True),
        sizes=(3, 5),
        calibration_seeds=2,
        comparison_seeds=2,
        steps=3,
    )
    pipe = save_pipeline(tmp_path / "p", tiny_unet(classes=2), scheduler("linear", "sample"))
    summary = reproduce(preset, tmp_path / "out", network=f"diffusers:{pipe}", progress=False)
    net = load_diffusers_network(pipe)
    assert summary["network"] == net.tag and summary["training"] is None and summary["conditional"]
    assert not (tmp_path / "out" / "network.pt").exists()
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["network"] == net.tag
    assert summary["summary"]["els"]["n"] == 2
    three = save_pipeline(tmp_path / "three", tiny_unet(classes=3), scheduler())
    with pytest.raises(ValueError, match="has 3 classes"):
        reproduce(preset, tmp_path / "out3", network=f"diffusers:{three}", progress=False)


def test_cli_calibrate_compare_reproduce_with_network(tmp_path, capsys):
    npz = tmp_path / "data.npz"
    images, labels = training_set(n=10, classes=3)
    np.savez(npz, images=((images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), labels=labels.numpy())
    pipe = save_pipeline(tmp_path / "p", tiny_unet(classes=3), scheduler("scaled_linear", "epsilon"))
    args = ["--network", f"diffusers:{pipe}", "--dataset", str(npz), "--device", "cpu", "-q"]
    calib = tmp_path / "calib.json"
    assert main(["calibrate", *args, "--sizes", "3", "5", "--seeds", "2", "--steps", "3", "--out", str(calib)]) == 0
    saved = json.loads(calib.read_text())
    assert saved["network"].startswith(f"diffusers:{pipe}") and saved["schedule"].startswith("diffusers-timesteps(")
    report = tmp_path / "report"
    argv = ["compare", *args, "--scales", str(calib), "--seeds", "2", "--steps", "3", "--out-dir", str(report)]
    assert main(argv) == 0
    assert "ELS: median Pearson r" in capsys.readouterr().out
    assert load_results(report)["config"]["network"] == saved["network"]
    # departure re-runs the machine on the network's schedule: found from the directory results.json names
    assert main(["departure", str(report), "--dataset", str(npz), "-q"]) == 0
    assert "bit for bit on 2" in capsys.readouterr().out
    other = save_pipeline(tmp_path / "o", tiny_unet(classes=3), scheduler("linear", "epsilon"))
    assert main(["departure", str(report), "--dataset", str(npz), "--network", f"diffusers:{other}", "-q"]) == 2
    assert "but the comparison ran on diffusers-timesteps(scaled_linear" in capsys.readouterr().err
    # refusals: both or neither of --checkpoint / --network, --network without --dataset, a non-spec, a shape the
    # preset's data does not have (mnist-small: 28 x 28 digits), a network that is not there
    assert main(["calibrate", *args, "--checkpoint", "x.pt", "--out", str(tmp_path / "c.json")]) == 2
    assert main(["calibrate", "--out", str(tmp_path / "c.json")]) == 2
    assert main(["calibrate", "--network", f"diffusers:{pipe}", "--out", str(tmp_path / "c.json")]) == 2
    assert main(["compare", "--network", str(pipe), "--out-dir", str(tmp_path / "r2")]) == 2
    assert main(["compare", "--checkpoint", "x.pt", "--dataset", str(npz), "--out-dir", str(tmp_path / "r3")]) == 2
    assert main(["reproduce", "mnist-small", "--network", f"diffusers:{pipe}", "--out-dir", str(tmp_path / "m")]) == 2
    missing = ["--network", f"diffusers:{tmp_path / 'none'}", "--dataset", str(npz)]
    assert main(["calibrate", *missing, "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and "one of the arguments --checkpoint --network is required" in err
    assert "--network needs --dataset" in err and "expected diffusers:DIR" in err
    assert "a --checkpoint names its own training data" in err
    assert "takes images of shape (1, 8, 8)" in err and "no diffusers model directory" in err
    assert "Traceback" not in err
