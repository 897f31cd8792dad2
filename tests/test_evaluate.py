"""The evaluation path: evaluate.py on saved weights (its defaults are the run's evaluation, the data is checked
against the run's classes and image shape, a wrong file is one line), the evaluation under torchrun (each process
its share of the batches and of the test images, the numbers of one process), its progress lines and duration
estimate, and the device's default attacks."""

import json
import logging
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, load_results, small_args, write_cifar, write_mnist, write_svhn
from test_common import _run_args, _tiny_data
from test_folder import write_folder

import common
import evaluate
import evaluation
import fgsm_rs
import flags
import harness
import imagenet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch FGSM-RS run on a 3-class folder of 16×16 images, evaluated with PGD-3-2 and CW-3 on a fixed 40
    of its 42 test images."""
    root = tmp_path_factory.mktemp("evaluate")
    data = str(root / "data")
    write_folder(data, per_class=12, n_test=14, size=(16, 16))
    out = str(root / "run")
    args = small_args(data, out, epochs=1, eval_samples=40, eval_restarts=2)
    fgsm_rs.main(args[:1] + ["folder"] + args[2:])
    return SimpleNamespace(data=data, out=out, last=os.path.join(out, "model_last.pt"))


@pytest.fixture
def logged():
    """The lines common.log writes during a test."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    keep = Keep()
    level = common.logger.level
    common.logger.addHandler(keep)
    common.logger.setLevel(logging.INFO)
    yield lines
    common.logger.removeHandler(keep)
    common.logger.setLevel(level)


def _fail(capsys, argv):
    """evaluate.py's exit code and stderr, as its command line gives them (harness.main_guard)."""
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: evaluate.main(argv))
    return err.value.code, capsys.readouterr().err


# ------------------------------------------------------------------------------ the data's identity


def test_results_json_records_the_datas_identity_and_the_evaluation(run):
    res = load_results(run.out)
    assert res["data"]["dataset"] == "folder" and res["data"]["shape"] == [3, 16, 16]
    assert res["data"]["class_names"] == [
        "ant",
        "bee",
        "cat",
    ]  # sorted subfolders: label i is name i
    ev = res["eval"]
    assert (ev["images"], ev["iters"], ev["restarts"], ev["cw_iters"]) == (40, 3, 2, 3)
    assert (ev["batch"], ev["seed"], ev["autoattack"]) == (32, 0, False)


