"""No user file is ever lost: atomic writes survive a kill at any moment, and elsfast refuses (never replaces or
deletes) a file it did not write, at every path it writes to (issue 15, items 1-3)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import elsfast
from elsfast.cli import main
from elsfast.common.fileio import MANIFEST_NAME, atomic_write, describe_file, written_by_elsfast
from elsfast.common.imageio import load_samples, save_grid, save_samples
from elsfast.research.calibrate import CalibrationResult

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = b"a user's own file, not elsfast's\n"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early ({proc.returncode}): {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- kills


WRITER = textwrap.dedent(
    """
    import sys, time
    from elsfast.common.fileio import atomic_write

    def slow(f):
        f.write(b"new, first half;")
        f.flush()
        open(sys.argv[2], "w").close()  # tell the parent the write is under way
        time.sleep(60)
        f.write(b" second half")

    atomic_write(sys.argv[1], slow)
    """
)


@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_kill_mid_write_leaves_the_old_file(tmp_path, sig):
    target, ready = tmp_path / "out.bin", tmp_path / "ready"
    atomic_write(target, lambda f: f.write(b"old"))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ready)], env=_env(), stderr=subprocess.PIPE)
    _wait_for(ready.exists, proc)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert target.read_bytes() == b"old"
    assert written_by_elsfast(target)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == (0 if sig == signal.SIGINT else 1)  # KeyboardInterrupt cleans up; a kill cannot
    atomic_write(target, lambda f: f.write(b"new"))  # the next write removes a dead process's temporary file
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, "out.bin", "ready"])


def test_a_temporary_file_of_a_live_process_is_left_alone(tmp_path):
    target = tmp_path / "x.json"
    live = tmp_path / f".x.json.{os.getppid()}.0123abcd.tmp"  # our parent is alive
    live.write_bytes(b"someone else's write in progress")
    atomic_write(target, lambda f: f.write(b"{}"))
    assert live.exists()


def test_a_killed_cli_sample_resumes_and_the_old_grid_survives(tmp_path):
    """SIGKILL `elsfast sample` once its sampling checkpoint exists: the earlier grid is intact, and the same
    command run again resumes and gives the uninterrupted run's samples."""
    grid, saved, ckpt = tmp_path / "grid.png", tmp_path / "x.pt", tmp_path / "grid.png.ckpt"
    args = ["sample", "--limit", "20", "--n", "2", "--steps", "20", "--quiet", "--out", str(grid), "--save", str(saved)]
    assert main([*args, "--resume-from", "none"]) == 0
    before, uninterrupted = grid.read_bytes(), load_samples(saved)
    cmd = [sys.executable, "-m", "elsfast", *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(ckpt.exists, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert grid.read_bytes() == before and torch.equal(load_samples(saved), uninterrupted)
    assert "sampling checkpoint" in describe_file(ckpt)
    done = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert not ckpt.exists()
    torch.testing.assert_close(load_samples(saved), uninterrupted, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- foreign files


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("net") / "net.pt"
    net = ["--channels", "4", "--blocks", "1", "--batch-size", "8", "--device", "cpu", "-q", "--max-steps", "1"]
    assert main(["train", "--dataset", "mnist-embedded", "--limit", "16", *net, "--out", str(path)]) == 0
    return path


def _refused(capsys, argv: list[str], path: Path, *words: str) -> None:
    before = path.read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("elsfast: error:") and "Traceback" not in err and str(path.name) in err, err
    for word in words:
        assert word in err, err
    assert path.read_bytes() == before


def test_sampling_never_touches_a_trained_network(tmp_path, network, capsys):
    """The data loss of issue 15 item 1: a network checkpoint given as the sampling checkpoint."""
    common = ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--out", str(tmp_path / "g.png")]
    _refused(capsys, [*common, "--resume-from", str(network)], network, "network checkpoint written by `elsfast train`")
    _refused(capsys, [*common, "--checkpoint", str(network)], network, "network checkpoint")
    with pytest.raises(
        ValueError, match=r"net\.pt is not an elsfast sampling checkpoint: it looks like an elsfast net"
    ):
        elsfast.sample(torch.zeros(2, 1, 4, 4), n=1, steps=3, progress=False, resume_from=network)
    assert network.exists() and not (tmp_path / "g.png").exists()


def test_deprecated_checkpoint_flag_still_works_with_a_warning(tmp_path, capsys):
    out = tmp_path / "g.png"
    argv = ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--out", str(out)]
    assert main([*argv, "--checkpoint", str(tmp_path / "s.ckpt")]) == 0
    assert "'sample --checkpoint' is deprecated" in capsys.readouterr().err and out.exists()
    assert main([*argv, "--checkpoint", "a", "--resume-from", "b"]) == 2


def test_train_refuses_an_existing_out_without_resume_or_overwrite(tmp_path, network, capsys):
    argv = ["train", "--dataset", "mnist-embedded", "--limit", "16", "--channels", "4", "--blocks", "1", "-q"]
    _refused(capsys, [*argv, "--max-steps", "1", "--out", str(network)], network, "--resume", "--overwrite")
    foreign = tmp_path / "mine.pt"
    foreign.write_bytes(FOREIGN)
    _refused(capsys, [*argv, "--max-steps", "1", "--out", str(foreign), "--resume"], foreign, "not a usable")
    assert main([*argv, "--max-steps", "1", "--out", str(foreign), "--overwrite", "--resume"]) == 2
    # --overwrite replaces a network checkpoint only, and never suggests itself for a foreign file (issue 27)
    _refused(capsys, [*argv, "--max-steps", "1", "--out", str(foreign)], foreign, "not written by elsfast")
    _refused(capsys, [*argv, "--max-steps", "1", "--out", str(foreign), "--overwrite"], foreign, "never replaces")
    for flags in ([], ["--overwrite"]):
        assert main([*argv, "--max-steps", "1", "--out", str(foreign), *flags]) == 2
        assert "--overwrite" not in capsys.readouterr().err
    copy = tmp_path / "net.pt"
    copy.write_bytes(network.read_bytes())
    assert main([*argv, "--max-steps", "1", "--out", str(copy), "--overwrite"]) == 0


@pytest.mark.parametrize("flag", ["--out", "--save", "--resume-from"])
def test_cli_sample_refuses_a_foreign_file_at_each_output(tmp_path, capsys, flag):
    paths = {"--out": tmp_path / "g.png", "--save": tmp_path / "x.npz", "--resume-from": tmp_path / "r.ckpt"}
    paths[flag].write_bytes(FOREIGN)
    argv = ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q"]
    argv += [arg for k, v in paths.items() for arg in (k, str(v))]
    _refused(capsys, argv, paths[flag], "not", "unknown format")
    assert [p.name for p in tmp_path.iterdir()] == [paths[flag].name]  # refused before any work


def test_cli_sample_replaces_its_own_outputs(tmp_path):
    argv = ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--out", str(tmp_path / "g.png")]
    assert main([*argv, "--seed", "1"]) == 0
    assert main([*argv, "--seed", "2"]) == 0  # written by elsfast: replaced


def test_measure_explain_calibrate_compare_refuse_foreign_outputs(tmp_path, network, capsys):
    samples = save_samples(torch.zeros(1, 1, 28, 28), tmp_path / "s.pt")
    foreign = tmp_path / "m.json"
    foreign.write_bytes(FOREIGN)
    _refused(capsys, ["measure", "--limit", "20", "--samples", str(samples), "--json", str(foreign)], foreign)

    out_dir = tmp_path / "why"
    out_dir.mkdir()
    (out_dir / "sample_0.png").write_bytes(FOREIGN)
    argv = ["explain", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--out-dir", str(out_dir)]
    _refused(capsys, argv, out_dir / "sample_0.png")

    args = ["--checkpoint", str(network), "--device", "cpu", "-q", "--steps", "3", "--seeds", "1"]
    plot = tmp_path / "cal.png"
    plot.write_bytes(FOREIGN)
    _refused(capsys, ["calibrate", *args, "--sizes", "1", "3", "--out", str(tmp_path / "cal.json")], plot)
    assert not (tmp_path / "cal.json").exists()

    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.md").write_bytes(FOREIGN)
    _refused(capsys, ["compare", *args, "--scales", "3", "--out-dir", str(report)], report / "summary.md")
    assert [p.name for p in report.iterdir()] == ["summary.md"]


def test_api_writers_refuse_foreign_files(tmp_path):
    for name, write in [
        ("grid.png", lambda p: save_grid(torch.zeros(1, 1, 4, 4), p)),
        ("x.pt", lambda p: save_samples(torch.zeros(1, 1, 4, 4), p)),
        (
            "cal.json",
            lambda p: CalibrationResult(2, [3], [0], [None], torch.zeros(1, 2), torch.zeros(1, 2, 1)).to_json(p),
        ),
        ("elsfast_machine.json", lambda p: elsfast.ScoreMachine(torch.zeros(1, 1, 4, 4)).save_pretrained(p.parent)),
        ("any.bin", lambda p: atomic_write(p, lambda f: f.write(b"x"))),
    ]:
        path = tmp_path / name
        path.write_bytes(FOREIGN)
        with pytest.raises(FileExistsError, match=f"{name} already exists and was not written by elsfast"):
            write(path)
        assert path.read_bytes() == FOREIGN
    atomic_write(tmp_path / "any.bin", lambda f: f.write(b"x"), replace="any")  # an explicit replacement
    assert (tmp_path / "any.bin").read_bytes() == b"x"


def test_a_file_changed_after_elsfast_wrote_it_is_no_longer_elsfast_s(tmp_path):
    path = save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "g.png")
    assert written_by_elsfast(path)
    path.write_bytes(b"edited by hand")
    assert not written_by_elsfast(path)
    with pytest.raises(FileExistsError):
        save_grid(torch.zeros(1, 1, 4, 4), path)


def test_describe_file_names_what_a_file_looks_like(tmp_path, network):
    (tmp_path / "e").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, tmp_path / "t.pt")
    save_samples(torch.zeros(1, 1, 2, 2), tmp_path / "s.npz")
    save_grid(torch.zeros(1, 1, 2, 2), tmp_path / "g.png")
    assert describe_file(network).startswith("an elsfast network checkpoint written by `elsfast train`")
    assert describe_file(tmp_path / "e") == "an empty file"
    assert describe_file(tmp_path / "t.pt") == "a torch file (torch.save) not written by elsfast"
    assert describe_file(tmp_path / "s.npz") == "a numpy .npz archive (arrays samples)"
    assert describe_file(tmp_path / "g.png") == "a PNG image"
    assert describe_file(tmp_path) == "a directory"


@pytest.mark.parametrize("name", ["network.pt", "calibration.json", "reproduction.json", "report/summary.md"])
def test_reproduce_refuses_a_foreign_file_at_each_stage_and_keeps_it(tmp_path, name):
    from elsfast.nets.train import TrainConfig
    from elsfast.research.reproduce import Preset, reproduce

    tiny = Preset(
        train=TrainConfig(dataset="mnist-embedded", limit=16, channels=4, blocks=1, batch_size=8, max_steps=1),
        sizes=(1, 3),
        calibration_seeds=1,
        comparison_seeds=1,
        steps=3,
    )
    foreign = tmp_path / name
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(FOREIGN)
    with pytest.raises((ValueError, FileExistsError), match=foreign.name.replace(".", r"\.")):
        reproduce(tiny, tmp_path, progress=False)
    assert foreign.read_bytes() == FOREIGN


# ---------------------------------------------------------------------------------------------- kinds (issue 27)


def _sampling_state(path: Path) -> Path:
    """A sampling checkpoint of some other run at `path`."""
    from elsfast.sampling.checkpoint import SamplingCheckpoint

    SamplingCheckpoint(path, key="another run").save(1, torch.zeros(2, 1, 28, 28))
    return path


def test_one_command_never_replaces_another_commands_file(tmp_path, network, capsys):
    """Issue 27: a file elsfast wrote is replaced only by the same kind of output, and the refusal says what the
    file is and what replaces it."""
    net = tmp_path / "net.pt"
    net.write_bytes(network.read_bytes())
    argv = ["sample", "--limit", "50", "--n", "2", "--steps", "3", "-q", "--out", str(tmp_path / "k.png")]
    _refused(capsys, [*argv, "--save", str(net)], net, "--save", "network checkpoint", "elsfast train --out")
    assert not (tmp_path / "k.png").exists()

    calib = CalibrationResult(2, [3], [0], [None], torch.zeros(1, 2), torch.zeros(1, 2, 1)).to_json(tmp_path / "c.json")
    samples = save_samples(torch.zeros(1, 1, 28, 28), tmp_path / "s.pt")
    _refused(capsys, ["measure", "--limit", "50", "--samples", str(samples), "--json", str(calib)], calib, "calibrat")

    state = _sampling_state(tmp_path / "state.pt")
    _refused(capsys, [*argv, "--save", str(state)], state, "sampling checkpoint")
    _refused(capsys, ["measure", "--limit", "50", "--samples", str(samples), "--json", str(samples)], samples)

    # the library's writers too, and the file stays as it was
    for write, path in [
        (lambda p: save_samples(torch.zeros(1, 1, 2, 2), p), net),
        (lambda p: CalibrationResult(2, [3], [0], [None], torch.zeros(1, 2), torch.zeros(1, 2, 1)).to_json(p), samples),
        (lambda p: atomic_write(p, lambda f: f.write(b"{}")), samples),  # a writer that names no kind
    ]:
        before = path.read_bytes()
        with pytest.raises(FileExistsError, match=r"is (an elsfast network|samples saved).*replaced only by"):
            write(path)
        assert path.read_bytes() == before
    assert main([*argv, "--save", str(samples)]) == 0  # samples by samples: replaced


@pytest.mark.parametrize("content", [FOREIGN, b'{"files": {}}', b'{"format": "elsfast-files/1", "files": []}'])
def test_a_users_own_manifest_file_is_never_overwritten(tmp_path, capsys, content):
    folder = tmp_path / "d"
    folder.mkdir()
    manifest = folder / MANIFEST_NAME
    manifest.write_bytes(content)
    argv = ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--out", str(folder / "x.png")]
    _refused(capsys, argv, manifest, "never replaces it")
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_NAME]
    with pytest.raises(FileExistsError, match="not elsfast's record"):
        save_grid(torch.zeros(1, 1, 2, 2), folder / "y.png")
    assert manifest.read_bytes() == content and not (folder / "y.png").exists()


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """An existing folder this process cannot create files in (root ignores permissions: /sys then)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        yield folder
        folder.chmod(0o755)
        return
    folder.chmod(0o755)
    try:
        (Path("/sys") / ".elsfast-test-probe").touch()
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no unwritable folder: permissions do not apply to this user and /sys is writable")


def _never(*args, **kwargs):
    raise AssertionError("the work started although its output folder cannot be written")


def test_outputs_in_an_unwritable_folder_are_refused_before_any_work(
    tmp_path, network, unwritable, capsys, monkeypatch
):
    """Issue 27: train, sample, measure, calibrate, compare and reproduce check every output folder (a probe file
    created and removed) before the first step, instead of failing at the end with the work lost."""
    import elsfast.nets.train as training
    import elsfast.research.calibrate as calibration
    import elsfast.research.compare as comparison
    import elsfast.research.creativity as creativity
    import elsfast.sampling as sampling

    for module, name in [
        (training, "train"),
        (sampling, "sample"),
        (creativity, "measure"),
        (calibration, "calibrate"),
        (comparison, "compare"),
    ]:
        monkeypatch.setattr(module, name, _never)
    ro = str(unwritable)
    net = ["--channels", "4", "--blocks", "1", "-q", "--max-steps", "1", "--limit", "16"]
    samples = save_samples(torch.zeros(1, 1, 28, 28), tmp_path / "s.pt")
    cases = [
        ["train", "--dataset", "mnist-embedded", *net, "--out", f"{ro}/sub/n.pt"],
        ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--out", f"{ro}/x.png"],
        ["sample", "--limit", "20", "--n", "1", "--steps", "3", "-q", "--save", f"{ro}/s.pt"],
        ["sample", "--limit", "20", "--n", "1", "-q", "--out", str(tmp_path / "x.png"), "--resume-from", f"{ro}/c"],
        ["measure", "--limit", "20", "--samples", str(samples), "--json", f"{ro}/m.json"],
        ["calibrate", "--checkpoint", str(network), "-q", "--out", f"{ro}/c.json"],
        ["calibrate", "--checkpoint", str(network), "-q", "--out", str(tmp_path / "c.json"), "--plot", f"{ro}/c.png"],
        ["compare", "--checkpoint", str(network), "-q", "--out-dir", ro],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "cannot write in" in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.pt", MANIFEST_NAME, "ro"])

    from elsfast.nets.train import TrainConfig
    from elsfast.research import reproduce as reproduction

    monkeypatch.setattr(reproduction, "train", _never)
    tiny = reproduction.Preset(
        train=TrainConfig(dataset="mnist-embedded", limit=16, channels=4, blocks=1, batch_size=8, max_steps=1),
        sizes=(1, 3),
        calibration_seeds=1,
        comparison_seeds=1,
        steps=3,
    )
    with pytest.raises(PermissionError, match="cannot write in"):
        reproduction.reproduce(tiny, unwritable, progress=False)


def test_sampling_keeps_its_checkpoint_until_every_output_is_written(tmp_path, capsys, monkeypatch):
    """Issue 27: a kill after `--save` is written but before `--out` is leaves the sampling checkpoint, and the
    same command run again resumes from it (not from step 0) and gives the uninterrupted run's samples."""
    import elsfast.common.imageio as imageio

    grid, saved, ckpt = tmp_path / "g.png", tmp_path / "x.pt", tmp_path / "g.png.ckpt"
    argv = ["sample", "--limit", "20", "--n", "2", "--steps", "6", "-q", "--out", str(grid), "--save", str(saved)]
    assert main([*argv, "--resume-from", "none"]) == 0
    uninterrupted = load_samples(saved)
    saved.unlink()
    grid.unlink()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio, "save_grid", killed)
    assert main(argv) == 130
    assert ckpt.exists() and "sampling checkpoint" in describe_file(ckpt) and not grid.exists()
    monkeypatch.undo()

    steps = []
    monkeypatch.setattr("elsfast.sampling.ddim.tqdm", lambda it, **kw: steps.append(list(it)) or steps[-1])
    assert main(argv) == 0
    assert len(steps[0]) == 1  # resumed at the last step, not from step 0
    assert not ckpt.exists() and grid.exists()
    torch.testing.assert_close(load_samples(saved), uninterrupted, rtol=0, atol=0)

    # the library: `write_outputs` runs before the checkpoint is removed
    state = tmp_path / "api.ckpt"
    seen = []
    images = torch.zeros(4, 1, 6, 6)
    out = elsfast.sample(
        images, n=1, steps=4, progress=False, resume_from=state, write_outputs=lambda x: seen.append(state.exists())
    )
    assert seen == [True] and not state.exists() and out.shape == (1, 1, 6, 6)


