"""fgsm_sdi.py: the generator's range, schedule and gradient, and the script end to end with resume."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import common
import fgsm_sdi
from conftest import check_outputs, check_resume, small_args

EPS, ALPHA = 8 / 255, 8 / 255
nullcast = contextlib.nullcontext


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range
    return x, torch.arange(n) % 10


def test_eta_is_inside_the_ball_and_the_pixel_range_for_any_input():
    torch.manual_seed(0)
    generator = fgsm_sdi.Generator(3)
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(50)  # saturate the tanh: the bound must come from the architecture, not small weights
    for scale in (1.0, 1e3):
        x = (torch.randn(4, 3, 16, 16) * scale).clamp(0, 1) if scale == 1.0 else torch.rand(4, 3, 16, 16)
        s = torch.randn(4, 3, 16, 16).sign() * scale
        raw = EPS * generator(x, s)
        assert raw.abs().max() <= EPS * (1 + 1e-6) and raw.abs().max() > 0.9 * EPS
        eta = fgsm_sdi.sdi_init(generator, x, s, EPS)
        assert eta.abs().max() <= EPS + 1e-7 and (x + eta).min() >= 0 and (x + eta).max() <= 1


def test_generator_gradient_equals_the_one_with_the_fgsm_step_detached():
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").eval()
    generator = fgsm_sdi.Generator(3)
    x, y = batch()
    s = fgsm_sdi.signed_input_grad(model, x, y, nullcast)
    # lr 0: the step leaves θ alone, so p.grad can be read after it.
    fgsm_sdi.generator_step(model, generator, torch.optim.SGD(generator.parameters(), lr=0.0), x, y, s,
                            EPS, ALPHA, nullcast)
    assert not generator.training  # back in eval mode once the update is done
    got = [p.grad.clone() for p in generator.parameters()]
    # The same written out: the FGSM direction taken at a detached x+η, a constant for θ.
    generator.train()
    eta = ((x + EPS * generator(x, s)).clamp(0, 1) - x)
    x_init = (x + eta).detach().requires_grad_(True)
    direction = torch.autograd.grad(F.cross_entropy(model(x_init), y), x_init)[0].sign()
    delta = (x + (eta + ALPHA * direction).clamp(-EPS, EPS)).clamp(0, 1) - x
    expected = torch.autograd.grad(-F.cross_entropy(model(x + delta), y), list(generator.parameters()))
    assert any(e.abs().sum() > 0 for e in expected)  # η does carry a gradient to θ
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_generator_step_leaves_the_target_weights_and_grads_alone():
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").train()  # train mode, as in main()
    generator = fgsm_sdi.Generator(3)
    gen_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    x, y = batch()
    s = fgsm_sdi.signed_input_grad(model, x, y, nullcast)
    target_before = [p.detach().clone() for p in model.parameters()]
    gen_before = [p.detach().clone() for p in generator.parameters()]
    fgsm_sdi.generator_step(model, generator, gen_opt, x, y, s, EPS, ALPHA, nullcast)
    assert all(torch.equal(a, p) for a, p in zip(target_before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(gen_before, generator.parameters()))


def test_generator_steps_raise_the_target_loss():
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").eval()  # a fixed target
    generator = fgsm_sdi.Generator(3)
    gen_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    x, y = batch(8)
    s = fgsm_sdi.signed_input_grad(model, x, y, nullcast)

    def target_loss():  # the loss the target's own step sees: generator in eval mode
        generator.eval()
        with torch.no_grad():
            eta = fgsm_sdi.sdi_init(generator, x, s, EPS)
        delta = fgsm_sdi.fgsm_from(model, x, y, eta, EPS, ALPHA, nullcast)
        with torch.no_grad():
            return F.cross_entropy(model(x + delta), y).item()

    before = target_loss()
    for _ in range(10):
        fgsm_sdi.generator_step(model, generator, gen_opt, x, y, s, EPS, ALPHA, nullcast)
    assert target_loss() > before


def test_fgsm_step_is_capped_at_eps_before_it_is_added_to_eta():
    # The authors' code: δ = Π(η + Π(α·sign(g))). With α = 1.25ε (the MNIST recipe) a step against η < 0 ends
    # at η + ε, not at ε; with α ≤ ε the cap changes nothing.
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").eval()
    x, y = batch()
    x = x * 0.5 + 0.25  # away from 0 and 1: no pixel clamp binds, only the ε-ball
    eta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * EPS
    x_init = (x + eta).requires_grad_(True)
    direction = torch.autograd.grad(F.cross_entropy(model(x_init), y), x_init)[0].sign()
    for alpha in (1.25 * EPS, 0.5 * EPS):
        delta = fgsm_sdi.fgsm_from(model, x, y, eta, EPS, alpha, nullcast)
        expected = (eta + min(alpha, EPS) * direction).clamp(-EPS, EPS)
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    # the cap matters at α = 1.25ε: where the step goes against η's sign, the uncapped one goes min(ε/4, |η|)
    # further
    capped = (eta + EPS * direction).clamp(-EPS, EPS)
    uncapped = (eta + 1.25 * EPS * direction).clamp(-EPS, EPS)
    assert (uncapped - capped).abs().max() > EPS / 10


def test_label_smoothing_below_one_over_c_is_a_usage_error(capsys):
    for argv in (["--label-smoothing", "0.09"], ["--label-smoothing", "1.5"],
                 ["--dataset", "cifar100", "--label-smoothing", "0.009"]):
        with pytest.raises(SystemExit) as err:
            fgsm_sdi.get_args(argv)
        assert err.value.code == 2 and "--label-smoothing" in capsys.readouterr().err
    assert fgsm_sdi.get_args(["--label-smoothing", "0.1"]).label_smoothing == 0.1          # 1/C: uniform labels
    assert fgsm_sdi.get_args(["--dataset", "cifar100", "--label-smoothing", "0.05"]).label_smoothing == 0.05


def test_generator_weight_decay_follows_the_targets(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    fgsm_sdi.main(small_args(mnist_dir, out, epochs=1, dataset="mnist", model="mnist-cnn", weight_decay=1e-3,
                             eval_iters=1))
    tracked = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["tracked"]
    assert tracked["gen_opt"]["param_groups"][0]["weight_decay"] == 1e-3
    assert tracked["opt"]["param_groups"][0]["weight_decay"] == 1e-3


def test_generator_is_updated_on_iterations_0_k_2k_of_each_epoch(mnist_dir, tmp_path, monkeypatch):
    # Tiny MNIST (cheap CNN, 1-channel generator): 200 images / batch 32 = 7 batches per epoch;
    # k = 3 -> iterations 0, 3, 6 of each epoch (the count restarts every epoch, as in Alg. 3 and the code).
    seen = {"batches": 0, "updates": []}
    epoch_of_loader, step = common.DeviceLoader.epoch, fgsm_sdi.generator_step

    def counting_epoch(self, epoch):
        seen["batches"] = 0
        for item in epoch_of_loader(self, epoch):
            seen["batches"] += 1
            yield item

    def recording_step(*args, **kwargs):
        seen["updates"].append(seen["batches"] - 1)  # index of the batch being trained on
        return step(*args, **kwargs)

    monkeypatch.setattr(common.DeviceLoader, "epoch", counting_epoch)
    monkeypatch.setattr(fgsm_sdi, "generator_step", recording_step)
    fgsm_sdi.main(small_args(mnist_dir, str(tmp_path / "run"), epochs=2, gen_interval=3, dataset="mnist",
                             model="mnist-cnn"))
    assert seen["batches"] == 7 and seen["updates"] == [0, 3, 6, 0, 3, 6]


def test_end_to_end_and_resume_include_the_generator(cifar_dir, tmp_path):
    a, _ = check_resume("fgsm_sdi.py", cifar_dir, tmp_path, gen_interval=3)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "fgsm_sdi" and a["args"]["alpha"] == 8 and all("gen_loss" in r for r in a["epochs"])
    # multistep lr: 16 iterations, milestones round(16·100/110) = round(16·105/110) = 15: ×0.01 by the end
    assert a["epochs"][0]["lr"] == 0.1 and a["epochs"][1]["lr"] == pytest.approx(1e-3)
    # the generator and its optimiser continue exactly across the interruption
    full, part = (torch.load(os.path.join(tmp_path, d, "checkpoint.pt"), weights_only=False)["tracked"]
                  for d in ("full", "part"))
    for k, v in full["generator"].items():
        assert torch.equal(v, part["generator"][k]), k
    for k, v in full["gen_opt"]["state"].items():
        assert all(torch.equal(t, part["gen_opt"]["state"][k][n]) for n, t in v.items())
