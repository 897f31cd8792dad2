"""fgsm_ckpt.py: its copyable core on a model whose decision boundary is known (every checkpoint case of Algorithm 1),
the eval-mode passes, the recipe, and the script end to end (in-process, tiny CIFAR-10, small WRN)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar

import common
import evaluation
import fgsm_ckpt

EPS = 8 / 255
ALPHA = 10 / 255


class Interval(nn.Module):
    """Two classes: class 1 where the image's mean lies within `w` of `tau`, class 0 elsewhere. Below tau the CE of
    class 0 rises with every pixel, so the FGSM step adds ε to every pixel, and which checkpoint x + k·p/c falls into
    the interval is known beforehand: a "distorted interval" (Kim et al., Fig. 1) placed at will."""

    def __init__(self, tau, w):
        super().__init__()
        self.tau = tau
        self.w = w

    def forward(self, x):
        z = self.w - (x.mean((1, 2, 3)) - self.tau).abs()
        return torch.stack([torch.zeros_like(z), z], 1)


def constant_images(means):
    return torch.stack([torch.full((3, 8, 8), m) for m in means])


# (image mean, start η, expected k): τ = 0.5, interval half-width ε/6, c = 3, checkpoints at +ε/3, +2ε/3, +ε
CASES = {
    "first checkpoint wrong": (0.5 - EPS / 3, 0.0, 1),
    "second wrong, full step right (distorted)": (0.5 - 2 * EPS / 3, 0.0, 2),
    "only the full step wrong": (0.5 - EPS, 0.0, 3),
    "none wrong": (0.5 - 2 * EPS, 0.0, 3),
    "wrong at the start (= x)": (0.5, 0.0, 0),
    "right at x, wrong at the start": (0.5 - 0.6 * EPS, 0.6 * EPS, 0),
    "wrong at x, right at the start": (0.5, -0.5 * EPS, 3),
}


def test_the_core_copies_and_trains_each_sample_on_its_smallest_misclassified_checkpoint():
    fgsm_ckpt_input = copy_of(fgsm_ckpt.fgsm_ckpt_input)  # defined again with torch alone
    model = Interval(0.5, EPS / 6)
    means, starts, expected = zip(*CASES.values())
    x = constant_images(means)
    y = torch.zeros(len(x), dtype=torch.long)
    start = constant_images(starts)
    x_train, k = fgsm_ckpt_input(model, x, y, EPS, ALPHA, 3, start)
    assert k.tolist() == list(expected), dict(zip(CASES, k.tolist()))
    # each x' written out: the FGSM point from x + η (every pixel up: sign +1), projected; p = x_fgsm − x
    x0 = (x + start).clamp(0, 1)
    x_fgsm = (x + (x0 + ALPHA - x).clamp(-EPS, EPS)).clamp(0, 1)
    p = x_fgsm - x
    for i, name in enumerate(CASES):
        want = {0: x[i], 1: x[i] + 1 * (p[i] / 3), 2: x[i] + 2 * (p[i] / 3), 3: x_fgsm[i]}
        assert torch.equal(x_train[i], want[k[i].item()]), name
    pred = model(x_train).argmax(1)
    # the chosen checkpoint is misclassified, except the full step when nothing was (and the clean fallback)
    assert pred.tolist() == [1, 1, 1, 0, 1, 0, 0]
    assert (x_train - x).abs().max() <= EPS + 1e-6 and x_train.min() >= 0 and x_train.max() <= 1


def test_of_several_misclassified_checkpoints_the_smallest():
    # a wider interval (half-width ε/2): from 0.5 − ε/2 the checkpoints at +ε/3 and +2ε/3 are both in it
    model = Interval(0.5, EPS / 2)
    x = constant_images([0.5 - EPS / 2])
    y = torch.zeros(1, dtype=torch.long)
    _, k = fgsm_ckpt.fgsm_ckpt_input(model, x, y, EPS, ALPHA, 3, torch.zeros_like(x))
    assert k.tolist() == [1]


def test_one_checkpoint_is_fgsm_rs_with_the_clean_fallback():
    model = Interval(0.5, EPS / 6)
    means, starts, _ = zip(*CASES.values())
    x, start = constant_images(means), constant_images(starts)
    y = torch.zeros(len(x), dtype=torch.long)
    x_train, k = fgsm_ckpt.fgsm_ckpt_input(model, x, y, EPS, ALPHA, 1, start)
    x3, k3 = fgsm_ckpt.fgsm_ckpt_input(model, x, y, EPS, ALPHA, 3, start)
    assert k.tolist() == [0 if v == 0 else 1 for v in k3.tolist()]
    full = k3 == 3
    assert torch.equal(x_train[full], x3[full])  # the full step, for the samples c = 3 takes it for
    assert torch.equal(x_train[k == 0], x[k == 0])


@pytest.fixture
def wrn():
    torch.manual_seed(0)
    return common.make_model("wrn-10-1", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def labelled_batch(model):
    """Random images labelled with the model's own predictions (most start correct), a quarter relabelled."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 32, 32, generator=gen)
    with torch.no_grad(), evaluation.eval_mode(model):
        y = model(x).argmax(1)
    y[:16] = (y[:16] + 1) % 10
    return x, y


