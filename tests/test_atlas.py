"""atlas.py: its copyable core (the weak attack and the loss of eq. (14) of the ICLR 2021 submission, OpenReview
k9GoaycDeio) against a hand computation, the Jacobian estimate, the ε ramp, App. B's validation scheduler, the flags
it refuses, and the script end to end (in-process; resume equality by subprocess, tiny CIFAR-10, small WRN; its
validation under torchrun)."""

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar
from torch.func import jacrev, vmap

import atlas
import common
import evaluate
import evaluation


def small_net(num_classes=5):
    """A smooth network without BatchNorm, so that each sample's Jacobian is its own."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, num_classes),
    )


def bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
    )


def copied_core():
    """atlas_loss and the one helper it names (jacobian_estimate), each defined again with torch alone."""
    core = copy_of(atlas.atlas_loss)
    core.__globals__["jacobian_estimate"] = copy_of(atlas.jacobian_estimate)
    return core


class Recorder(torch.nn.Module):
    """The wrapped network, remembering the input of every forward pass."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def batch(n=6, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 4, 4, generator=gen), torch.arange(n) % 5
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range must stay in it
    return x, y


def exact_jacobians(model, x):
    """Per-sample Jacobians of the logits w.r.t. the input, B × C × D, with torch.func."""
    return vmap(jacrev(lambda xi: model(xi[None])[0]))(x).flatten(2)


def test_one_projection_estimate_is_unbiased_for_the_frobenius_norm():
    model = small_net()
    torch.manual_seed(1)
    n = 4000
    for point in torch.rand(3, 3, 4, 4):
        jac = exact_jacobians(model, point[None])[0].detach()  # C × D
        num_classes = jac.shape[0]
        a = jac @ jac.T
        exact = a.trace().item()  # ‖J‖²_F
        # n independent one-projection estimates: the same point n times, one v per row.
        x_rep = point.expand(n, -1, -1, -1).clone().requires_grad_(True)
        estimate = atlas.jacobian_estimate(model(x_rep), x_rep).item()
        # Exact spread of one estimate C·vᵀAv with v uniform on the sphere:
        # E[(vᵀAv)²] = (tr(A)² + 2 tr(A²)) / (C(C+2)).
        var = (
            num_classes**2
            * (exact**2 + 2 * (a @ a).trace().item())
            / (num_classes * (num_classes + 2))
            - exact**2
        )
        se = math.sqrt(var / n)
        assert (
            4.5 * se < 0.1 * exact
        )  # the tolerance is tight enough to catch a factor ½ or a missing C
        assert abs(estimate - exact) < 4.5 * se, (estimate, exact, se)


def test_the_core_copies_and_equals_a_hand_computation_differentiated_through():
    core = copied_core()
    model = small_net()
    x, y = batch()
    eps, step, a, b, r = 8 / 255, 10 / 255, 0.5, 2.0, 0.5
    torch.manual_seed(3)
    loss, logits, terms = core(model, x, y, eps, step, a, b, iters=2, ramp=r)
    assert all(p.grad is None for p in model.parameters())  # the attack took input gradients only
    grads = torch.autograd.grad(loss, list(model.parameters()))

    # By hand, drawing in the same order: the random start, then one v per sample in the Jacobian estimate.
    torch.manual_seed(3)
    e, s = r * eps, r * step  # §5.3: the ramp scales ε and the step
    d = (x + torch.empty_like(x).uniform_(-e, e)).clamp(0, 1) - x
    for _ in range(2):
        d.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
        d = (x + (d.detach() + s * g.sign()).clamp(-e, e)).clamp(0, 1) - x
    x_adv = x + d
    v = torch.randn(6, 5)
    v = v / v.norm(dim=1, keepdim=True)
    z_adv, z = model(x_adv), model(x)
    log_p_adv = z_adv - z_adv.logsumexp(1, keepdim=True)
    log_p = z - z.logsumexp(1, keepdim=True)
    ce_hand = -log_p_adv[torch.arange(6), y].mean()
    jacobians = exact_jacobians(model, x_adv)  # B × C × D, differentiable in θ
    jac_hand = 5 * torch.einsum("bc,bcd->bd", v, jacobians).pow(2).sum(1).mean()
    kl_hand = (log_p_adv.exp() * (log_p_adv - log_p)).sum(1).mean()
    loss_hand = ce_hand + r * a * jac_hand + r * b * kl_hand  # eq. (14), weights ramped
    torch.testing.assert_close(logits, z_adv)
    torch.testing.assert_close(
        terms, {"ce": ce_hand.detach(), "jac": jac_hand.detach(), "kl": kl_hand.detach()}
    )
    torch.testing.assert_close(loss, loss_hand)
    assert terms["kl"] > 0 and terms["jac"] > 0
    # The Jacobian and KL terms reach θ: the gradients equal those of the hand-written loss.
    for g, g_hand in zip(grads, torch.autograd.grad(loss_hand, list(model.parameters()))):
        torch.testing.assert_close(g, g_hand)


