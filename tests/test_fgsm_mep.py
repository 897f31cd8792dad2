"""fgsm_mep.py: its copyable core and memory update, the momentum forms, checkpoints of the memories, and the script
end to end with resume (--compile: tests/test_compile.py)."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    check_outputs,
    check_resume,
    comparable,
    copy_of,
    load_results,
    small_args,
    write_cifar,
    write_mnist,
)

import fgsm_mep
import harness

EPS, ALPHA = 8 / 255, 8 / 255


def tiny_model(mode="train"):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)
    )
    return net.train(mode == "train")


def memories(rows=20):
    torch.manual_seed(1)
    return torch.empty(rows, 3, 4, 4).uniform_(-EPS, EPS), torch.randn(rows, 3, 4, 4) * 1e-3


def a_batch(n=5):
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range
    return x, torch.arange(n)


@pytest.mark.parametrize("lam", [10.0, 0.0])
def test_the_core_copies_and_equals_lines_12_14_16_written_out(lam):
    mep_loss = copy_of(fgsm_mep.mep_loss)  # defined again with torch alone
    model, (x, y) = tiny_model(), a_batch()
    delta_pgi = (x + memories()[0][:5]).clamp(0, 1) - x
    loss, logits, delta_adv, grad = mep_loss(model, x, y, delta_pgi, EPS, ALPHA, lam)
    # its mode; input gradients only
    assert model.training and all(p.grad is None for p in model.parameters())
    assert (
        delta_adv.abs().max() <= EPS + 1e-7
        and (x + delta_adv).min() >= 0
        and (x + delta_adv).max() <= 1
    )
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    # written out, on a copy of the model in the same state (BN statistics included)
    ref = tiny_model()
    d = delta_pgi.clone().requires_grad_(True)
    logits_pgi = ref(x + d)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_pgi, y), d, retain_graph=True)  # line 12
    adv = (x + (delta_pgi + ALPHA * g.sign()).clamp(-EPS, EPS)).clamp(0, 1) - x  # line 14
    out = ref(x + adv)
    expected = F.cross_entropy(out, y) + lam * ((out - logits_pgi) ** 2).mean()  # line 16
    expected.backward()
    torch.testing.assert_close(grad, g)
    torch.testing.assert_close(delta_adv, adv)
    torch.testing.assert_close(logits, out)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # gradients through both forward passes
    for a, b in zip(got, [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the FGSM step raises the loss over the prior
        assert F.cross_entropy(ref.eval()(x + delta_adv), y) > F.cross_entropy(
            ref(x + delta_pgi), y
        )


def test_the_regulariser_reaches_the_weights_through_the_priors_forward_too():
    model, (x, y) = tiny_model(), a_batch()
    delta_pgi = torch.zeros_like(x)
    # adv_model: a second module, so that only the prior's pass can reach model's weights
    frozen = tiny_model()
    loss, *_ = fgsm_mep.mep_loss(model, x, y, delta_pgi, EPS, ALPHA, 10.0, adv_model=frozen)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_core_refuses_normalised_images():
    x = (torch.rand(4, 3, 4, 4) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        fgsm_mep.mep_loss(tiny_model(), x, torch.arange(4), torch.zeros_like(x), EPS, ALPHA, 10.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_core_under_autocast_gives_the_fp32_step_and_momentum(dtype):
    model, (x, y) = tiny_model("eval"), a_batch(8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    delta_pgi = torch.zeros_like(x)
    _, _, adv32, grad32 = fgsm_mep.mep_loss(model, x, y, delta_pgi, EPS, ALPHA, 10.0)
    # an eval-mode model stays in eval mode, its BN statistics untouched (main() runs it in train mode, as the code)
    assert not model.training and all(
        torch.equal(v, model.state_dict()[k]) for k, v in state.items()
    )
    loss, _, adv, grad = fgsm_mep.mep_loss(model, x, y, delta_pgi, EPS, ALPHA, 10.0, autocast=dtype)
    # the same signs, up to rounding
    assert loss.dtype == torch.float32 and (adv == adv32).float().mean() > 0.9
    # under float16 grad is 2^10 ∇ (the loss scale): the momentum's ∇/‖∇‖₁ does not see it
    scale = 1024 if dtype == torch.float16 else 1
    assert (grad.abs().sum() / grad32.abs().sum()).item() == pytest.approx(scale, rel=0.05)
    torch.testing.assert_close(
        grad / grad.abs().sum(), grad32 / grad32.abs().sum(), rtol=0.1, atol=1e-4
    )


@pytest.mark.parametrize("prior", ["epoch", "momentum"])
def test_the_memory_update_copies_changes_only_its_rows_and_stays_in_range(prior):
    update_memory = copy_of(fgsm_mep.update_memory)
    model = tiny_model()
    delta_memory, momentum_memory = memories()
    idx = torch.tensor([2, 5, 7, 11, 19])
    x, y = a_batch()
    delta_before, momentum_before = delta_memory.clone(), momentum_memory.clone()
    delta_pgi = (x + delta_memory[idx]).clamp(0, 1) - x
    _, _, delta_adv, grad = fgsm_mep.mep_loss(model, x, y, delta_pgi, EPS, ALPHA, 10.0)
    update_memory(
        delta_memory,
        momentum_memory if prior == "momentum" else None,
        idx,
        x,
        delta_pgi,
        delta_adv,
        grad,
        EPS,
        ALPHA,
        0.3,
    )
    others = torch.ones(20, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(delta_memory[others], delta_before[others])
    assert torch.equal(momentum_memory[others], momentum_before[others])
    assert torch.equal(momentum_memory[idx], momentum_before[idx]) == (prior == "epoch")
    assert delta_memory[idx].abs().max() <= EPS + 1e-7
    assert (x + delta_memory[idx]).min() >= 0 and (x + delta_memory[idx]).max() <= 1
    if prior == "epoch":  # EP: the next prior is δ_adv itself
        assert torch.equal(delta_memory[idx], delta_adv)
    else:  # lines 13, 15 written out, with the code's ∇/‖∇‖₁ over the whole batch
        momentum = 0.3 * momentum_before[idx] + grad / grad.abs().sum()
        torch.testing.assert_close(momentum_memory[idx], momentum)
        expected = (x + (delta_pgi + ALPHA * momentum.sign()).clamp(-EPS, EPS)).clamp(0, 1) - x
        torch.testing.assert_close(delta_memory[idx], expected)


def test_the_batch_prior_hands_delta_adv_to_the_next_batch():
    slot = torch.empty(8, 3, 4, 4).uniform_(-EPS, EPS)
    x, y = a_batch()  # a smaller last batch uses the first 5 slots
    before = slot.clone()
    delta_pgi = (x + slot[:5]).clamp(0, 1) - x
    _, _, delta_adv, grad = fgsm_mep.mep_loss(tiny_model(), x, y, delta_pgi, EPS, ALPHA, 10.0)
    fgsm_mep.update_memory(slot, None, slice(0, 5), x, delta_pgi, delta_adv, grad, EPS, ALPHA, None)
    assert torch.equal(slot[:5], delta_adv) and torch.equal(slot[5:], before[5:])


def test_the_norm_form_uses_one_l1_norm_over_the_whole_batch():
    grad = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 10.0)])
    x = torch.full((2, 3, 4, 4), 0.5)
    delta, momentum = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    fgsm_mep.update_memory(
        delta,
        momentum,
        torch.arange(2),
        x,
        delta[:2].clone(),
        delta[:2].clone(),
        grad,
        EPS,
        ALPHA,
        0.3,
        "norm",
    )
    assert momentum.abs().sum().item() == pytest.approx(1.0)
    # per-sample scale survives (a per-sample norm would make both samples weigh the same)
    torch.testing.assert_close(momentum[1] / momentum[0], torch.full((3, 4, 4), -10.0))


def run_momentum_steps(form, steps=4):
    """A few batches on the same samples with hand-made gradients that flip sign after the first: the history should
    outvote the current gradient in the code's norm form, never in the box's sign form (DECISIONS.md, 'MEP
    momentum form')."""
    delta_memory, momentum_memory = memories(6)
    momentum_memory.zero_()
    x, idx = torch.rand(6, 3, 4, 4) * 0.5 + 0.25, torch.arange(6)
    outcomes = []
    for t in range(steps):
        delta_pgi = (x + delta_memory[idx]).clamp(0, 1) - x
        # A strong gradient, then weak opposite ones; one big entry makes the later batches' ∇/‖∇‖₁ small
        # everywhere else (a real batch's L1 norm differs from batch to batch too).
        grad = torch.full_like(x, 1.0 if t == 0 else -1e-3)
        grad[0, 0, 0, 0] = 1.0 if t == 0 else -100.0
        # line 14
        delta_adv = (x + (delta_pgi + ALPHA * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1) - x
        fgsm_mep.update_memory(
            delta_memory, momentum_memory, idx, x, delta_pgi, delta_adv, grad, EPS, ALPHA, 0.3, form
        )
        outcomes.append(torch.equal(delta_memory, delta_adv))
    return outcomes


def test_sign_momentum_reduces_mep_to_ep_and_the_default_does_not():
    assert all(run_momentum_steps("sign"))  # the stored prior is always δ_adv, i.e. FGSM-EP
    outcomes = run_momentum_steps("norm")  # after the flip, the remembered direction wins
    assert outcomes[0] and not all(outcomes[1:])


def test_momentum_flags_are_refused_without_a_momentum_memory(capsys):
    for argv in (
        ["--prior", "epoch", "--mu", "0.5"],
        ["--prior", "batch", "--momentum-form", "sign"],
    ):
        with pytest.raises(SystemExit) as err:
            fgsm_mep.get_args(argv)
        assert err.value.code == 2 and "--prior momentum" in capsys.readouterr().err
    args = fgsm_mep.get_args([])
    assert (args.mu, args.momentum_form) == (0.3, "norm")
    assert fgsm_mep.get_args(["--prior", "epoch"]).mu is None


@pytest.mark.parametrize("true_prob", [0.05, 0.1])
def test_a_true_prob_at_or_under_one_over_c_fails_before_the_run_starts(
    true_prob, cifar_dir, tmp_path, capsys, no_checksum
):
    """F = 1/C (0.1 on 10 classes) is the uniform label and below it the true class is the least likely: refused in
    one line before the run folder exists."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        harness.main_guard(
            lambda: fgsm_mep.main(small_args(cifar_dir, str(out), true_prob=true_prob))
        )
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.count("\n") == 1 and "--true-prob" in message
    assert not out.exists()


# BP keeps one batch slot (batch size 32); EP and MEP one row per training image of the split (tiny CIFAR-100 here:
# 120, tiny MNIST: 200), whatever the dataset's image shape. MEP on MNIST also resets its memories every epoch.
@pytest.mark.parametrize(
    "prior,dataset,rows,shape",
    [
        ("batch", "cifar10", 32, (3, 32, 32)),
        ("epoch", "cifar100", 120, (3, 32, 32)),
        ("momentum", "mnist", 200, (1, 28, 28)),
    ],
)
def test_each_prior_runs_and_its_memories_fit_the_dataset(
    prior, dataset, rows, shape, cifar_dir, mnist_dir, tmp_path, no_checksum, monkeypatch
):
    data_dir = {"cifar10": cifar_dir, "mnist": mnist_dir}.get(dataset)
    if dataset == "cifar100":
        data_dir = str(tmp_path / "c100")
        write_cifar(data_dir, n_train=120, n_test=32, num_classes=100)
    extra = dict(dataset=dataset, prior=prior, epochs=1)
    # --reset-every 1: at every epoch's start, random ±min(α, ε) and zero momentum
    if dataset == "mnist":
        extra.update(model="mnist-cnn", epochs=2, reset_every=1)
        calls, real = [], fgsm_mep.update_memory

        def spy(delta_memory, momentum_memory, *args):
            calls.append((delta_memory.clone(), momentum_memory.clone()))
            return real(delta_memory, momentum_memory, *args)

        monkeypatch.setattr(fgsm_mep, "update_memory", spy)
    out = str(tmp_path / "run")
    fgsm_mep.main(small_args(data_dir, out, **extra))
    res = check_outputs(out, epochs=extra["epochs"])
    assert res["args"]["prior"] == prior and "reg" in res["epochs"][0]
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["objects"]["memory"]
    assert tuple(saved["delta"].shape) == (rows,) + shape
    assert (saved["momentum"] is not None) == (prior == "momentum")
    assert saved["delta"].abs().max() <= res["args"]["epsilon"] / 255 + 1e-6
    if dataset == "mnist":
        step = min(res["args"]["alpha"], res["args"]["epsilon"]) / 255
        # each epoch's first batch
        for delta_memory, momentum_memory in (
            calls[0],
            calls[len(calls) // 2],
        ):
            assert (
                torch.allclose(delta_memory.abs(), torch.tensor(step)) and not momentum_memory.any()
            )


def test_the_multistep_schedule_completes_when_the_loader_drops_a_lone_sample(tmp_path):
    """129 images in batches of 128: the loader drops the lone 129th, so an epoch is one step, and the milestones
    (100/110 and 105/110 of all steps) must be planned for that: lr × 0.01 at the end."""
    write_mnist(str(tmp_path / "d"), n_train=129, n_test=8)  # MNIST's CNN: the cheapest network
    out = str(tmp_path / "run")
    fgsm_mep.main(
        small_args(
            str(tmp_path / "d"),
            out,
            epochs=2,
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
    lrs = [r["lr"] for r in load_results(out)["epochs"]]
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.1 * 0.01)
    # both milestones on one iteration: the lr never runs at 0.01, and the log says so
    with open(os.path.join(out, "log.txt")) as f:
        assert (
            "# both lr milestones fall on iteration 2 of 2: the lr drops from 0.1 to 0.001 at once"
            in f.read()
        )


def mnist_run(data_dir, out, **extra):
    return small_args(
        data_dir,
        out,
        epochs=3,
        dataset="mnist",
        model="mnist-cnn",
        batch_size=50,
        eval_iters=1,
        eval_cw_iters=0,
        **extra,
    )


def test_a_skipped_checkpoint_keeps_the_last_one_and_resumes_from_it_exactly(
    mnist_dir, tmp_path, monkeypatch
):
    """Saving the memories is held to 5% of the training time: when the saves have cost more, MEP's loop passes
    save=False, checkpoint.pt stays at the previous epoch, and an interrupted run resumes from there, exactly (with
    the memories of that epoch)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    fgsm_mep.main(mnist_run(mnist_dir, full))
    saves, start_epoch, end_epoch = [], harness.Run.start_epoch, harness.Run.end_epoch

    def costly_saves(run):  # from epoch 2 on, the saves so far seem to have cost 100 s
        start_epoch(run)
        if len(saves) >= 1:
            run.save_seconds = 100.0

    def end_then_interrupt(run, epoch, *args, **kwargs):
        saves.append(kwargs["save"])
        end_epoch(run, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(harness.Run, "start_epoch", costly_saves)
    monkeypatch.setattr(harness.Run, "end_epoch", end_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fgsm_mep.main(mnist_run(mnist_dir, part))
    assert saves == [True, False]
    ckpt = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
    assert ckpt["epoch"] == 1  # epoch 2 was not saved: the checkpoint of epoch 1 is intact
    monkeypatch.undo()
    restored, real = [], fgsm_mep.update_memory

    def first_memories(delta_memory, momentum_memory, *args):
        if not restored:
            restored.append((delta_memory.clone(), momentum_memory.clone()))
        return real(delta_memory, momentum_memory, *args)

    monkeypatch.setattr(fgsm_mep, "update_memory", first_memories)
    fgsm_mep.main(mnist_run(mnist_dir, part, resume=True))
    # the memories are those of epoch 1's checkpoint, exactly, when epoch 2 starts again
    assert torch.equal(restored[0][0], ckpt["objects"]["memory"]["delta"])
    assert torch.equal(restored[0][1], ckpt["objects"]["memory"]["momentum"])
    assert comparable(load_results(full)) == comparable(load_results(part))
    with open(os.path.join(part, "log.txt")) as f:
        assert "the rows of epochs 2-2 above were not checkpointed: discarded" in f.read()
    final = [
        torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)["objects"]["memory"]
        for d in (full, part)
    ]
    for name in ("delta", "momentum"):
        assert torch.equal(final[0][name], final[1][name]), name


def test_end_to_end_and_resume_include_the_memories(cifar_dir, tmp_path):
    a, _ = check_resume("fgsm_mep.py", cifar_dir, tmp_path)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "fgsm_mep" and a["args"]["prior"] == "momentum" and a["args"]["lam"] == 10
    # both milestones passed
    assert a["epochs"][0]["lr"] == 0.1 and a["epochs"][1]["lr"] == pytest.approx(1e-3)
    full, part = (
        torch.load(os.path.join(tmp_path, d, "checkpoint.pt"), weights_only=False)["objects"][
            "memory"
        ]
        for d in ("full", "part")
    )
    for name in ("delta", "momentum"):
        assert full[name].shape[0] == 256 and torch.equal(full[name], part[name]), name
    assert full["momentum"].abs().sum() > 0
