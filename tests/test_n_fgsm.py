"""n_fgsm.py: its copyable core (the noise, the step, the pixel range, and NO projection onto the ε-ball), the
recipes, the lr triangle and the SVHN ramp, and the script end to end (in-process, tiny CIFAR-10, small WRN)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar

import common
import imagenet
import n_fgsm

EPS = 8 / 255


@pytest.fixture
def wrn():
    torch.manual_seed(0)
    return common.make_model("wrn-10-1", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def batch(low=0.0, high=1.0):
    gen = torch.Generator().manual_seed(1)
    return low + (high - low) * torch.rand(8, 3, 32, 32, generator=gen), torch.arange(8)


def test_the_core_copies_and_is_the_signed_step_from_the_noise(wrn):
    n_fgsm_delta = copy_of(n_fgsm.n_fgsm_delta)  # defined again with torch alone
    x, y = batch()
    x[0], x[1] = 0.0, 1.0  # pixels at the ends of the range must stay in it
    noise = torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)
    delta = n_fgsm_delta(wrn, x, y, EPS, 2 * EPS, noise)
    assert all(p.grad is None for p in wrn.parameters())  # only ∇η was computed
    # the step written out: η clamped into the pixel range, one signed step of α, clamped again
    eta = ((x + noise).clamp(0, 1) - x).requires_grad_(True)
    F.cross_entropy(wrn(x + eta), y).backward()
    expected = (x + eta.detach() + EPS * eta.grad.sign()).clamp(0, 1) - x
    torch.testing.assert_close(delta, expected)
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert delta.abs().max() <= 3 * EPS + 1e-6  # |δ| ≤ k + α


def test_the_perturbation_is_not_projected_onto_the_eps_ball(wrn):
    """N-FGSM's point (Algorithm 1: no clipping): with k = 2ε and α = ε, |δ| runs up to 3ε. Mid-range pixels, so
    that the pixel clamp does not bite: a projection onto the ε-ball would cut every |δ| to ε."""
    x, y = batch(0.25, 0.75)
    delta = n_fgsm.n_fgsm_delta(wrn, x, y, EPS, 2 * EPS)
    assert delta.abs().max() > 2.5 * EPS
    assert (
        delta.abs() > EPS + 1e-6
    ).float().mean() > 0.3  # for a third of the pixels: 1/2 expected
    with torch.no_grad():  # it raises the loss over the clean image
        assert F.cross_entropy(wrn(x + delta), y) > F.cross_entropy(wrn(x), y)


def test_the_noise_is_uniform_of_magnitude_k(wrn):
    x, y = batch(0.25, 0.75)
    k = 2 * EPS
    eta = n_fgsm.n_fgsm_delta(wrn, x, y, 0.0, k)  # α = 0: δ is the noise itself
    assert eta.abs().max() <= k + 1e-6 and eta.abs().max() > 0.99 * k
    assert eta.abs().mean().item() == pytest.approx(k / 2, rel=0.02)  # |U(−k, k)| has mean k/2
    assert eta.mean().abs() < 0.01 * k
    assert not torch.equal(eta, n_fgsm.n_fgsm_delta(wrn, x, y, 0.0, k))  # drawn anew each call
    assert torch.equal(n_fgsm.n_fgsm_delta(wrn, x, y, 0.0, 0.0), torch.zeros_like(x))
    # k = 0: plain FGSM from x, a step of exactly α on every pixel with a gradient
    step = n_fgsm.n_fgsm_delta(wrn, x, y, EPS, 0.0)
    size = step.abs()
    assert torch.allclose(size[size > 0], torch.full_like(size[size > 0], EPS)) and (size > 0).any()


@pytest.mark.parametrize("train", [True, False])
def test_the_core_runs_in_the_mode_it_finds(wrn, train):
    """The authors' code attacks in train mode: BatchNorm's running statistics take in the noisy pass. In eval mode
    nothing moves them. The mode is left as it was."""
    wrn.train(train)
    x, y = batch()
    n_fgsm.n_fgsm_delta(wrn, x, y, EPS, 2 * EPS)
    assert all(m.training == train for m in wrn.modules())
    bn = next(m for m in wrn.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == (1 if train else 0)


def test_the_core_under_bf16_gives_the_fp32_direction(wrn):
    x, y = batch()
    zero = torch.zeros_like(x)
    fp32 = n_fgsm.n_fgsm_delta(wrn.eval(), x, y, EPS, 0.0, zero)
    low = n_fgsm.n_fgsm_delta(wrn, x, y, EPS, 0.0, zero, autocast=torch.bfloat16)
    assert (low != 0).float().mean() > 0.9 and (low == fp32).float().mean() > 0.9


def test_the_core_refuses_normalised_images(wrn):
    x = (torch.rand(4, 3, 32, 32) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        n_fgsm.n_fgsm_delta(wrn, x, torch.arange(4), EPS, 2 * EPS)


def test_recipes():
    for dataset in ("cifar10", "cifar100"):
        a = n_fgsm.get_args(["--dataset", dataset])
        assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.model) == (
            30,
            128,
            0.2,
            5e-4,
            "preact18",
        )
        assert (a.epsilon, a.alpha, a.noise, a.lr_peak, a.ramp_epochs) == (8, 8, 16, 0.5, 0)
        assert a.lr_schedule == "cyclic"
    # k = 2ε and α = ε follow ε (experiments.sh: --epsilon E --alpha E --unif 2)
    a = n_fgsm.get_args(["--epsilon", "16"])
    assert (a.alpha, a.noise) == (16, 32)
    svhn = n_fgsm.get_args(["--dataset", "svhn"])
    assert (svhn.lr, svhn.lr_peak, svhn.ramp_epochs, svhn.noise) == (0.05, 0.4, 5, 16)
    assert n_fgsm.get_args(["--dataset", "svhn", "--epsilon", "12", "--noise", "36"]).alpha == 12
    imnet = n_fgsm.get_args(["--dataset", "imagenet"])
    assert (imnet.epsilon, imnet.alpha, imnet.noise, imnet.model) == (2, 2, 2, "resnet50")
    # the lr schedule is the recipes' --lr-schedule: the authors' CyclicLR, Wong et al.'s on ImageNet
    assert imnet.lr_schedule == "imagenet"
    for argv in (["--dataset", "svhn"], ["--dataset", "imagenet", "--lr-schedule", "cyclic"]):
        assert n_fgsm.get_args(argv).lr_schedule == "cyclic"


def test_lr_schedule_imagenet_works_on_any_data(tmp_path, no_checksum):
    """ImageNet's schedule is chosen by --lr-schedule imagenet (its recipe sets it), not by the dataset, as in the
    other scripts: on CIFAR-10 it gives imagenet.imagenet_lr's lr (129 images in batches of 128: one step per
    epoch)."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = str(tmp_path / "run")
    small = dict(batch_size=128, monitor_size=8, eval_samples=8, eval_cw_iters=0, eval_iters=1)
    n_fgsm.main(small_args(str(tmp_path / "d"), out, lr_schedule="imagenet", **small))
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = imagenet.imagenet_lr(probe, type("Loader", (), {"batches": lambda self, e: 1})(), 2)
    lrs = []
    for _ in range(2):
        probe.step()
        sched.step()
        lrs.append(probe.param_groups[0]["lr"])
    # the cyclic triangle would end at 0; Wong et al.'s schedule ends at lr/1000
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx(lrs)
    assert lrs[-1] == pytest.approx(0.2 / 1000)


