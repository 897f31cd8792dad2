"""rmcla.py (R-MC-LA): the adversarial label, the copyable core (MC target, targeted step, soft-label loss, modes),
the flag checks, and the script end to end."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar

import harness
import rmcla


def check_label(label, y, beta):
    """A distribution whose true-class entry is β times the largest other entry (y′_c = β·max_{k≠c} y′_k)."""
    assert (label >= 0).all()
    torch.testing.assert_close(label.sum(1), torch.ones(len(y)))
    true = label.gather(1, y[:, None]).squeeze(1)
    others = label.scatter(1, y[:, None], 0.0)
    torch.testing.assert_close(true, beta * others.amax(1))
    torch.testing.assert_close(
        1 - true, others.sum(1)
    )  # y′_c = 1 − ε_y, ε_y spread over the others


@pytest.mark.parametrize("rule", ["main", "sup"])
@pytest.mark.parametrize("top_k", [None, 4])
def test_label_is_a_distribution_with_the_beta_condition(rule, top_k):
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(32, 10), torch.randint(0, 10, (32,))
    check_label(copy_of(rmcla.adversarial_label)(logits, y, 9.0, 0.01, top_k, rule), y, 9.0)


def test_label_matches_a_hand_computed_four_class_example():
    # p = (1/2, 1/4, 1/8, 1/8), true class 0 (row 1: the same probabilities rolled so the true class is 1).
    # v = −log p = (L, 2L, 3L, 3L) with L = ln 2; v_MC = 2L, v_LL = 3L; β = 9, γ = 0.01.
    p = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 8]])
    logits, y = (
        torch.cat([p.log(), p.roll(1, 1).log()]) + 5.0,
        torch.tensor([0, 1]),
    )  # a shift changes no p
    L, beta, gamma = math.log(2), 9.0, 0.01
    # main: w = v − v_MC + γ = (·, γ, L+γ, L+γ), D = 2L + 3γ, ε_y = 1/(1 + β(L+γ)/D) ≈ 0.182874
    D = 2 * L + 3 * gamma
    eps_y = 1 / (1 + beta * (L + gamma) / D)
    main = torch.tensor(
        [1 - eps_y, eps_y * gamma / D, eps_y * (L + gamma) / D, eps_y * (L + gamma) / D]
    )
    # supplement eqs. (2)-(4): w = v = (·, 2L, 3L, 3L), Σ = 8L, ε_y = 1/(1 + 3β/8) = 8/35, so y′ = (27, 2, 3, 3)/35
    sup = torch.tensor([27, 2, 3, 3]) / 35
    for rule, expected in (("main", main), ("sup", sup)):
        label = rmcla.adversarial_label(logits, y, beta, gamma, rule=rule)
        torch.testing.assert_close(label, torch.stack([expected, expected.roll(1)]))
    assert main[1] == pytest.approx(0.0012912, abs=1e-6) and main[2] == pytest.approx(
        0.090791, abs=1e-6
    )
    # supplement eq. (9): the main rule gives the MC class less mass than the sup rule
    assert main[1] < sup[1]


def test_top_k_puts_mass_only_on_the_top_k_classes():
    torch.manual_seed(1)
    logits, y = 2 * torch.randn(16, 8), torch.randint(0, 8, (16,))
    for rule in ("main", "sup"):
        label = rmcla.adversarial_label(logits, y, 9.0, 0.01, top_k=3, rule=rule)
        check_label(label, y, 9.0)
        for i in range(len(y)):
            wrong = [k for k in range(8) if k != y[i]]
            largest_loss = sorted(wrong, key=lambda k: logits[i, k].item())[
                :3
            ]  # largest v = smallest p
            support = sorted([y[i].item()] + largest_loss)
            assert set(label[i].nonzero().flatten().tolist()) == set(support)
            # the same formula on just those classes (n − 1 → K), with v from the full softmax
            v = -F.log_softmax(logits[i], 0)[largest_loss]
            w = v - v.min() + 0.01 if rule == "main" else v
            eps_y = 1 / (1 + 9.0 * w.max() / w.sum())
            torch.testing.assert_close(label[i, largest_loss], eps_y * w / w.sum())
        # K = n − 1 is the plain rule
        torch.testing.assert_close(
            rmcla.adversarial_label(logits, y, 9.0, 0.01, top_k=7, rule=rule),
            rmcla.adversarial_label(logits, y, 9.0, 0.01, rule=rule),
        )


def test_top_k_both_readings_of_v_mc_on_a_hand_computed_example():
    # p = (1/2, 1/4, 1/8, 1/16, 1/16), true class 0: v = −log p = (L, 2L, 3L, 4L, 4L), L = ln 2; K = 3 keeps
    # classes 2, 3, 4 (largest v). The MC class over all non-true classes is class 1 (v = 2L), outside the K.
    p = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16]])
    logits, y = p.log() - 1.0, torch.tensor([0])
    L, beta, gamma = math.log(2), 9.0, 0.01
    # top-k: v_MC = 3L, the smallest v of the three: w = (γ, L+γ, L+γ), D = 2L + 3γ, ε_y ≈ 0.182875
    D = 2 * L + 3 * gamma
    eps_in = 1 / (1 + beta * (L + gamma) / D)
    within = torch.tensor(
        [1 - eps_in, 0, eps_in * gamma / D, eps_in * (L + gamma) / D, eps_in * (L + gamma) / D]
    )
    # all: v_MC = 2L (class 1): w = (L+γ, 2L+γ, 2L+γ), D = 5L + 3γ, ε_y ≈ 0.217635
    D = 5 * L + 3 * gamma
    eps_all = 1 / (1 + beta * (2 * L + gamma) / D)
    over_all = torch.tensor(
        [
            1 - eps_all,
            0,
            eps_all * (L + gamma) / D,
            eps_all * (2 * L + gamma) / D,
            eps_all * (2 * L + gamma) / D,
        ]
    )
    for vmc_over, expected in (("top-k", within), ("all", over_all)):
        label = rmcla.adversarial_label(logits, y, beta, gamma, top_k=3, vmc_over=vmc_over)
        torch.testing.assert_close(label[0], expected)
        check_label(label, y, beta)
    assert eps_in == pytest.approx(0.182875, abs=1e-6) and eps_all == pytest.approx(
        0.217635, abs=1e-6
    )
    # the consequence: with top-k the K-th class gets under 1% of ε_y (effectively K − 1 classes share it);
    # with all it gets a fifth, and ε_y is larger
    assert within[2] < 0.01 * eps_in and over_all[2] > 0.2 * eps_all and eps_all > eps_in
    # without --top-k, or with the sup rule (no v_MC), both readings are the same label
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(16, 10), torch.randint(0, 10, (16,))
    for top_k, rule in ((None, "main"), (4, "sup")):
        torch.testing.assert_close(
            rmcla.adversarial_label(logits, y, beta, gamma, top_k, rule, "all"),
            rmcla.adversarial_label(logits, y, beta, gamma, top_k, rule, "top-k"),
        )
    # the flag: the current reading by default, and refused where it changes nothing
    assert rmcla.get_args(["--dataset", "cifar100", "--top-k", "9"]).vmc_over == "top-k"
    assert (
        rmcla.get_args(["--dataset", "cifar100", "--top-k", "9", "--vmc-over", "all"]).vmc_over
        == "all"
    )
    for bad in (
        ["--vmc-over", "all"],
        ["--top-k", "4", "--label-rule", "sup", "--vmc-over", "all"],
    ):
        with pytest.raises(SystemExit) as e:
            rmcla.get_args(bad)
        assert e.value.code == 2


def tiny_net():
    """A small net with BatchNorm (the core switches its modes) that takes [0, 1] images."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16 * 16, 10),
    )


