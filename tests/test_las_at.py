"""las_at.py: the copyable pieces (strategy network, per-sample PGD, reward, REINFORCE step, the core), the flags,
the update and lr schedules (in-process runs), and end to end with --resume (subprocess, tiny CIFAR-10)."""

import argparse
import inspect
import os
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar

import common
import harness
import las_at

# DECISIONS.md, 'LAS-AT attack and schedule': the code README's sets (/255 units for ε and step); MNIST is our
# documented choice.
CIFAR10_SETS = (list(range(3, 16)), list(range(1, 6)), list(range(3, 15)))
EXPECTED_SETS = {
    "cifar10": CIFAR10_SETS,
    "cifar100": (list(range(3, 16)), list(range(1, 6)), list(range(3, 13))),
    "svhn": CIFAR10_SETS,
    "tiny-imagenet": CIFAR10_SETS,
    "mnist": (
        [0.05 * i * 255 for i in range(1, 7)],
        [0.01 * i * 255 for i in range(1, 6)],
        list(range(3, 15)),
    ),
}
SHAPES = {
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "svhn": (3, 32, 32),
    "tiny-imagenet": (3, 64, 64),
    "mnist": (1, 28, 28),
}


def copy_with(function, *helpers):
    """copy_of(function) with the copyable helpers it names defined beside it (also from their source alone)."""
    namespace = {
        "torch": torch,
        "nn": torch.nn,
        "F": torch.nn.functional,
        **{h.__name__: copy_of(h) for h in helpers},
    }
    exec(textwrap.dedent(inspect.getsource(function)), namespace)
    return namespace[function.__name__]


def net(name="wrn-10-1", shape=(3, 32, 32), classes=10):
    c = shape[0]
    return common.make_model(name, classes, shape, (0.5,) * c, (0.25,) * c)


def strategy_net(backbone="wrn-10-1", shape=(3, 32, 32), sets=CIFAR10_SETS, grid=1):
    return copy_of(las_at.StrategyNet)(net(backbone, shape), *sets, grid=grid)


class ZeroFeatures(nn.Module):
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
    assert args.strategy_model == ("mnist-cnn" if dataset == "mnist" else "preact18")
    torch.manual_seed(0)
    shape = SHAPES[dataset]
    strategy = strategy_net(
        "mnist-cnn" if dataset == "mnist" else "wrn-10-1",
        shape,
        (args.eps_set, args.step_set, args.iters_set),
    ).eval()
    logits = strategy(torch.rand(2, *shape))
    assert {k: v.shape for k, v in logits.items()} == {
        "eps": (2, len(eps_set)),
        "step": (2, len(step_set)),
        "iters": (2, len(iters_set)),
    }
    # With zero features and zeroed heads every action is equally likely: 3000 draws of the core give exactly the
    # set's values (a zero-feature backbone and 4×4 images against a linear target keep them cheap).
    strategy.backbone = ZeroFeatures(strategy.heads["eps"].in_features)
    for head in strategy.heads.values():
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    target = nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * 16, 10))
    x, y = torch.rand(3000, shape[0], 4, 4), torch.arange(3000) % 10
    las_at_delta = copy_with(las_at.las_at_delta, las_at.per_sample_pgd)
    delta, log_prob, (eps, step, iters) = las_at_delta(target, strategy, x, y, 8 / 255)
    uniform = -sum(torch.log(torch.tensor(float(len(s)))) for s in (eps_set, step_set, iters_set))
    torch.testing.assert_close(log_prob, uniform.expand(3000))  # Σ over the heads of log(1/|set|)
    assert sorted(set((eps * 255).tolist())) == pytest.approx(eps_set, rel=1e-5)
    assert sorted(set((step * 255).tolist())) == pytest.approx(step_set, rel=1e-5)
    assert sorted(set(iters.tolist())) == iters_set
    assert (
        (delta.abs().amax((1, 2, 3)) <= eps + 1e-6).all()
        and (x + delta).min() >= 0
        and (x + delta).max() <= 1
    )


