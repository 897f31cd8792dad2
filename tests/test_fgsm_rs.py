"""fgsm_rs.py end to end (subprocess, tiny CIFAR-10, small WRN) and its FGSM step."""
import contextlib
import os

import torch

import common
import fgsm_rs
from conftest import check_outputs, check_resume, load_results, run_script, small_args


def test_end_to_end_writes_every_output(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("fgsm_rs.py", small_args(cifar_dir, out))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "fgsm_rs" and res["args"]["epsilon"] == 8 and res["args"]["alpha"] == 10
    # the log line of each epoch reaches stdout too
    assert sum(line.split()[0] in ("1", "2") for line in proc.stdout.splitlines() if line.strip()) == 2
    # weights load into a fresh model with load_state_dict
    model = common.make_model("wrn-10-1", "cifar10")
    model.load_state_dict(torch.load(os.path.join(out, "model_last.pt")))


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    check_resume("fgsm_rs.py", cifar_dir, tmp_path)


def test_resume_with_previous_init_and_early_stop(cifar_dir, tmp_path):
    # the previous-batch δ and the early-stop weights live in the checkpoint too
    a, _ = check_resume("fgsm_rs.py", cifar_dir, tmp_path, delta_init="previous", early_stop=True)
    assert all("es_acc" in r for r in a["epochs"])


def test_mnist_recipe_resumes_exactly(mnist_dir, tmp_path):
    # Adam + the piecewise-linear LambdaLR schedule of the MNIST recipe, on Wong's MNIST CNN
    check_resume("fgsm_rs.py", mnist_dir, tmp_path, dataset="mnist", model="mnist-cnn", batch_size=50)


def test_fgsm_step_is_the_signed_gradient_step_inside_the_ball():
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").eval()
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6)
    x[0] = 0.0  # pixels at the range ends must stay in [0, 1]
    x[1] = 1.0
    eps, alpha = 8 / 255, 10 / 255
    start = torch.empty_like(x).uniform_(-eps, eps)
    delta = fgsm_rs.fgsm_rs_delta(model, x, y, start, eps, alpha, contextlib.nullcontext)
    assert all(p.grad is None for p in model.parameters())  # only ∇δ was computed
    assert delta.abs().max() <= eps + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    # the same step written out: clamp the start into [0,1], one signed gradient step, project
    d = ((x + start).clamp(0, 1) - x).requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x + d), y).backward()
    expected = (x + (d.detach() + alpha * d.grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    torch.testing.assert_close(delta, expected)
    # and it raises the loss over the random start
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(x + delta), y) > ce(model(x + d), y)


def test_alpha_zero_from_zero_is_plain_training(cifar_dir, tmp_path, monkeypatch):
    """`--alpha 0 --delta-init zero` (README's floor) trains on clean images and runs no attack pass."""
    import sys
    monkeypatch.setattr(fgsm_rs, "fgsm_rs_delta", lambda *a, **k: (_ for _ in ()).throw(AssertionError("attacked")))
    out = str(tmp_path / "plain")
    monkeypatch.setattr(sys, "argv", ["fgsm_rs.py", *small_args(cifar_dir, out, epochs=1, alpha=0, delta_init="zero",
                                                               eval_iters=1)])
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    fgsm_rs.main()  # the patched attack would have raised: every weight step saw x + 0
    res = load_results(out)
    assert res["args"]["alpha"] == 0 and len(res["epochs"]) == 1