def test_renamed_class_folders_are_refused_naming_the_class(run, tmp_path, capsys):
    """The same images with class folders renamed: clean accuracy 91.25% → 10.00%, and no message."""
    data = tmp_path / "renamed"
    shutil.copytree(run.data, data)
    for split in ("train", "test"):
        os.rename(data / split / "ant", data / split / "zebra")  # now bee, cat, zebra
    code, err = _fail(capsys, ["--weights", run.last, "--data-dir", str(data), "--device", "cpu"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "class 0 is 'bee'" in err and "class 0 is 'ant'" in err and "3 of 3 classes" in err


def test_every_format_names_its_classes(tmp_path, no_checksum):
    write_cifar(str(tmp_path))
    write_mnist(str(tmp_path))
    write_svhn(str(tmp_path))
    names = {
        n: common.load_dataset(n, str(tmp_path))[2]["class_names"] for n in ("cifar10", "mnist")
    }
    assert names["cifar10"] == [f"c{i}" for i in range(10)]  # batches.meta's label_names
    assert names["mnist"][0] == "0 - zero" and len(names["mnist"]) == 10
    assert common.load_dataset("svhn", str(tmp_path))[2]["class_names"] == list("0123456789")


def test_a_different_shape_or_class_count_is_refused_and_an_old_record_is_not_checked():
    run = {"dataset": "mnist", "shape": [1, 28, 28], "class_names": list("0123456789")}
    with pytest.raises(common.FastatError, match=r"has 3×32×32 images .*mnist's, 1×28×28"):
        evaluate.check_same_data(
            run, {"shape": (3, 32, 32), "class_names": list("0123456789")}, "x"
        )
    with pytest.raises(common.FastatError, match="has 9 classes; .* 10"):
        evaluate.check_same_data(run, {"shape": (1, 28, 28), "class_names": list("012345678")}, "x")
    same = {"shape": (1, 28, 28), "class_names": list("0123456789")}
    assert evaluate.check_same_data(run, same, "x")
    assert not evaluate.check_same_data({"shape": [1, 28, 28]}, same, "x")  # an older results.json


# ------------------------------------------------------------------------------ the run's evaluation


def test_evaluate_repeats_the_runs_evaluation_by_default(run, logged):
    """Its defaults were PGD-50-10 and CW-20 whatever the run did (15 silent minutes on a PGD-10-1 run)."""
    again = evaluate.main(["--weights", run.last, "--device", "cpu", "--workers", "0"])
    assert again == load_results(run.out)["final"]["last"] and "pgd3_2" in again
    start = next(line for line in logged if line.startswith("# evaluating"))
    assert "on 40 folder test images" in start and "with PGD-3-2, CW-3 (the run's;" in start


def test_the_runs_autoattack_and_seed_are_defaults_and_flags_override(run, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(run.out, folder)
    res = load_results(folder)
    res["args"].update(autoattack=True, seed=7)
    (folder / "results.json").write_text(json.dumps(res))
    monkeypatch.setitem(sys.modules, "autoattack", SimpleNamespace())
    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: seen.append(a) or {})
    base = ["--weights", str(folder / "model_last.pt"), "--device", "cpu", "--workers", "0"]
    evaluate.main(base)
    evaluate.main(base + ["--no-autoattack", "--eval-iters", "7", "--seed", "1"])
    # (model, x, y, eps, iters, restarts, cw_iters, autoattack, classes, batch, step, ..., seed, total)
    assert [a[4:8] + a[9:10] + a[-2:] for a in seen] == [
        (3, 2, 3, True, 32, 7, 40),
        (7, 2, 3, False, 32, 1, 40),
    ]


def test_eval_step_is_in_255_units(run, capsys):
    """--eval-step 0.01 meant as 0.01 of the pixel range reported 88.6% robust for a 0.4% model."""
    code, err = _fail(capsys, ["--weights", run.last, "--eval-step", "0.01"])
    assert code == 2 and "--eval-step 2.55" in err


def test_the_evaluation_flags_have_one_definition(monkeypatch):
    calls = []
    real = flags.eval_flags
    monkeypatch.setattr(flags, "eval_flags", lambda p, **k: calls.append(k) or real(p, **k))
    flags.base_parser("doc")
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert calls == [{}, {"default": "the run's"}]


@pytest.mark.parametrize("what", ["checkpoint", "log", "architecture", "missing", "no results"])
def test_a_wrong_weights_file_is_one_line(run, tmp_path, capsys, what):
    """--weights on a checkpoint.pt, a log, another network's weights, a missing file: tracebacks."""
    folder = tmp_path / "run"
    shutil.copytree(run.out, folder)
    weights = folder / {"checkpoint": "checkpoint.pt", "log": "log.txt"}.get(what, "model_last.pt")
    if what == "architecture":
        res = load_results(folder)
        res["args"]["model"] = "wrn-16-1"
        (folder / "results.json").write_text(json.dumps(res))
    if what == "missing":
        weights = folder / "model_final.pt"
    if what == "no results":
        os.remove(folder / "results.json")
    code, err = _fail(capsys, ["--weights", str(weights), "--device", "cpu"])
    said = {
        "checkpoint": "is a training checkpoint, not weights",
        "log": "is not a file torch.save wrote",
        "architecture": "do not fit the wrn-16-1",
        "missing": "no such file",
        "no results": "results.json: No such file or directory",
    }[what]
    assert code == 2 and err.startswith("fastat: ") and len(err.strip().splitlines()) == 1
    assert said in err and "give a run's model_last.pt or model_best.pt" in err


def test_a_checkpoint_by_subprocess_is_one_line(run):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--weights", os.path.join(run.out, "checkpoint.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fastat: --weights") and "training checkpoint" in proc.stderr


# ------------------------------------------------------------------------------ torchrun


LAUNCH = """import os, runpy, sys
sys.path.insert(0, {root!r})
import common
import evaluation
real = evaluation.pgd_correct
def counted(model, x, y, *a, **k):  # the images each process attacks
    with open(os.path.join({out!r}, f"rank{{common.rank()}}.txt"), "a") as f:
        f.write(f"{{len(y)}}\\n")
    return real(model, x, y, *a, **k)
evaluation.pgd_correct = counted
sys.argv = ["evaluate.py", *sys.argv[1:]]
import torch.distributed as dist
real_end = dist.destroy_process_group
def end(*a, **k):  # the group must end before the process does: gloo's threads abort it otherwise
    open(os.path.join({out!r}, f"ended{{dist.get_rank()}}"), "w").close()
    real_end(*a, **k)
dist.destroy_process_group = end
runpy.run_path(os.path.join({root!r}, "evaluate.py"), run_name="__main__")
"""


def test_two_processes_attack_their_shares_and_give_one_processs_numbers(run, tmp_path):
    """Under torchrun every process evaluated everything. Now each attacks its whole batches (40 images in batches
    of 8: 3 and 2 batches), the random starts follow the batch, and the counts are summed: the numbers of one.
    Each process ends its process group before it exits (harness.setup's atexit): one left standing let gloo's
    threads abort a process at exit, now and then (SIGABRT, a failed CI run)."""
    argv = ["--weights", run.last, "--batch-size", "8", "--device", "cpu", "--workers", "0"]
    one = evaluate.main(argv + ["--out", str(tmp_path / "one.json")])
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCH.format(root=ROOT, out=str(tmp_path)))
    proc = torchrun_script(launcher, argv + ["--out", str(tmp_path / "two.json")])
    with open(tmp_path / "two.json") as f:
        assert json.load(f)["results"] == one
    attacked = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert attacked == [["24"] * 3, ["16"] * 3]  # clean, PGD, CW: each its share
    assert proc.stdout.count("worst_case") == 1  # one process prints
    assert (tmp_path / "ended0").exists() and (tmp_path / "ended1").exists()


def torchrun_script(script, args):
    """tests/test_distributed.py's torchrun, on a script of this test's own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("streamed", [False, True])
def test_each_process_keeps_only_its_share_of_the_test_images(run, monkeypatch, streamed):
    """Every process held all the evaluation images on its device (12.4 GB at --eval-samples 50000 on ImageNet)."""
    argv = ["--dataset", "folder", "--data-dir", run.data, "--device", "cpu", "--workers", "0"]
    argv += ["--eval-samples", "40", "--batch-size", "8", "--monitor-size", "8"]
    args = fgsm_rs.get_args(argv + ["--image-size", "16"] * streamed)
    whole = common.get_data(args)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: rank)
        monkeypatch.setattr(common, "world", lambda: 2)
        monkeypatch.setattr(imagenet, "world", lambda: 2)
        parts.append(common.get_data(args))
    assert [len(p.test_y) for p in parts] == [24, 16] and whole.test_size == 40
    assert all(p.test_size == 40 for p in parts)
    assert torch.equal(torch.cat([p.test_x for p in parts]), whole.test_x)
    assert whole.class_names == ["ant", "bee", "cat"]


def test_shares_are_whole_batches_and_a_process_may_have_none(run, monkeypatch):
    monkeypatch.setattr(common, "world", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: rank)
        shares.append([common.eval_share(n, 8) for n in (40, 8, 0)])
    assert shares == [
        [slice(0, 24), slice(0, 8), slice(0, 0)],
        [slice(24, 40), slice(8, 8), slice(0, 0)],
    ]
    _, test = common.image_folders("folder", run.data)
    x, y = common.decode_images(test, 0, torch.arange(0))  # the second process of 8 images in 2
    assert x.shape[0] == len(y) == 0


def test_autoattack_runs_batch_by_batch_with_the_seed(monkeypatch):
    """Its own seed was the clock's, and it batched a process's images its own way: not one process's numbers."""
    calls = []

    class AutoAttack:
        def __init__(self, model, norm, eps, seed=None, version="standard", **kw):
            self.seed = seed
            self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
            self.apgd_targeted = SimpleNamespace()
            self.fab = SimpleNamespace()

        def run_standard_evaluation(self, x, y, bs=250):
            calls.append((self.seed, len(y)))
            return x

    monkeypatch.setitem(sys.modules, "autoattack", SimpleNamespace(AutoAttack=AutoAttack))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x = torch.rand(5, 3, 2, 2)
    mask, _ = evaluation.autoattack_correct(model, x, torch.arange(5), 8 / 255, 10, 2, seed=3)
    assert calls == [(3, 2), (3, 2), (3, 1)] and mask.shape == (5,)


# ------------------------------------------------------------------------------ progress and duration


def _clock(monkeypatch, seconds):
    """The clock of the progress lines (common) and of the estimate (evaluation), advancing `seconds` at
    every reading."""
    now = [0.0]

    def tick():
        now[0] += seconds
        return now[0]

    for module in (common, evaluation):
        monkeypatch.setattr(module, "time", SimpleNamespace(time=tick))


def test_progress_lines_come_from_inside_a_batchs_attack(monkeypatch, logged):
    """After "evaluating the last model on 200 test images" nothing was printed for 13.5 minutes: only finished
    batches counted."""
    _clock(monkeypatch, 1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(6, 3, 2, 2)
    evaluation.pgd_correct(model, x, torch.arange(6) % 3, 8 / 255, 2 / 255, 4, 2, batch_size=6,
                       label="PGD-4-2", progress=0.5)  # fmt: skip
    assert len(logged) == 7  # after every step but the last: inside the one batch
    assert logged[0].startswith("# PGD-4-2: 0/6 images (batch 1/1, restart 1/2, step 1/4)")
    assert "(batch 1/1, restart 2/2, step 3/4)" in logged[-1] and "ETA" in logged[-1]


def test_the_duration_estimate_counts_every_step_of_the_protocol(monkeypatch):
    _clock(monkeypatch, 30.0)  # a timed step takes 30 s
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(10, 3, 2, 2)
    seconds = evaluation.eval_seconds(model, x, torch.arange(10) % 3, 3, 2, 4, batch_size=5)
    # 2 batches × 30 s × (PGD 3 × 2 + CW 4 + (2 restarts' + CW's + clean forward) / 3)
    assert seconds == pytest.approx(2 * 30 * (3 * 2 + 4 + 4 / 3))
    assert (
        evaluation.duration(seconds) == "about 11 min"
        and evaluation.duration(20) == "under a minute"
    )


def test_the_run_says_what_it_evaluates_and_how_long_before_it_starts(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        evaluation,
        "evaluate",
        lambda *a, **k: seen.append((tmp_path / "log.txt").read_text()) or {},
    )
    model = common.make_model("wrn-10-1", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    args = _run_args(tmp_path, epochs=1, eval_iters=20, eval_restarts=1, eval_cw_iters=20)
    run = harness.Run(args, _tiny_data())
    run.start_epoch()
    run.end_epoch(0, model, {"model": model}, lr=0.1, loss=1.0, acc=0.5)
    run.finish(model)
    line = seen[0].splitlines()[-1]
    assert line.startswith(
        "# evaluating the last model (epoch 1) on 8 test images with PGD-20-1, CW-20"
    )
    assert "(CPU default; the full protocol: --eval-iters 50 --eval-restarts 10): " in line
    assert line.endswith("under a minute")


def test_a_cpu_evaluates_cheaply_by_default_and_a_gpu_fully(monkeypatch, capsys):
    """PGD-50-10 + CW-20 on 200 test images takes about an hour on a CPU."""
    attacks = ("eval_iters", "eval_restarts", "eval_cw_iters")

    def parsed(*argv):
        args = fgsm_rs.get_args(list(argv))
        return tuple(getattr(args, k) for k in attacks)

    assert parsed("--device", "cpu") == (20, 1, 20)
    assert parsed("--device", "cpu", "--eval-restarts", "10", "--eval-iters", "50") == (50, 10, 20)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parsed("--device", "cuda") == (50, 10, 20)
    with pytest.raises(SystemExit):
        fgsm_rs.get_args(["--help"])
    assert "PGD restarts of the evaluation (default 10 on a GPU, 1 on a CPU)" in " ".join(
        capsys.readouterr().out.split()
    )
