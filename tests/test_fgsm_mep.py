"""fgsm_mep.py: memories, FGSM step, regulariser, momentum forms, and the script end to end with resume."""
import contextlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import fgsm_mep
from conftest import check_outputs, check_resume, small_args, write_cifar

EPS, ALPHA = 8 / 255, 8 / 255
nullcast = contextlib.nullcontext


def saved_memories(out_dir):
    """The memories of the checkpoint in out_dir, read from the side files that checkpoint.pt names."""
    tracked = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=False)["tracked"]
    out = {}
    for name in ("delta_memory", "momentum_memory"):
        if name in tracked:
            ref = tracked[name]
            raw = np.fromfile(os.path.join(out_dir, ref["file"]), dtype=np.uint8)
            out[name] = torch.from_numpy(raw).view(getattr(torch, ref["dtype"].split(".")[1])).view(ref["shape"])
    return out


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


def memories(rows=20):
    torch.manual_seed(1)
    return torch.empty(rows, 3, 4, 4).uniform_(-EPS, EPS), torch.randn(rows, 3, 4, 4) * 1e-3


@pytest.mark.parametrize("prior", ["epoch", "momentum"])
def test_a_batch_changes_only_its_own_memory_rows_and_stays_in_range(prior):
    model = tiny_model()
    delta_memory, momentum_memory = memories()
    idx = torch.tensor([2, 5, 7, 11, 19])
    x = torch.rand(5, 3, 4, 4)
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range
    y = torch.arange(5)
    delta_before, momentum_before = delta_memory.clone(), momentum_memory.clone()
    delta_pgi = (x + delta_memory[idx]).clamp(0, 1) - x
    delta_adv, grad, _ = fgsm_mep.fgsm_from_prior(model, x, y, delta_pgi, EPS, ALPHA, nullcast)
    fgsm_mep.store_prior(prior, delta_memory, momentum_memory, idx, x, delta_pgi, delta_adv, grad, EPS, ALPHA,
                         0.3, "norm")
    others = torch.ones(20, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(delta_memory[others], delta_before[others])
    assert not torch.equal(delta_memory[idx], delta_before[idx])
    assert torch.equal(momentum_memory[others], momentum_before[others])
    assert torch.equal(momentum_memory[idx], momentum_before[idx]) == (prior == "epoch")
    for delta in (delta_adv, delta_memory[idx]):
        assert delta.abs().max() <= EPS + 1e-7 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    # δ_adv is the FGSM step from the prior: where no clamp binds, it moved by exactly α·sign(∇)
    free = (delta_pgi + ALPHA * grad.sign()).abs() < EPS - 1e-6
    free &= ((x + delta_pgi + ALPHA * grad.sign()) > 0) & ((x + delta_pgi + ALPHA * grad.sign()) < 1)
    assert free.any()
    torch.testing.assert_close((delta_adv - delta_pgi)[free], (ALPHA * grad.sign())[free])


def test_batch_prior_hands_delta_adv_to_the_next_batch():
    model = tiny_model()
    slot = torch.empty(8, 3, 4, 4).uniform_(-EPS, EPS)
    x, y = torch.rand(5, 3, 4, 4), torch.arange(5)  # a smaller last batch uses the first 5 slots
    before = slot.clone()
    delta_pgi = (x + slot[:5]).clamp(0, 1) - x
    delta_adv, grad, _ = fgsm_mep.fgsm_from_prior(model, x, y, delta_pgi, EPS, ALPHA, nullcast)
    fgsm_mep.store_prior("batch", slot, None, slice(0, 5), x, delta_pgi, delta_adv, grad, EPS, ALPHA, 0.3, "norm")
    assert torch.equal(slot[:5], delta_adv) and torch.equal(slot[5:], before[5:])


def test_regulariser_is_lambda_times_mean_squared_logit_difference():
    logits_adv = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    logits_pgi = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    reg = fgsm_mep.pgi_regulariser(logits_adv, logits_pgi, 10.0)
    assert reg.item() == pytest.approx(10 * (1 + 4 + 4 + 9) / 4)  # 45
    reg.backward()
    # gradients reach both passes: d/da = 2λ(a − b)/4, d/db its negative
    torch.testing.assert_close(logits_adv.grad, 5.0 * (logits_adv - logits_pgi).detach())
    torch.testing.assert_close(logits_pgi.grad, -logits_adv.grad)


def test_the_prior_forward_keeps_its_graph_for_the_weight_step():
    model = tiny_model()
    x, y = torch.rand(5, 3, 4, 4), torch.arange(5)
    delta_pgi = torch.empty_like(x).uniform_(-EPS, EPS)
    delta_adv, _, logits_pgi = fgsm_mep.fgsm_from_prior(model, x, y, delta_pgi, EPS, ALPHA, nullcast)
    assert all(p.grad is None for p in model.parameters())  # the attack computed ∇δ only
    # the regulariser's gradient through f(x+δ_pgi) alone (f(x+δ_adv) held fixed) reaches the weights
    reg = fgsm_mep.pgi_regulariser(model(x + delta_adv).detach(), logits_pgi, 10.0)
    grads = torch.autograd.grad(reg, list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_norm_form_uses_one_l1_norm_over_the_whole_batch():
    grad = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 10.0)])
    direction = fgsm_mep.momentum_direction(grad, "norm")
    assert direction.abs().sum().item() == pytest.approx(1.0)
    # per-sample scale survives (a per-sample norm would make both samples weigh the same)
    torch.testing.assert_close(direction[1] / direction[0], torch.full((3, 4, 4), -10.0))
    assert torch.equal(fgsm_mep.momentum_direction(grad, "sign"), grad.sign())


