"""free_at.py: Free-AT's copyable core (one backward gives the weight step and δ's step, δ in the ε-ball, x + δ
clamped in the forward, the position-tied rows), the m replays of every minibatch and the recipes' epochs, the
smaller last batch, Amata+Free's schedule of m and step, resume (the carried δ in the checkpoint), and two
processes under torchrun (each its own δ) resumed exactly. Tiny CIFAR-10, small WRN."""

import copy
import math

import launch
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    check_outputs,
    check_resume,
    comparable,
    copy_of,
    load_results,
    small_args,
    write_cifar,
)

import amata
import free_at


def _net():
    """A small network with BatchNorm (train mode matters) for the core's tests."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 1, 1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


def _batch(n=6, size=16):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 3, size, size, generator=gen), torch.arange(n) % 10
    x[0], x[1] = 0.0, 1.0  # pixels at the range ends: the forward's clamp is active there
    return x, y


@pytest.mark.parametrize("step_over_eps", [1.0, 2.5])
def test_the_core_copies_and_one_backward_gives_both_gradients(step_over_eps):
    """The copy made from torch alone: the weight gradient and the weight step are those of CE at clamp(x + δ, 0, 1),
    δ's rows 0:n take one signed step of that same backward, clipped to the ε-ball, and rows n: stay as they were."""
    free_replay = copy_of(free_at.free_replay)
    model, x, y = _net().train(), *_batch()
    reference = copy.deepcopy(model)
    eps = 8 / 255
    step = step_over_eps * eps
    gen = torch.Generator().manual_seed(2)
    delta = torch.empty(9, *x.shape[1:]).uniform_(
        -eps, eps, generator=gen
    )  # a buffer of 9 rows, 6 in use
    delta[:, :, 0] = eps  # the first image row pushed past 1 where x = 1
    before = delta.clone()
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, logits = free_replay(model, opt, x, y, delta, eps, step)

    # the forward saw x + δ clamped to the pixel range (the authors' clamp), one pass per replay
    assert len(seen) == 1 and seen[0].min() >= 0 and seen[0].max() <= 1
    assert torch.equal(seen[0], (x + before[:6]).clamp(0, 1))
    # the same gradients computed explicitly, on a copy of the model before the step
    d = before[:6].clone().requires_grad_(True)
    ref_loss = F.cross_entropy(reference((x + d).clamp(0, 1)), y)
    params = list(reference.parameters())
    *g_theta, g_delta = torch.autograd.grad(ref_loss, params + [d])
    torch.testing.assert_close(loss, ref_loss.detach())
    for p, g in zip(model.parameters(), g_theta):  # the weight gradient of that one backward
        torch.testing.assert_close(p.grad, g)
    # δ ← clip(δ + step·sign(∇_δ), −ε, ε) on rows 0:n; the other positions' rows carried unchanged
    assert torch.equal(delta[:6], (before[:6] + step * g_delta.sign()).clamp(-eps, eps))
    assert torch.equal(delta[6:], before[6:])
    assert delta.abs().max() <= eps
    assert (delta[:6] != before[:6]).any()
    # δ is not projected onto the pixel range (only the forward clamps): where x = 1 the clamp passes no gradient,
    # so δ > 0 stays, and x + δ leaves [0, 1] in storage
    assert (x[1] + delta[1]).max() > 1
    # the weights took the optimiser's step with that gradient
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for p, g in zip(params, g_theta):
        p.grad = g
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    for b, c in zip(model.buffers(), reference.buffers()):  # BatchNorm saw the replay in train mode
        assert torch.equal(b, c)
    assert model[1].num_batches_tracked.item() == 1


def test_replays_carry_delta_and_raise_the_loss():
    """m replays of one batch: each starts from the δ the previous one left (the buffer), |δ| ≤ ε throughout, and δ
    ascends: the loss at the final δ is above the loss at the clean images for the same weights."""
    model, x, y = _net().train(), *_batch()
    eps = 8 / 255
    delta = torch.zeros(6, *x.shape[1:])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: only δ moves
    starts = []
    for _ in range(4):
        starts.append(delta.clone())
        free_at.free_replay(model, opt, x, y, delta, eps, eps / 2)
        assert delta.abs().max() <= eps + 1e-7
    assert not torch.equal(starts[1], starts[0]) and not torch.equal(starts[3], starts[2])
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model((x + delta).clamp(0, 1)), y) > F.cross_entropy(model(x), y)


