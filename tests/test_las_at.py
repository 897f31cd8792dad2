"""las_at.py: action sets and strategy heads, per-sample PGD, the reward, the REINFORCE step, the
update schedule (in-process), and end to end with --resume (subprocess, tiny CIFAR-10, small WRN)."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import common
import las_at
from conftest import check_outputs, check_resume, load_results, small_args

# SPEC §6: the code README's sets (/255 units for ε and step); MNIST is our documented choice.
CIFAR10_SETS = (list(range(3, 16)), list(range(1, 6)), list(range(3, 15)))
EXPECTED_SETS = {
    "cifar10": CIFAR10_SETS,
    "cifar100": (list(range(3, 16)), list(range(1, 6)), list(range(3, 13))),
    "svhn": CIFAR10_SETS,
    "tiny-imagenet": CIFAR10_SETS,
    "mnist": ([0.05 * i * 255 for i in range(1, 7)], [0.01 * i * 255 for i in range(1, 6)], list(range(3, 15))),
}


class ZeroFeatures(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.new_zeros(len(x), self.dim)


@pytest.mark.parametrize("dataset", list(EXPECTED_SETS))
def test_each_head_is_a_distribution_over_the_datasets_action_set(dataset):
    args = las_at.get_args(["--dataset", dataset])
    eps_set, step_set, iters_set = EXPECTED_SETS[dataset]
    assert args.eps_set == pytest.approx(eps_set) and args.step_set == pytest.approx(step_set)
    assert args.iters_set == iters_set
    backbone = "mnist-cnn" if dataset == "mnist" else "wrn-10-1"
    assert args.strategy_model == ("mnist-cnn" if dataset == "mnist" else "preact18")
    torch.manual_seed(0)
    strategy = las_at.StrategyNet(backbone, dataset, args.eps_set, args.step_set, args.iters_set).eval()
    shape = common.DATASETS[dataset]["shape"]
    logits = strategy(torch.rand(2, *shape))
    assert {k: v.shape for k, v in logits.items()} == {"eps": (2, len(eps_set)), "step": (2, len(step_set)),
                                                       "iters": (2, len(iters_set))}
    # With zero features and zeroed heads every action is equally likely: many draws give exactly the
    # set's values (a zero-feature stand-in for the backbone keeps 3000 draws cheap).
    strategy.backbone = ZeroFeatures(strategy.heads["eps"].in_features)
    for head in strategy.heads.values():
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    x = torch.rand(3000, *shape)
    with torch.no_grad():
        dists, _, (eps, step, iters) = las_at.sample_strategy(strategy, x)
    for d in dists.values():
        torch.testing.assert_close(d.probs.sum(1), torch.ones(3000))
    assert sorted(set((eps * 255).tolist())) == pytest.approx(eps_set, rel=1e-5)
    assert sorted(set((step * 255).tolist())) == pytest.approx(step_set, rel=1e-5)
    assert sorted(set(iters.tolist())) == iters_set


def test_flags_that_do_not_fit_are_refused():
    for argv in (["--strategy-model", "mnist-cnn"], ["--label-smoothing", "1.5"], ["--iters-set", "0"],
                 ["--reward", "bogus"], ["--dataset", "mnist", "--strategy-grid", "2"]):
        with pytest.raises(SystemExit) as err:
            las_at.get_args(argv)
        assert err.value.code == 2
    # the ŵ-term weights default per reward form (code: 4, 2; slides' form: 1, 1)
    a = las_at.get_args([])
    b = las_at.get_args(["--reward", "loss"])
    assert (a.reward_alpha, a.reward_beta, b.reward_alpha, b.reward_beta) == (4, 2, 1, 1)


def reference_pgd(model, x, y, start, eps, step, n):
    """Plain single-sample L∞ PGD written out: project the start, n signed-gradient steps."""
    delta = (x + start.clamp(-eps, eps)).clamp(0, 1) - x
    for _ in range(n):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
        delta = (x + (delta.detach() + step * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    return delta.detach()


def test_per_sample_pgd_equals_single_sample_runs_and_stays_in_each_ball():
    torch.manual_seed(0)
    # float64 so that batched and single-sample convolutions agree far below any gradient's size
    model = common.make_model("wrn-10-1", "cifar10").double().eval()
    x, y = torch.rand(5, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    x[0], x[1] = 0.0, 1.0  # pixels at the range ends
    eps = torch.tensor([3, 15, 8, 5, 12], dtype=torch.float64) / 255
    step = torch.tensor([1, 5, 2, 4, 3], dtype=torch.float64) / 255
    iters = torch.tensor([3, 7, 14, 1, 5])
    start = torch.empty_like(x).uniform_(-8 / 255, 8 / 255)  # wider than some samples' balls
    delta = las_at.per_sample_pgd(model, x, y, start, eps, step, iters, contextlib.nullcontext)
    for i in range(5):
        expected = reference_pgd(model, x[i:i + 1], y[i:i + 1], start[i:i + 1], eps[i].item(), step[i].item(),
                                 iters[i].item())
        torch.testing.assert_close(delta[i:i + 1], expected, rtol=0, atol=1e-12)
        assert delta[i].abs().max() <= eps[i] + 1e-12
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    # sample 3 stopped after 1 step: running it for the batch's 14 steps would end elsewhere
    longer = reference_pgd(model, x[3:4], y[3:4], start[3:4], eps[3].item(), step[3].item(), 14)
    assert not torch.allclose(delta[3:4], longer)


@pytest.mark.parametrize("reward", ["accuracy", "loss"])
def test_reward_leaves_the_target_and_its_optimiser_untouched(reward):
    torch.manual_seed(0)
    args = las_at.get_args(["--reward", reward])
    model = common.make_model("wrn-10-1", "cifar10").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers exist, BN statistics have moved, .grad is set
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    x_adv = (x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255)).clamp(0, 1)
    total, (r1, r2, r3) = las_at.compute_reward(model, x, y, x_adv, 0.1, args, contextlib.nullcontext)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for k, s in opt_state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], s["momentum_buffer"])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    with torch.no_grad():
        model.eval()
        expected_r1 = F.cross_entropy(model(x_adv), y).clamp(0, 10)
    torch.testing.assert_close(r1, expected_r1)
    torch.testing.assert_close(total, r1 + r2 + r3)
    if reward == "accuracy":  # 4 × robust accuracy and 2 × clean accuracy of ŵ, on 16 images
        assert 0 <= r2 <= 4 and 0 <= r3 <= 2 and (r2 * 16 / 4) % 1 == 0 and (r3 * 16 / 2) % 1 == 0
    else:  # negative CE losses of ŵ
        assert r2 < 0 and r3 < 0


def test_label_smoothing_below_one_over_c_is_refused_at_parse_time(tmp_path):
    """TRUE_PROB < 1/C would give another class more mass than the true one (and PyTorch's label_smoothing
    would exceed 1): an argparse error (exit 2) before any data is read (the data dir does not exist)."""
    missing = str(tmp_path / "no-data")
    for dataset, value, accepted in (("cifar10", 0.05, False), ("cifar10", 0.1, True), ("cifar10", 1.0, True),
                                     ("cifar100", 0.05, True), ("cifar100", 0.005, False),
                                     ("tiny-imagenet", 0.004, False), ("tiny-imagenet", 0.8, True)):
        argv = ["--dataset", dataset, "--data-dir", missing, "--label-smoothing", str(value)]
        if accepted:
            assert las_at.get_args(argv).label_smoothing == value
        else:
            with pytest.raises(SystemExit) as err:
                las_at.get_args(argv)
            assert err.value.code == 2, (dataset, value)
    # at exactly 1/C the soft label is uniform: PyTorch accepts the converted smoothing (s = 1)
    c = 10
    s = (1 - 1 / c) * c / (c - 1)
    F.cross_entropy(torch.zeros(2, c), torch.tensor([0, 1]), label_smoothing=s)


def test_tiny_imagenet_recipe_is_the_codes_tiny_imagenet_script():
    t, c = las_at.get_args(["--dataset", "tiny-imagenet"]), las_at.get_args([])
    # code (LAS_AT_train_TinyImageNet.py): k = 1, target gradient clipped at 10, 2×2-pooled strategy features;
    # its label smoothing 0.8 stays off, as on every dataset here
    assert (t.strategy_every, t.clip_grad_norm, t.strategy_grid, t.label_smoothing) == (1, 10, 2, None)
    assert (c.strategy_every, c.clip_grad_norm, c.strategy_grid, c.label_smoothing) == (20, 0, 1, None)
    assert las_at.get_args(["--dataset", "tiny-imagenet", "--strategy-every", "20"]).strategy_every == 20
    torch.manual_seed(0)
    strategy = las_at.StrategyNet("wrn-10-1", "tiny-imagenet", *CIFAR10_SETS, grid=2).eval()
    assert strategy.heads["eps"].in_features == 4 * 64  # wrn-10-1 ends in 64 channels; code: 4 × 512 = 2048
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        features = strategy.features(x).view(3, 64, 2, 2)
        pooled = strategy.backbone(x)  # the backbone's own 1×1 pooling of the same final map
        logits = strategy(x)
    # the four equal cells of each channel average to its global mean, and they are not all equal
    torch.testing.assert_close(features.mean((2, 3)), pooled)
    assert (features.flatten(2).std(2) > 1e-4).any()
    assert logits["iters"].shape == (3, len(CIFAR10_SETS[2]))


def test_reward_attacks_w_hat_in_train_mode_then_scores_it_in_eval_mode(monkeypatch):
    """The code's order: the PGD-10 × 2 on ŵ runs with ŵ in train mode (its BN running statistics move
    with the attack's passes), then ŵ goes to eval mode and R2, R3 are its accuracies there."""
    torch.manual_seed(0)
    args = las_at.get_args([])
    model = common.make_model("wrn-10-1", "cifar10").eval()
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    x_adv = (x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255)).clamp(0, 1)
    seen = {}
    real_attack = common.attack_pgd

    def recording_attack(shadow, *a, **kw):
        stats = lambda: torch.cat([m.running_mean for m in shadow.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        before = stats().clone()
        delta, robust = real_attack(shadow, *a, **kw)
        seen.update(shadow=shadow, delta=delta, training=shadow.training, moved=not torch.equal(before, stats()))
        return delta, robust

    monkeypatch.setattr(common, "attack_pgd", recording_attack)
    _, (_, r2, r3) = las_at.compute_reward(model, x, y, x_adv, 0.1, args, contextlib.nullcontext)
    assert seen["shadow"] is not model
    assert seen["training"] and seen["moved"]
    shadow = seen["shadow"]
    assert not shadow.training  # switched to eval mode after the attack
    with torch.no_grad():
        expected_r2 = 4 * (shadow(x + seen["delta"]).argmax(1) == y).float().mean()
        expected_r3 = 2 * (shadow(x).argmax(1) == y).float().mean()
    assert r2.item() == expected_r2.item() and r3.item() == expected_r3.item()


def test_k_1_clips_the_target_and_steps_the_strategy_lr_with_the_code_milestones(cifar_dir, tmp_path, no_checksum,
                                                                                monkeypatch):
    """One epoch of 4 iterations with k = 1 (the Tiny ImageNet recipe's) and a clip small enough to act: every
    target step is clipped to that norm (the strategy's to 1.0), and the strategy's lr, stepped per update at
    the target's milestones (int(4·99/110) = int(4·104/110) = 3), ends at 1e-4 × 0.01."""
    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **kw):
        parameters = list(parameters)
        out = real_clip(parameters, max_norm, *a, **kw)
        clips.append((max_norm, torch.cat([p.grad.flatten() for p in parameters]).norm().item(), out.item()))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    out = tmp_path / "run"
    las_at.main(small_args(cifar_dir, str(out), epochs=1, strategy_model="wrn-10-1", strategy_every=1,
                           clip_grad_norm=0.001, val_size=128, iters_set=1, eval_samples=8, eval_iters=1,
                           monitor_size=8))
    assert [m for m, _, _ in clips] == [1.0, 0.001] * 4  # per iteration: strategy update, then target step
    for max_norm, after, before in clips:
        assert after <= max_norm * (1 + 1e-4) + 1e-6
    assert any(before > 0.001 for m, _, before in clips if m == 0.001)  # the clip did act
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["tracked"]["strategy_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.01)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reinforce_step_moves_the_log_probability_of_the_sampled_actions_with_the_reward(sign):
    torch.manual_seed(0)
    strategy = las_at.StrategyNet("wrn-10-1", "cifar10", *CIFAR10_SETS).train()
    strategy_opt = torch.optim.SGD(strategy.parameters(), lr=0.05)
    x = torch.rand(8, 3, 32, 32)
    dists, actions, _ = las_at.sample_strategy(strategy, x)
    before = sum(d.log_prob(actions[k]).sum() for k, d in dists.items()).item()
    las_at.reinforce_step(strategy, strategy_opt, dists, actions, torch.tensor(sign * 2.0))
    with torch.no_grad():
        logits = strategy(x)  # train mode again: the same batch statistics as the sampling pass
    after = sum(torch.distributions.Categorical(logits=logits[k]).log_prob(a).sum() for k, a in actions.items())
    assert (after.item() - before) * sign > 0


def test_strategy_is_updated_exactly_every_k_iterations(cifar_dir, tmp_path, no_checksum, monkeypatch):
    """In-process run, 2 epochs × 4 iterations (128 of the 256 images held out), k = 3: the strategy
    samples in train mode and its weights change on iterations 3 and 6 of the run (counted across
    epochs: a per-epoch count would give 3 and 7), and only there."""
    seen = []  # per strategy call: (train mode?, the strategy's weights at that moment)
    real_sample = las_at.sample_strategy

    def recording_sample(strategy, x):
        seen.append((strategy.training, torch.cat([p.detach().flatten() for p in strategy.parameters()])))
        return real_sample(strategy, x)

    monkeypatch.setattr(las_at, "sample_strategy", recording_sample)
    las_at.main(small_args(cifar_dir, str(tmp_path / "run"), epochs=2, strategy_model="wrn-10-1",
                           strategy_every=3, val_size=128) + ["--iters-set", "1", "2"])
    target_samples = [w for training, w in seen if not training]  # one per iteration, after any update
    assert len(target_samples) == 8
    changed = [m + 1 for m in range(1, 8) if not torch.equal(target_samples[m], target_samples[m - 1])]
    assert changed == [3, 6]
    assert [training for training, _ in seen] == [False, False, True, False, False, False, True, False, False, False]
    res = load_results(str(tmp_path / "run"))
    assert [r["updates"] for r in res["epochs"]] == [1, 1]
    # k ≥ 2: the code's strategy milestones (target iterations, stepped per update) are never reached
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["tracked"]["strategy_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_end_to_end_with_resume(cifar_dir, tmp_path):
    # 128 of the 256 images held out (the best model is chosen on them): 4 iterations per epoch, one update
    a, _ = check_resume("las_at.py", cifar_dir, tmp_path, strategy_model="wrn-10-1", strategy_every=4,
                        iters_set=3, val_size=128)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "las_at" and a["args"]["eps_set"] == CIFAR10_SETS[0]
    for row in a["epochs"]:
        assert 3 <= row["eps_mean"] <= 15 and 1 <= row["step_mean"] <= 5 and row["iters_mean"] == 3
        assert row["updates"] == 1 and 0 <= row["reward"] <= 16  # R1 ≤ 10, R2 ≤ 4, R3 ≤ 2
    # the strategy network and its optimiser are in the checkpoint
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert "heads.eps.weight" in ckpt["tracked"]["strategy"] and "strategy_opt" in ckpt["tracked"]