def test_the_checkpoint_rule_holds_on_a_network(wrn):
    """For every sample: x' is x, a checkpoint or the FGSM point, and the smallest misclassified one, as the model
    (eval mode) sees them; checked against the checkpoints formed here from the core's FGSM point."""
    x, y = labelled_batch(wrn)
    start = torch.empty_like(x).uniform_(-EPS, EPS)
    x_train, k = fgsm_ckpt.fgsm_ckpt_input(wrn, x, y, EPS, ALPHA, 3, start)
    assert len(set(k.tolist())) >= 3  # the batch exercises several cases
    x0 = (x + start).clamp(0, 1).requires_grad_(True)
    with evaluation.eval_mode(wrn):
        logits = wrn(x0)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x0)
        x_fgsm = (x + (x0.detach() + ALPHA * grad.sign() - x).clamp(-EPS, EPS)).clamp(0, 1)
        p = x_fgsm - x
        with torch.no_grad():
            right = [wrn(x + j * (p / 3)).argmax(1) == y for j in (1, 2)]
    right_at_start = logits.argmax(1) == y
    for i in range(len(y)):
        if not right_at_start[i]:
            assert k[i] == 0 and torch.equal(x_train[i], x[i])
            continue
        j = next((j for j in (1, 2) if not right[j - 1][i]), 3)
        assert k[i] == j
        assert torch.equal(x_train[i], x_fgsm[i] if j == 3 else x[i] + j * (p[i] / 3))


@pytest.mark.parametrize("train", [True, False])
def test_the_passes_run_in_eval_mode_and_leave_batchnorm_alone(wrn, train):
    """The authors' attack (torchattacks) and their checkpoint search run in eval mode: BatchNorm's running statistics
    come from the weight step's pass alone, and the model is handed back in its mode."""
    wrn.train(train)
    before = {n: v.clone() for n, v in wrn.state_dict().items()}
    x, y = labelled_batch(wrn)
    fgsm_ckpt.fgsm_ckpt_input(wrn, x, y, EPS, ALPHA, 3)
    assert all(m.training == train for m in wrn.modules())
    assert all(torch.equal(v, before[n]) for n, v in wrn.state_dict().items())
    assert all(p.grad is None for p in wrn.parameters())  # input gradients only


def test_the_core_under_bf16_keeps_the_images_dtype(wrn):
    x, y = labelled_batch(wrn)
    x_train, k = fgsm_ckpt.fgsm_ckpt_input(wrn, x, y, EPS, ALPHA, 3, autocast=torch.bfloat16)
    assert x_train.dtype == x.dtype and k.dtype == torch.int64
    assert (x_train - x).abs().max() <= EPS + 1e-6 and 0 <= x_train.min() <= x_train.max() <= 1


def test_the_core_refuses_normalised_images(wrn):
    x = (torch.rand(4, 3, 32, 32) - 0.5) / 0.25
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        fgsm_ckpt.fgsm_ckpt_input(wrn, x, torch.arange(4), EPS, ALPHA)


