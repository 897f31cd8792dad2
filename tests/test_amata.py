"""amata.py: the K_t / α_t schedule of Algorithm 1 (Ye et al., AAAI 2021, arXiv:2012.08112; end points:
DECISIONS.md, 'Amata K_t end points') for both recipes, its copyable core (the inner PGD loop) against PGD-10, the
ε-ball, the mode and BN rule, LeNet, the documented PGD-AT baseline, the flags it refuses, and the script end to end
(in-process; resume equality by subprocess, tiny CIFAR-10, small WRN)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar

import amata
import common
import evaluation
import flags


def recipe_table(argv):
    """(K_t, α_t in [0, 1] units) for every epoch of the run that `argv` describes, with a copy of annealing() made
    from torch alone."""
    a = amata.get_args(argv)
    annealing = copy_of(amata.annealing)
    return [annealing(t, a.epochs, a.k_min, a.k_max, a.tau / 255) for t in range(a.epochs)]


def test_schedule_table_of_the_cifar10_recipe():
    table = recipe_table([])
    ks = [k for k, _ in table]
    # K_t = 2 + 8t/99 rounded to nearest (T = 99 for 100 epochs: K_0 = K_min, K_99 = K_max): K rises by one
    # where 8t/99 passes n + ½, i.e. at t = 7, 19, 31, 44, 56, 69, 81, 93; the last seven epochs run K_max = 10.
    expected = (
        [2] * 7
        + [3] * 12
        + [4] * 12
        + [5] * 13
        + [6] * 12
        + [7] * 13
        + [8] * 12
        + [9] * 12
        + [10] * 7
    )
    assert ks == expected
    for t, (k, alpha) in enumerate(table):
        assert (
            abs(k - (2 + 8 * t / 99)) <= 0.5
        )  # nearest integer to Algorithm 1's K_t (T = epochs − 1)
        assert alpha == pytest.approx(20 / 255 / k)  # α_t = τ/K_t, so K_t·α_t = τ every epoch
    assert table[0][1] == pytest.approx(10 / 255) and table[-1][1] == pytest.approx(2 / 255)
    # on average K_t + 1 ≈ 7 passes per batch against 11 for PGD-10
    assert sum(ks) / 100 + 1 == pytest.approx(7.0)
    # K_min = K_max: a constant schedule; halves round up
    assert {amata.annealing(t, 7, 10, 10, 20 / 255)[0] for t in range(7)} == {10}
    assert amata.annealing(1, 3, 2, 3, 20 / 255)[0] == 3  # 2 + 1·1/2 = 2.5 → 3


def test_schedule_table_of_the_mnist_recipe_ends_with_pgd40_step_001():
    table = recipe_table(["--dataset", "mnist"])
    ks = [k for k, _ in table]
    assert len(table) == 56 and ks[0] == 5 and table[0][1] == pytest.approx(0.4 / 5)
    # the last epoch is Table 1's PGD-40 with step 0.01 (with t/T, T = 56, it would be K = 39, step 0.01026)
    assert ks[-1] == 40 and table[-1][1] == pytest.approx(0.01)
    assert ks[-2] == 39  # 5 + 35·54/55 = 39.36
    for t, (k, alpha) in enumerate(table):
        assert abs(k - (5 + 35 * t / 55)) <= 0.5 and alpha == pytest.approx(0.4 / k)
    assert ks == sorted(ks)


@pytest.mark.parametrize(
    "dataset, expected", [("cifar10", [2, 5, 7, 10]), ("mnist", [5, 17, 28, 40])]
)
def test_compressed_run_still_spans_k_min_to_k_max(dataset, expected):
    # --epochs 4: T = 3, K_t = K_min + ΔK·t/3 rounded (cifar10 2 + 8t/3; mnist 5 + 35t/3)
    # (the recipe's lr milestones lie past 4 epochs: --milestones alone, no lr drop)
    table = recipe_table(["--dataset", dataset, "--epochs", "4", "--milestones"])
    tau = table[0][0] * table[0][1]
    assert [k for k, _ in table] == expected
    assert [alpha for _, alpha in table] == pytest.approx([tau / k for k in expected])
    # a single epoch runs K_max
    assert (
        recipe_table(["--dataset", dataset, "--epochs", "1", "--milestones"])[0][0] == expected[-1]
    )


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return common.make_model(
        "wrn-10-1", 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ).eval()


def batch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.arange(8)
    x[0], x[1] = 0.0, 1.0  # pixels at the range ends must stay in [0, 1]
    return x, y


@pytest.mark.parametrize("random_start", [False, True])
def test_the_core_copies_and_with_k_10_10_tau_20_is_pgd10_with_step_2(net, random_start):
    amata_delta = copy_of(amata.amata_delta)  # defined again with torch alone
    x, y = batch()
    eps = 8 / 255
    k, alpha = amata.annealing(3, 100, 10, 10, 20 / 255)
    assert k == 10 and alpha == pytest.approx(2 / 255)
    torch.manual_seed(5)
    delta = amata_delta(net, x, y, eps, alpha, k, random_start)
    assert all(p.grad is None for p in net.parameters())  # only ∇δ was computed
    torch.manual_seed(5)  # the same random start, drawn the same way
    reference, _ = evaluation.attack_pgd(net, x, y, eps, 2 / 255, 10, rand_init=random_start)
    torch.testing.assert_close(delta, reference)
    assert (delta != 0).any()


def test_every_step_stays_in_the_ball_and_pixel_range(net):
    x, y = batch()
    eps = 8 / 255
    # K_t = 2 and τ = 20/255: α_t = 10/255 > ε, so the projection is active from the first step
    k, alpha = amata.annealing(0, 100, 2, 10, 20 / 255)
    losses = []
    for steps in range(1, 5):  # the attack stopped after each step (deterministic from x⁰)
        delta = amata.amata_delta(net, x, y, eps, alpha, steps)
        assert delta.abs().max() <= eps + 1e-6
        assert (x + delta).min() >= 0 and (x + delta).max() <= 1
        with torch.no_grad():
            losses.append(F.cross_entropy(net(x + delta), y).item())
    with torch.no_grad():
        clean = F.cross_entropy(net(x), y).item()
    assert losses[0] > clean  # the attack raises the loss


@pytest.mark.parametrize("train", [True, False])
def test_the_core_leaves_the_mode_and_touches_bn_statistics_only_in_train_mode(train):
    """The core runs the model in the mode it finds it in and leaves it there; in train mode (training here) each of
    the K_t passes enters BN's running statistics, as documented; in eval mode they stay as they were."""
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3).train(train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch()
    amata.amata_delta(model, x, y, 8 / 255, 4 / 255, 3)
    assert all(m.training == train for m in model.modules())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == (3 if train else 0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) == (not train)


def test_the_core_refuses_normalised_images(net):
    """A Normalize() in the transform gives images outside [0, 1]; the pixel clamp would then make δ huge."""
    x = (torch.rand(4, 3, 32, 32) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        amata.amata_delta(net, x, torch.arange(4), 8 / 255, 2 / 255, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_direction(net, dtype):
    x, y = (
        torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        torch.arange(8),
    )  # inside (0, 1)
    fp32 = amata.amata_delta(net, x, y, 8 / 255, 8 / 255, 1)
    low = amata.amata_delta(net, x, y, 8 / 255, 8 / 255, 1, autocast=dtype)
    assert (low != 0).float().mean() > 0.9  # no underflow to a zero gradient (fp16 scales the loss)
    assert (low == fp32).float().mean() > 0.9  # the same signs, up to rounding


def test_arguments():
    a = amata.get_args([])
    # batch 256: YOPO's PGD-10 CIFAR-10 config, whose lr, wd and milestones App. A.2 gives
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.milestones) == (
        100,
        256,
        0.05,
        5e-4,
        [75, 90],
    )
    assert (a.k_min, a.k_max, a.tau, a.epsilon, a.random_start, a.model) == (
        2,
        10,
        20,
        8,
        False,
        "preact18",
    )
    m = amata.get_args(["--dataset", "mnist"])
    assert (m.k_min, m.k_max, m.tau, m.epsilon, m.lr, m.epochs, m.milestones) == (
        5,
        40,
        102,
        76.5,
        0.1,
        56,
        [50, 55],
    )
    assert (m.batch_size, m.weight_decay, m.model) == (256, 5e-4, "lenet")
    assert amata.get_args(["--epochs", "3", "--milestones"]).milestones == []  # no lr drop
    assert amata.get_args(["--epochs", "3", "--milestones", "1", "2"]).milestones == [1, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k-min", "5", "--k-max", "3"], "--k-min 5 is larger than --k-max 3"),
        (["--alpha", "2"], "α_t = τ/K_t"),
        (["--tau", "0"], "--tau"),
        # τ is in /255 units: 0.4 (MNIST's τ in [0, 1] units) is refused with the value to write
        (["--tau", "0.4"], "write --tau 102"),
        (["--k-min", "0"], "--k-min"),
        # a milestone at or after the last epoch never lowers the lr during training: given, or the recipe's (75 90)
        # under a shorter --epochs
        (
            ["--epochs", "2", "--milestones", "2", "2"],
            "--milestones 2 2: 2 is not below --epochs 2",
        ),
        (
            ["--epochs", "80"],
            "the recipe's milestones 75 90: 90 is not below --epochs 80, so the lr would",
        ),
        # the error suggests the recipe's drops (75% and 90% of the run) for this run
        (["--epochs", "80"], "e.g. --milestones 60 72;"),
        (
            ["--dataset", "mnist", "--epochs", "10"],
            "the recipe's milestones 50 55: 50 is not below --epochs 10",
        ),
    ],
)
def test_flags_that_would_mislead_are_refused_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        amata.get_args(argv)
    assert err.value.code == 2 and message in " ".join(capsys.readouterr().err.split())


def test_lenet_is_the_pytorch_examples_mnist_net():
    assert flags.model_name("LeNet") == "lenet"
    torch.manual_seed(0)
    net = common.make_model("lenet", 10, (1, 28, 28), (0.0,), (1.0,)).eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 20, (5, 5), (0, 0)),
        (20, 50, (5, 5), (0, 0)),
    ]
    assert [(f.in_features, f.out_features) for f in fcs] == [(800, 500), (500, 10)]
    assert sum(p.numel() for p in net.parameters()) == 520 + 25050 + 400500 + 5010
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in net.modules())
    # the forward of pytorch/examples' Net (its log_softmax left to the loss), written out
    x = torch.rand(4, 1, 28, 28)
    h = F.max_pool2d(F.relu(F.conv2d(x, convs[0].weight, convs[0].bias)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, convs[1].weight, convs[1].bias)), 2).view(-1, 4 * 4 * 50)
    expected = F.linear(F.relu(F.linear(h, fcs[0].weight, fcs[0].bias)), fcs[1].weight, fcs[1].bias)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)
    # other image sizes get the matching first FC width (CIFAR: 50·5·5)
    cifar = common.make_model("lenet", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    assert cifar(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_documented_pgd_at_baseline_is_pgd10_with_random_start():
    line = next(line for line in amata.__doc__.splitlines() if "PGD-10 AT, the baseline" in line)
    argv = line.split("amata.py", 1)[1].split("#")[0].split()
    a = amata.get_args(argv)
    assert a.random_start is True  # Madry et al.'s PGD-AT starts from a random point of the ε-ball
    table = [amata.annealing(t, a.epochs, a.k_min, a.k_max, a.tau / 255) for t in range(a.epochs)]
    assert {k for k, _ in table} == {10} and all(
        alpha == pytest.approx(2 / 255) for _, alpha in table
    )


def test_main_attacks_in_train_mode_and_drops_the_lr_at_each_milestone(
    cifar_dir, tmp_path, no_checksum, monkeypatch
):
    """As the docstring says: the attack sees the model in train mode (BN uses the attacked batch's statistics),
    through the input-gradient view; the lr is ×0.1 from the epoch after each milestone (epochs 1 and 2 of 3: the
    last epoch trains at lr × 0.01)."""
    calls, real = [], amata.amata_delta

    def recording(model, x, y, eps, alpha_t, k_t, *a, **kw):
        calls.append((type(model), model.training, k_t, alpha_t, kw.get("autocast", a[-1])))
        return real(model, x, y, eps, alpha_t, k_t, *a, **kw)

    monkeypatch.setattr(amata, "amata_delta", recording)
    out = str(tmp_path / "run")
    amata.main(
        small_args(
            cifar_dir,
            out,
            epochs=3,
            batch_size=128,
            k_min=1,
            k_max=2,
            tau=4,
            eval_iters=1,
            eval_cw_iters=0,
            eval_samples=8,
            monitor_size=8,
        )
        + ["--milestones", "1", "2"]
    )
    rows = load_results(out)["epochs"]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005, 0.0005])
    # 256 images in batches of 128, K_t 1, 2 (1.5 rounds up), 2, α_t = τ/K_t
    assert calls == [
        (common.WideResNet, True, k, pytest.approx(4 / 255 / k), None) for k in (1, 1, 2, 2, 2, 2)
    ]
    assert [r["K_t"] for r in rows] == [1, 2, 2] and [r["alpha_t"] for r in rows] == pytest.approx(
        [4, 2, 2]
    )