def test_flags_that_do_not_fit_are_refused_at_parse_time(capsys):
    for argv, word in (
        (["--iters-set", "0"], "--iters-set"),
        (["--reward", "bogus"], "--reward"),
        (["--dataset", "mnist", "--strategy-grid", "2"], "--strategy-grid"),
        (["--eps-set", "0.05", "0.1"], "write --eps-set 12.75"),
        (["--eps-set", "3", "4", "3"], "each value once"),
        (["--strategy-momentum", "1"], "below 1"),
    ):
        with pytest.raises(SystemExit) as err:
            las_at.get_args(argv)
        assert err.value.code == 2 and word in capsys.readouterr().err, argv
    # the ŵ-term weights default per reward form (code: 4, 2; the paper's form: 1, 1, our choice)
    a, b = las_at.get_args([]), las_at.get_args(["--reward", "loss"])
    assert (a.reward_alpha, a.reward_beta, b.reward_alpha, b.reward_beta) == (4, 2, 1, 1)
    # the strategy network does not follow --model, and -h says so
    assert las_at.get_args(["--model", "wrn-34-10"]).strategy_model == "preact18"
    with pytest.raises(SystemExit):
        las_at.get_args(["-h"])
    assert "ResNet18 strategy for every target" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"strategy_model": "mnist-cnn"}, "--strategy-model mnist-cnn does not fit 32x32"),
        ({"true_prob": 0.1}, "--true-prob 0.1: the true class's probability must be above 1/C"),
        # 231 training images in batches of 32: 8 iterations per epoch, 16 in the run
        ({"strategy_every": 17}, "--strategy-every 17: this run has 16 iterations"),
    ],
)
def test_flags_that_do_not_fit_the_data_are_refused_before_the_run_folder(
    cifar_dir, tmp_path, no_checksum, capsys, flags, words
):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        harness.main_guard(
            lambda: las_at.main(small_args(cifar_dir, str(out), **{"strategy_every": 4, **flags}))
        )
    assert err.value.code == 2 and words in capsys.readouterr().err
    assert not out.exists()