def test_file_kind_is_decided_in_one_place_and_old_records_still_work(tmp_path, network):
    """`file_kind`: the declared format's kind, else the kind recorded in the manifest; a file an older elsfast
    recorded without a kind is replaced by an output of the same file type only."""
    import json

    from elsfast.common.fileio import UNRECORDED_KIND, check_replaceable, file_kind

    grid = save_grid(torch.zeros(1, 1, 2, 2), tmp_path / "g.png")
    samples = save_samples(torch.zeros(1, 1, 2, 2), tmp_path / "s.pt")
    assert (file_kind(network), file_kind(grid), file_kind(samples)) == ("network", "grid", "samples")
    assert file_kind(_sampling_state(tmp_path / "state.pt")) == "sampling-state"
    (tmp_path / "mine.txt").write_bytes(FOREIGN)
    assert file_kind(tmp_path / "mine.txt") is None and file_kind(tmp_path / "none") is None
    check_replaceable(samples, "samples")
    with pytest.raises(FileExistsError, match=r"samples saved by `elsfast sample --save`.*not by a grid"):
        check_replaceable(samples, "grid")
    with pytest.raises(ValueError, match="kind must be one of"):
        atomic_write(tmp_path / "x", lambda f: f.write(b"x"), kind="anything")

    manifest = tmp_path / MANIFEST_NAME
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"format": old["format"], "files": old["files"]}))  # as an older elsfast wrote it
    assert file_kind(grid) == UNRECORDED_KIND
    with pytest.raises(FileExistsError, match="replaced only by"):
        atomic_write(grid, lambda f: f.write(b"{}"))  # a JSON document over a PNG image
    assert file_kind(grid) == UNRECORDED_KIND
    save_grid(torch.ones(1, 1, 2, 2), grid)  # a PNG over a PNG: replaced, and now recorded as a grid
    assert file_kind(grid) == "grid"


def test_the_manifest_forgets_files_deleted_since_they_were_written(tmp_path):
    """Issue 27: entries of deleted files are pruned at the next write in the folder, so that a user's new file
    of that name is not taken for elsfast's."""
    import json

    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"a"))
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"b"))
    (tmp_path / "a.bin").unlink()
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"b2"))
    assert sorted(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == ["b.bin"]