def test_end_to_end_logs_k_and_alpha_and_resumes(cifar_dir, tmp_path):
    # with --random-start, so that the resumed run must also restore the RNG that draws the starts, and a milestone
    # after epoch 1, so that it must restore the lr scheduler too
    # (--k-max 4 keeps the run short)
    a, _ = check_resume(
        "amata.py", cifar_dir, tmp_path, epochs=2, random_start=True, milestones=1, k_max=4
    )
    assert check_outputs(str(tmp_path / "full"), epochs=2)["args"]["random_start"] is True
    # T = 1: K_0 = K_min = 2, K_1 = K_max = 4; α_t = τ/K_t in /255 units
    assert [r["K_t"] for r in a["epochs"]] == [2, 4]
    assert [r["alpha_t"] for r in a["epochs"]] == pytest.approx([10, 5])
    assert [r["lr"] for r in a["epochs"]] == pytest.approx([0.05, 0.005])
    with open(tmp_path / "full" / "log.txt") as f:
        lines = f.read().splitlines()
    header = next(line for line in lines if line.split()[:1] == ["epoch"]).split()
    assert header[-2:] == ["K_t", "alpha_t"]
    epoch_lines = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert [int(cells[header.index("K_t")]) for cells in epoch_lines] == [2, 4]


def test_tau_follows_epsilon():
    assert amata.get_args(["--epsilon", "16"]).tau == 40  # τ = 2.5ε: PGD-10 at ε 16 steps 4/255
    assert amata.get_args(["--epsilon", "16", "--tau", "20"]).tau == 20


def test_milestones_on_one_epoch_drop_the_lr_at_once_and_say_so(tmp_path, no_checksum):
    """A run too short to space its milestones (--milestones 1 1 in 2 epochs): MultiStepLR applies both drops after
    epoch 1 (×0.01), and the log says so in one line (129 images in batches of 128: one step per epoch)."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = tmp_path / "run"
    short = dict(batch_size=128, k_min=1, k_max=1, tau=4, monitor_size=8, eval_samples=8)
    amata.main(
        small_args(str(tmp_path / "d"), str(out), eval_iters=1, eval_cw_iters=0, **short)
        + ["--milestones", "1", "1"]
    )
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx([0.05, 0.0005])
    notes = [line for line in (out / "log.txt").read_text().splitlines() if "at once" in line]
    assert notes == [
        "# milestones 1 1: lr drops at once, 2 after epoch 1 (×0.1 each); the run is too short "
        "to space them"
    ]
