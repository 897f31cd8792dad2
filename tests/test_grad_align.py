"""grad_align.py: its copyable core (FGSM from a zero start plus GradAlign's Ω, Andriushchenko & Flammarion,
NeurIPS 2020, §4) against a per-sample hand computation and finite differences, its λ rule and recipes, the authors'
lr schedule, and the script end to end (subprocess and in-process, resume, two processes; tiny CIFAR-10)."""

import numpy as np
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
    write_mnist,
)
from torch.func import functional_call, grad, vmap

import fgsm_rs
import grad_align
import harness


def small_net(num_classes=5, dtype=torch.float32, hidden=16):
    """A smooth network without BatchNorm: each sample's input gradient is its own."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, num_classes),
    ).to(dtype)


def bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
    )


def batch(n=6, dtype=torch.float32):
    torch.manual_seed(1)
    x = torch.rand(n, 3, 4, 4, dtype=dtype)
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range must stay in it
    return x, torch.arange(n) % 5


class Recorder(torch.nn.Module):
    """The network, recording the input of every pass."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


EPS = 8 / 255
ALPHA = 10 / 255  # 1.25ε, the authors' step


@pytest.mark.parametrize("both_grads", [False, True])
def test_the_core_copies_and_equals_a_per_sample_hand_computation_differentiated_through(
    both_grads,
):
    core = copy_of(grad_align.grad_align_loss)  # defined again with torch alone
    model = small_net()
    params = dict(model.named_parameters())
    x, y = batch()
    lam = 0.7
    torch.manual_seed(3)
    loss, logits, terms = core(model, x, y, EPS, ALPHA, lam, both_grads=both_grads)
    assert all(p.grad is None for p in model.parameters())  # the caller backpropagates
    grads = torch.autograd.grad(loss, list(params.values()))

    # By hand, each sample on its own (torch.func), drawing η as the core does: its only random draw.
    def ce_one(xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    input_grad = vmap(grad(ce_one))  # per-sample ∇_x, differentiable in θ
    g1 = input_grad(x, y)
    x_adv = (x + (ALPHA * g1.detach().sign()).clamp(-EPS, EPS)).clamp(0, 1)
    torch.manual_seed(3)
    x_eta = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    g2 = input_grad(x_eta, y)
    g1 = g1 if both_grads else g1.detach()  # the authors' code: g₁ a constant
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
    ce_hand = F.cross_entropy(model(x_adv), y)
    loss_hand = ce_hand + lam * (1 - cos.mean())  # CE at the FGSM point + λ·Ω
    torch.testing.assert_close(logits, model(x_adv))
    torch.testing.assert_close(terms, {"ce": ce_hand.detach(), "cos": cos.mean().detach()})
    torch.testing.assert_close(loss, loss_hand)
    assert 0 < terms["cos"] < 1  # the two gradients are neither equal nor unrelated
    # Ω reaches θ through g₂ (and g₁): the gradients equal those of the hand-written loss.
    for g, g_hand in zip(grads, torch.autograd.grad(loss_hand, list(params.values()))):
        torch.testing.assert_close(g, g_hand)


def test_the_double_backward_is_the_gradient_of_the_loss_by_finite_differences():
    """In double precision the weight gradient of the core's loss matches central finite differences of its value
    (torch.autograd.gradcheck). --both-grads: Ω's gradient reaches θ through ∇_x CE(x) and ∇_x CE(x+η), the
    loss's own gradient. Default (the authors' code): ∇_x CE(x) is a constant; it is the loss's gradient when the
    FGSM pass runs through a network frozen at the current weights (attack_model), and not otherwise."""
    model = small_net(dtype=torch.float64, hidden=6)
    names = [name for name, _ in model.named_parameters()]
    x, y = batch(dtype=torch.float64)

    def loss_of(both_grads, frozen_attack):
        def f(*weights):
            def net(inp):
                return functional_call(model, dict(zip(names, weights)), (inp,))

            torch.manual_seed(0)  # the same η at every evaluation
            attack = model if frozen_attack else net
            out = grad_align.grad_align_loss(
                net, x, y, EPS, ALPHA, 2.0, both_grads=both_grads, attack_model=attack
            )
            return out[0]

        return f

    weights = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(loss_of(True, False), weights, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(loss_of(False, True), weights, eps=1e-6, atol=1e-6)
    assert not torch.autograd.gradcheck(
        loss_of(False, False), weights, eps=1e-6, atol=1e-6, raise_exception=False
    )


@pytest.mark.parametrize("both_grads", [False, True])
@pytest.mark.parametrize("clamp_eta", [True, False])
def test_the_passes_fgsm_step_and_noise_stay_where_they_should(both_grads, clamp_eta):
    net = small_net(10)
    model, attack_model = Recorder(net), Recorder(net)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    x[0], x[1] = 0.0, 1.0
    grad_align.grad_align_loss(
        model,
        x,
        y,
        EPS,
        ALPHA,
        0.2,
        both_grads=both_grads,
        clamp_eta=clamp_eta,
        attack_model=attack_model,
    )
    # The FGSM pass at x goes through attack_model only when its gradient is a constant of the loss.
    passes = attack_model.inputs + model.inputs
    assert [len(attack_model.inputs), len(model.inputs)] == ([0, 3] if both_grads else [1, 2])
    assert torch.equal(passes[0], x)
    x_adv, x_eta = passes[1], passes[2]
    # FGSM from zero: ε·sign(∇_x CE(x)) (the step 1.25ε is cut to ε), then clamped to [0, 1]
    x_leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(x_leaf), y), x_leaf)
    torch.testing.assert_close(x_adv, (x + EPS * g.sign()).clamp(0, 1))
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # η: uniform in the ε-ball around x, in the pixel range unless the code's form is asked for
    eta = x_eta - x
    assert eta.abs().max() <= EPS + 1e-6 and eta.abs().max() > 0.9 * EPS and eta.std() > 0.4 * EPS
    outside = (x_eta < 0) | (x_eta > 1)
    assert outside.any() != clamp_eta  # x has black and white images: the ball reaches past [0, 1]