def code_pgd(model, x, y, start, eps, step, n):
    """The authors' Attack_policy_batch for one image, written out: the start clamped to the pixel range only, then
    n signed-gradient steps, each projected onto the ε-ball and the pixel range."""
    delta = (x + start).clamp(0, 1) - x
    for _ in range(n):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
        delta = (x + (delta.detach() + step * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    return delta.detach()


def test_per_sample_pgd_equals_single_image_runs_of_the_codes_attack_and_stays_in_each_ball():
    per_sample_pgd = copy_of(las_at.per_sample_pgd)
    torch.manual_seed(0)
    # float64 so that batched and single-image convolutions agree far below any gradient's size
    model = net().double().eval()
    x, y = torch.rand(5, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    x[0], x[1] = 0.0, 1.0  # pixels at the range ends
    eps = torch.tensor([3, 15, 8, 5, 12], dtype=torch.float64) / 255
    step = torch.tensor([1, 5, 2, 4, 3], dtype=torch.float64) / 255
    iters = torch.tensor([3, 7, 14, 1, 5])
    start = torch.empty_like(x).uniform_(-8 / 255, 8 / 255)  # wider than some images' balls
    delta = per_sample_pgd(model, x, y, start, eps, step, iters)
    assert all(p.grad is None for p in model.parameters())  # only ∇δ was computed
    for i in range(5):
        expected = code_pgd(
            model,
            x[i : i + 1],
            y[i : i + 1],
            start[i : i + 1],
            eps[i].item(),
            step[i].item(),
            iters[i].item(),
        )
        torch.testing.assert_close(delta[i : i + 1], expected, rtol=0, atol=1e-12)
        assert delta[i].abs().max() <= eps[i] + 1e-12
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    # image 3 stopped after 1 step: running it for the batch's 14 steps would end elsewhere
    longer = code_pgd(model, x[3:4], y[3:4], start[3:4], eps[3].item(), step[3].item(), 14)
    assert not torch.allclose(delta[3:4], longer)


def test_the_start_is_projected_by_the_steps_not_before_the_first():
    """The fix: the code draws the start from U(−8/255, 8/255) whatever ε_i, clamps it to the pixel range only, and
    projects onto ε_i after each step. With ε = 3/255, step 1/255 and a start at +6/255, a pixel whose gradient
    sign is −1 goes 6 → 5 → (ball) 3 → 2 → 1 in three steps; projecting the start first (3 → 2 → 1 → 0) ends at 0.
    A two-class linear model makes the sign of ∇_x CE constant, sign(w_1 − w_0) for label 0."""
    per_sample_pgd = copy_of(las_at.per_sample_pgd)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).double()
    x, y = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    start = torch.full_like(x, 6 / 255)
    eps, step = (
        torch.full((2,), 3 / 255, dtype=torch.float64),
        torch.full((2,), 1 / 255, dtype=torch.float64),
    )
    # image 1 has no step of its own (n = 0): the masked steps of the others still project it onto its ball
    delta = per_sample_pgd(model, x, y, start, eps, step, torch.tensor([3, 0]))
    up = (model[1].weight[1] - model[1].weight[0]).view(3, 8, 8) > 0
    assert 0 < up.sum() < up.numel()
    torch.testing.assert_close(
        delta[0], torch.where(up, 3.0, 1.0).double() / 255, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(delta[1], torch.full_like(x[1], 3 / 255), rtol=0, atol=1e-12)
    # the old reading (the start projected onto the ball first) ends elsewhere: 0 where the sign is −1
    projected = code_pgd(
        model, x[:1], y[:1], start[:1].clamp(-3 / 255, 3 / 255), 3 / 255, 1 / 255, 3
    )
    torch.testing.assert_close(
        projected[0], torch.where(up, 3.0, 0.0).double() / 255, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_sample_pgd_under_autocast_gives_the_fp32_direction(dtype):
    torch.manual_seed(0)
    model, x, y = net().eval(), torch.rand(6, 3, 32, 32), torch.arange(6)
    eps, step, iters = (
        torch.full((6,), 8 / 255),
        torch.full((6,), 8 / 255),
        torch.ones(6, dtype=torch.long),
    )
    start = torch.zeros_like(x)
    fp32 = las_at.per_sample_pgd(model, x, y, start, eps, step, iters)
    low = las_at.per_sample_pgd(model, x, y, start, eps, step, iters, autocast=dtype)
    assert (low != 0).float().mean() > 0.9  # no underflow to a zero gradient (fp16 scales the loss)
    assert (low == fp32).float().mean() > 0.9  # the same signs, up to rounding


def test_the_core_samples_attacks_and_hands_both_networks_back():
    las_at_delta = copy_with(las_at.las_at_delta, las_at.per_sample_pgd)
    torch.manual_seed(0)
    model, strategy = net(), strategy_net()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)

    def bn_stats(m):
        return [b.clone() for b in m.buffers()]

    for update, model_mode, strategy_mode in (
        (False, True, True),
        (True, False, False),
        (True, True, False),
    ):
        model.train(model_mode)
        strategy.train(strategy_mode)
        target_stats, strategy_stats = bn_stats(model), bn_stats(strategy)
        delta, log_prob, (eps, step, iters) = las_at_delta(
            model, strategy, x, y, 8 / 255, update=update
        )
        assert model.training == model_mode and strategy.training == strategy_mode
        # target attacked in eval mode
        assert all(torch.equal(a, b) for a, b in zip(target_stats, bn_stats(model)))
        # the strategy samples in train mode (its BN statistics move) only for an update, and only then with a graph
        moved = not all(torch.equal(a, b) for a, b in zip(strategy_stats, bn_stats(strategy)))
        assert moved == update and log_prob.requires_grad == update and log_prob.shape == (8,)
        assert (
            (delta.abs().amax((1, 2, 3)) <= eps + 1e-6).all()
            and (x + delta).min() >= 0
            and (x + delta).max() <= 1
        )
        assert (
            iters.dtype == torch.long and ((3 / 255 - 1e-6 <= eps) & (eps <= 15 / 255 + 1e-6)).all()
        )
    # normalised images would make the pixel clamp wrong
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        las_at_delta(model, strategy, (x - 0.5) / 0.25, y, 8 / 255)


def test_strategy_net_takes_any_classifier_module_and_strips_its_last_linear():
    StrategyNet = copy_of(las_at.StrategyNet)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 7),
        nn.ReLU(),
        nn.Linear(7, 10),
    )
    strategy = StrategyNet(backbone, *CIFAR10_SETS)
    # only the last one
    assert isinstance(backbone[5], nn.Identity) and isinstance(backbone[3], nn.Linear)
    assert strategy.heads["iters"].in_features == 7 and strategy(torch.rand(2, 3, 32, 32))[
        "iters"
    ].shape == (2, 12)
    with pytest.raises(ValueError):  # a 2×2 grid needs a final BatchNorm's feature map
        StrategyNet(nn.Sequential(nn.Flatten(), nn.Linear(12, 10)), *CIFAR10_SETS, grid=2)


@pytest.mark.parametrize("shape,grid", [((3, 32, 32), 1), ((3, 64, 64), 2)])
def test_the_authors_strategy_is_their_cifar_resnet18_on_raw_pixels(shape, grid):
    """--strategy-model resnet18-authors: the authors' ResNet18_Strategy (LAS_PGD_AT/StrategyNet.py, pytorch-cifar's
    ResNet18): 11,173,962 parameters with a 10-class classifier, a 3×3 stride-1 stem and no max-pool, 512·G²
    features (their avg_pool2d(out, 4): 1×1 on 32×32, 2×2 on 64×64), and it reads raw pixels: its actions' logits
    do not change with the dataset's mean and std, which a normalising backbone's do."""
    argv = ["--strategy-model", "ResNet18-Authors", "--strategy-grid", str(grid)]
    args = las_at.get_args(argv)
    assert args.strategy_model == "resnet18-authors"
    assert sum(p.numel() for p in las_at.AuthorsResNet18(10).parameters()) == 11_173_962
    x = torch.rand(2, *shape)
    logits = {}
    for model in ("resnet18-authors", "preact18"):
        for mean in (0.0, 0.5):
            data = argparse.Namespace(
                num_classes=10, shape=shape, mean=(mean,) * 3, std=(1 - mean,) * 3
            )
            torch.manual_seed(0)
            backbone, net_grid = las_at.strategy_backbone(
                argparse.Namespace(strategy_model=model, strategy_grid=grid), data
            )
            strategy = copy_of(las_at.StrategyNet)(backbone, *CIFAR10_SETS, grid=net_grid).eval()
            logits[model, mean] = strategy(x)["eps"]
            if model == "resnet18-authors":
                stem = backbone.conv1
                assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
                assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())
                assert strategy.heads["eps"].in_features == 512 * grid**2
    assert torch.equal(logits["resnet18-authors", 0.0], logits["resnet18-authors", 0.5])
    assert not torch.allclose(logits["preact18", 0.0], logits["preact18", 0.5])