def test_a_term_of_weight_zero_is_not_computed():
    """ATLAS-g (α = 0) and ATLAS-l (β = 0): the unused term is neither computed nor returned; with both 0 the core
    is the FGSM-RS loss and needs no helper (copied alone, without jacobian_estimate)."""
    model, (x, y) = small_net(), batch()
    args = (model, x, y, 8 / 255, 10 / 255)
    assert set(atlas.atlas_loss(*args, 0.0, 5.0)[2]) == {"ce", "kl"}
    assert set(atlas.atlas_loss(*args, 2e-4, 0.0)[2]) == {"ce", "jac"}
    loss, logits, terms = copy_of(atlas.atlas_loss)(*args, 0.0, 0.0)
    assert set(terms) == {"ce"} and loss.item() == terms["ce"].item()


@pytest.mark.parametrize("iters, step", [(1, 10 / 255), (10, 1.785 / 255)])
@pytest.mark.parametrize("r", [1.0, 0.4])
def test_the_core_attacks_through_attack_model_inside_the_ramped_ball(iters, step, r):
    net = small_net(10).eval()
    model, attack_model = Recorder(net), Recorder(net)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    x[0], x[1] = 0.0, 1.0
    eps = 8 / 255
    _, logits, terms = atlas.atlas_loss(
        model, x, y, eps, step, 2e-4, 5.0, iters=iters, ramp=r, attack_model=attack_model
    )
    # iters passes of the attack through attack_model; the loss passes (x′, and x for the KL term) through model
    assert (
        len(attack_model.inputs) == iters
        and len(model.inputs) == 2
        and torch.equal(model.inputs[1], x)
    )
    x_adv = model.inputs[0]
    delta = x_adv - x
    assert delta.abs().max() <= r * eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert delta.abs().max() > 0.99 * r * eps  # it reached the edge of the ball somewhere
    with torch.no_grad():  # and it raised the loss over the clean images
        assert terms["ce"] > F.cross_entropy(net(x), y)


@pytest.mark.parametrize("train", [True, False])
def test_the_core_leaves_the_mode_and_touches_bn_statistics_only_in_train_mode(train):
    """The core runs the model in the mode it finds it in and leaves it there. Train mode (training here): BatchNorm
    takes the attack's and the loss's passes into its running statistics, as the method's training passes do; eval
    mode: they stay as they were."""
    net = bn_net().train(train)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = batch()
    loss, _, _ = atlas.atlas_loss(net, x, y, 8 / 255, 10 / 255, 2e-4, 5.0, iters=2)
    loss.backward()  # the double backward works through BatchNorm
    assert net.training == train and net[1].training == train
    changed = not torch.equal(net[1].running_mean, before["1.running_mean"])
    assert changed == train
    assert net[1].num_batches_tracked.item() == (4 if train else 0)  # 2 attack passes, x′ and x


