"""fgsm_sdi.py: its copyable core, generator and generator step, the schedules, the script end to end with resume."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_mnist

import common
import fgsm_sdi
import harness

EPS, ALPHA = 8 / 255, 8 / 255


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range
    return x, torch.arange(n) % 10


def target(mode="train"):
    """A tiny target with BatchNorm (its running statistics tell which passes it saw)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 10),
    )
    return net.train(mode == "train")


def generator(seed=0):
    torch.manual_seed(seed)
    return copy_of(fgsm_sdi.Generator)(3)  # the class, defined again with torch alone


def clean_sign(model, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return x.grad.sign()


def fgsm_capped(model, x, y, eta, eps, alpha):
    """eq. (7) written out: the FGSM direction at x + η, the step capped at ε, added to η, projected."""
    x_init = (x + eta).detach().requires_grad_(True)
    direction = torch.autograd.grad(F.cross_entropy(model(x_init), y), x_init)[0].sign()
    return (x + (eta + (alpha * direction).clamp(-eps, eps)).clamp(-eps, eps)).clamp(0, 1) - x


def test_the_core_copies_and_equals_eqs_5_to_7_written_out():
    fgsm_sdi_delta = copy_of(fgsm_sdi.fgsm_sdi_delta)
    model, gen = target("eval"), generator().eval()
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, gen)]
    x, y = batch()
    delta = fgsm_sdi_delta(model, gen, x, y, EPS, ALPHA)
    assert delta.abs().max() <= EPS + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    # input gradients only
    assert all(p.grad is None for p in [*model.parameters(), *gen.parameters()])
    # both used in the mode they were in: in eval mode,
    assert not model.training and not gen.training
    for m, state in zip((model, gen), states):  # their weights and BN statistics are left alone
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    s_x = clean_sign(model, x, y)  # eq. (5)
    with torch.no_grad():
        eta = (x + EPS * gen(x, s_x)).clamp(0, 1) - x  # eq. (6), pixel-clamped
    torch.testing.assert_close(delta, fgsm_capped(model, x, y, eta, EPS, ALPHA))
    # a given s_x is used as it is: the opposite sign gives another η_g, hence another δ_g
    other = fgsm_sdi_delta(model, gen, x, y, EPS, ALPHA, signed_grad=-s_x)
    assert not torch.equal(other, delta)
    with torch.no_grad():  # the FGSM step raises the loss over the initialisation alone
        assert F.cross_entropy(model(x + delta), y) > F.cross_entropy(model(x + eta), y)