def test_tiny_imagenet_recipe_is_the_codes_tiny_imagenet_script():
    t, c = las_at.get_args(["--dataset", "tiny-imagenet"]), las_at.get_args([])
    # code (LAS_AT_train_TinyImageNet.py): k = 1, target gradient clipped at 10, 2×2-pooled strategy features;
    # its label smoothing 0.8 stays off, as on every dataset here
    assert (t.strategy_every, t.clip_grad_norm, t.strategy_grid, t.true_prob) == (
        1,
        10,
        2,
        None,
    )
    assert (c.strategy_every, c.clip_grad_norm, c.strategy_grid, c.true_prob) == (
        20,
        0,
        1,
        None,
    )
    assert (
        las_at.get_args(["--dataset", "tiny-imagenet", "--strategy-every", "20"]).strategy_every
        == 20
    )
    torch.manual_seed(0)
    strategy = strategy_net("wrn-10-1", (3, 64, 64), grid=2).eval()
    # wrn-10-1 ends in 64 channels; code: 4 × 512 = 2048
    assert strategy.heads["eps"].in_features == 4 * 64
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        features = strategy.features(x).view(3, 64, 2, 2)
        pooled = strategy.backbone(x)  # the backbone's own 1×1 pooling of the same final map
        logits = strategy(x)
    # the four equal cells of each channel average to its global mean, and they are not all equal
    torch.testing.assert_close(features.mean((2, 3)), pooled)
    assert (features.flatten(2).std(2) > 1e-4).any()
    assert logits["iters"].shape == (3, len(CIFAR10_SETS[2]))


