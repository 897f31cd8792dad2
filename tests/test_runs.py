"""The run folder as a user meets it: one run holds it at a time, --resume never starts a different run,
an interruption says what is intact and how to go on, and the faults of a run (a full disk, a bad
checkpoint, an out-dir in the way) are one line with nothing lost."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_results, run_script, small_args

import common
import fgsm_rs
import harness

pytestmark = pytest.mark.usefixtures("no_checksum")  # in-process runs on test-made CIFAR files


def _guarded(argv):
    """fgsm_rs.main(argv) as the script runs it: SystemExit's code (0 if it returned)."""
    try:
        harness.main_guard(lambda: fgsm_rs.main(argv))
    except SystemExit as err:
        return err.code
    return 0


# ---------------------------------------------------------------- one run per folder


def test_a_held_folder_refuses_a_second_run_naming_the_holder(cifar_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = harness.hold(str(out))  # this test process is "the first run"
    try:
        proc = run_script("fgsm_rs.py", small_args(cifar_dir, str(out), epochs=1), expect=2)
        line = proc.stderr.strip().splitlines()[-1]
        assert (
            "still going" in line
            and f"pid {os.getpid()}" in line
            and "Traceback" not in proc.stderr
        )
        assert not (out / "log.txt").exists()  # refused before it wrote anything
    finally:
        holder.close()
    run_script("fgsm_rs.py", small_args(cifar_dir, str(out), epochs=1))  # free again: it runs


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    """The hold is the system's lock: a run killed with SIGKILL (no clean-up) releases it."""
    code = f"import sys, time; sys.path.insert(0, {ROOT!r}); import harness; "
    code += f"f = harness.hold({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(common.FastatError, match=f"pid {proc.pid}"):
        harness.hold(str(tmp_path))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    harness.hold(str(tmp_path)).close()


# ---------------------------------------------------------------- --resume never starts another run


def test_resume_alone_on_an_empty_or_mistyped_folder_refuses(tmp_path, capsys):
    """Also with a flag or two that are not the whole run: only a command that names its data starts
    a run in a folder that holds none."""
    for folder, extra in (
        (tmp_path / "nowhere", []),
        (tmp_path, []),
        (tmp_path / "typo", ["--seed", "1"]),
    ):
        assert _guarded(["--resume", "--out-dir", str(folder), *extra]) == 2
        line = capsys.readouterr().err.strip()
        assert "there is no run to resume" in line and str(folder) in line and "\n" not in line
    assert os.listdir(tmp_path) == []


def test_interrupted_before_its_first_checkpoint_a_run_restarts_as_itself(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    """Ctrl-C in the first epoch: the message names the real folder and says no epoch was
    checkpointed; --resume --out-dir then starts the recorded run (its flags, not the default recipe),
    and log.txt keeps the original command."""
    out = str(tmp_path / "run")
    argv = small_args(cifar_dir, out, epochs=1, epsilon=16)
    real = harness.Run.end_epoch

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.Run, "end_epoch", interrupted)
    assert _guarded(argv) == 130
    err = capsys.readouterr().err
    assert f"no epoch was checkpointed yet: python fgsm_rs.py --resume --out-dir {out}" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    monkeypatch.setattr(harness.Run, "end_epoch", real)
    assert _guarded(["--resume", "--out-dir", out]) == 0
    res = load_results(out)
    assert res["args"]["epsilon"] == 16 and res["args"]["model"] == "wrn-10-1"
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("# python fgsm_rs.py") == 2 and "no checkpoint in" in log


def test_interrupted_after_a_checkpoint_the_message_names_the_epoch_and_the_folder(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    out = str(tmp_path / "run")
    real = harness.Run.end_epoch

    def interrupted(run, epoch, *a, **k):
        real(run, epoch, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.Run, "end_epoch", interrupted)
    assert _guarded(small_args(cifar_dir, out, epochs=2)) == 130
    err = capsys.readouterr().err
    again = f"python fgsm_rs.py --resume --out-dir {out} continues it"
    assert f"the checkpoint of epoch 1 in {out} is intact: {again}" in err


def test_resume_into_an_empty_folder_starts_the_run_the_command_gives(cifar_dir, tmp_path, capsys):
    """A cluster's restart repeats the whole command, --resume included, from the first start."""
    out = str(tmp_path / "run")
    assert _guarded(small_args(cifar_dir, out, epochs=1, resume=True)) == 0
    assert load_results(out)["args"]["epochs"] == 1
    assert "no checkpoint in" in capsys.readouterr().out


def test_a_finished_run_says_which_flags_it_ignored(cifar_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _guarded(small_args(cifar_dir, out, epochs=1)) == 0
    capsys.readouterr()
    assert _guarded(["--resume", "--out-dir", out, "--epochs", "3"]) == 0
    said = capsys.readouterr().out
    assert "finished run" in said and "--epochs ignored" in said


def test_a_resume_logs_the_evaluation_flags_it_changed(cifar_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = harness.Run.end_epoch

    def interrupted(run, epoch, *a, **k):
        real(run, epoch, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.Run, "end_epoch", interrupted)
    assert _guarded(small_args(cifar_dir, out, epochs=2)) == 130
    monkeypatch.setattr(harness.Run, "end_epoch", real)
    assert _guarded(["--resume", "--out-dir", out, "--eval-iters", "2"]) == 0
    log = open(os.path.join(out, "log.txt")).read()
    assert "# changed on resuming: --eval-iters 2 (was 3)" in log


def test_the_log_holds_the_data_lines_and_says_that_best_is_last(cifar_dir, tmp_path):
    """The lines logged before log.txt opens (the data's counts) are in it too, after the command."""
    out = str(tmp_path / "run")
    assert _guarded(small_args(cifar_dir, out, epochs=1)) == 0
    lines = open(os.path.join(out, "log.txt")).read().splitlines()
    assert (
        lines[0].startswith("# python fgsm_rs.py")
        and sum(x.startswith("# python") for x in lines) == 1
    )
    assert (
        "# cifar10: 256 training images, 0 validation images, 64 test images, 10 classes" in lines
    )
    assert "# the best model is the last one (epoch 1): the same numbers" in lines


def test_a_resume_with_another_process_count_is_refused_before_the_data_is_read(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    args = vars(fgsm_rs.get_args(["--data-dir", str(tmp_path / "no-data"), "--device", "cpu"]))
    record = {"method": "fgsm_rs", "args": {**args, "out_dir": str(out)}, "processes": 2}
    (out / "args.json").write_text(json.dumps(record))
    assert _guarded(["--resume", "--out-dir", str(out)]) == 2
    assert "trained by 2 process(es)" in capsys.readouterr().err  # not "dataset not found"


# ---------------------------------------------------------------- faults: one line, nothing lost


@pytest.mark.parametrize("content", [b"not a checkpoint", "foreign"])
def test_a_truncated_or_foreign_checkpoint_is_one_line(cifar_dir, tmp_path, capsys, content):
    out = str(tmp_path / "run")
    assert _guarded(small_args(cifar_dir, out, epochs=1)) == 0
    os.remove(os.path.join(out, "results.json"))
    path = os.path.join(out, "checkpoint.pt")
    if content == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        with open(path, "r+b") as f:  # truncated in the middle
            f.truncate(os.path.getsize(path) // 2)
    assert _guarded(["--resume", "--out-dir", out]) == 2
    line = capsys.readouterr().err.strip()
    assert "cannot be read as a fastat checkpoint" in line and "\n" not in line


def test_a_full_disk_at_a_save_is_one_line_and_the_last_checkpoint_stays(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    out = str(tmp_path / "run")
    real = torch.save
    saves = []

    def full_disk(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint: what torch.save raises when the disk is full
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470"
            )
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert _guarded(small_args(cifar_dir, out, epochs=2)) == 1
    line = capsys.readouterr().err.strip()
    assert "the disk is full" in line and "checkpoint.pt" in line and "\n" not in line
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["epoch"] == 1 and not os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))


def test_an_existing_out_dir_that_is_not_writable_is_one_line(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    """A folder on a read-only file system, or another user's (the tests run as root, whom permissions
    do not stop: the refusal of the system is simulated where the run folder is first written)."""

    def read_only(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(harness, "open", read_only, raising=False)
    assert _guarded(small_args(cifar_dir, str(tmp_path / "run"), epochs=1)) == 2
    line = capsys.readouterr().err.strip()
    assert "not writable (Permission denied)" in line and "\n" not in line


def test_an_out_dir_that_is_a_file_is_one_line(cifar_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _guarded(small_args(cifar_dir, str(tmp_path / "file"), epochs=1)) == 2
    assert "a file of that name is in the way" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1e3"])
def test_a_seed_out_of_range_is_an_argparse_error(seed, capsys):
    with pytest.raises(SystemExit) as err:
        fgsm_rs.get_args(["--seed", seed])
    assert err.value.code == 2 and "--seed" in capsys.readouterr().err


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "argv,what",
    [
        (["--alpha", "0.375"], "--alpha 95.625"),
        (["--epsilon", "300"], "more than the whole pixel range"),
        (["--alpha", "256"], "more than the whole pixel range"),
        (["--epsilon", "0"], "at least 1"),
    ],
)
def test_every_255_value_is_checked_like_epsilon(argv, what, capsys):
    with pytest.raises(SystemExit) as err:
        fgsm_rs.get_args(argv)
    assert err.value.code == 2 and what in capsys.readouterr().err
    assert fgsm_rs.get_args(["--alpha", "0", "--delta-init", "zero"]).alpha == 0  # plain training


@pytest.mark.parametrize(
    "argv,what",
    [
        (["--eps-set", "4", "0.03"], "--eps-set 7.65"),
        (["--eps-set", "300"], "more than the whole pixel range"),
        (["--step-set", "0.5"], "--step-set 127.5"),
    ],
)
def test_las_at_action_sets_are_checked_like_epsilon(argv, what, capsys):
    import las_at

    with pytest.raises(SystemExit) as err:
        las_at.get_args(argv)
    assert err.value.code == 2 and what in capsys.readouterr().err


def test_the_monitor_is_a_small_share_of_the_training_images_by_default():
    args = fgsm_rs.get_args([])
    assert args.monitor_size is None
    sizes = {n: common.monitor_size(args, n) for n in (256, 5085, 50_000)}
    assert sizes == {256: 32, 5085: 101, 50_000: 512}
    args.monitor_size = 7
    assert common.monitor_size(args, 50_000) == 7


@pytest.mark.parametrize("script", ["fgsm_rs", "n_fgsm", "evaluate"])
def test_help_shows_every_default(script, capsys):
    """Every flag with a default shows it (0 and 0.0 too), and the flags the recipes fill show each
    recipe's value, parse_args's base (the network, the held-out images) and ImageNet's included."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        (module.main if script == "evaluate" else module.get_args)(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default" in text
    if script == "evaluate":
        assert "where to evaluate (default " in text and "(0: none) (default 10)" in text
        return
    assert "random seed (under torchrun each process adds its rank) (default 0)" in text
    assert "(default preact18; mnist recipe mnist-cnn; imagenet recipe resnet50)" in text
    assert "passes over the training images (default" in text and "imagenet recipe 0.4" in text


def test_a_command_line_is_logged_once_per_run_and_the_lock_is_recorded(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    run_script("fgsm_rs.py", small_args(cifar_dir, out, epochs=1))
    record = json.load(open(os.path.join(out, "args.json")))
    assert record["method"] == "fgsm_rs" and record["processes"] == 1
    assert record["args"]["epochs"] == 1
    assert "pid" in open(os.path.join(out, "run.lock")).read()