def test_the_core_refuses_normalised_images():
    """A Normalize() in the transform gives images outside [0, 1]; the pixel clamp would then be meaningless."""
    model = _net()
    x = (torch.rand(4, 3, 16, 16) - 0.5) / 0.25
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        free_at.free_replay(model, opt, x, torch.arange(4), torch.zeros_like(x), 8 / 255, 8 / 255)


def test_under_fp16_the_scaler_gives_the_fp32_direction_and_an_overflow_leaves_delta():
    """Under float16 the GradScaler's scale is the loss scale of the one backward: δ's signs are those of fp32; an
    overflow (a scale far too large) makes the scaler skip the weight step, and δ keeps its value (no NaN)."""
    x, y = _batch()
    eps = 8 / 255
    deltas = []
    for autocast, scale in ((None, None), (torch.float16, 2.0**10)):
        model = _net().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        deltas.append(torch.zeros(6, *x.shape[1:]))
        free_at.free_replay(model, opt, x, y, deltas[-1], eps, eps, autocast, scaler)
    moved = deltas[0] != 0  # fp32's δ moved there (the clamp passes no gradient at some range ends)
    assert (
        moved.float().mean() > 0.5 and (deltas[1][moved] != 0).float().mean() > 0.9
    )  # no underflow
    assert (deltas[1] == deltas[0]).float().mean() > 0.9  # the same signs, up to rounding
    model = _net().train()
    weights = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    start = torch.full((6, *x.shape[1:]), eps / 2)
    delta = start.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    free_at.free_replay(model, opt, x, y, delta, eps, eps, torch.float16, scaler)
    assert delta.isfinite().all() and delta.abs().max() <= eps
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if "weight" in k)
    assert scaler.get_scale() < 2.0**100  # the scaler saw the overflow


def test_the_recipes():
    """CIFAR-10: Wong et al.'s train_free.py (m = 8, 10 passes, lr triangle to 0.04 over the replays, batch 128,
    wd 5e-4, ε = step = 8/255); ImageNet: the authors' main_free.py/configs.yml, with epochs and lr period divided by
    m (⌈90/m⌉ epochs, ×0.1 every ⌈30/m⌉), one 224-px phase in batches of 256, ε = step = 4/255."""
    a = free_at.get_args([])
    assert (a.replays, a.epochs, a.batch_size, a.lr, a.lr_schedule) == (8, 10, 128, 0.04, "cyclic")
    assert (a.weight_decay, a.epsilon, a.alpha, a.model) == (5e-4, 8, 8, "preact18")
    i = free_at.get_args(["--dataset", "imagenet"])
    m = i.replays
    assert m == 4 and i.epochs == math.ceil(90 / m) == 23
    assert i.lr_schedule == "step" and i.lr == 0.1 and i.milestones == [8, 16]
    assert all(k * math.ceil(30 / m) == ms for k, ms in zip((1, 2), i.milestones))
    assert i.phases == [[23, 224, 256]] and i.batch_size == 256 and i.model == "resnet50"
    assert (i.epsilon, i.alpha, i.weight_decay) == (4, 4, 1e-4)
    # the step follows ε (the authors' step = ε), as their ε = 2 and 8 models
    assert free_at.get_args(["--dataset", "imagenet", "--epsilon", "2"]).alpha == 2
    assert free_at.get_args(["--epsilon", "16"]).alpha == 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replays", "2", "--replays-min", "3"], "--replays-min 3 is larger"),
        (["--milestones", "3"], "--lr-schedule step"),
        # a milestone at or past the last epoch never lowers the lr: the recipe's (8 16) under a shorter --epochs,
        # or given; flags.milestones' one wording, suggesting the recipe's drops (8 and 16 of 23) for this run
        (
            ["--dataset", "imagenet", "--epochs", "4"],
            "the recipe's milestones 8 16: 8 is not below --epochs 4, so the lr would never drop",
        ),
        (["--dataset", "imagenet", "--epochs", "12"], "e.g. --milestones 4 8;"),
        (
            ["--lr-schedule", "step", "--milestones", "2", "10"],
            "--milestones 2 10: 10 is not below --epochs 10",
        ),
    ],
)
def test_flags_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        free_at.get_args(argv)
    assert err.value.code == 2 and message in " ".join(capsys.readouterr().err.split())
    # the cyclic schedule has no drops: the ImageNet recipe's milestones are not checked against a short run
    assert free_at.get_args(["--dataset", "imagenet", "--epochs", "4", "--lr-schedule", "cyclic"])


