"""rmcla.py (R-MC-LA): the adversarial label, the MC target, the targeted step, and the script end to end."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import common
import rmcla
from conftest import check_outputs, check_resume, load_results, run_script, small_args, write_cifar


def check_label(label, y, beta):
    """A distribution whose true-class entry is β times the largest other entry (y′_c = β·max_{k≠c} y′_k)."""
    assert (label >= 0).all()
    torch.testing.assert_close(label.sum(1), torch.ones(len(y)))
    true = label.gather(1, y[:, None]).squeeze(1)
    others = label.scatter(1, y[:, None], 0.0)
    torch.testing.assert_close(true, beta * others.amax(1))
    torch.testing.assert_close(1 - true, others.sum(1))  # y′_c = 1 − ε_y, ε_y spread over the others


@pytest.mark.parametrize("rule", ["main", "sup"])
@pytest.mark.parametrize("top_k", [None, 4])
def test_label_is_a_distribution_with_the_beta_condition(rule, top_k):
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(32, 10), torch.randint(0, 10, (32,))
    check_label(rmcla.adversarial_label(logits, y, 9.0, 0.01, top_k, rule), y, 9.0)


def test_label_matches_a_hand_computed_four_class_example():
    # p = (1/2, 1/4, 1/8, 1/8), true class 0 (row 1: the same probabilities rolled so the true class is 1).
    # v = −log p = (L, 2L, 3L, 3L) with L = ln 2; v_MC = 2L, v_LL = 3L; β = 9, γ = 0.01.
    p = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 8]])
    logits, y = torch.cat([p.log(), p.roll(1, 1).log()]) + 5.0, torch.tensor([0, 1])  # a shift changes no p
    L, beta, gamma = math.log(2), 9.0, 0.01
    # main: w = v − v_MC + γ = (·, γ, L+γ, L+γ), D = 2L + 3γ, ε_y = 1/(1 + β(L+γ)/D) ≈ 0.182874
    D = 2 * L + 3 * gamma
    eps_y = 1 / (1 + beta * (L + gamma) / D)
    main = torch.tensor([1 - eps_y, eps_y * gamma / D, eps_y * (L + gamma) / D, eps_y * (L + gamma) / D])
    # supplement eq. (2)-(4): w = v = (·, 2L, 3L, 3L), Σ = 8L, ε_y = 1/(1 + 3β/8) = 8/35, so y′ = (27, 2, 3, 3)/35
    sup = torch.tensor([27, 2, 3, 3]) / 35
    for rule, expected in (("main", main), ("sup", sup)):
        label = rmcla.adversarial_label(logits, y, beta, gamma, rule=rule)
        torch.testing.assert_close(label, torch.stack([expected, expected.roll(1)]))
    assert main[1] == pytest.approx(0.0012912, abs=1e-6) and main[2] == pytest.approx(0.090791, abs=1e-6)
    # eq. (9): the main rule gives the MC class less mass than the sup rule
    assert main[1] < sup[1]


def test_top_k_puts_mass_only_on_the_top_k_classes():
    torch.manual_seed(1)
    logits, y = 2 * torch.randn(16, 8), torch.randint(0, 8, (16,))
    for rule in ("main", "sup"):
        label = rmcla.adversarial_label(logits, y, 9.0, 0.01, top_k=3, rule=rule)
        check_label(label, y, 9.0)
        for i in range(len(y)):
            wrong = [k for k in range(8) if k != y[i]]
            largest_loss = sorted(wrong, key=lambda k: logits[i, k].item())[:3]  # largest v = smallest p
            support = sorted([y[i].item()] + largest_loss)
            assert set(label[i].nonzero().flatten().tolist()) == set(support)
            # the same formula on just those classes (n − 1 → K), with v from the full softmax
            v = -F.log_softmax(logits[i], 0)[largest_loss]
            w = v - v.min() + 0.01 if rule == "main" else v
            eps_y = 1 / (1 + 9.0 * w.max() / w.sum())
            torch.testing.assert_close(label[i, largest_loss], eps_y * w / w.sum())
        # K = n − 1 is the plain rule
        torch.testing.assert_close(rmcla.adversarial_label(logits, y, 9.0, 0.01, top_k=7, rule=rule),
                                   rmcla.adversarial_label(logits, y, 9.0, 0.01, rule=rule))


def test_top_k_both_readings_of_v_mc_on_a_hand_computed_example():
    # p = (1/2, 1/4, 1/8, 1/16, 1/16), true class 0: v = −log p = (L, 2L, 3L, 4L, 4L), L = ln 2; K = 3 keeps
    # classes 2, 3, 4 (largest v). The MC class over all non-true classes is class 1 (v = 2L), outside the K.
    p = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16]])
    logits, y = p.log() - 1.0, torch.tensor([0])
    L, beta, gamma = math.log(2), 9.0, 0.01
    # top-k: v_MC = 3L, the smallest v of the three: w = (γ, L+γ, L+γ), D = 2L + 3γ, ε_y ≈ 0.182875
    D = 2 * L + 3 * gamma
    eps_in = 1 / (1 + beta * (L + gamma) / D)
    within = torch.tensor([1 - eps_in, 0, eps_in * gamma / D, eps_in * (L + gamma) / D, eps_in * (L + gamma) / D])
    # all: v_MC = 2L (class 1): w = (L+γ, 2L+γ, 2L+γ), D = 5L + 3γ, ε_y ≈ 0.217635
    D = 5 * L + 3 * gamma
    eps_all = 1 / (1 + beta * (2 * L + gamma) / D)
    over_all = torch.tensor([1 - eps_all, 0, eps_all * (L + gamma) / D, eps_all * (2 * L + gamma) / D,
                             eps_all * (2 * L + gamma) / D])
    for vmc_over, expected in (("top-k", within), ("all", over_all)):
        label = rmcla.adversarial_label(logits, y, beta, gamma, top_k=3, vmc_over=vmc_over)
        torch.testing.assert_close(label[0], expected)
        check_label(label, y, beta)
    assert eps_in == pytest.approx(0.182875, abs=1e-6) and eps_all == pytest.approx(0.217635, abs=1e-6)
    # the consequence: with top-k the K-th class gets under 1% of ε_y (effectively K − 1 classes share it);
    # with all it gets a fifth, and ε_y is larger
    assert within[2] < 0.01 * eps_in and over_all[2] > 0.2 * eps_all and eps_all > eps_in
    # without --top-k, or with the sup rule (no v_MC), both readings are the same label
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(16, 10), torch.randint(0, 10, (16,))
    for top_k, rule in ((None, "main"), (4, "sup")):
        torch.testing.assert_close(rmcla.adversarial_label(logits, y, beta, gamma, top_k, rule, "all"),
                                   rmcla.adversarial_label(logits, y, beta, gamma, top_k, rule, "top-k"))
    # the flag: the current reading by default
    assert rmcla.get_args(["--dataset", "cifar100", "--top-k", "9"]).vmc_over == "top-k"
    assert rmcla.get_args(["--dataset", "cifar100", "--top-k", "9", "--vmc-over", "all"]).vmc_over == "all"


def test_attack_target_is_the_most_confusing_class():
    logits = torch.tensor([[5.0, 3.0, 4.0, -1.0],    # true 0 is the top class: the runner-up, 2
                           [5.0, 3.0, 4.0, -1.0],    # true 2: the top wrong class, 0
                           [0.0, 9.0, 1.0, 8.5]])    # true 1: 3
    assert rmcla.most_confusing_class(logits, torch.tensor([0, 2, 1])).tolist() == [2, 0, 3]


def test_targeted_step_descends_towards_the_target_inside_the_ball():
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").eval()
    x, y_mc = torch.rand(6, 3, 32, 32), torch.arange(6)
    x[0], x[1] = 0.0, 1.0
    eps = 8 / 255
    start = torch.empty_like(x).uniform_(-eps, eps)
    delta = rmcla.mc_targeted_delta(model, x, y_mc, start, eps, eps, contextlib.nullcontext)
    assert all(p.grad is None for p in model.parameters())
    assert delta.abs().max() <= eps + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    # written out: the random start clamped to [0, 1], one step of size ε DOWN the target's CE, projected
    d = ((x + start).clamp(0, 1) - x).requires_grad_(True)
    F.cross_entropy(model(x + d), y_mc).backward()
    expected = (x + (d.detach() - eps * d.grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    torch.testing.assert_close(delta, expected)
    with torch.no_grad():
        assert F.cross_entropy(model(x + delta), y_mc) < F.cross_entropy(model(x + d), y_mc)


def test_end_to_end_and_resume_with_the_lr_step(cifar_dir, tmp_path):
    # --milestones 1: the ×0.1 step happens between the two epochs and must survive the resume
    a, _ = check_resume("rmcla.py", cifar_dir, tmp_path, milestones=1)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "rmcla" and a["args"]["alpha"] == 8 and a["args"]["beta"] == 9
    assert [r["lr"] for r in a["epochs"]] == pytest.approx([0.1, 0.01])


def test_cifar100_top_k_and_sup_rule_end_to_end(tmp_path):
    root = str(tmp_path / "data")
    write_cifar(root, n_train=128, n_test=32, num_classes=100)
    out = str(tmp_path / "run")
    run_script("rmcla.py", small_args(root, out, epochs=1, dataset="cifar100", top_k=9, label_rule="sup"))
    res = load_results(out)
    assert res["args"]["beta"] == 11 and res["args"]["top_k"] == 9 and math.isfinite(res["epochs"][0]["loss"])
    # more non-true classes than a dataset has is refused with a usage error
    proc = run_script("rmcla.py", small_args(root, str(tmp_path / "bad"), top_k=10), expect=2)
    assert "--top-k" in proc.stderr


def test_mnist_recipe_runs(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    run_script("rmcla.py", small_args(mnist_dir, out, epochs=1, dataset="mnist", model="mnist-cnn", batch_size=50))
    res = load_results(out)
    assert res["args"]["optimizer"] == "adam" and res["args"]["alpha"] == 76.5 and res["args"]["lr"] == 1e-3