def reward_setup(mode):
    torch.manual_seed(0)
    model = net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers exist, BN statistics have moved, .grad is set
    x_adv = (x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255)).clamp(0, 1)
    return model.train(mode), opt, x, y, x_adv


@pytest.mark.parametrize("reward", ["accuracy", "loss"])
@pytest.mark.parametrize("mode", [True, False])
def test_reward_leaves_the_target_its_mode_and_its_optimiser_untouched(reward, mode):
    compute_reward = copy_of(las_at.compute_reward)
    model, opt, x, y, x_adv = reward_setup(mode)
    weights = {
        k: v.clone() for k, v in model.state_dict().items()
    }  # with the BN statistics and batch counts
    opt_state = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    groups = opt.state_dict()["param_groups"]
    grads = [p.grad.clone() for p in model.parameters()]
    total, (r1, r2, r3) = compute_reward(
        model,
        x,
        y,
        x_adv,
        0.1,
        8 / 255,
        2 / 255,
        reward=reward,
        reward_alpha=4.0 if reward == "accuracy" else 1.0,
        reward_beta=2.0 if reward == "accuracy" else 1.0,
    )
    assert model.training == mode
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["param_groups"] == groups
    assert all(
        torch.equal(opt.state_dict()["state"][k]["momentum_buffer"], v)
        for k, v in opt_state.items()
    )
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


