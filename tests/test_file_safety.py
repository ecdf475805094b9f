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
    assert main([*argv, "--max-steps", "1", "--out", str(foreign), "--overwrite"]) == 0
    assert "network checkpoint" in describe_file(foreign)


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


def test_the_manifest_forgets_files_deleted_since_they_were_written(tmp_path):
    """Issue 27: entries of deleted files are pruned at the next write in the folder, so that a user's new file
    of that name is not taken for elsfast's."""
    import json

    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"a"))
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"b"))
    (tmp_path / "a.bin").unlink()
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"b2"))
    assert sorted(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == ["b.bin"]