def batch(n=8):
    torch.manual_seed(1)
    x = torch.rand(n, 3, 32, 32)
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range must stay in it
    return x, torch.arange(n) % 10


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_core_copies_and_is_the_algorithm_written_out(mode):
    """rmcla_loss (with adversarial_label) defined again with torch alone equals R-MC-LA written out by hand: clean
    logits in eval mode, y_MC, random start clamped to [0, 1], one ε step down the CE of y_MC, soft-label CE at x_adv
    in train mode; the BN statistics take in x_adv's batch only, and the model comes back in its mode."""
    rmcla_loss = copy_of(rmcla.rmcla_loss)
    rmcla_loss.__globals__["adversarial_label"] = copy_of(rmcla.adversarial_label)
    model, (x, y) = tiny_net().train(mode == "train"), batch()
    reference = copy.deepcopy(model)
    eps, beta, gamma = 8 / 255, 9.0, 0.01
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append((i[0].detach(), m.training)))
    torch.manual_seed(2)
    loss, logits = rmcla_loss(model, x, y, eps, eps, beta, gamma)
    assert model.training == (mode == "train") and all(p.grad is None for p in model.parameters())
    assert [training for _, training in seen] == [
        False,
        False,
        True,
    ]  # clean, attack: eval; loss pass: train
    # by hand
    torch.manual_seed(2)
    reference.eval()
    with torch.no_grad():
        clean = reference(x)
    y_mc = clean.scatter(1, y[:, None], float("-inf")).argmax(1)
    assert (y_mc != y).all()
    start = ((x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(reference(x + start), y_mc), start)
    x_adv = (x + (start.detach() - eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(seen[2][0], x_adv)
    reference.train()
    label, ref_logits = rmcla.adversarial_label(clean, y, beta, gamma), reference(x_adv)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, -(label * F.log_softmax(ref_logits, 1)).sum(1).mean())
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)  # one update, by x_adv's batch
    assert bn.num_batches_tracked.item() == 1
    # x_adv: inside the ball and the pixel range, and the step went *towards* y_MC
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        reference.eval()
        assert F.cross_entropy(reference(x_adv), y_mc) < F.cross_entropy(reference(x + start), y_mc)
    loss.backward()  # the weight step's backward
    assert all(p.grad is not None for p in model.parameters())


def test_the_core_restores_the_mode_when_it_fails():
    model, (x, y) = tiny_net().train(), batch()
    with pytest.raises(
        RuntimeError
    ):  # top-k larger than the non-true classes: topk fails inside the label
        rmcla.rmcla_loss(model, x, y, 8 / 255, 8 / 255, 9.0, 0.01, top_k=11)
    assert model.training
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):  # normalised images are refused
        rmcla.rmcla_loss(model, (x - 0.5) / 0.25, y, 8 / 255, 8 / 255, 9.0, 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_step(dtype):
    model, (x, y) = tiny_net(), batch()
    adv = {}
    for d in (None, dtype):
        seen = []
        handle = model.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
        torch.manual_seed(3)
        loss, logits = rmcla.rmcla_loss(model, x, y, 8 / 255, 8 / 255, 9.0, 0.01, autocast=d)
        handle.remove()
        adv[d] = seen[2]
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    moved = (adv[dtype] - x).abs() > 1e-6
    assert moved.float().mean() > 0.5  # not underflowed to a zero gradient (fp16 scales the loss)
    assert (adv[dtype] == adv[None]).float().mean() > 0.9  # the same signs, up to rounding


def test_milestones_at_or_past_the_end_are_refused(capsys):
    assert rmcla.get_args(["--epochs", "8", "--milestones", "4", "6"]).milestones == [
        4,
        6,
    ]  # bench/real_data.py's
    assert rmcla.get_args(["--epochs", "8", "--milestones"]).milestones == []  # a constant lr
    assert rmcla.get_args([]).milestones == [100, 150] and rmcla.get_args(
        ["--dataset", "mnist"]
    ).milestones == [5, 8]
    for argv, words in (
        (
            ["--epochs", "8", "--milestones", "4", "8"],
            "--milestones 4 8: 8 is not below --epochs 8",
        ),
        # the recipe's, with the code's drops (at 1/2 and 3/4 of the run) suggested for this run
        (["--epochs", "8"], "the recipe's milestones 100 150: 100 is not below --epochs 8"),
        (["--epochs", "8"], "e.g. --milestones 4 6;"),
        (["--dataset", "mnist", "--epochs", "6"], "pass --milestones below 6"),
    ):
        with pytest.raises(SystemExit) as e:
            rmcla.get_args(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_end_to_end_and_resume_with_the_lr_step(cifar_dir, tmp_path):
    # --milestones 1: the ×0.1 step happens between the two epochs and must survive the resume
    a, _ = check_resume("rmcla.py", cifar_dir, tmp_path, milestones=1)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "rmcla" and a["args"]["alpha"] == 8 and a["args"]["beta"] == 9
    assert [r["lr"] for r in a["epochs"]] == pytest.approx([0.1, 0.01])


def test_cifar100_top_k_and_sup_rule_end_to_end(tmp_path, no_checksum, capsys):
    root = str(tmp_path / "data")
    write_cifar(root, n_train=128, n_test=32, num_classes=100)
    out = str(tmp_path / "run")
    rmcla.main(
        small_args(
            root,
            out,
            epochs=1,
            dataset="cifar100",
            top_k=9,
            label_rule="sup",
            milestones=True,
            eval_iters=1,
            eval_cw_iters=0,
        )
    )
    res = load_results(out)
    assert (
        res["args"]["beta"] == 11
        and res["args"]["top_k"] == 9
        and math.isfinite(res["epochs"][0]["loss"])
    )
    # more non-true classes than a dataset has: refused once the data is read, before the run folder is made
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        harness.main_guard(
            lambda: rmcla.main(
                small_args(
                    root, str(tmp_path / "bad"), dataset="cifar100", top_k=100, milestones=True
                )
            )
        )
    assert e.value.code == 2 and "--top-k 100" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")


def test_mnist_recipe_runs(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    rmcla.main(
        small_args(
            mnist_dir,
            out,
            epochs=1,
            dataset="mnist",
            model="mnist-cnn",
            batch_size=50,
            milestones=True,
            eval_iters=1,
            eval_cw_iters=0,
        )
    )
    res = load_results(out)
    assert (
        res["args"]["optimizer"] == "adam"
        and res["args"]["alpha"] == 76.5
        and res["args"]["lr"] == 1e-3
    )
    assert math.isfinite(res["epochs"][0]["loss"])


@pytest.mark.parametrize(
    "milestones, lrs", [(["1", "2"], [0.1, 0.01, 0.001]), (["2", "2"], [0.1, 0.1, 0.001])]
)
def test_the_lr_steps_when_the_loader_drops_a_lone_sample(tmp_path, no_checksum, milestones, lrs):
    """129 images in batches of 128 (one step per epoch): after both milestones the lr is lr × 0.01. Two milestones
    on one epoch (a run too short to space them) drop it at once, and the log says so in one line."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = tmp_path / "run"
    rmcla.main(
        small_args(
            str(tmp_path / "d"),
            str(out),
            epochs=3,
            batch_size=128,
            monitor_size=8,
            eval_samples=8,
            eval_iters=1,
            eval_cw_iters=0,
        )
        + ["--milestones", *milestones]
    )
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx(lrs)
    notes = [line for line in (out / "log.txt").read_text().splitlines() if "at once" in line]
    if milestones[0] == milestones[1]:
        assert notes == [
            "# milestones 2 2: lr drops at once, 2 after epoch 2 (×0.1 each); the run is too "
            "short to space them"
        ]
    else:
        assert notes == []
