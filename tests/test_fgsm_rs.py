"""fgsm_rs.py: its copyable core, the guard, the schedules, and the script end to end (subprocess, tiny CIFAR-10),
also under torchrun (two CPU processes)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    check_outputs,
    check_resume,
    comparable,
    copy_of,
    load_results,
    run_script,
    small_args,
    write_cifar,
)

import common
import evaluate
import evaluation
import fgsm_rs
import imagenet


def test_end_to_end_writes_every_output(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("fgsm_rs.py", small_args(cifar_dir, out))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "fgsm_rs" and res["args"]["epsilon"] == 8 and res["args"]["alpha"] == 10
    # the header comes first, then the row of each epoch, on stdout too
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    header = next(i for i, w in enumerate(lines) if w[:2] == ["epoch", "seconds"])
    rows = [i for i, w in enumerate(lines) if w[0].isdigit()]
    assert header < rows[0] and [lines[i][0] for i in rows] == ["1", "2"]
    # the weights load from the run folder alone: no data needed
    model, saved = evaluate.load_model(os.path.join(out, "model_last.pt"))
    assert saved["args"]["model"] == "wrn-10-1" and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    """In three processes, as a real interruption: the resumed run is given nothing but --resume --out-dir."""
    check_resume("fgsm_rs.py", cifar_dir, tmp_path, in_process=False)


def test_resume_with_previous_init_and_early_stop(cifar_dir, tmp_path):
    # the previous-batch δ and the guard's weights live in the checkpoint too
    a, _ = check_resume("fgsm_rs.py", cifar_dir, tmp_path, delta_init="previous", early_stop=True)
    assert all("es_acc" in r for r in a["epochs"])


def test_mnist_recipe_resumes_exactly(mnist_dir, tmp_path):
    # Adam + the piecewise-linear LambdaLR schedule of the MNIST recipe, on Wong's MNIST CNN
    check_resume(
        "fgsm_rs.py", mnist_dir, tmp_path, dataset="mnist", model="mnist-cnn", batch_size=50
    )


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16 * 16, 10),
    )


def test_the_core_copies_and_is_the_signed_gradient_step_inside_the_ball():
    fgsm_rs_delta = copy_of(fgsm_rs.fgsm_rs_delta)  # defined again with torch alone
    model = _net()
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6)
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range must stay in it
    eps, alpha = 8 / 255, 10 / 255
    start = torch.empty_like(x).uniform_(-eps, eps)
    delta = fgsm_rs_delta(model, x, y, eps, alpha, start)
    assert all(p.grad is None for p in model.parameters())  # only ∇δ was computed
    assert delta.abs().max() <= eps + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    # the step written out: the start clamped into [0, 1], one signed gradient step, projected
    d = ((x + start).clamp(0, 1) - x).requires_grad_(True)
    F.cross_entropy(model(x + d), y).backward()
    expected = (x + (d.detach() + alpha * d.grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    torch.testing.assert_close(delta, expected)
    with torch.no_grad():  # it raises the loss over its start
        assert F.cross_entropy(model(x + delta), y) > F.cross_entropy(model(x + d), y)
    # a random start by default: δ differs between calls and stays in the ball
    other = fgsm_rs_delta(model, x, y, eps, alpha)
    assert not torch.equal(other, delta) and other.abs().max() <= eps + 1e-6


def test_the_core_refuses_normalised_images():
    """A Normalize() in the transform gives images outside [0, 1]; the pixel clamp would then make δ huge."""
    x = (torch.rand(4, 3, 32, 32) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        fgsm_rs.fgsm_rs_delta(_net(), x, torch.arange(4), 8 / 255, 10 / 255)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_direction(dtype):
    model, x, y = _net(), torch.rand(6, 3, 32, 32), torch.arange(6)
    start = torch.zeros_like(x)
    fp32 = fgsm_rs.fgsm_rs_delta(model, x, y, 8 / 255, 8 / 255, start)
    low = fgsm_rs.fgsm_rs_delta(model, x, y, 8 / 255, 8 / 255, start, autocast=dtype)
    assert (low != 0).float().mean() > 0.9  # no underflow to a zero gradient (fp16 scales the loss)
    assert (low == fp32).float().mean() > 0.9  # the same signs, up to rounding


def test_alpha_zero_from_zero_is_plain_training(cifar_dir, tmp_path, monkeypatch, no_checksum):
    """`--alpha 0 --delta-init zero` (the floor) trains on clean images and runs no attack pass."""
    monkeypatch.setattr(
        fgsm_rs, "fgsm_rs_delta", lambda *a, **k: (_ for _ in ()).throw(AssertionError("attacked"))
    )
    out = str(tmp_path / "plain")
    fgsm_rs.main(small_args(cifar_dir, out, epochs=1, alpha=0, delta_init="zero", eval_iters=1))
    res = load_results(out)
    assert res["args"]["alpha"] == 0 and len(res["epochs"]) == 1


@pytest.mark.parametrize("epsilon", [8, 16])
def test_the_early_stop_guard_steps_by_a_quarter_of_epsilon(
    cifar_dir, tmp_path, monkeypatch, no_checksum, epsilon
):
    """Wong's guard is PGD-5 with step 2/255 at ε = 8/255; a fixed 2/255 could not reach the surface of a larger
    ball (5 steps: 10/255) and would miss the overfitting: the step is ε/4."""
    steps, real = [], evaluation.pgd_correct

    def spy(model, x, y, eps, step, iters, *a, **k):
        if iters == 5:
            steps.append((eps, step))
        return real(model, x, y, eps, step, iters, *a, **k)

    monkeypatch.setattr(evaluation, "pgd_correct", spy)
    fgsm_rs.main(
        small_args(cifar_dir, str(tmp_path / "run"), epochs=1, early_stop=True, epsilon=epsilon)
    )
    assert steps == [(epsilon / 255, epsilon / 255 / 4)]


@pytest.mark.parametrize(
    "flags", [{}, {"optimizer": "adam"}, {"optimizer": "adam", "lr_schedule": "piecewise"}]
)
def test_the_lr_schedule_completes_when_the_loader_drops_a_lone_sample(
    tmp_path, no_checksum, flags
):
    """129 images in batches of 128: the loader drops the lone 129th (train-mode BN cannot take it), so an epoch is
    one step, and the schedule must be planned for that: the triangle ends at 0 after the last epoch."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = str(tmp_path / "run")
    fgsm_rs.main(
        small_args(
            str(tmp_path / "d"),
            out,
            epochs=4,
            batch_size=128,
            monitor_size=8,
            eval_samples=8,
            **flags,
        )
    )
    lrs = [r["lr"] for r in load_results(out)["epochs"]]
    assert lrs[-1] == 0 and max(lrs) > 0


