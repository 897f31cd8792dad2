"""amata.py: the K_t / α_t schedule of Algorithm 1, the attack against PGD-10, the ε-ball, and the script end to
end (subprocess, tiny CIFAR-10, small WRN) with --resume."""
import contextlib

import pytest
import torch

import amata
import common
from conftest import check_outputs, check_resume


def test_schedule_table_for_100_epochs_k_2_to_10():
    tau = 20 / 255
    table = [amata.annealing(t, 100, 2, 10, tau) for t in range(100)]
    ks = [k for k, _ in table]
    # K_t = 2 + 8t/100 rounded to nearest: K rises by one where 8t/100 passes n + ½, i.e. at
    # t = 7, 19, 32, 44, 57, 69, 82, 94 (t counted from 0); the last six epochs run K_max = 10.
    expected = [2] * 7 + [3] * 12 + [4] * 13 + [5] * 12 + [6] * 13 + [7] * 12 + [8] * 13 + [9] * 12 + [10] * 6
    assert ks == expected
    for t, (k, alpha) in enumerate(table):
        assert abs(k - (2 + 8 * t / 100)) <= 0.5       # nearest integer to Algorithm 1's K_t
        assert alpha == pytest.approx(tau / k)          # α_t = τ/K_t, so K_t·α_t = τ every epoch
    assert table[0][1] == pytest.approx(10 / 255) and table[-1][1] == pytest.approx(2 / 255)
    # SPEC §9: on average K_t + 1 ≈ 7 passes per batch against 11 for PGD-10
    assert sum(ks) / 100 + 1 == pytest.approx(6.96)
    # K_min = K_max: a constant schedule; halves round up
    assert {amata.annealing(t, 7, 10, 10, tau)[0] for t in range(7)} == {10}
    assert amata.annealing(1, 2, 2, 3, tau)[0] == 3  # 2 + 1·1/2 = 2.5 → 3


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return common.make_model("wrn-10-1", "cifar10").eval()


def batch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.arange(8)
    x[0], x[1] = 0.0, 1.0  # pixels at the range ends must stay in [0, 1]
    return x, y


@pytest.mark.parametrize("random_start", [False, True])
def test_k_10_10_tau_20_is_pgd10_with_step_2(net, random_start):
    x, y = batch()
    eps = 8 / 255
    k, alpha = amata.annealing(3, 100, 10, 10, 20 / 255)
    assert k == 10 and alpha == pytest.approx(2 / 255)
    torch.manual_seed(5)
    delta = amata.amata_attack(net, x, y, eps, alpha, k, random_start, contextlib.nullcontext)
    torch.manual_seed(5)  # the same random start, drawn the same way
    reference, _ = common.attack_pgd(net, x, y, eps, 2 / 255, 10, rand_init=random_start)
    torch.testing.assert_close(delta, reference)
    assert (delta != 0).any()


def test_every_step_stays_in_the_ball_and_pixel_range(net):
    x, y = batch()
    eps = 8 / 255
    # K_t = 2 and τ = 20/255: α_t = 10/255 > ε, so the projection is active from the first step
    k, alpha = amata.annealing(0, 100, 2, 10, 20 / 255)
    losses = []
    for steps in range(1, 5):  # the attack stopped after each step (deterministic from x⁰)
        delta = amata.amata_attack(net, x, y, eps, alpha, steps, False, contextlib.nullcontext)
        assert delta.abs().max() <= eps + 1e-6
        assert (x + delta).min() >= 0 and (x + delta).max() <= 1
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(net(x + delta), y).item())
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(net(x), y).item()
    assert losses[0] > clean  # the attack raises the loss


def test_arguments(capsys):
    a = amata.get_args([])
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.milestones) == (100, 128, 0.05, 5e-4, [75, 90])
    assert (a.k_min, a.k_max, a.tau, a.epsilon, a.random_start, a.model) == (2, 10, 20, 8, False, "preact18")
    m = amata.get_args(["--dataset", "mnist"])
    assert (m.k_min, m.k_max, m.tau, m.epsilon, m.lr, m.epochs, m.milestones) == (5, 40, 102, 76.5, 0.1, 56, [50, 55])
    for bad in (["--k-min", "5", "--k-max", "3"], ["--alpha", "2"], ["--tau", "0"], ["--k-min", "0"]):
        with pytest.raises(SystemExit) as err:
            amata.get_args(bad)
        assert err.value.code == 2


def test_end_to_end_logs_k_and_alpha_and_resumes(cifar_dir, tmp_path):
    # with --random-start, so that the resumed run must also restore the RNG that draws the starts
    a, _ = check_resume("amata.py", cifar_dir, tmp_path, epochs=2, random_start=True)
    assert check_outputs(str(tmp_path / "full"), epochs=2)["args"]["random_start"] is True
    # T = 2: K_0 = 2, K_1 = 2 + 8·½ = 6; α_t = τ/K_t in /255 units
    assert [r["K_t"] for r in a["epochs"]] == [2, 6]
    assert [r["alpha_t"] for r in a["epochs"]] == pytest.approx([10, 20 / 6])
    with open(tmp_path / "full" / "log.txt") as f:
        lines = f.read().splitlines()
    header = next(line for line in lines if line.split()[:1] == ["epoch"]).split()
    assert "K_t" in header and "alpha_t" in header
    epoch_lines = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert [int(cells[header.index("K_t")]) for cells in epoch_lines] == [2, 6]

