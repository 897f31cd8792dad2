"""atlas.py: the Jacobian estimate, the three loss terms of eq. (14), the ε ramp, the validation scheduler of
App. B, the held-out slice, and the script end to end (subprocess, tiny CIFAR-10, small WRN) with --resume."""
import contextlib
import math
import os
import re

import pytest
import torch
from torch.func import jacrev, vmap

import atlas
import common
from conftest import check_outputs, check_resume, load_results, small_args


def small_net(num_classes=5):
    """A smooth network without BatchNorm, so that each sample's Jacobian is its own."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, num_classes))


def exact_jacobians(model, x):
    """Per-sample Jacobians of the logits w.r.t. the input, B × C × D, with torch.func."""
    return vmap(jacrev(lambda xi: model(xi[None])[0]))(x).flatten(2)


def test_one_projection_estimate_is_unbiased_for_the_frobenius_norm():
    model = small_net()
    torch.manual_seed(1)
    n = 4000
    for point in torch.rand(3, 3, 4, 4):
        jac = exact_jacobians(model, point[None])[0].detach()                   # C × D
        num_classes = jac.shape[0]
        a = jac @ jac.T
        exact = a.trace().item()                                                # ‖J‖²_F
        # n independent one-projection estimates: the same point n times, one v per row.
        x_rep = point.expand(n, -1, -1, -1).clone().requires_grad_(True)
        estimate = atlas.jacobian_estimate(model(x_rep), x_rep).item()
        # Exact spread of one estimate C·vᵀAv with v uniform on the sphere:
        # E[(vᵀAv)²] = (tr(A)² + 2 tr(A²)) / (C(C+2)).
        var = num_classes ** 2 * (exact ** 2 + 2 * (a @ a).trace().item()) / (num_classes * (num_classes + 2)) \
            - exact ** 2
        se = math.sqrt(var / n)
        assert 4.5 * se < 0.1 * exact  # the tolerance is tight enough to catch a factor ½ or a missing C
        assert abs(estimate - exact) < 4.5 * se, (estimate, exact, se)


def test_loss_terms_equal_a_hand_computation_and_are_differentiated_through():
    model = small_net()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 4, 4, generator=gen)
    x_adv = (x + (torch.rand(x.shape, generator=gen) - 0.5) * 0.1).clamp(0, 1)
    y = torch.arange(6) % 5
    torch.manual_seed(3)
    logits, ce, jac, kl = atlas.atlas_terms(model, x, x_adv, y)
    a, b = 2e-4, 5.0
    grads = torch.autograd.grad(ce + a * jac + b * kl, list(model.parameters()))

    # By hand. v: the estimator draws a normalised Gaussian per sample right after the forward pass.
    torch.manual_seed(3)
    v = torch.randn(6, 5)
    v = v / v.norm(dim=1, keepdim=True)
    z_adv, z = model(x_adv), model(x)
    log_p_adv = z_adv - z_adv.logsumexp(1, keepdim=True)
    log_p = z - z.logsumexp(1, keepdim=True)
    ce_hand = -log_p_adv[torch.arange(6), y].mean()
    jacobians = exact_jacobians(model, x_adv)                                   # B × C × D, differentiable in θ
    jac_hand = 5 * torch.einsum("bc,bcd->bd", v, jacobians).pow(2).sum(1).mean()
    kl_hand = (log_p_adv.exp() * (log_p_adv - log_p)).sum(1).mean()
    torch.testing.assert_close(logits, z_adv)
    torch.testing.assert_close(ce, ce_hand)
    torch.testing.assert_close(jac, jac_hand)
    torch.testing.assert_close(kl, kl_hand)
    assert kl > 0 and jac > 0
    # The Jacobian and KL terms reach θ: the gradients equal those of the hand-written loss.
    grads_hand = torch.autograd.grad(ce_hand + a * jac_hand + b * kl_hand, list(model.parameters()))
    for g, g_hand in zip(grads, grads_hand):
        torch.testing.assert_close(g, g_hand)
    # ATLAS-g / ATLAS-l: a term whose weight is 0 is not computed
    _, _, jac0, kl0 = atlas.atlas_terms(model, x, x_adv, y, use_jacobian=False, use_kl=False)
    assert jac0 == 0 and kl0 == 0


def test_epsilon_ramp():
    n = 7  # batches per epoch
    assert atlas.ramp(0, 0, n, 15) == 0.0
    assert atlas.ramp(15, 0, n, 15) == 1.0 and atlas.ramp(40, 3, n, 15) == 1.0
    values = [atlas.ramp(e, i, n, 15) for e in range(15) for i in range(n)]
    assert values == pytest.approx([k / (15 * n) for k in range(15 * n)])  # linear, per iteration, below v
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
    assert lrs[-1] == pytest.approx(0.1 / 5 ** 5)
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
    assert opt.param_groups[0]["lr"] == 0.1 and sched.state_dict() == {"best": 0.1, "epochs_since_best": 0}
    # At full ε the count starts: lr ÷ 5 after the 2nd epoch without a new best, stop after the 3rd.
    assert not sched.step(0.1) and not sched.step(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    assert sched.step(0.1)


def test_main_starts_counting_when_the_ramp_ends(mnist_dir, tmp_path, monkeypatch):
    # Validation accuracy falls every epoch. Ramp 3 epochs: epochs 1-2 end below full ε and are not counted;
    # plateau 1 / stop 2 then cut the lr after epoch 3 and stop after epoch 4 (counting from epoch 2 would
    # cut after epoch 2 and stop after epoch 3).
    accs = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    pgd_accuracy = common.pgd_accuracy

    def falling_validation(model, x, y, *args, **kwargs):
        return next(accs) if len(y) == 48 else pgd_accuracy(model, x, y, *args, **kwargs)  # 48: the val size

    monkeypatch.setattr(common, "pgd_accuracy", falling_validation)
    out = str(tmp_path / "run")
    atlas.main(small_args(mnist_dir, out, epochs=5, dataset="mnist", model="mnist-cnn", val_size=48, val_iters=1,
                          ramp_epochs=3, plateau_epochs=1, stop_epochs=2, eval_iters=1))
    rows = load_results(out)["epochs"]
    assert [r["val_acc"] for r in rows] == [0.5, 0.4, 0.3, 0.2]
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.01, 0.01, 0.002])


def test_recipes():
    a = atlas.get_args(["--dataset", "cifar100", "--epochs", "30"])
    assert (a.epochs, a.lr, a.batch_size, a.weight_decay) == (30, 0.1, 64, 2e-4)
    assert (a.jac_alpha, a.kl_beta, a.epsilon, a.alpha, a.attack_iters) == (2e-4, 5.0, 8, 10, 1)
    assert (a.val_size, a.val_iters, a.val_step, a.plateau_epochs, a.stop_epochs) == (5000, 10, 1.785, 2, 10)
    ten = atlas.get_args(["--dataset", "cifar100", "--attack-iters", "10"])
    assert (ten.alpha, ten.jac_alpha, ten.kl_beta) == (1.785, 1e-4, 10.0)
    assert atlas.get_args(["--attack-iters", "10"]).kl_beta == 5.0                       # CIFAR-10 ten-step
    assert atlas.get_args(["--kl-beta", "0", "--attack-iters", "10"]).kl_beta == 0.0     # ATLAS-l
    m = atlas.get_args(["--dataset", "mnist"])
    assert (m.lr, m.batch_size, m.jac_alpha, m.kl_beta, m.epsilon, m.alpha) == (0.01, 128, 1e-5, 0.3, 76.5, 95.625)
    assert (m.val_iters, m.val_step, m.model) == (20, 2.55, "mnist-cnn")
    m20 = atlas.get_args(["--dataset", "mnist", "--attack-iters", "20"])   # MNIST's multi-step ATLAS
    assert (m20.alpha, m20.jac_alpha, m20.kl_beta) == (2.55, 5e-6, 0.2)
    with pytest.raises(SystemExit):
        atlas.get_args(["--val-size", "0"])


def test_validation_slice_never_appears_in_training_batches(cifar_dir, no_checksum):
    args = atlas.get_args(["--data-dir", cifar_dir, "--val-size", "64", "--batch-size", "32", "--device", "cpu"])
    data = common.get_data(args, "cpu", args.val_size)  # as main() calls it
    val = set(data.val.indices.tolist())
    assert len(val) == 64
    for epoch in range(3):
        seen = torch.cat([idx for _, _, idx in data.train.epoch(epoch)]).tolist()
        assert not val & set(seen)
        assert len(seen) == len(set(seen)) == data.train_size - 64
    # and the held-out images are the training split's images at those indices, not augmented copies
    x_all, _ = common.load_split("cifar10", cifar_dir, train=True)
    assert torch.equal(data.val.images, torch.from_numpy(x_all)[data.val.indices])


def test_one_step_attack_stays_in_the_ball():
    model = small_net(10).eval()
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    x[0], x[1] = 0.0, 1.0
    for iters, step in ((1, 10 / 255), (10, 1.785 / 255)):
        delta = atlas.attack(model, x, y, 8 / 255, step, iters, contextlib.nullcontext)
        assert delta.abs().max() <= 8 / 255 + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1
        assert delta.abs().max() > 7 / 255  # it moved to the edge of the ball somewhere


def test_help_names_the_mnist_multi_step_variant(capsys):
    with pytest.raises(SystemExit):
        atlas.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dataset mnist --attack-iters 20" in text


def test_end_to_end_resume_validation_rule_and_best_model(cifar_dir, tmp_path):
    # plateau 1 / stop 2 so that the lr cut and (possibly) the stop happen within 3 tiny epochs; a 2-epoch
    # ramp so that epoch 1 is not counted and epochs 2-3 are
    extra = dict(val_size=128, val_iters=1, plateau_epochs=1, stop_epochs=2, ramp_epochs=2)
    a, _ = check_resume("atlas.py", cifar_dir, tmp_path, epochs=3, **extra)
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
    assert stopped or len(rows) == 3
    with open(os.path.join(tmp_path / "full", "log.txt")) as f:
        log = f.read()
    assert "val_acc" in log
    # the best model is the first epoch with the highest validation accuracy among those that do not predict
    # one class (common.py logs those as not eligible; 0 when none is)
    ineligible = {int(e) for e in re.findall(r"# epoch (\d+): .*not eligible", log)}
    val = [(r["val_acc"], -r["epoch"]) for r in rows if r["epoch"] not in ineligible]
    assert a["best_epoch"] == (-max(val)[1] if val else 0)
    # ε ramps per iteration: 4 batches of 32 per epoch, the logged ε is the last batch's
    for e, row in enumerate(rows):
        assert row["eps"] == pytest.approx(8 * atlas.ramp(e, 3, 4, 2))
    assert load_results(str(tmp_path / "part"))["best_epoch"] == a["best_epoch"]


def test_steps_follow_epsilon():
    a = atlas.get_args(["--epsilon", "16"])
    assert a.alpha == 20 and abs(a.val_step - 2 * 1.785) < 1e-9
    assert atlas.get_args(["--epsilon", "16", "--val-step", "2"]).val_step == 2