def test_each_recipe_names_its_lr_schedule():
    """ImageNet's schedule is chosen by --lr-schedule imagenet (the ImageNet recipe's), as in the other scripts."""
    assert (fgsm_rs.get_args([]).lr_schedule, fgsm_rs.get_args([]).optimizer) == ("cyclic", "sgd")
    mnist = fgsm_rs.get_args(["--dataset", "mnist"])
    assert (mnist.lr_schedule, mnist.optimizer) == ("piecewise", "adam")
    assert fgsm_rs.get_args(["--dataset", "imagenet"]).lr_schedule == "imagenet"


def test_lr_schedule_imagenet_is_wongs_schedule_without_decay_on_batchnorm(
    cifar_dir, tmp_path, no_checksum
):
    out = str(tmp_path / "run")
    fgsm_rs.main(small_args(cifar_dir, out, lr_schedule="imagenet", eval_iters=1))
    opt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["objects"]["opt"]
    decayed, not_decayed = opt["param_groups"]
    model, _ = evaluate.load_model(os.path.join(out, "model_last.pt"))
    batchnorm = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(not_decayed["params"]) == 2 * len(batchnorm) > 0  # their weights and biases
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (5e-4, 0.0)
    # the lr of imagenet.imagenet_lr after the run's 2 × 8 iterations, set every iteration
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    loader = type("Loader", (), {"batches": lambda self, e: 8})()
    sched = imagenet.imagenet_lr(probe, loader, 2)
    lrs = []
    for _ in range(2):
        for _ in range(8):
            probe.step()
            sched.step()
        lrs.append(probe.param_groups[0]["lr"])
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx(lrs)


