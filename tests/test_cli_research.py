"""`elsfast train`, `calibrate`, `compare` and `reproduce` end to end on tiny problems."""

import json
import sys

import pytest

from elsfast.cli import main


def test_train_calibrate_compare(tmp_path, capsys):
    ckpt = tmp_path / "net.pt"
    data = ["--dataset", "mnist-embedded", "--limit", "30"]
    net = ["--channels", "8", "--blocks", "1", "--batch-size", "8", "--conditional", "--device", "cpu", "-q"]
    assert main(["train", *data, *net, "--max-steps", "2", "--out", str(ckpt)]) == 0
    assert "trained 2/2 steps" in capsys.readouterr().out
    assert main(["train", *data, *net, "--max-steps", "3", "--out", str(ckpt), "--resume"]) == 0
    assert "trained 3/3 steps" in capsys.readouterr().out

    calib = tmp_path / "calib.json"
    args = ["--checkpoint", str(ckpt), "--device", "cpu", "-q"]
    assert main(["calibrate", *args, "--sizes", "1", "3", "--seeds", "2", "--steps", "3", "--out", str(calib)]) == 0
    assert calib.exists() and calib.with_suffix(".png").exists()
    assert len(json.loads(calib.read_text())["scales"]) == 3
    capsys.readouterr()

    # without matplotlib the calibration is still computed and written; the plot is skipped, saying why
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
            mp.delitem(sys.modules, name)
        mp.setitem(sys.modules, "matplotlib", None)
        bare = tmp_path / "bare.json"
        assert main(["calibrate", *args, "--sizes", "1", "3", "--seeds", "1", "--steps", "3", "--out", str(bare)]) == 0
    out = capsys.readouterr().out
    assert bare.exists() and not bare.with_suffix(".png").exists()
    assert "skipped" in out and "pip install elsfast[plots]" in out
    code = main(["calibrate", *args, "--seeds", "1", "--steps", "3", "--out", str(bare), "--plot", "p.jpg"])
    assert code == 2 and ".svg" in capsys.readouterr().err

    attentive = tmp_path / "sa.pt"
    sa = ["--arch", "unet-sa", "--channels", "4,8", "--pad-to", "32", "--max-steps", "1"]
    assert main(["train", *data, *sa, "--batch-size", "4", "--device", "cpu", "-q", "--out", str(attentive)]) == 0
    from elsfast.nets.train import load_checkpoint

    assert load_checkpoint(attentive)[1]["model"]["attention"] == [1]
    capsys.readouterr()

    report = tmp_path / "report"
    assert (
        main(["compare", *args, "--scales", str(calib), "--seeds", "2", "--steps", "3", "--out-dir", str(report)]) == 0
    )
    out = capsys.readouterr().out
    assert "ELS: median Pearson r" in out and (report / "summary.md").exists()


def test_research_commands_reject_bad_input(tmp_path, capsys):
    assert main(["calibrate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", "x.json"]) == 2
    assert main(["compare", "--checkpoint", "x.pt", "--machines", "els,xyz", "--out-dir", str(tmp_path)]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["compare", "--checkpoint", str(bad), "--out-dir", str(tmp_path / "r")]) == 2
    assert main(["calibrate", "--checkpoint", str(bad), "--sizes", "4", "--out", "x.json"]) == 2
    sideways = ["--scales", "MNIST_UNet_zeros:sideways", "--out-dir", str(tmp_path / "s")]
    assert main(["compare", "--checkpoint", "x.pt", *sideways]) == 2
    err = capsys.readouterr().err
    assert err.count("elsfast: error:") == 5 and "Traceback" not in err
    assert "--scales: calibrated scales 'MNIST_UNet_zeros:sideways': unknown reading 'sideways'" in err


def test_compare_and_reproduce_take_a_protocol(tmp_path, capsys, monkeypatch):
    """`--protocol` on `elsfast compare` runs and reports the paper's step counts (contradicting --steps or
    --network-steps is refused before anything loads); on `elsfast reproduce` it reaches `reproduce` and the
    protocol is printed with the results."""
    import elsfast.research.reproduce as reproduce_module

    ckpt = tmp_path / "net.pt"
    data = ["--dataset", "mnist-embedded", "--limit", "20"]
    net = ["--channels", "8", "--blocks", "1", "--batch-size", "8", "--device", "cpu", "-q"]
    assert main(["train", *data, *net, "--max-steps", "1", "--out", str(ckpt)]) == 0
    args = ["compare", "--checkpoint", str(ckpt), "--device", "cpu", "-q", "--seeds", "1", "--machines", "is"]
    assert main([*args, "--protocol", "table2", "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "protocol table2: network 20 steps from t = 0.95, machines 20 steps" in out
    config = json.loads((tmp_path / "r" / "results.json").read_text())["config"]
    assert (config["protocol"], config["network_steps"], config["network_start_t"]) == ("table2", 20, 0.95)
    assert main([*args, "--protocol", "table1", "--network-steps", "20", "--out-dir", str(tmp_path / "x")]) == 2
    assert main([*args, "--protocol", "table1", "--steps", "10", "--out-dir", str(tmp_path / "x")]) == 2
    assert main([*args, "--protocol", "table3", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    refused = "table1 runs the network for 150 steps and the machines for 20, but --steps 20 --network-steps 20 was"
    assert f"argument --protocol: {refused} given" in err
    assert "but --steps 10 was given" in err and "invalid choice: 'table3'" in err
    assert not (tmp_path / "x").exists()

    seen = {}

    def fake_reproduce(preset, out_dir, **kw):
        seen.update(kw, preset=preset)
        return {"protocol": kw["protocol"], "steps": 20, "network_steps": 150, "network_start_t": 0.95, "summary": {}}

    monkeypatch.setattr(reproduce_module, "reproduce", fake_reproduce)
    argv = ["reproduce", "mnist-small", "--out-dir", str(tmp_path / "p"), "--device", "cpu", "-q"]
    assert main([*argv, "--protocol", "table1"]) == 0
    assert seen["protocol"] == "table1" and seen["preset"] == "mnist-small"
    assert "protocol table1: network 150 steps from t = 0.95" in capsys.readouterr().out
    assert main(argv) == 0 and seen["protocol"] is None  # the preset's
