"""fgsm_rs.py: its copyable core, the guard, the schedules, and the script end to end (subprocess, tiny CIFAR-10)."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    check_outputs,
    check_resume,
    copy_of,
    load_results,
    run_script,
    small_args,
    write_cifar,
)

import evaluate
import evaluation
import fgsm_rs


def test_end_to_end_writes_every_output(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("fgsm_rs.py", small_args(cifar_dir, out))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "fgsm_rs" and res["args"]["epsilon"] == 8 and res["args"]["alpha"] == 10
    # the header comes first, then the row of each epoch, on stdout too
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert lines[1][:2] == ["epoch", "seconds"] and [w[0] for w in lines if w[0].isdigit()] == [
        "1",
        "2",
    ]
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


@pytest.mark.parametrize("flags", [{}, {"optimizer": "adam"}])
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