def test_the_core_refuses_normalised_images():
    """A Normalize() in the transform gives images outside [0, 1]; the pixel clamp would then make δ huge."""
    x = (torch.rand(4, 3, 4, 4) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        atlas.atlas_loss(small_net(), x, torch.arange(4), 8 / 255, 10 / 255, 2e-4, 5.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_terms(dtype):
    """Under float16 v is scaled by 2^10 for the backward pass of the Jacobian estimate: it must be divided back."""
    model = bn_net().eval()
    x, y = batch(16)
    results = []
    for autocast in (None, dtype):
        torch.manual_seed(4)  # the same random start and the same v
        loss, _, terms = atlas.atlas_loss(
            model, x, y, 8 / 255, 8 / 255, 2e-4, 5.0, autocast=autocast
        )
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        results.append(terms)
    fp32, low = results
    for name in ("ce", "jac", "kl"):
        assert abs(low[name] - fp32[name]) < 0.1 * fp32[name] + 1e-3, (name, low[name], fp32[name])


def test_epsilon_ramp():
    n = 7  # batches per epoch
    assert atlas.ramp(0, 0, n, 15) == 0.0
    assert atlas.ramp(15, 0, n, 15) == 1.0 and atlas.ramp(40, 3, n, 15) == 1.0
    values = [atlas.ramp(e, i, n, 15) for e in range(15) for i in range(n)]
    assert values == pytest.approx(
        [k / (15 * n) for k in range(15 * n)]
    )  # linear, per iteration, below v
    assert max(values) < 1.0
    assert atlas.ramp(0, 0, n, 0) == 1.0  # --ramp-epochs 0: full ε from the start


def test_validation_scheduler_lowers_lr_and_stops_on_the_right_epochs():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = atlas.ValidationScheduler(opt, plateau=2, stop=10, factor=5)
    # epochs 1, 2, 5 set a new best; epoch 3 only ties it (no improvement); from epoch 6 nothing improves.
    accs = [0.10, 0.20, 0.20, 0.19, 0.25] + [0.24] * 20
    lrs, stopped_at = [], None
    for epoch, acc in enumerate(accs, 1):
        if sched.step(acc):
            stopped_at = epoch
            break
        lrs.append(opt.param_groups[0]["lr"])
    # lr ÷ 5 after epochs 4 (2 without a new best), 7, 9, 11, 13; stop after epoch 15 (10 without one).
    cuts = [e for e in range(2, len(lrs) + 1) if lrs[e - 1] < lrs[e - 2]]
    assert cuts == [4, 7, 9, 11, 13]
    assert lrs[-1] == pytest.approx(0.1 / 5**5)
    assert stopped_at == 15
    # its state survives a checkpoint round trip
    state = sched.state_dict()
    again = atlas.ValidationScheduler(opt)
    again.load_state_dict(state)
    assert again.state_dict() == state == {"best": 0.25, "epochs_since_best": 10}


def test_validation_scheduler_does_not_count_epochs_of_the_eps_ramp():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = atlas.ValidationScheduler(opt, plateau=2, stop=3, factor=5)
    # Six ramp epochs at 0% (MNIST's case) and one new best among them: no lr cut and no stop.
    for acc in (0.0, 0.0, 0.0, 0.1, 0.1, 0.1):
        assert not sched.step(acc, count=False)
    assert opt.param_groups[0]["lr"] == 0.1 and sched.state_dict() == {
        "best": 0.1,
        "epochs_since_best": 0,
    }
    # At full ε the count starts: lr ÷ 5 after the 2nd epoch without a new best, stop after the 3rd.
    assert not sched.step(0.1) and not sched.step(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    assert sched.step(0.1)


def test_main_validates_in_eval_mode_and_starts_counting_when_the_ramp_ends(
    mnist_dir, tmp_path, monkeypatch
):
    # Validation accuracy falls every epoch. Ramp 3 epochs: epochs 1-2 end below full ε and are not counted;
    # plateau 1 / stop 2 then cut the lr after epoch 3 and stop after epoch 4 (counting from epoch 2 would
    # cut after epoch 2 and stop after epoch 3).
    accs, calls, real = iter([0.5, 0.4, 0.3, 0.2, 0.1]), [], evaluation.pgd_correct

    def falling_validation(model, x, y, eps, step, iters, *args, **kwargs):
        if len(y) != 50:  # 50: the validation images (the monitor and the test subset have 32)
            return real(model, x, y, eps, step, iters, *args, **kwargs)
        calls.append((x.dtype, eps, step, iters, model.training))
        return torch.arange(50) < round(50 * next(accs))

    monkeypatch.setattr(evaluation, "pgd_correct", falling_validation)
    out = str(tmp_path / "run")
    atlas.main(
        small_args(
            mnist_dir,
            out,
            epochs=5,
            dataset="mnist",
            model="mnist-cnn",
            val_size=50,
            val_iters=1,
            ramp_epochs=3,
            plateau_epochs=1,
            stop_epochs=2,
        )
    )
    rows = load_results(out)["epochs"]
    assert [r["val_acc"] for r in rows] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.01, 0.01, 0.002])
    # the uint8 held-out images, at the full ε, with the recipe's step (0.01); pgd_correct switches to eval mode
    assert (
        calls[0] == (torch.uint8, pytest.approx(0.3), pytest.approx(0.01), 1, True)
        and len(calls) == 4
    )


def test_recipes():
    a = atlas.get_args(["--dataset", "cifar100", "--epochs", "30"])
    assert (a.epochs, a.lr, a.batch_size, a.weight_decay) == (30, 0.1, 64, 2e-4)
    assert (a.jac_alpha, a.kl_beta, a.epsilon, a.alpha, a.attack_iters) == (2e-4, 5.0, 8, 10, 1)
    # val_size None: common.get_data holds out a tenth of the training images, at most 5,000 (App. B: 5,000 of 50,000)
    assert (a.val_size, a.val_iters, a.val_step, a.plateau_epochs, a.stop_epochs) == (
        None,
        10,
        1.785,
        2,
        10,
    )
    ten = atlas.get_args(["--dataset", "cifar100", "--attack-iters", "10"])
    assert (ten.alpha, ten.jac_alpha, ten.kl_beta) == (1.785, 1e-4, 10.0)
    assert atlas.get_args(["--attack-iters", "10"]).kl_beta == 5.0  # CIFAR-10 ten-step
    assert atlas.get_args(["--kl-beta", "0", "--attack-iters", "10"]).kl_beta == 0.0  # ATLAS-l
    m = atlas.get_args(["--dataset", "mnist"])
    assert (m.lr, m.batch_size, m.jac_alpha, m.kl_beta, m.epsilon, m.alpha) == (
        0.01,
        128,
        1e-5,
        0.3,
        76.5,
        95.625,
    )
    assert (m.val_iters, m.val_step, m.model) == (20, 2.55, "mnist-cnn")
    m20 = atlas.get_args(["--dataset", "mnist", "--attack-iters", "20"])  # MNIST's multi-step ATLAS
    assert (m20.alpha, m20.jac_alpha, m20.kl_beta) == (2.55, 5e-6, 0.2)
    assert (
        atlas.get_args(["--epochs", "15", "--ramp-epochs", "0"]).ramp_epochs == 0
    )  # no ramp: any length


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--val-size", "0"], "--val-size 0"),
        # a run that never trains at full ε: the default 15-epoch ramp against 15 epochs or fewer
        (["--epochs", "15"], "--epochs 15 is not longer than --ramp-epochs 15"),
        (["--epochs", "3", "--ramp-epochs", "3.5"], "give a shorter --ramp-epochs"),
        # /255 units, as ε: the paper's 0.007 is refused with the value to write
        (["--val-step", "0.007"], "write --val-step 1.785"),
    ],
)
def test_flags_that_would_mislead_are_refused_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        atlas.get_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_the_ramp_completes_when_the_loader_drops_a_lone_sample(tmp_path, monkeypatch, no_checksum):
    """129 training images in batches of 64: the loader drops the lone 129th, so an epoch is two steps, and the
    per-iteration ramp must be planned for two: with --ramp-epochs 1.5 the last step of epoch 1 runs at ε·(1/2)/1.5
    and the last of epoch 2 at the full ε (planned for three steps it would stop at 8/9 of it). The main loop hands
    the core the eager model for the loss (double backward) and the input-gradient view for the attack, and run.amp
    (fp32 here: None)."""
    write_cifar(str(tmp_path / "d"), n_train=129 + 16, n_test=8)
    seen, real = [], atlas.atlas_loss

    def spy(model, *args, attack_model=None, **kwargs):
        seen.append(
            (type(model), type(attack_model), model.training, kwargs.get("autocast", args[-1]))
        )
        return real(model, *args, attack_model=attack_model, **kwargs)

    monkeypatch.setattr(atlas, "atlas_loss", spy)
    out = str(tmp_path / "run")
    atlas.main(
        small_args(
            str(tmp_path / "d"),
            out,
            batch_size=64,
            val_size=16,
            val_iters=1,
            ramp_epochs=1.5,
            eval_samples=8,
            eval_cw_iters=0,
        )
    )
    rows = load_results(out)["epochs"]
    assert [r["eps"] for r in rows] == pytest.approx([8 * 0.5 / 1.5, 8])
    assert seen == [(common.WideResNet, common.WideResNet, True, None)] * 4
    # a ramp that ends after the last step is refused once the batch count is known, before the run folder exists
    with pytest.raises(common.FastatError, match="--ramp-epochs 1.9 ends after the last"):
        atlas.main(
            small_args(
                str(tmp_path / "d"),
                str(tmp_path / "late"),
                batch_size=64,
                val_size=16,
                ramp_epochs=1.9,
            )
        )
    assert not os.path.exists(tmp_path / "late")