def test_recipe_is_the_authors_stepwise_run():
    a = fgsm_ckpt.get_args([])
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay) == (200, 128, 0.01, 5e-4)
    assert (a.lr_schedule, a.milestones, a.checkpoints) == ("multistep", [60, 120, 160], 3)
    assert (a.epsilon, a.alpha, a.model) == (8, 10, "preact18")
    assert fgsm_ckpt.get_args(["--epsilon", "16"]).alpha == 20  # α = 1.25ε follows ε
    cyclic = fgsm_ckpt.get_args(["--lr-schedule", "cyclic", "--epochs", "30", "--lr", "0.3"])
    assert (cyclic.lr_schedule, cyclic.epochs, cyclic.lr) == ("cyclic", 30, 0.3)


@pytest.mark.parametrize(
    "argv, message",
    [
        # the recipe's 60, 120, 160 would never act in 30 epochs: flags.milestones' one wording, suggesting the
        # recipe's drops (0.3, 0.6 and 0.8 of the run) for this run
        (
            ["--epochs", "30"],
            "the recipe's milestones 60 120 160: 60 is not below --epochs 30, so the lr would",
        ),
        (["--epochs", "30"], "e.g. --milestones 9 18 24;"),
        (["--epochs", "30", "--milestones", "10", "30"], "--milestones 10 30: 30 is not below"),
    ],
)
def test_milestones_past_the_run_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        fgsm_ckpt.get_args(argv)
    assert err.value.code == 2 and message in " ".join(capsys.readouterr().err.split())
    assert fgsm_ckpt.get_args(["--epochs", "30", "--milestones"]).milestones == []
    # the cyclic schedule has no drops: the recipe's milestones are not checked
    assert fgsm_ckpt.get_args(["--epochs", "30", "--lr-schedule", "cyclic"])


def test_milestones_on_one_epoch_drop_the_lr_at_once_and_say_so(tmp_path, no_checksum):
    """--milestones 1 1 in 2 epochs: both drops come after epoch 1 (×0.01), and the log says so in flags.milestones'
    one line (129 images in batches of 128: one batch per epoch)."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = tmp_path / "run"
    short = dict(batch_size=128, checkpoints=2, monitor_size=8, eval_samples=8)
    fgsm_ckpt.main(
        small_args(str(tmp_path / "d"), str(out), eval_iters=1, eval_cw_iters=0, **short)
        + ["--milestones", "1", "1"]
    )
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx([0.01, 0.0001])
    notes = [line for line in (out / "log.txt").read_text().splitlines() if "at once" in line]
    assert notes == [
        "# milestones 1 1: lr drops at once, 2 after epoch 1 (×0.1 each); the run is too short "
        "to space them"
    ]


def test_end_to_end_cyclic(cifar_dir, tmp_path, no_checksum):
    out = str(tmp_path / "run")
    fgsm_ckpt.main(small_args(cifar_dir, out, lr_schedule="cyclic", lr=0.3))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "fgsm_ckpt" and res["args"]["checkpoints"] == 3
    rows = res["epochs"]
    # one triangle over the run: the peak after epoch 1, 0 after the last step
    assert [r["lr"] for r in rows] == pytest.approx([0.3, 0.0], abs=1e-12)
    for r in rows:
        assert 0 <= r["at_clean"] <= 1 and 0 <= r["at_full"] <= 1
        assert r["at_clean"] + r["at_full"] <= 1


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    # the multistep schedule (a milestone after epoch 1) is in the checkpoint
    a, _ = check_resume("fgsm_ckpt.py", cifar_dir, tmp_path, milestones=1)
    assert [r["lr"] for r in a["epochs"]] == pytest.approx([0.01, 0.001])


def test_results_name_the_recipe(cifar_dir, tmp_path, no_checksum):
    out = str(tmp_path / "run")
    fgsm_ckpt.main(small_args(cifar_dir, out, epochs=1, milestones=True, checkpoints=2))
    res = load_results(out)
    assert res["args"]["milestones"] == [] and res["args"]["checkpoints"] == 2