@pytest.mark.parametrize("train", [True, False])
def test_the_core_leaves_the_mode_and_touches_bn_statistics_only_in_train_mode(train):
    """In train mode (training here, and the authors' code) BatchNorm's running statistics take the three passes,
    x, x+δ and x+η; in eval mode nothing changes them. The double backward runs through BatchNorm."""
    net = bn_net().train(train)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = batch()
    loss, _, _ = grad_align.grad_align_loss(net, x, y, EPS, ALPHA, 0.2)
    loss.backward()
    assert net.training == train and net[1].training == train
    assert not torch.equal(net[1].running_mean, before["1.running_mean"]) == train
    assert net[1].num_batches_tracked.item() == (3 if train else 0)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_lambda_zero_is_plain_fgsm_training_from_a_zero_start():
    """λ = 0: the FGSM-RS step from a zero start and its CE, with no η drawn and no third pass."""
    net = small_net()
    model = Recorder(net)
    x, y = batch()
    state = torch.get_rng_state()
    loss, logits, terms = copy_of(grad_align.grad_align_loss)(model, x, y, EPS, ALPHA, 0.0)
    assert torch.equal(torch.get_rng_state(), state) and len(model.inputs) == 2
    delta = fgsm_rs.fgsm_rs_delta(net, x, y, EPS, ALPHA, torch.zeros_like(x))
    expected = F.cross_entropy(net(x + delta), y)
    assert (
        set(terms) == {"ce"}
        and torch.equal(loss, expected)
        and torch.equal(model.inputs[1], x + delta)
    )
    for a, b in zip(
        torch.autograd.grad(loss, list(net.parameters())),
        torch.autograd.grad(expected, list(net.parameters())),
    ):
        torch.testing.assert_close(a, b)


class Saturating(torch.nn.Module):
    """small_net, plus 10^4 on class 0's logit for an almost white image: its CE is exactly 0 there, and so is its
    input gradient, in the whole ε-ball."""

    def __init__(self):
        super().__init__()
        self.net = small_net()

    def forward(self, x):
        z = self.net(x)
        bonus = 1e4 * (x.flatten(1).mean(1) > 0.9).float()
        return torch.cat([z[:, :1] + bonus[:, None], z[:, 1:]], 1)