def test_the_core_refuses_normalised_images():
    x = (torch.rand(4, 3, 32, 32) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        fgsm_sdi.fgsm_sdi_delta(target(), generator(), x, torch.arange(4), EPS, ALPHA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_perturbation(dtype):
    model, gen, (x, y) = target("eval"), generator().eval(), batch()
    fp32 = fgsm_sdi.fgsm_sdi_delta(model, gen, x, y, EPS, ALPHA)
    low = fgsm_sdi.fgsm_sdi_delta(model, gen, x, y, EPS, ALPHA, autocast=dtype)
    assert low.abs().max() <= EPS + 1e-6
    assert ((low - fp32).abs() < EPS / 20).float().mean() > 0.8  # mostly the same δ, up to rounding


def test_the_generators_output_is_inside_the_ball_whatever_its_weights():
    gen = generator()
    with torch.no_grad():
        for p in gen.parameters():
            # saturate the tanh: the bound must come from the architecture, not small weights
            p.mul_(50)
    x, s = torch.rand(4, 3, 16, 16), torch.randn(4, 3, 16, 16).sign() * 1e3
    raw = EPS * gen(x, s)
    assert raw.abs().max() <= EPS * (1 + 1e-6) and raw.abs().max() > 0.9 * EPS


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_generator_step_ascends_through_eta_only_and_restores_the_generators_mode(mode):
    generator_step = copy_of(fgsm_sdi.generator_step)
    model, gen = target("eval"), generator().train(mode == "train")
    x, y = batch()
    # lr 0: the step leaves θ alone, so p.grad can be read after it.
    loss, s_x = generator_step(
        model, gen, torch.optim.SGD(gen.parameters(), lr=0.0), x, y, EPS, ALPHA
    )
    assert gen.training == (mode == "train")  # handed back in the mode it was found in
    assert torch.equal(s_x, clean_sign(model, x, y))  # eq. (5), returned for this iteration's δ_g
    got = [p.grad.clone() for p in gen.parameters()]
    # The same written out, in train mode: the FGSM direction taken at a detached x + η, a constant for θ.
    gen.train()
    eta = (x + EPS * gen(x, s_x)).clamp(0, 1) - x
    # its FGSM direction is a constant: θ acts through η only
    delta = fgsm_capped(model, x, y, eta, EPS, ALPHA)
    expected_loss = F.cross_entropy(model(x + delta), y)
    expected = torch.autograd.grad(-expected_loss, list(gen.parameters()))
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert any(e.abs().sum() > 0 for e in expected)  # η does carry a gradient to θ
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_generator_step_leaves_the_targets_weights_grads_and_statistics_alone():
    model, gen = target("eval"), generator()
    state = {
        k: v.clone() for k, v in model.state_dict().items()
    }  # weights and BN running statistics
    gen_before = [p.detach().clone() for p in gen.parameters()]
    x, y = batch()
    fgsm_sdi.generator_step(
        model, gen, torch.optim.Adam(gen.parameters(), lr=1e-3), x, y, EPS, ALPHA
    )
    assert (
        all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not model.training
    )
    assert all(p.grad is None for p in model.parameters())  # backward(inputs=θ) never formed them
    assert any(not torch.equal(a, p) for a, p in zip(gen_before, gen.parameters()))
    # in train mode (as in main() and the code) the target's BN statistics see the step's passes, by design
    model.train()
    fgsm_sdi.generator_step(
        model, gen, torch.optim.Adam(gen.parameters(), lr=1e-3), x, y, EPS, ALPHA
    )
    assert not torch.equal(model[1].running_mean, state["1.running_mean"]) and model.training


def test_generator_steps_raise_the_loss_the_targets_step_sees():
    model, gen = target("eval"), generator()  # a fixed target
    gen_opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    x, y = batch(16)

    def target_loss():  # the generator in eval mode, as for the target's step
        gen.eval()
        delta = fgsm_sdi.fgsm_sdi_delta(model, gen, x, y, EPS, ALPHA)
        with torch.no_grad():
            return F.cross_entropy(model(x + delta), y).item()

    before = target_loss()
    for _ in range(10):
        fgsm_sdi.generator_step(model, gen, gen_opt, x, y, EPS, ALPHA)
    assert target_loss() > before


class Fixed(nn.Module):
    """A 'generator' that returns a given η/ε, to test eq. (7) alone."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, signed_grad):
        return self.out


def test_the_fgsm_step_is_capped_at_eps_before_it_is_added_to_eta():
    # The authors' code: δ = Π(η + Π(α·sign(g))). With α = 1.25ε (the MNIST recipe) a step against η < 0 ends at
    # η + ε, not at ε; with α ≤ ε the cap changes nothing (DECISIONS.md, 'SDI step cap').
    model = target("eval")
    x, y = batch()
    x = x * 0.5 + 0.25  # away from 0 and 1: no pixel clamp binds, only the ε-ball
    eta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * EPS
    x_init = (x + eta).requires_grad_(True)
    direction = torch.autograd.grad(F.cross_entropy(model(x_init), y), x_init)[0].sign()
    for alpha in (1.25 * EPS, 0.5 * EPS):
        delta = fgsm_sdi.fgsm_sdi_delta(model, Fixed(eta / EPS), x, y, EPS, alpha)
        expected = (eta + min(alpha, EPS) * direction).clamp(-EPS, EPS)
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    # the cap matters at α = 1.25ε: where the step goes against η's sign, the uncapped one goes further
    capped = (eta + EPS * direction).clamp(-EPS, EPS)
    uncapped = (eta + 1.25 * EPS * direction).clamp(-EPS, EPS)
    assert (uncapped - capped).abs().max() > EPS / 10


@pytest.mark.parametrize("true_prob", [0.05, 0.1])
def test_a_true_prob_at_or_under_one_over_c_fails_before_the_run_starts(
    true_prob, cifar_dir, tmp_path, capsys, no_checksum
):
    """--true-prob F is the true class's probability: F = 1/C (here 0.1) is the uniform label, below it the true
    class is the least likely; both leave no signal and are refused in one line before the run folder exists."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        harness.main_guard(
            lambda: fgsm_sdi.main(small_args(cifar_dir, str(out), true_prob=true_prob))
        )
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.count("\n") == 1 and "--true-prob" in message
    assert not out.exists()


def test_true_prob_is_the_true_class_probability_of_the_final_loss(
    monkeypatch, cifar_dir, tmp_path, no_checksum
):
    """--true-prob 0.5 on 10 classes: PyTorch's label_smoothing s with 1 − s + s/10 = 0.5, i.e. s = 5/9, reaches
    both losses that the code smooths (the generator's and the target's); above 1 it is refused at parse time."""
    seen = []
    real = F.cross_entropy

    def spy(*args, label_smoothing=0.0, **kwargs):
        seen.append(label_smoothing)
        return real(*args, label_smoothing=label_smoothing, **kwargs)

    monkeypatch.setattr(fgsm_sdi.F, "cross_entropy", spy)
    fgsm_sdi.main(
        small_args(cifar_dir, str(tmp_path / "run"), epochs=1, true_prob=0.5, eval_iters=1)
    )
    # 256 images in batches of 32: 8 target steps, and the generator's update on iteration 0
    smoothed = [s for s in seen if s]
    assert smoothed == [pytest.approx(5 / 9)] * 9
    with pytest.raises(SystemExit):
        fgsm_sdi.get_args(["--true-prob", "1.5"])


def test_generator_updates_on_iterations_0_k_2k_with_the_targets_weight_decay(
    mnist_dir, tmp_path, monkeypatch
):
    # Tiny MNIST (cheap CNN, 1-channel generator): 200 images / batch 32 = 7 batches per epoch (the 8 left over
    # form the 7th); k = 3 -> iterations 0, 3, 6 of each epoch (the count restarts every epoch, as in the FGSM-SDI
    # algorithm and FGSM_SDI.py's batch_idx % att_num).
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
    out = str(tmp_path / "run")
    fgsm_sdi.main(
        small_args(
            mnist_dir,
            out,
            epochs=2,
            gen_every=3,
            dataset="mnist",
            model="mnist-cnn",
            weight_decay=1e-3,
            eval_iters=1,
            eval_cw_iters=0,
        )
    )
    assert seen["batches"] == 7 and seen["updates"] == [0, 3, 6, 0, 3, 6]
    objects = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["objects"]
    # the code's shared weight decay
    assert objects["gen_opt"]["param_groups"][0]["weight_decay"] == 1e-3
    assert objects["opt"]["param_groups"][0]["weight_decay"] == 1e-3
    assert all("gen_loss" in r for r in load_results(out)["epochs"])


def test_the_multistep_schedule_completes_when_the_loader_drops_a_lone_sample(tmp_path):
    """129 images in batches of 128: the loader drops the lone 129th, so an epoch is one step, and the milestones
    (100/110 and 105/110 of all steps) must be planned for that: lr × 0.01 at the end (planned for two steps per
    epoch, neither would fire)."""
    write_mnist(str(tmp_path / "d"), n_train=129, n_test=8)  # MNIST's CNN: the cheapest network
    out = str(tmp_path / "run")
    fgsm_sdi.main(
        small_args(
            str(tmp_path / "d"),
            out,
            epochs=2,
            dataset="mnist",
            model="mnist-cnn",
            batch_size=128,
            lr_schedule="multistep",
            lr=0.1,
            monitor_size=8,
            eval_samples=8,
            eval_iters=1,
            eval_cw_iters=0,
        )
    )
    lrs = [r["lr"] for r in load_results(out)["epochs"]]
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.1 * 0.01)
    # both milestones on one iteration: the lr never runs at 0.01, and the log says so
    with open(os.path.join(out, "log.txt")) as f:
        assert (
            "# both lr milestones fall on iteration 2 of 2: the lr drops from 0.1 to 0.001 at once"
            in f.read()
        )


def test_end_to_end_and_resume_include_the_generator(cifar_dir, tmp_path):
    a, _ = check_resume("fgsm_sdi.py", cifar_dir, tmp_path, gen_every=3)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert (
        a["method"] == "fgsm_sdi"
        and a["args"]["alpha"] == 8
        and all("gen_loss" in r for r in a["epochs"])
    )
    # multistep lr: 16 iterations, milestones round(16·100/110) = round(16·105/110) = 15: ×0.01 by the end
    assert a["epochs"][0]["lr"] == 0.1 and a["epochs"][1]["lr"] == pytest.approx(1e-3)
    # the generator and its optimiser continue exactly across the interruption
    full, part = (
        torch.load(os.path.join(tmp_path, d, "checkpoint.pt"), weights_only=False)["objects"]
        for d in ("full", "part")
    )
    for k, v in full["generator"].items():
        assert torch.equal(v, part["generator"][k]), k
    for k, v in full["gen_opt"]["state"].items():
        assert all(torch.equal(t, part["gen_opt"]["state"][k][n]) for n, t in v.items())