# A launcher for torchrun (through tests/_launch.py): the scripts of a plan in turn, PGD from a zero start (the
# attack is then the same in every process and in the test's own evaluation), and Ctrl-C right after epoch 1 of the
# runs whose --out-dir is named "part".
LAUNCHER = """
import json, os, runpy, sys
import torch.distributed
import common, evaluation, harness
attack_pgd = evaluation.attack_pgd
evaluation.attack_pgd = lambda *a, **k: attack_pgd(*a, **{**k, "rand_init": False})
end_epoch = harness.Run.end_epoch
def end_epoch_then_interrupt(run, epoch, *a, **k):
    end_epoch(run, epoch, *a, **k)
    if epoch == 0 and os.path.basename(run.args.out_dir) == "part":
        raise KeyboardInterrupt
harness.Run.end_epoch = end_epoch_then_interrupt
plan_file = sys.argv[1]
codes = []
for script, args in json.load(open(plan_file)):
    sys.argv = [script, *args]
    try:
        runpy.run_path(os.path.join(os.path.dirname(common.__file__), script), run_name="__main__")
        codes.append(0)
    except SystemExit as err:
        codes.append(err.code)
    if common.world() > 1:  # as when the processes end: the first one's files are written
        torch.distributed.barrier()
if common.rank() == 0:
    json.dump(codes, open(plan_file + ".out", "w"))
"""


def run_plan_under_torchrun(plan, folder, setup=""):
    """Each [script, args] of `plan` in turn in two torchrun processes (one start); returns the exit codes. setup:
    code the launcher runs first (after its imports: json, os, runpy, sys, torch.distributed, common, harness)."""
    from test_distributed import torchrun

    launcher = folder / "launcher.py"
    launcher.write_text(
        LAUNCHER.replace(
            "import common, evaluation, harness\n", f"import common, evaluation, harness\n{setup}\n"
        )
    )
    with open(folder / "plan.json", "w") as f:
        json.dump(plan, f)
    torchrun([str(launcher), str(folder / "plan.json")])
    with open(folder / "plan.json.out") as f:
        return json.load(f)


def zero_start_pgd(monkeypatch):
    """PGD from a zero start in this process, as the launcher makes it in the torchrun processes."""
    pgd = evaluation.attack_pgd
    monkeypatch.setattr(
        evaluation, "attack_pgd", lambda *a, **k: pgd(*a, **{**k, "rand_init": False})
    )


@pytest.fixture(scope="module")
def two_processes(cifar_dir, tmp_path_factory):
    """In one torchrun start of two processes: --delta-init previous for 2 epochs, uninterrupted and interrupted
    after epoch 1 then resumed; --early-stop for one epoch in batches of 66 (33 images each), at ε 1/255
    (its PGD-5 accuracy is then near the clean one, neither 0 nor 1)."""
    root = tmp_path_factory.mktemp("fgsm_rs_two")
    guard = small_args(
        cifar_dir, str(root / "guard"), epochs=1, early_stop=True, batch_size=66, epsilon=1
    )
    plan = [
        ["fgsm_rs.py", small_args(cifar_dir, str(root / "full"), delta_init="previous")],
        ["fgsm_rs.py", small_args(cifar_dir, str(root / "part"), delta_init="previous")],
        ["fgsm_rs.py", ["--resume", "--out-dir", str(root / "part")]],
        ["fgsm_rs.py", guard],
    ]
    assert run_plan_under_torchrun(plan, root) == [0, 130, 0, 0]
    return root, guard


def test_previous_delta_resumes_exactly_under_two_processes(two_processes):
    """Each process chains its own part of the batches' δ: the checkpoint keeps every process's, and the resumed
    run ends with the numbers of the uninterrupted one."""
    root, _ = two_processes
    full, part = load_results(root / "full"), load_results(root / "part")
    assert full["processes"] == 2 and full["args"]["delta_init"] == "previous"
    assert comparable(full) == comparable(part)


def test_the_guard_accuracy_of_two_processes_is_the_whole_first_batchs(
    two_processes, monkeypatch, no_checksum
):
    """The guard's PGD-5 accuracy under torchrun: one model (the first process's BatchNorm statistics, saved as
    model_last.pt) on that epoch's whole first batch, of which each process holds a part."""
    root, guard = two_processes
    res = load_results(root / "guard")
    model, _ = evaluate.load_model(str(root / "guard" / "model_last.pt"))
    data = common.get_data(fgsm_rs.get_args(guard))
    x, y, _ = next(iter(data.train.epoch(0)))  # one process: the whole batch
    zero_start_pgd(monkeypatch)
    eps = 1 / 255
    correct = evaluation.pgd_correct(model, x, y, eps, eps / 4, 5).sum().item()
    # the whole batch's count with the saved model (equal parts: batches split evenly, harness.setup)
    assert len(y) == 66 and res["processes"] == 2 and 0 < correct < 66
    assert res["epochs"][0]["es_acc"] * 66 == pytest.approx(correct)
