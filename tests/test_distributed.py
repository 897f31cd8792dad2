"""Training across processes with torchrun (gloo on the CPU): each process takes its part of every batch, the weights
stay identical across processes, two processes train what one does with the same global batch, a resumed two-process
run equals an uninterrupted one, and every script runs under two processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, comparable, load_results, write_mnist

import common
import fgsm_rs


def torchrun(args, env=None, expect=0):
    """`torchrun --standalone --nproc_per_node 2 tests/_launch.py ARGS`, one thread per process."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "tests", "_launch.py"),
        *args,
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(env or {})},
    )
    assert proc.returncode == expect, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.mark.parametrize("n,batch", [(40, 8), (43, 8), (41, 10)])
def test_each_process_gets_a_disjoint_part_of_every_batch(monkeypatch, n, batch):
    images, labels = torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n)
    loader = common.DeviceLoader(
        images, labels, torch.arange(n), batch, shuffle=True, crop=1, flip=True, seed=3
    )
    whole = [idx.tolist() for _, _, idx in loader.epoch(2)]
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: rank)
        monkeypatch.setattr(common, "world", lambda: 2)
        parts.append([idx.tolist() for _, _, idx in loader.epoch(2)])
        assert len(parts[-1]) == len(loader)  # every process runs every step of the schedule
    for b, (a, c) in enumerate(zip(*parts)):
        assert (
            len(a) >= 2 and len(c) >= 2 and not set(a) & set(c) and a + c == whole[b]
        )  # the one-process batch
    # a last batch too small to give each process two images (43 = 5 × 8 + 3) is dropped
    assert len(parts[0]) == len(whole) - (
        n % batch in (2, 3)
    )  # (a lone one is dropped with one process too)


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory):
    """The same run (MNIST CNN, no BatchNorm; FGSM from a zero start: nothing random but the data order; SGD, whose
    step follows the gradient smoothly, where Adam's first steps amplify rounding in tiny gradients) in one
    process, in two, and in two interrupted after epoch 1 and resumed."""
    root = tmp_path_factory.mktemp("dist")
    write_mnist(str(root / "data"), n_train=200, n_test=40)
    args = [
        "--dataset",
        "mnist",
        "--data-dir",
        str(root / "data"),
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--delta-init",
        "zero",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--eval-samples",
        "20",
        "--eval-iters",
        "2",
        "--eval-restarts",
        "1",
        "--eval-cw-iters",
        "2",
        "--monitor-size",
        "20",
        "--device",
        "cpu",
    ]
    torch.set_num_threads(1)
    fgsm_rs.main(args + ["--out-dir", str(root / "one")])
    os.makedirs(root / "weights")
    torchrun(
        ["fgsm_rs.py", *args, "--out-dir", str(root / "two")],
        env={"FASTAT_TEST_WEIGHTS_DIR": str(root / "weights")},
    )
    part = str(root / "part")
    # torchrun exits 1 when a process fails; each process exited 130, as Ctrl-C makes a script do
    proc = torchrun(
        ["fgsm_rs.py", *args, "--out-dir", part],
        env={"FASTAT_TEST_INTERRUPT_AFTER_EPOCH": "1"},
        expect=1,
    )
    assert "exitcode  : 130" in proc.stderr and "--resume" in proc.stderr
    assert not os.path.exists(os.path.join(part, "results.json"))
    torchrun(["fgsm_rs.py", "--resume", "--out-dir", part])
    return root


def test_two_processes_keep_identical_weights_and_train_what_one_does(mnist_runs):
    rank0, rank1 = (torch.load(mnist_runs / "weights" / f"fgsm_rs-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bit-identical across the processes
    one, two = (
        torch.load(mnist_runs / "one" / "model_last.pt"),
        torch.load(mnist_runs / "two" / "model_last.pt"),
    )
    assert all(
        torch.equal(rank0[k], two[k]) for k in two
    )  # the first process wrote its own weights
    for k in one:  # the gradients of two halves averaged = the gradient of the whole batch, up to float rounding
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    a, b = load_results(mnist_runs / "one"), load_results(mnist_runs / "two")
    for r1, r2 in zip(a["epochs"], b["epochs"]):
        assert (
            abs(r1["loss"] - r2["loss"]) < 1e-4
            and abs(r1["acc"] - r2["acc"]) < 1e-6
            and r1["lr"] == r2["lr"]
        )
    assert (b["processes"], b["batch_per_process"], a["processes"]) == (2, 25, 1)
    assert b["eval"]["images"] == 20 and set(b["final"]["last"]) == set(a["final"]["last"])


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(mnist_runs):
    assert comparable(load_results(mnist_runs / "two")) == comparable(
        load_results(mnist_runs / "part")
    )
    log = (mnist_runs / "part" / "log.txt").read_text()
    assert (
        log.count("# resumed from") == 1 and len(log.splitlines()) > 6
    )  # one log, written by one process


def test_every_script_runs_one_epoch_under_two_processes(cifar_dir, tmp_path):
    """One torchrun start runs each script for one epoch in turn, and both processes end with one model (weights and
    BatchNorm statistics); fgsm_mep.py refuses (its memories stay in one process)."""

    def flags(name, *own):
        return [
            "--dataset",
            "cifar10",
            "--data-dir",
            cifar_dir,
            "--model",
            "wrn-10-1",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--eval-samples",
            "8",
            "--eval-iters",
            "2",
            "--eval-restarts",
            "1",
            "--eval-cw-iters",
            "2",
            "--monitor-size",
            "8",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / name),
            *own,
        ]

    plan = [
        ["fgsm_rs.py", flags("fgsm_rs")],
        ["fgsm_sdi.py", flags("fgsm_sdi", "--gen-every", "4")],
        ["atlas.py", flags("atlas", "--ramp-epochs", "0", "--val-size", "32", "--val-iters", "2")],
        ["amata.py", flags("amata", "--k-min", "2", "--k-max", "2", "--milestones")],
        [
            "las_at.py",
            flags(
                "las_at",
                "--strategy-model",
                "wrn-10-1",
                "--iters-set",
                "1",
                "2",
                "--strategy-every",
                "4",
            ),
        ],
        ["latent_at.py", flags("latent_at")],
        ["rmcla.py", flags("rmcla", "--milestones")],
        ["fgsm_mep.py", flags("fgsm_mep")],
    ]
    with open(tmp_path / "plan.json", "w") as f:
        json.dump(plan, f)
    os.makedirs(tmp_path / "weights")
    proc = torchrun(
        ["--each", str(tmp_path / "plan.json")],
        env={"FASTAT_TEST_WEIGHTS_DIR": str(tmp_path / "weights")},
    )
    with open(tmp_path / "plan.json.out") as f:
        codes = json.load(f)
    assert codes == [0] * 7 + [2], proc.stderr[-3000:]
    assert "fgsm_mep.py runs in one process" in proc.stderr
    for name, _ in plan[:-1]:
        res = load_results(tmp_path / name[:-3])
        assert (
            res["processes"] == 2
            and len(res["epochs"]) == 1
            and 0 <= res["final"]["last"]["worst_case"] <= 1
        )
        # one model in both processes, BatchNorm's running statistics included (each moved its own during the epoch)
        rank0, rank1 = (
            torch.load(tmp_path / "weights" / f"{name[:-3]}-rank{r}.pt") for r in (0, 1)
        )
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), name
        saved = torch.load(tmp_path / name[:-3] / "model_last.pt")
        assert all(torch.equal(rank0[k], saved[k]) for k in saved), name