@pytest.mark.parametrize(
    "argv", [["--lr-peak", "1"], ["--dropout", "0.3"], ["--model", "wrn-16-2", "--dropout", "1"]]
)
def test_flags_refused(argv):
    with pytest.raises(SystemExit):
        n_fgsm.get_args(argv)


def test_end_to_end(cifar_dir, tmp_path, no_checksum):
    out = str(tmp_path / "run")
    n_fgsm.main(small_args(cifar_dir, out))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "n_fgsm" and (res["args"]["noise"], res["args"]["alpha"]) == (16, 8)
    rows = res["epochs"]
    # one triangle 0 → 0.2 → 0 peaking half-way: 0.2 after epoch 1, 0 after the last step
    assert [r["lr"] for r in rows] == pytest.approx([0.2, 0.0], abs=1e-12)
    for r in rows:  # the training perturbations reach past ε, within k + α
        assert 8 < r["delta_linf"] <= 24 + 1e-4


def test_the_ramp_and_the_lr_peak(cifar_dir, tmp_path, no_checksum, monkeypatch):
    """SVHN's warm-up (the authors' train.py): ε (so α and k) times min(iteration / ramp, 1), 0 at the first; and
    the lr triangle's peak where --lr-peak puts it (SVHN: 2/5)."""
    seen, real = [], n_fgsm.n_fgsm_delta

    def spy(model, x, y, alpha, k, *a, **kw):
        seen.append((alpha, k))
        return real(model, x, y, alpha, k, *a, **kw)

    monkeypatch.setattr(n_fgsm, "n_fgsm_delta", spy)
    out = str(tmp_path / "run")
    n_fgsm.main(small_args(cifar_dir, out, ramp_epochs=1.5, lr_peak=0.25, eval_iters=1))
    ramp = [min(i / 12, 1.0) for i in range(16)]  # 8 batches per epoch: 12 iterations of ramp
    assert [a for a, _ in seen] == pytest.approx([r * 8 / 255 for r in ramp])
    assert [k for _, k in seen] == pytest.approx([r * 16 / 255 for r in ramp])
    # 16 steps, the peak at 1/4 (step 4): after epoch 1 (step 8) the lr is 0.2·(1 − 4/12), then 0
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx([0.2 * 8 / 12, 0.0])


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    # the cyclic lr and momentum, and the ramp across the interruption
    check_resume("n_fgsm.py", cifar_dir, tmp_path, ramp_epochs=1.5)