def test_milestones_on_one_epoch_drop_the_lr_at_once_and_say_so(tmp_path, no_checksum):
    """--lr-schedule step --milestones 1 1 in 2 epochs: both drops come after epoch 1 (×0.01), and the log says so in
    flags.milestones' one line (129 images in batches of 128: one batch per epoch, one replay)."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = tmp_path / "run"
    short = dict(batch_size=128, replays=1, monitor_size=8, eval_samples=8, lr_schedule="step")
    free_at.main(
        small_args(str(tmp_path / "d"), str(out), eval_iters=1, eval_cw_iters=0, **short)
        + ["--milestones", "1", "1"]
    )
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx([0.04, 0.0004])
    notes = [line for line in (out / "log.txt").read_text().splitlines() if "at once" in line]
    assert notes == [
        "# milestones 1 1: lr drops at once, 2 after epoch 1 (×0.1 each); the run is too short "
        "to space them"
    ]


def test_amata_free_schedule_of_m_and_step():
    """Amata+Free on the ImageNet recipe (Amata §3.2, Table 3): m_t = 2 + 2t/22 rounded (T = epochs − 1, as amata.py's
    K_t), so 6 epochs at m = 2, 11 at 3, 6 at 4; the step halves while m doubles: α_t = α·2/m_t, 4/255 at m = 2
    down to 2/255 at m = 4 (τ = m_t·α_t = 8/255 = 2ε every epoch); Free's epochs and lr boundaries are kept."""
    a = free_at.get_args(["--dataset", "imagenet", "--replays-min", "2"])
    ms = [free_at.replays_at(t, a.epochs, a.replays_min, a.replays) for t in range(a.epochs)]
    assert ms == [2] * 6 + [3] * 11 + [4] * 6
    steps = [a.alpha * a.replays_min / m for m in ms]
    assert steps[0] == 4 and steps[-1] == 2 and {m * s for m, s in zip(ms, steps)} == {8}
    assert (a.epochs, a.milestones) == (23, [8, 16])
    assert sum(ms) / (a.replays * a.epochs) == pytest.approx(69 / 92)  # the replays Free would run
    # the same rule as amata.py's K_t, for other ends and lengths; one epoch runs m_max; m_min = m_max is Free
    for epochs, lo, hi in ((23, 2, 4), (7, 1, 8), (100, 2, 10), (2, 3, 5), (1, 2, 4)):
        assert [free_at.replays_at(t, epochs, lo, hi) for t in range(epochs)] == [
            amata.annealing(t, epochs, lo, hi, 1.0)[0] for t in range(epochs)
        ]
    assert free_at.replays_at(0, 1, 2, 4) == 4 and {
        free_at.replays_at(t, 9, 4, 4) for t in range(9)
    } == {4}


@pytest.fixture(scope="module")
def spied_run(cifar_dir, tmp_path_factory):
    """One in-process run (256 images in batches of 48: five of 48 and a last one of 16; m = 3; 2 epochs) with every
    call of the core recorded: its batch, the buffer it was given, that buffer before and after."""
    out = str(tmp_path_factory.mktemp("free") / "run")
    calls = []
    real = free_at.free_replay

    def spy(model, opt, x, y, delta, eps, step, *a, **k):
        before = delta.clone()
        lr = opt.param_groups[0]["lr"]
        result = real(model, opt, x, y, delta, eps, step, *a, **k)
        calls.append(
            dict(x=x, n=len(y), buffer=delta, before=before, after=delta.clone(), step=step, lr=lr)
        )
        return result

    with pytest.MonkeyPatch.context() as mp, launch.no_checksum():
        mp.setattr(free_at, "free_replay", spy)
        free_at.main(small_args(cifar_dir, out, epochs=2, batch_size=48, replays=3))
    return out, calls