def test_validation_slice_never_appears_in_training_batches(cifar_dir, no_checksum):
    args = atlas.get_args(["--data-dir", cifar_dir, "--batch-size", "32", "--device", "cpu"])
    data = common.get_data(args)  # as main() calls it
    assert data.val_size == 25  # the default: a tenth of the 256 training images
    val = set(data.val.indices.tolist())
    assert len(val) == 25
    for epoch in range(3):
        seen = torch.cat([idx for _, _, idx in data.train.epoch(epoch)]).tolist()
        assert not val & set(seen)
        assert len(seen) == len(set(seen)) == data.train_size - 25
    # and the held-out images are the training split's images at those indices, not augmented copies
    (x_all, _), _, _ = common.load_dataset("cifar10", cifar_dir)
    assert torch.equal(data.val.images, x_all[data.val.indices])


def test_help_shows_the_recipes_and_names_the_mnist_multi_step_variant(capsys):
    with pytest.raises(SystemExit):
        atlas.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dataset mnist --attack-iters 20" in text
    assert "(default 0.0002; mnist recipe 1e-05)" in text  # the one-step --jac-alpha
    with pytest.raises(SystemExit):
        atlas.get_args(["--help", "--attack-iters", "10"])
    assert "(default 0.0001; mnist recipe 5e-06;" in " ".join(capsys.readouterr().out.split())