def test_samples_with_a_zero_gradient_are_left_out_of_the_mean():
    """A zero gradient has no direction: the authors' code leaves such samples out of the mean cosine; with none
    left Ω is 0 (their code's mean would be NaN). The weight gradient stays finite either way."""
    model = Saturating()
    x, y = batch()
    x[0], x[1] = 1.0, torch.rand(3, 4, 4) * 0.5  # only sample 0 is white; its label is 0
    torch.manual_seed(3)
    loss, _, terms = grad_align.grad_align_loss(model, x, y, EPS, ALPHA, 0.5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    # by hand, over samples 1..5
    x_leaf = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(x_leaf), y, reduction="sum"), x_leaf)
    assert (g1[0] == 0).all() and (g1[1:].flatten(1).norm(dim=1) > 0).all()
    torch.manual_seed(3)
    x_eta = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1).requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(x_eta), y, reduction="sum"), x_eta)
    cos = F.cosine_similarity(g1[1:].flatten(1), g2[1:].flatten(1), dim=1)
    torch.testing.assert_close(terms["cos"], cos.mean())
    torch.testing.assert_close(loss - terms["ce"], 0.5 * (1 - cos.mean()))
    # every sample white and of class 0: no direction anywhere, Ω = 0
    loss, _, terms = grad_align.grad_align_loss(
        model, torch.full_like(x, 0.97), torch.zeros_like(y), EPS, ALPHA, 0.5
    )
    assert loss.item() == terms["ce"].item() == 0.0 and terms["cos"].item() == 0.0
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_the_core_refuses_normalised_images():
    """A Normalize() in the transform gives images outside [0, 1]; the pixel clamp would then make δ huge."""
    x = (torch.rand(4, 3, 4, 4) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        grad_align.grad_align_loss(small_net(), x, torch.arange(4), EPS, ALPHA, 0.2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_terms(dtype):
    """Under float16 the gradients' CE is scaled by 2^10; the cosine ignores the scale."""
    model = bn_net().eval()
    x, y = batch(16)
    results = []
    for autocast in (None, dtype):
        torch.manual_seed(4)  # the same η
        loss, _, terms = grad_align.grad_align_loss(model, x, y, EPS, ALPHA, 0.2, autocast=autocast)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        results.append(terms)
    fp32, low = results
    for name in ("ce", "cos"):
        assert abs(low[name] - fp32[name]) < 0.05 * fp32[name], (name, low[name], fp32[name])


# The authors' commands: sh/exps_diff_eps_cifar10.sh (ε 1..16) and sh/exps_diff_eps_svhn.sh (ε 1..12).
CIFAR_LAMBDAS = [0.027, 0.036, 0.047, 0.063, 0.084, 0.112, 0.150, 0.200, 0.267, 0.356, 0.474, 0.632]
CIFAR_LAMBDAS += [0.843, 1.124, 1.500, 2.000]
SVHN_LAMBDAS = [1.657, 1.757, 1.864, 1.976, 2.096, 2.223, 2.357, 2.500, 2.651, 2.812, 2.982, 3.162]


def test_lambda_follows_epsilon_as_in_the_authors_scripts():
    assert [grad_align.ga_lambda("cifar10", e) for e in range(1, 17)] == CIFAR_LAMBDAS
    assert [grad_align.ga_lambda("svhn", e) for e in range(1, 13)] == SVHN_LAMBDAS
    assert grad_align.ga_lambda("cifar100", 8) == 0.2  # every other dataset: the CIFAR-10 rule
    # between the authors' ε: their rule, rounded as their values are
    assert grad_align.ga_lambda("cifar10", 7.5) == round(0.02 * 10 ** (7.5 / 8), 3) == 0.173
    assert grad_align.ga_lambda("svhn", 4.5) == round(1.5625 * 1.6 ** (4.5 / 8), 3) == 2.035


def test_recipes():
    a = grad_align.get_args([])
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.optimizer) == (
        30,
        128,
        0.3,
        5e-4,
        "sgd",
    )
    assert (a.epsilon, a.alpha, a.ga_lambda, a.lr_schedule, a.alpha_ramp_epochs) == (
        8,
        10,
        0.2,
        "cyclic",
        0.0,
    )
    assert (a.model, a.both_grads, a.no_eta_clamp) == ("preact18", False, False)
    a = grad_align.get_args(["--epsilon", "16"])
    assert (a.alpha, a.ga_lambda) == (20, 2.0)
    a = grad_align.get_args(["--dataset", "svhn"])
    assert (a.epochs, a.lr, a.ga_lambda, a.alpha_ramp_epochs) == (15, 0.05, 2.5, 5.0)
    a = grad_align.get_args(["--dataset", "mnist"])
    assert (a.model, a.optimizer, a.lr, a.epsilon, a.ga_lambda) == (
        "mnist-cnn",
        "adam",
        5e-3,
        76.5,
        0.2,
    )
    a = grad_align.get_args(["--dataset", "imagenet"])
    assert (a.model, a.lr_schedule, a.epsilon, a.ga_lambda) == ("resnet50", "imagenet", 2, 0.036)
    a = grad_align.get_args(["--ga-lambda", "0.5", "--epsilon", "16"])
    assert a.ga_lambda == 0.5  # given, it wins


class Batches:
    def __init__(self, per_epoch):
        self.per_epoch = per_epoch

    def batches(self, epoch):
        return self.per_epoch[epoch]


@pytest.mark.parametrize("per_epoch", [[7] * 30, [3] * 6 + [5] * 12 + [2] * 12])
def test_the_cyclic_schedule_is_the_authors(per_epoch):
    """utils.get_lr_schedule('cyclic') written out, as train.py sets it before iteration i of epoch e: lr_max ·
    interp(e + (i + 1)/batches, [0, ⌊2·30/5⌋ = 12, 30], [0, 1, 0]); also when an epoch's batches change."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3, momentum=0.9)
    sched = grad_align.cyclic_lr(opt, Batches(per_epoch), 30)
    for e, n in enumerate(per_epoch):
        for i in range(n):
            expected = 0.3 * np.interp(e + (i + 1) / n, [0, 12, 30], [0, 1, 0])
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), (e, i)
            assert opt.param_groups[0]["momentum"] == 0.9
            opt.step()
            sched.step()
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.0, abs=1e-12)


def test_end_to_end_writes_every_output(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    run_script("grad_align.py", small_args(cifar_dir, out))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "grad_align" and res["args"]["ga_lambda"] == 0.2
    assert all(0 < r["cos"] <= 1 and r["loss"] >= r["ce"] for r in res["epochs"])


def test_multistep_milestones_on_one_iteration_are_logged(tmp_path, no_checksum):
    """Jia et al.'s 100/110 and 105/110 of the iterations, planned for a run of 2 iterations (129 MNIST images in
    batches of 128: the loader drops the lone one), both fall on iteration 2: the lr drops ×0.01 at once, and the log
    says so in one line, as fgsm_sdi.py's, fgsm_mep.py's and las_at.py's multistep schedules do."""
    write_mnist(str(tmp_path / "d"), n_train=129, n_test=8)  # MNIST's CNN: the cheapest network
    out = tmp_path / "run"
    grad_align.main(
        small_args(
            str(tmp_path / "d"),
            str(out),
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
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx([0.1, 0.001])
    notes = [line for line in (out / "log.txt").read_text().splitlines() if "at once" in line]
    assert notes == [
        "# both lr milestones fall on iteration 2 of 2: the lr drops from 0.1 to 0.001 at once, "
        "never running at 0.01; a longer run separates them"
    ]


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    """η's draws, the lr schedule and the step ramp continue exactly where they stopped."""
    check_resume("grad_align.py", cifar_dir, tmp_path, alpha_ramp_epochs=1.5)


def test_the_step_ramp_and_lambda_zero_in_the_loop(cifar_dir, tmp_path, monkeypatch, no_checksum):
    """--alpha-ramp-epochs: the FGSM step grows linearly per iteration (the authors' SVHN runs); --ga-lambda 0
    trains without a double backward (the loss passes may then be compiled) and logs no cosine."""
    steps, wrapped, real = [], [], grad_align.grad_align_loss
    monkeypatch.setattr(
        grad_align,
        "grad_align_loss",
        lambda model, x, y, eps, alpha, *a, **k: (
            steps.append(alpha) or real(model, x, y, eps, alpha, *a, **k)
        ),
    )
    models = harness.Run.models
    monkeypatch.setattr(
        harness.Run,
        "models",
        lambda run, model, double_backward=False: (
            wrapped.append(double_backward) or models(run, model, double_backward)
        ),
    )
    out = str(tmp_path / "ramp")
    grad_align.main(small_args(cifar_dir, out, epochs=2, alpha_ramp_epochs=1, eval_iters=1))
    per_epoch = len(steps) // 2  # 256 images in batches of 32
    expected = [
        10 / 255 * min(1.0, (e + i / per_epoch) / 1) for e in range(2) for i in range(per_epoch)
    ]
    assert steps == pytest.approx(expected) and wrapped == [True]
    steps.clear()
    grad_align.main(
        small_args(cifar_dir, str(tmp_path / "plain"), epochs=1, ga_lambda=0, eval_iters=1)
    )
    assert (
        wrapped == [True, False] and "cos" not in load_results(str(tmp_path / "plain"))["epochs"][0]
    )


def test_two_processes_end_with_one_model(cifar_dir, tmp_path):
    """Under torchrun the loss passes run through DistributedDataParallel (with --both-grads the FGSM pass at x too),
    and the double backward's gradients are averaged once per step: both processes end with the same weights."""
    from test_distributed import torchrun

    out = str(tmp_path / "run")
    args = small_args(cifar_dir, out, epochs=1, eval_iters=1, eval_cw_iters=1, both_grads=True)
    torchrun(["grad_align.py", *args], env={"FASTAT_TEST_WEIGHTS_DIR": str(tmp_path)})
    rank0, rank1 = (torch.load(tmp_path / f"grad_align-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    res = load_results(out)
    assert res["processes"] == 2 and 0 < res["epochs"][0]["cos"] <= 1