def test_reward_attacks_w_hat_in_train_mode_then_scores_it_in_eval_mode():
    """The code's order, seen by a forward hook (the deepcopy ŵ keeps it): R1 on the target in eval mode; ŵ's step
    in train mode; PGD-10 × 2 restarts on ŵ in train mode (10 attack passes and a final one per restart, each moving
    ŵ's BN statistics; an image ŵ misclassifies stops moving); then R3, R2 on ŵ in eval mode."""
    compute_reward = copy_of(las_at.compute_reward)
    model, _, x, y, x_adv = reward_setup(False)
    calls = []

    def record(module, inputs, output):
        stats = torch.cat(
            [m.running_mean for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        ).clone()
        calls.append(
            (module, module.training, inputs[0].detach().clone(), output.detach().float(), stats)
        )

    model.register_forward_hook(record)
    _, (_, r2, r3) = compute_reward(model, x, y, x_adv, 0.1, 8 / 255, 2 / 255)
    assert len(calls) == 1 + 1 + 2 * 11 + 2
    assert calls[0][0] is model and not calls[0][1] and torch.equal(calls[0][2], x_adv)
    shadow = calls[1][0]
    assert shadow is not model and all(c[0] is shadow for c in calls[1:])
    assert [c[1] for c in calls[1:]] == [True] * 23 + [False] * 2
    # train mode moves the stats
    assert all(not torch.equal(a[4], b[4]) for a, b in zip(calls[1:23], calls[2:24]))
    for restart in range(2):
        attack = calls[2 + 11 * restart : 2 + 11 * restart + 11]
        for before, after in zip(attack, attack[1:]):
            wrong = before[3].argmax(1) != y
            assert torch.equal(before[2][wrong], after[2][wrong])  # misclassified: not moved
            assert not torch.equal(before[2][~wrong], after[2][~wrong]) or not (~wrong).any()
    clean, adv = calls[-2], calls[-1]
    assert torch.equal(clean[2], x) and (adv[2] - x).abs().max() <= 8 / 255 + 1e-6
    assert r3.item() == 2 * (clean[3].argmax(1) == y).float().mean().item()
    assert r2.item() == 4 * (adv[3].argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reinforce_step_moves_the_log_probability_of_the_sampled_actions_with_the_reward(sign):
    las_at_delta = copy_with(las_at.las_at_delta, las_at.per_sample_pgd)
    reinforce_step = copy_of(las_at.reinforce_step)
    torch.manual_seed(0)
    model, strategy = net(), strategy_net().train()
    strategy_opt = torch.optim.SGD(strategy.parameters(), lr=0.05)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    _, log_prob, (eps, step, iters) = las_at_delta(model, strategy, x, y, 8 / 255, update=True)
    reinforce_step(strategy, strategy_opt, log_prob, torch.tensor(sign * 2.0))
    # the same actions, scored by the updated strategy (train mode again: batch statistics, as when sampled)
    actions = {"eps": eps * 255, "step": step * 255, "iters": iters}
    with torch.no_grad():
        logits = strategy(x)
    after = sum(
        torch.distributions.Categorical(logits=logits[k]).log_prob(
            (v[:, None] - getattr(strategy, f"{k}_values")).abs().argmin(1)
        )
        for k, v in actions.items()
    )
    assert (after.sum().item() - log_prob.sum().item()) * sign > 0


def test_k_1_clips_the_target_and_steps_the_strategy_lr_with_the_code_milestones(
    cifar_dir, tmp_path, no_checksum, monkeypatch
):
    """One epoch of 4 iterations with k = 1 (the Tiny ImageNet recipe's) and a clip small enough to act: every
    target step is clipped to that norm (the strategy's to 1.0), and the strategy's lr, stepped per update at the
    target's milestones (int(4·99/110) = int(4·104/110) = 3), ends at 1e-4 × 0.01. --true-prob 0.7 reaches
    ŵ's step as PyTorch's smoothing (1 − 0.7)·10/9."""
    clips, smoothings = [], []
    real_clip, real_reward = torch.nn.utils.clip_grad_norm_, las_at.compute_reward

    def recording_clip(parameters, max_norm, *a, **kw):
        parameters = list(parameters)
        out = real_clip(parameters, max_norm, *a, **kw)
        clips.append(
            (max_norm, torch.cat([p.grad.flatten() for p in parameters]).norm().item(), out.item())
        )
        return out

    def recording_reward(*a, **kw):
        smoothings.append(inspect.signature(real_reward).bind(*a, **kw).arguments["smoothing"])
        return real_reward(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(las_at, "compute_reward", recording_reward)
    out = tmp_path / "run"
    las_at.main(
        small_args(
            cifar_dir,
            str(out),
            epochs=1,
            strategy_model="wrn-10-1",
            strategy_every=1,
            clip_grad_norm=0.001,
            val_size=128,
            iters_set=1,
            eval_samples=8,
            eval_iters=1,
            monitor_size=8,
            true_prob=0.7,
        )
    )
    # per iteration: strategy update, then target step
    assert [m for m, _, _ in clips] == [
        1.0,
        0.001,
    ] * 4
    for max_norm, after, before in clips:
        assert after <= max_norm * (1 + 1e-4) + 1e-6
    assert any(before > 0.001 for m, _, before in clips if m == 0.001)  # the clip did act
    assert smoothings == [pytest.approx(0.3 * 10 / 9)] * 4
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["objects"]["strategy_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.01)


def test_strategy_is_updated_exactly_every_k_iterations(
    cifar_dir, tmp_path, no_checksum, monkeypatch
):
    """In-process run, 2 epochs × 4 iterations (128 of the 256 images held out), k = 3: the strategy samples for an
    update and its weights change on iterations 3 and 6 of the run (counted across epochs: a per-epoch count would
    give 3 and 7), and only there. A strategy backbone other than --model gets one line in the log."""
    seen = []  # per call of the core: (update?, the strategy's weights at that moment)
    real_core = las_at.las_at_delta

    def recording_core(model, strategy, *a, update=False, **kw):
        seen.append((update, torch.cat([p.detach().flatten() for p in strategy.parameters()])))
        return real_core(model, strategy, *a, update=update, **kw)

    monkeypatch.setattr(las_at, "las_at_delta", recording_core)
    out = tmp_path / "run"
    las_at.main(
        small_args(
            cifar_dir,
            str(out),
            epochs=2,
            strategy_model="wrn-16-1",
            strategy_every=3,
            val_size=128,
            eval_samples=8,
            monitor_size=8,
        )
        + ["--iters-set", "1", "2"]
    )
    target_samples = [w for update, w in seen if not update]  # one per iteration, after any update
    assert len(target_samples) == 8
    changed = [
        m + 1 for m in range(1, 8) if not torch.equal(target_samples[m], target_samples[m - 1])
    ]
    assert changed == [3, 6]
    assert [update for update, _ in seen] == [
        False,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    res = load_results(str(out))
    assert [r["updates"] for r in res["epochs"]] == [1, 1]
    # k ≥ 2: the code's strategy milestones (target iterations, stepped per update) are never reached
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["objects"]["strategy_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    with open(out / "log.txt") as f:
        assert (
            sum(line.startswith("# strategy network: wrn-16-1, target: wrn-10-1") for line in f)
            == 1
        )


def test_the_multistep_milestones_are_reached_when_the_loader_drops_a_lone_image(
    tmp_path, no_checksum
):
    """129 training images in batches of 128: the loader drops the lone 129th, so an epoch is one iteration, and the
    code's per-iteration milestones int(99/110), int(104/110) of the run must be planned for that: the lr ends at
    lr × 0.01."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = str(tmp_path / "run")
    las_at.main(
        small_args(
            str(tmp_path / "d"),
            out,
            epochs=2,
            batch_size=128,
            val_size=0,
            monitor_size=8,
            eval_samples=8,
            eval_iters=1,
            strategy_model="wrn-10-1",
            strategy_every=2,
        )
        + ["--iters-set", "1", "2"]
    )
    res = load_results(out)
    assert [r["updates"] for r in res["epochs"]] == [0, 1]
    assert res["epochs"][-1]["lr"] == pytest.approx(0.1 * 0.01)
    # both milestones on one iteration: the lr never runs at 0.01, and the log says so
    with open(os.path.join(out, "log.txt")) as f:
        assert (
            "# both lr milestones fall on iteration 1 of 2: the lr drops from 0.1 to 0.001 at once"
            in f.read()
        )


def test_end_to_end_with_resume(cifar_dir, tmp_path):
    # 128 of the 256 images held out (the best model is chosen on them): 4 iterations per epoch, one update
    a, _ = check_resume(
        "las_at.py",
        cifar_dir,
        tmp_path,
        strategy_model="wrn-10-1",
        strategy_every=4,
        iters_set=3,
        val_size=128,
        eval_samples=8,
        monitor_size=8,
    )
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "las_at" and a["args"]["eps_set"] == CIFAR10_SETS[0]
    for row in a["epochs"]:
        assert 3 <= row["eps_mean"] <= 15 and 1 <= row["step_mean"] <= 5 and row["iters_mean"] == 3
        assert row["updates"] == 1 and 0 <= row["reward"] <= 16  # R1 ≤ 10, R2 ≤ 4, R3 ≤ 2
    # the strategy network, its optimiser and its scheduler are in the checkpoint
    ckpt = torch.load(os.path.join(tmp_path, "full", "checkpoint.pt"), weights_only=False)
    assert "heads.eps.weight" in ckpt["objects"]["strategy"]
    assert {"strategy_opt", "strategy_sched"} <= set(ckpt["objects"])
