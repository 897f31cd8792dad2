"""Training across processes with torchrun (gloo on the CPU): each process takes an equal part of every batch,
the weights stay identical across processes, two processes train what one does with the same global batch (for a
network without BatchNorm: with it, each process normalises with its own part's statistics, as Wong et al.'s
DataParallel did), a resumed two-process run equals an uninterrupted one, a worker killed mid-epoch under
torchrun's restarts finishes as if uninterrupted, processes started differently or failing alone say so in one
line, and every script runs under two processes."""

import json
import os
import socket
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


@pytest.mark.parametrize("n,batch", [(40, 8), (43, 8), (41, 10), (45, 8)])
def test_each_process_gets_an_equal_disjoint_part_of_every_batch(monkeypatch, n, batch):
    """Two processes split every batch of the one-process run into equal halves (DDP averages their
    gradients with equal weights): a last batch of 5 loses one image, one of 3 (2 + 1) is dropped."""
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
        assert len(a) == len(c) >= 2 and not set(a) & set(c)
        assert a + c == whole[b][: len(a) + len(c)]  # the one-process batch, or all it can split
    last = n % batch  # the one-process run's partial last batch (it drops a lone image)
    even = last - last % 2  # what of it splits evenly over two processes
    assert len(parts[0]) == len(whole) - (2 <= last and even < 4)  # fewer than two images each
    if even >= 4:
        assert len(parts[0][-1]) + len(parts[1][-1]) == even


def mnist_args(root):
    """A tiny MNIST run of fgsm_rs.py whose two-process form equals its one-process form (no BatchNorm,
    FGSM from a zero start, SGD)."""
    flags = (
        "--dataset mnist --epochs 2 --batch-size 50 --delta-init zero --optimizer sgd --lr 0.05 "
    )
    flags += (
        "--eval-samples 20 --eval-iters 2 --eval-restarts 1 --eval-cw-iters 2 --monitor-size 20 "
    )
    return flags.split() + ["--device", "cpu", "--data-dir", str(root / "data")]


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory):
    """The same run (MNIST CNN, no BatchNorm; FGSM from a zero start: nothing random but the data order; SGD, whose
    step follows the gradient smoothly, where Adam's first steps amplify rounding in tiny gradients) in one
    process, in two, and in two interrupted after epoch 1 and resumed."""
    root = tmp_path_factory.mktemp("dist")
    write_mnist(str(root / "data"), n_train=200, n_test=40)
    args = mnist_args(root)
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
    assert proc.stderr.count("fastat: interrupted") == 1  # said once, by the first process
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
        ["free_at.py", flags("free_at", "--replays", "2")],
        ["grad_align.py", flags("grad_align")],
        ["fgsm_ckpt.py", flags("fgsm_ckpt", "--milestones")],
        ["n_fgsm.py", flags("n_fgsm")],
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
    assert codes == [0] * 11 + [2], proc.stderr[-3000:]
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


# Runs tests/_launch.py with per-process changes from the environment: FASTAT_TEST_RANK_ARGS ({rank:
# [flags]}) appended to one process's command; FASTAT_TEST_KILL ("rank epoch batch") kills that process
# with SIGKILL at that batch, in torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0).
PER_PROCESS = """
import json, os, runpy, signal, sys
launch = os.path.join(sys.argv[1], "tests", "_launch.py")
extra = json.loads(os.environ.get("FASTAT_TEST_RANK_ARGS", "{}")).get(os.environ["RANK"], [])
kill = os.environ.get("FASTAT_TEST_KILL", "").split()
if kill and kill[0] == os.environ["RANK"] and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    sys.path.insert(0, sys.argv[1])
    import common
    epochs = common.DeviceLoader.epoch
    def epoch(loader, e):
        for i, batch in enumerate(epochs(loader, e)):
            if loader.shuffle and (e, i) == (int(kill[1]), int(kill[2])):
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch
    common.DeviceLoader.epoch = epoch
sys.argv = [launch, *sys.argv[2:], *extra]
runpy.run_path(launch, run_name="__main__")
"""


def per_process(tmp_path, args, env, expect, restarts=None):
    """torchrun with 2 processes through PER_PROCESS; restarts: c10d rendezvous with that many restarts
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the work-around of pytorch/pytorch#135712)."""
    wrapper = tmp_path / "per_process.py"
    wrapper.write_text(PER_PROCESS)
    rdzv = ["--standalone"]
    if restarts is not None:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "t"]
        rdzv += ["--max-restarts", str(restarts), "--nnodes", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", "2"]
    cmd += [str(wrapper), ROOT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == expect, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_processes_started_with_different_flags_stop_naming_the_flag(mnist_runs, tmp_path):
    """A different --seed on one node trained a quarter of the images twice; a different --lr ended with
    other weights; a different --epochs hung. Every process compares the flags after the group starts."""
    args = ["fgsm_rs.py", *mnist_args(mnist_runs), "--out-dir", str(tmp_path / "run")]
    proc = per_process(tmp_path, args, {"FASTAT_TEST_RANK_ARGS": '{"1": ["--seed", "1"]}'}, 1)
    assert (
        "fastat (process 1): --seed differs between the processes: 0 in process 0, 1" in proc.stderr
    )
    assert "fastat (process 0): --seed differs" in proc.stderr and not (tmp_path / "run").exists()


def test_a_failure_on_another_process_is_explained_by_that_process(mnist_runs, tmp_path):
    args = ["fgsm_rs.py", *mnist_args(mnist_runs), "--out-dir", str(tmp_path / "run")]
    missing = json.dumps(
        {"1": ["--data-dir", str(tmp_path / "missing")]}
    )  # a node without the data
    proc = per_process(tmp_path, args, {"FASTAT_TEST_RANK_ARGS": missing}, 1)
    assert "fastat (process 1): dataset 'mnist' not found in " in proc.stderr
    assert "fastat (process 0): another process stopped" in proc.stderr


def test_a_batch_that_does_not_split_evenly_is_refused(mnist_runs, tmp_path):
    args = ["fgsm_rs.py", *mnist_args(mnist_runs), "--out-dir", str(tmp_path / "run")]
    proc = per_process(tmp_path, args + ["--batch-size", "51"], {}, 1)
    assert "--batch-size 51 does not give each of the 2 processes the same number" in proc.stderr


def test_a_worker_killed_mid_epoch_restarts_and_finishes_as_if_uninterrupted(mnist_runs, tmp_path):
    """The README's command for automatic restarts: torchrun --max-restarts with c10d rendezvous, and
    --resume from the first start. Process 1 is killed (SIGKILL) in the middle of epoch 2."""
    out = str(tmp_path / "run")
    args = ["fgsm_rs.py", *mnist_args(mnist_runs), "--out-dir", out, "--resume"]
    proc = per_process(tmp_path, args, {"FASTAT_TEST_KILL": "1 1 2"}, 0, restarts=1)
    assert "exitcode: -9" in proc.stderr  # it was killed, and restarted
    log = open(os.path.join(out, "log.txt")).read()
    assert "# resumed from" in log and "after epoch 1" in log
    assert comparable(load_results(out)) == comparable(load_results(mnist_runs / "two"))


def test_a_finished_run_says_so_once_under_torchrun(mnist_runs):
    proc = torchrun(["fgsm_rs.py", "--resume", "--out-dir", str(mnist_runs / "two")])
    assert proc.stdout.count("is a finished run") == 1