def run_momentum_steps(form, steps=4):
    """A few batches on the same samples with hand-made gradients that flip sign after the first: the
    history should outvote the current gradient in the code's norm form, never in the slides' sign form."""
    delta_memory, momentum_memory = memories(6)
    momentum_memory.zero_()
    x, idx = torch.rand(6, 3, 4, 4) * 0.5 + 0.25, torch.arange(6)
    outcomes = []
    for t in range(steps):
        delta_pgi = (x + delta_memory[idx]).clamp(0, 1) - x
        # A strong gradient, then weak opposite ones; one big entry makes the later batches' ∇/‖∇‖₁
        # small everywhere else (a real batch's L1 norm differs from batch to batch too).
        grad = torch.full_like(x, 1.0 if t == 0 else -1e-3)
        grad[0, 0, 0, 0] = 1.0 if t == 0 else -100.0
        delta_adv = (x + (delta_pgi + ALPHA * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1) - x  # line 14
        fgsm_mep.store_prior("momentum", delta_memory, momentum_memory, idx, x, delta_pgi, delta_adv, grad,
                             EPS, ALPHA, 0.3, form)
        outcomes.append(torch.equal(delta_memory, delta_adv))
    return outcomes


def test_sign_momentum_reduces_mep_to_ep_and_the_default_does_not():
    # sign form: the stored prior is always δ_adv, i.e. FGSM-EP (the degeneracy the docstring explains)
    assert all(run_momentum_steps("sign"))
    # norm form: after the flip, the remembered direction wins and the stored prior is not δ_adv
    outcomes = run_momentum_steps("norm")
    assert outcomes[0] and not all(outcomes[1:])


# BP keeps one batch slot (batch size 32); EP and MEP one row per training image of the split
# (tiny CIFAR-100 here: 120, tiny MNIST: 200), whatever the dataset's image shape.
@pytest.mark.parametrize("prior,dataset,rows,shape", [("batch", "cifar10", 32, (3, 32, 32)),
                                                      ("epoch", "cifar100", 120, (3, 32, 32)),
                                                      ("momentum", "mnist", 200, (1, 28, 28))])
def test_each_prior_runs_and_memories_fit_the_dataset(prior, dataset, rows, shape, cifar_dir, mnist_dir, tmp_path,
                                                      no_checksum):
    data_dir = {"cifar10": cifar_dir, "mnist": mnist_dir}.get(dataset)
    if dataset == "cifar100":
        data_dir = str(tmp_path / "c100")
        write_cifar(data_dir, n_train=120, n_test=32, num_classes=100)
    extra = dict(dataset=dataset, prior=prior)
    if dataset == "mnist":
        extra["model"] = "mnist-cnn"
    out = str(tmp_path / "run")
    fgsm_mep.main(small_args(data_dir, out, epochs=1, **extra))  # in-process: the subprocess path is tested below
    res = check_outputs(out, epochs=1)
    assert res["args"]["prior"] == prior and "reg" in res["epochs"][0]
    saved = saved_memories(out)
    assert tuple(saved["delta_memory"].shape) == (rows,) + shape
    assert ("momentum_memory" in saved) == (prior == "momentum")
    assert saved["delta_memory"].abs().max() <= res["args"]["epsilon"] / 255 + 1e-6


def test_label_smoothing_below_one_over_c_is_a_usage_error(capsys):
    for argv in (["--label-smoothing", "0.09"], ["--label-smoothing", "1.5"],
                 ["--dataset", "cifar100", "--label-smoothing", "0.009"]):
        with pytest.raises(SystemExit) as err:
            fgsm_mep.get_args(argv)
        assert err.value.code == 2 and "--label-smoothing" in capsys.readouterr().err
    assert fgsm_mep.get_args(["--label-smoothing", "0.1"]).label_smoothing == 0.1          # 1/C: uniform labels
    assert fgsm_mep.get_args(["--dataset", "cifar100", "--label-smoothing", "0.05"]).label_smoothing == 0.05


def test_memories_live_beside_a_small_checkpoint_and_an_interrupted_save_keeps_the_last_one(tmp_path):
    args = SimpleNamespace(method="test", out_dir=str(tmp_path), resume=False, seed=0, device="cpu", epsilon=8,
                           epochs=5)
    memory = torch.rand(1000, 3, 8, 8)                               # 768 kB
    run = common.Run(args)
    run.track(model=nn.Linear(2, 2), memory=memory)
    run.train_time = 1e6  # saving is cheap next to the training: every epoch is saved
    run._save_checkpoint(1)
    memory.mul_(2)
    epoch_2 = memory.clone()
    run._save_checkpoint(2)
    # checkpoint.pt is small: it names the memory's file and holds no copy of it
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # the two saves went to the two files in turn: epoch 2's is memory.1.bin
    assert ckpt["tracked"]["memory"] == {"file": "memory.1.bin", "dtype": "torch.float32", "shape": [1000, 3, 8, 8]}
    assert os.path.getsize(tmp_path / "checkpoint.pt") < memory.numel() * 4 / 10
    assert os.path.getsize(tmp_path / "memory.1.bin") == memory.numel() * 4
    # epoch 3's save dies half-way through its file (memory.0.bin): checkpoint.pt still names epoch 2's
    with open(tmp_path / "memory.0.bin", "r+b") as f:
        f.write(b"\xff" * 1000)
        f.truncate(5000)
    memory.zero_()
    resumed = common.Run(SimpleNamespace(**{**vars(args), "resume": True}))
    resumed.track(model=nn.Linear(2, 2), memory=memory)
    resumed._load_checkpoint()
    assert resumed.start_epoch == 2 and torch.equal(memory, epoch_2)


def test_saving_memories_is_held_to_five_percent_of_the_training_time(tmp_path):
    args = SimpleNamespace(method="test", out_dir=str(tmp_path), resume=False, seed=0, device="cpu", epsilon=8,
                           epochs=5)

    def epochs_done():
        return torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epochs_done"]

    run = common.Run(args)
    run.track(model=nn.Linear(2, 2), memory=torch.zeros(10))
    run._save_checkpoint(1)
    run._save_seconds, run.train_time = 1.0, 10.0    # saves have cost 10% of the training so far: skip
    run._save_checkpoint(2)
    assert epochs_done() == 1
    run.train_time = 30.0                             # 3.3%: save
    run._save_checkpoint(3)
    assert epochs_done() == 3
    run._save_seconds, run.train_time = 100.0, 30.0
    run._save_checkpoint(5)                           # the last epoch is always saved
    assert epochs_done() == 5
    # a run without per-sample memories saves every epoch, whatever its saves cost
    plain = common.Run(SimpleNamespace(**{**vars(args), "out_dir": str(tmp_path / "plain")}))
    plain.track(model=nn.Linear(2, 2))
    plain._save_seconds, plain.train_time = 100.0, 1.0
    plain._save_checkpoint(2)
    assert torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["epochs_done"] == 2


def test_end_to_end_and_resume_include_the_memories(cifar_dir, tmp_path):
    a, _ = check_resume("fgsm_mep.py", cifar_dir, tmp_path)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "fgsm_mep" and a["args"]["prior"] == "momentum" and a["args"]["lam"] == 10
    assert a["epochs"][0]["lr"] == 0.1 and a["epochs"][1]["lr"] == pytest.approx(1e-3)  # both milestones passed
    full, part = (saved_memories(os.path.join(tmp_path, d)) for d in ("full", "part"))
    for name in ("delta_memory", "momentum_memory"):
        assert full[name].shape[0] == 256 and torch.equal(full[name], part[name]), name
    assert full["momentum_memory"].abs().sum() > 0
    # checkpoint.pt holds no memory: it is smaller than one of them
    assert os.path.getsize(os.path.join(tmp_path, "full", "checkpoint.pt")) < full["delta_memory"].numel() * 4