def test_end_to_end_resume_validation_rule_and_best_model(cifar_dir, tmp_path):
    # plateau 1 / stop 2 so that the rule can act within 2 tiny epochs; a 1.5-epoch ramp so that epoch 1 is not
    # counted and epoch 2 is (test_main_validates_... checks the rule on more epochs)
    extra = dict(val_size=128, val_iters=1, plateau_epochs=1, stop_epochs=2, ramp_epochs=1.5)
    a, _ = check_resume("atlas.py", cifar_dir, tmp_path, epochs=2, **extra)
    rows = a["epochs"]
    res = check_outputs(str(tmp_path / "full"), epochs=len(rows))
    assert res["args"]["jac_alpha"] == 2e-4 and res["args"]["kl_beta"] == 5.0
    assert {"eps", "val_acc", "ce", "jac", "kl"} <= set(rows[0])
    # the lr and stop columns follow App. B's rule applied to the logged validation accuracies
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = atlas.ValidationScheduler(opt, plateau=1, stop=2)
    stopped = False
    for e, row in enumerate(rows):
        assert not stopped  # no epoch runs after the stop
        assert row["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        stopped = sched.step(row["val_acc"], count=e >= 1)
    assert stopped or len(rows) == 2
    with open(os.path.join(tmp_path / "full", "log.txt")) as f:
        log = f.read()
    header = next(line for line in log.splitlines() if line.split()[:1] == ["epoch"]).split()
    assert header[-5:] == ["eps", "val_acc", "ce", "jac", "kl"]
    # the best model is the first epoch with the highest validation accuracy among those that do not predict
    # one class (common.py logs those as not eligible; best = last when none is)
    ineligible = {int(e) for e in re.findall(r"# epoch (\d+): .*not eligible", log)}
    val = [(r["val_acc"], -r["epoch"]) for r in rows if r["epoch"] not in ineligible]
    assert a["best_epoch"] == (-max(val)[1] if val else len(rows))
    # ε ramps per iteration: 4 batches of 32 per epoch (128 held out), the logged ε is the last batch's
    for e, row in enumerate(rows):
        assert row["eps"] == pytest.approx(8 * atlas.ramp(e, 3, 4, 1.5))


def test_atlas_g_logs_no_jacobian_column(cifar_dir, tmp_path, no_checksum):
    out = str(tmp_path / "run")
    atlas.main(
        small_args(
            cifar_dir, out, epochs=1, jac_alpha=0, ramp_epochs=0, val_iters=1, eval_cw_iters=0
        )
    )
    row = load_results(out)["epochs"][0]
    assert "jac" not in row and row["kl"] > 0 and row["eps"] == 8


def test_steps_follow_epsilon():
    a = atlas.get_args(["--epsilon", "16"])
    assert a.alpha == 20 and abs(a.val_step - 2 * 1.785) < 1e-9
    assert atlas.get_args(["--epsilon", "16", "--val-step", "2"]).val_step == 2


def test_validation_under_two_processes_is_one_models_accuracy_on_the_whole_set(
    cifar_dir, tmp_path, monkeypatch, no_checksum
):
    """Under torchrun App. B's validation accuracy is one model's (the first process's BatchNorm statistics, saved
    as model_last.pt) on the whole held-out set, what one process computes, and each process attacks its share of
    the 33 images (16 and 17), not all of them. At ε 1/255 the PGD accuracy is near the clean one, neither 0 nor 1."""
    from test_fgsm_rs import run_plan_under_torchrun, zero_start_pgd

    out = tmp_path / "atlas"
    argv = small_args(
        cifar_dir, str(out), epochs=1, epsilon=1, ramp_epochs=0, val_size=33, val_iters=2
    )
    # each process writes the sizes of the image sets it runs PGD-2 on (the validation's: --val-iters 2)
    spy = (
        "pgd_correct = evaluation.pgd_correct\n"
        "def spy(model, x, y, eps, step, iters, *a, **k):\n"
        "    if iters == 2:\n"
        f"        with open(os.path.join({str(tmp_path)!r}, f'rank{{common.rank()}}'), 'a') as f:\n"
        "            f.write(f'{len(y)} ')\n"
        "    return pgd_correct(model, x, y, eps, step, iters, *a, **k)\n"
        "evaluation.pgd_correct = spy\n"
    )
    assert run_plan_under_torchrun([["atlas.py", argv]], tmp_path, spy) == [0]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["16 ", "17 "]
    res = load_results(out)
    model, _ = evaluate.load_model(str(out / "model_last.pt"))
    args = atlas.get_args(argv)
    data = common.get_data(args)
    zero_start_pgd(monkeypatch)  # as in the two processes
    x, y = data.val.images, data.val.labels
    correct = evaluation.pgd_correct(model, x, y, 1 / 255, args.val_step / 255, 2).sum().item()
    assert res["processes"] == 2 and len(y) == 33 and 0 < correct < 33
    assert res["epochs"][0]["val_acc"] * 33 == pytest.approx(correct)