def test_end_to_end_with_m_replays_of_every_batch(spied_run):
    out, calls = spied_run
    res = check_outputs(out, epochs=2)
    assert res["method"] == "free_at" and res["args"]["replays"] == 3
    assert [r["m"] for r in res["epochs"]] == [3, 3] and [r["step"] for r in res["epochs"]] == [
        8,
        8,
    ]
    # every batch replayed exactly m = 3 times in a row: 6 batches an epoch (5 × 48 + 16), 36 weight steps
    sizes = [c["n"] for c in calls]
    assert sizes == ([48] * 15 + [16] * 3) * 2
    for k in range(0, len(calls), 3):
        assert calls[k]["x"] is calls[k + 1]["x"] is calls[k + 2]["x"]
        assert k == 0 or calls[k]["x"] is not calls[k - 1]["x"]
    # one lr triangle over every replay of the run (Wong's train_free.py), set before each: up over the first
    # half of the 36 replays, down over the second, 0 after the last
    lrs = [c["lr"] for c in calls]
    assert lrs[0] == 0 and all(a < b for a, b in zip(lrs[:18], lrs[1:19]))
    assert all(a > b for a, b in zip(lrs[18:], lrs[19:])) and lrs[18] == pytest.approx(0.04)
    assert res["epochs"][-1]["lr"] == 0 and res["epochs"][0]["lr"] == pytest.approx(0.04)


def test_one_buffer_carried_across_replays_batches_and_epochs(spied_run):
    """δ starts at zero once and is never reset: each call starts from what the previous call left, through the
    smaller last batch (rows 16: untouched there, carried to the next epoch's first batch) and the epoch boundary."""
    _, calls = spied_run
    buffer = calls[0]["buffer"]
    assert buffer.shape == (48, 3, 32, 32) and all(c["buffer"] is buffer for c in calls)
    assert not calls[0]["before"].any()
    for previous, call in zip(calls, calls[1:]):
        assert torch.equal(call["before"], previous["after"])
    last = [c for c in calls[:18] if c["n"] == 16]
    assert len(last) == 3
    for c in last:
        assert torch.equal(c["after"][16:], c["before"][16:]) and not torch.equal(
            c["after"], c["before"]
        )
    assert (calls[17]["after"][16:] != 0).any()  # rows that the full batches had moved, carried on
    assert all(c["after"].abs().max() <= 8 / 255 + 1e-7 for c in calls)


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    """δ lives in the checkpoint: an interrupted run resumed ends with the uninterrupted run's numbers (the smaller
    last batch and Amata+Free's changing m included)."""
    a, _ = check_resume("free_at.py", cifar_dir, tmp_path, batch_size=48, replays=2, replays_min=1)
    assert [r["m"] for r in a["epochs"]] == [1, 2] and [r["step"] for r in a["epochs"]] == [8, 4]


def test_two_processes_resumed_equal_the_uninterrupted_run(cifar_dir, tmp_path):
    """Under torchrun each process carries its own δ (its rows of its part of the batch), kept per process in the
    checkpoint: a two-process run interrupted after epoch 1 and resumed equals the uninterrupted one."""
    from test_distributed import torchrun

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    own = dict(epochs=2, batch_size=48, replays=2)
    torchrun(["free_at.py", *small_args(cifar_dir, full, **own)])
    torchrun(
        ["free_at.py", *small_args(cifar_dir, part, **own)],
        env={"FASTAT_TEST_INTERRUPT_AFTER_EPOCH": "1"},
        expect=1,
    )
    saved = torch.load(f"{part}/checkpoint.pt", weights_only=False)["objects"]["delta"]
    assert len(saved) == 2 and saved[0].shape == (24, 3, 32, 32) and not torch.equal(*saved)
    torchrun(["free_at.py", "--resume", "--out-dir", part])
    a, b = load_results(full), load_results(part)
    assert a["processes"] == b["processes"] == 2
    assert comparable(a) == comparable(b)
