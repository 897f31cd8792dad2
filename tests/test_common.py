"""common.py: each dataset's loading path on files in its real format, the device loader, the networks, the PGD
evaluation, the command line and the run plumbing (resume, checkpoints, the table, the final evaluation)."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    ROOT,
    class_images,
    load_results,
    run_script,
    small_args,
    write_cifar,
    write_mnist,
    write_svhn,
)

import common
import evaluate
import evaluation
import fgsm_rs
import flags
import harness
import plots

# ------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_files_load_exactly(tmp_path, no_checksum, num_classes):
    (xtr, ytr), (xte, yte) = write_cifar(
        str(tmp_path), n_train=50, n_test=20, num_classes=num_classes
    )
    (x, y), (tx, ty), info = common.load_dataset(
        "cifar10" if num_classes == 10 else "cifar100", str(tmp_path)
    )
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8 and info["classes"] == num_classes
    assert torch.equal(x, torch.from_numpy(xtr)) and torch.equal(y, torch.from_numpy(ytr))
    assert torch.equal(tx, torch.from_numpy(xte)) and torch.equal(ty, torch.from_numpy(yte))


def test_svhn_and_mnist_files_load(tmp_path, no_checksum):
    (xtr, ytr), _ = write_svhn(str(tmp_path / "svhn"), n_train=30, n_test=20)
    (x, y), _, _ = common.load_dataset("svhn", str(tmp_path / "svhn"))
    assert torch.equal(x, torch.from_numpy(xtr)) and torch.equal(
        y, torch.from_numpy(ytr)
    )  # .mat's 10 is digit 0
    (xtr, ytr), _ = write_mnist(str(tmp_path / "mnist"), n_train=40, n_test=10)
    (x, y), _, info = common.load_dataset("mnist", str(tmp_path / "mnist"))
    assert (
        x.shape == (40, 1, 28, 28)
        and torch.equal(x, torch.from_numpy(xtr))
        and tuple(info["shape"]) == (1, 28, 28)
    )


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "tiny-imagenet"])
def test_missing_dataset_offline_is_one_clear_line(tmp_path, name, monkeypatch, capsys):
    import urllib.request

    def offline(*a, **k):  # no network: every download attempt fails at once
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: common.load_dataset(name, str(tmp_path / "nowhere")))
    line = capsys.readouterr().err.strip()
    assert (
        err.value.code == 2
        and line.startswith(f"fastat: dataset '{name}' not found")
        and "\n" not in line
    )
    assert str(tmp_path / "nowhere") in line and "'Data layout'" in line


@pytest.fixture
def offline(monkeypatch):
    """No network: every download attempt fails at once, and is counted."""
    import urllib.request

    attempts = []

    def fail(*a, **k):
        attempts.append(a)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    return attempts


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist"])
def test_files_that_fail_the_checksum_are_refused_not_downloaded_over(
    tmp_path, name, offline, capsys
):
    """Test-made files cannot match torchvision's md5 (as a subset or a re-pickled copy cannot): they are
    reported as present and failing the check, and no download is tried over them (was: 'not found ... could
    not be downloaded', after a download attempt)."""
    if name == "svhn":
        write_svhn(str(tmp_path))
        kept = tmp_path / "train_32x32.mat"
    elif name == "mnist":  # no checksum: a file cut short
        write_mnist(str(tmp_path))
        kept = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
        kept.write_bytes(kept.read_bytes()[:5000])
    else:
        write_cifar(str(tmp_path), num_classes=10 if name == "cifar10" else 100)
        kept = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    files = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: common.load_dataset(name, str(tmp_path)))
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line and str(kept) in line
    assert "fails torchvision's checks" in line and "not found" not in line
    assert not offline and sorted(str(p) for p in tmp_path.rglob("*")) == files


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_failed_download_leaves_nothing_behind_and_says_why_in_one_whole_line(
    tmp_path, name, offline, capsys, monkeypatch
):
    """A literal --data-dir DIR (relative, missing) with MNIST left DIR/MNIST/raw behind, and the error line was
    cut at the first line of torchvision's message ('Error downloading train-images-idx3-ubyte.gz:')."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        harness.main_guard(lambda: common.load_dataset(name, os.path.join("DIR", "sub")))
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"fastat: dataset '{name}' not found") and offline
    assert os.listdir(tmp_path) == []  # neither DIR nor DIR/sub/MNIST/raw
    if name == "mnist":  # torchvision's whole message: each mirror tried, and why it failed
        assert line.count("Tried") == 2 and line.count("urlopen error offline") == 2
    # in an existing folder, only what the download made goes
    (tmp_path / "mine.txt").write_text("kept")
    with pytest.raises(SystemExit):
        harness.main_guard(lambda: common.load_dataset(name, "."))
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_one_class_is_refused_and_the_splits_are_counted(tmp_path, no_checksum, log_lines, capsys):
    """A training split of one class scores 100% clean and robust: refused in one line. Otherwise one log line
    gives each split's images and the classes."""
    write_cifar(str(tmp_path), n_train=60, n_test=10)
    common.get_data(_args(str(tmp_path), val_size=15))
    assert "# cifar10: 45 training images, 15 validation images, 10 test images, 10 classes" in (
        log_lines
    )
    write_cifar(str(tmp_path / "one"), n_train=20, n_test=10, num_classes=1)  # cifar-100's format
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: common.get_data(_args(str(tmp_path / "one"), "cifar100")))
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line and "one class" in line


def _args(data_dir, dataset="cifar10", batch_size=16, seed=0, monitor_size=8, val_size=0, **kw):
    return SimpleNamespace(
        dataset=dataset,
        data_dir=data_dir,
        batch_size=batch_size,
        seed=seed,
        workers=0,
        monitor_size=monitor_size,
        val_size=val_size,
        no_flip=False,
        eval_samples=None,
        device="cpu",
        precision="fp32",
        progress_every=0,
        image_size=None,
        phases=None,
        phase_data_dirs=None,
        **kw,
    )


def _find_crop_flip(aug, orig, pad=4):
    """Which (row shift, col shift, flip) of the zero-padded original gives `aug`, if any."""
    padded = F.pad(orig, (pad,) * 4)
    h, w = orig.shape[-2:]
    for flip in (False, True):
        for i in range(2 * pad + 1):
            for j in range(2 * pad + 1):
                crop = padded[:, i : i + h, j : j + w]
                if torch.equal(crop.flip(2) if flip else crop, aug):
                    return i, j, flip
    return None


def test_loader_batches_indices_and_augmentation(tmp_path, no_checksum):
    (full_x, full_y), _ = write_cifar(str(tmp_path), n_train=40, n_test=10)
    full_x, full_y = torch.from_numpy(full_x), torch.from_numpy(full_y)
    data = common.get_data(_args(str(tmp_path)))
    seen, crops = [], set()
    for x, y, idx in data.train.epoch(0):
        assert (
            x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and len(x) == len(y) == len(idx)
        )
        assert (
            0 <= x.min() and x.max() <= 1 and torch.equal(y, full_y[idx])
        )  # labels follow the samples
        for k in range(
            len(y)
        ):  # the augmented image is a crop (+ flip) of exactly the sample idx names
            found = _find_crop_flip((x[k] * 255).round().to(torch.uint8), full_x[idx[k]])
            assert found is not None
            crops.add(found)
        seen += idx.tolist()
    assert sorted(seen) == list(range(40))  # one epoch = each training sample once
    assert len(crops) > 5 and {c[2] for c in crops} == {False, True}  # it does augment
    order0 = torch.cat([i for _, _, i in data.train.epoch(0)])
    assert torch.equal(order0, torch.tensor(seen)) and not torch.equal(
        order0, torch.cat([i for _, _, i in data.train.epoch(1)])
    )


@pytest.mark.parametrize(
    "n,batch,expected", [(129, 128, 1), (128, 128, 1), (130, 128, 2), (33, 16, 2), (5, 16, 1)]
)
def test_len_is_the_number_of_batches_an_epoch_yields(n, batch, expected):
    """A lone last sample is dropped (train-mode BN cannot take it); len() must count only what is yielded, or a
    per-iteration schedule is planned for steps that never run."""
    loader = common.DeviceLoader(
        torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
        torch.zeros(n, dtype=torch.long),
        torch.arange(n),
        batch,
        shuffle=True,
    )
    assert len(loader) == len(list(loader.epoch(0))) == expected
    assert sum(len(y) for _, y, _ in loader.epoch(0)) == n - (n % batch == 1)


def test_loader_prints_progress_without_reading_the_device(log_lines):
    loader = common.DeviceLoader(
        torch.zeros(64, 1, 2, 2, dtype=torch.uint8),
        torch.zeros(64, dtype=torch.long),
        torch.arange(64),
        8,
        shuffle=True,
        progress=1e-9,
    )
    list(loader.epoch(2))
    lines = [line for line in log_lines if line.startswith("# train epoch 3:")]
    assert lines and "images/s" in lines[0] and "ETA" in lines[0] and lines[0].split()[4] == "8/64"


def test_validation_slice_is_disjoint_and_fixed_and_holds_the_monitor(tmp_path, no_checksum):
    write_cifar(str(tmp_path), n_train=60, n_test=10)
    data = common.get_data(_args(str(tmp_path), seed=1, val_size=15))
    val = torch.cat([i for _, _, i in data.val.epoch(0)])
    train = torch.cat([i for e in range(3) for _, _, i in data.train.epoch(e)])
    assert len(val) == 15 == len(set(val.tolist())) and not set(val.tolist()) & set(train.tolist())
    assert set(val.tolist()) | set(train.tolist()) == set(range(60)) and data.train_size == 60
    val_images = (
        data.val.images.float() / 255
    )  # the monitor is a fixed random part of the validation slice
    for xm, ym in zip(*data.monitor):
        rows = [i for i in range(15) if torch.equal(val_images[i], xm)]
        assert rows and data.val.labels[rows[0]] == ym
    other = common.get_data(
        _args(str(tmp_path), seed=7, val_size=15)
    )  # the slice does not depend on --seed
    assert torch.equal(other.val.indices, data.val.indices)
    # None: a tenth of the training images, at most 5,000 (ATLAS's 5,000 of CIFAR's 50,000)
    args = _args(str(tmp_path), val_size=None)
    data = common.get_data(args)
    assert data.val.labels.numel() == 6 == data.val_size and args.val_size is None


def test_loader_draws_the_epoch_up_front_with_the_per_batch_augmentation():
    """The loader makes an epoch's random draws before its first batch (one device copy each); the batches are those
    of a per-batch loop, draw for draw."""
    torch.manual_seed(0)
    n, bs = 2 * 8 + 1, 8  # a lone last sample, which is dropped
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8)
    labels, indices = torch.arange(n) % 3, torch.arange(n) * 10
    loader = common.DeviceLoader(
        images, labels, indices, bs, shuffle=True, crop=2, flip=True, seed=4
    )

    def per_batch(epoch):
        gen = torch.Generator().manual_seed(4 * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        sizes = [8, 8]
        crops = [torch.randint(0, 5, (k, 2), generator=gen) for k in sizes]
        flips = [torch.rand(k, generator=gen) < 0.5 for k in sizes]
        for b, start in enumerate((0, 8)):
            batch = order[start : start + 8]
            x = common.random_crop(images[batch], 2, crops[b])
            yield (
                torch.where(flips[b][:, None, None, None], x.flip(3), x).float() / 255,
                labels[batch],
                indices[batch],
            )

    for epoch in (0, 3):
        got, want = list(loader.epoch(epoch)), list(per_batch(epoch))
        assert len(got) == len(want) == 2
        assert all(torch.equal(u, v) for a, b in zip(got, want) for u, v in zip(a, b))


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 4 * 4).view(2, 1, 4, 4).float()
    out = common.random_crop(x, 2, torch.tensor([[0, 0], [2, 3]]))
    assert torch.equal(out[0, 0, 2:, 2:], x[0, 0, :2, :2]) and (out[0, 0, :2] == 0).all()
    assert torch.equal(out[1, 0, :, :3], x[1, 0, :, 1:]) and (out[1, 0, :, 3] == 0).all()


# ---------------------------------------------------------------------------------------- networks


def _make(name, shape=(3, 32, 32), classes=10):
    return common.make_model(name, classes, shape, (0.5,) * shape[0], (0.25,) * shape[0])


@pytest.mark.parametrize(
    "name,shape,classes",
    [
        ("preact18", (3, 32, 32), 10),
        ("preact18", (3, 64, 64), 200),
        ("wrn-16-2", (3, 32, 32), 100),
        ("wrn-10-1", (1, 28, 28), 10),
        ("mnist-cnn", (1, 28, 28), 10),
        ("lenet", (1, 28, 28), 10),
        ("lenet", (3, 32, 32), 10),
    ],
)
def test_model_output_shapes(name, shape, classes):
    assert _make(name, shape, classes).eval()(torch.rand(2, *shape)).shape == (2, classes)


def test_preact18_matches_wong_architecture_and_wrn_takes_dropout():
    model = _make("preact18")
    # Counted by hand from Wong's preact_resnet.py: stem conv 1,728; stages 147,968 + 525,184 + 2,098,944 +
    # 8,392,192 (BN-conv-BN-conv blocks, 1×1 conv shortcuts without BN); final BN 1,024; linear 5,130.
    assert sum(p.numel() for p in model.parameters()) == 11_172_170 and isinstance(
        model.bn, nn.BatchNorm2d
    )
    wrn = common.make_model("wrn-16-2", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, dropout=0.3)
    assert len(wrn.block1) == 2 and wrn.conv1.out_channels == 16 and wrn.fc.in_features == 128
    assert all(b.dropout == 0.3 for b in wrn.modules() if isinstance(b, common.PreActBlock))


@pytest.mark.parametrize("name,shape", [("mnist-cnn", (3, 32, 32)), ("lenet", (1, 12, 12))])
def test_a_network_that_cannot_take_the_images_is_one_line(name, shape, capsys):
    with pytest.raises(common.FastatError, match=name):
        _make(name, shape)


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    model, plain = _make("wrn-10-1").eval(), _make("wrn-10-1").eval()
    plain.load_state_dict(model.state_dict())
    plain.mean.zero_()
    plain.std.fill_(1)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(x), plain((x - 0.5) / 0.25))
    assert "mean" in model.state_dict()  # travels with the weights


@pytest.mark.parametrize(
    "text,ok",
    [
        ("preact18", True),
        ("wrn-34-10", True),
        ("WRN-16-2", True),
        ("mnist-cnn", True),
        ("wrn-12-2", False),
        ("wrn-16", False),
        ("resnet9", False),
        ("wrn-4-1", False),
    ],
)
def test_model_names(text, ok):
    if ok:
        flags.model_name(text)
    else:
        with pytest.raises(Exception):
            flags.model_name(text)


# ---------------------------------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def trained():
    """A small CNN with BatchNorm trained for a few hundred steps on the class-pattern images (clean accuracy
    ~100%), in eval mode."""
    torch.manual_seed(0)
    x, y = class_images(200, 10, (3, 32, 32), seed=0, noise=60)
    x, y = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:64], y[:64]


def _loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_pgd_stays_in_the_ball_and_pixel_range(trained):
    model, x, y = trained
    for loss in ("ce", "cw"):
        delta, _ = evaluation.attack_pgd(model, x, y, 8 / 255, 2 / 255, 10, restarts=2, loss=loss)
        assert (
            delta.abs().max() <= 8 / 255 + 1e-6
            and (x + delta).min() >= 0
            and (x + delta).max() <= 1
        )


def test_pgd_loss_above_fgsm_above_clean(trained):
    model, x, y = trained
    fgsm, _ = evaluation.attack_pgd(
        model, x, y, 8 / 255, 8 / 255, 1, rand_init=False
    )  # one FGSM step
    pgd, _ = evaluation.attack_pgd(model, x, y, 8 / 255, 2 / 255, 20)
    assert (
        _loss(model, x, y).mean()
        < _loss(model, x + fgsm, y).mean()
        < _loss(model, x + pgd, y).mean()
    )


def test_more_restarts_never_lower_the_per_sample_loss(trained):
    model, x, y = trained
    losses, robust = [], []
    for restarts in (1, 3):
        torch.manual_seed(5)  # the first restart of the 3-restart run is the 1-restart run
        delta, ok = evaluation.attack_pgd(model, x, y, 12 / 255, 2 / 255, 5, restarts=restarts)
        losses.append(_loss(model, x + delta, y))
        robust.append(ok)
    assert (losses[1] >= losses[0] - 1e-6).all() and (losses[1] > losses[0] + 1e-4).any()
    assert (robust[1] <= robust[0]).all()  # a sample counts as robust only if every restart failed


def test_pgd_restarts_keep_the_best_without_a_host_sync(trained):
    """The per-sample choice of the best restart is a torch.where, not boolean-mask indexing (whose data-dependent
    size makes the host wait for a GPU; LAS-AT runs this attack in its training loop)."""
    from torch.profiler import ProfilerActivity, profile

    model, x, y = trained
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluation.attack_pgd(model, x, y, 8 / 255, 2 / 255, 2, restarts=3)
    names = {e.name for e in prof.events()}
    assert "aten::where" in names and not names & {
        "aten::nonzero",
        "aten::masked_select",
        "aten::index_put_",
    }


def test_cw_margin_and_its_attack(trained):
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    torch.testing.assert_close(
        evaluation.cw_margin(logits, torch.tensor([1, 0])), torch.tensor([-3.0, 3.0])
    )
    model, x, y = trained
    before = evaluation.cw_margin(model(x), y)
    delta, ok = evaluation.attack_pgd(model, x, y, 8 / 255, 2 / 255, 10, loss="cw")
    with torch.no_grad():
        after = evaluation.cw_margin(model(x + delta), y)
    assert after.mean() > before.mean() + 0.5 and torch.equal(ok, after <= 0)


def _bn_state(model):
    return {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluation_helpers_restore_the_mode_and_leave_bn_alone(
    trained, mode, tmp_path, monkeypatch
):
    """pgd_correct, evaluate, autoattack_correct and the per-epoch monitor hand the model back in its mode, with
    its BN running statistics untouched."""
    model, x, y = trained
    model.train(mode == "train")
    bn = _bn_state(model)
    clean = evaluation.pgd_correct(model, x, y, 8 / 255, 2 / 255, 0)
    evaluation.pgd_correct(model, (x * 255).to(torch.uint8), y, 48 / 255, 8 / 255, 3, batch_size=20)
    evaluation.evaluate(model, (x[:8] * 255).to(torch.uint8), y[:8], 8 / 255, 2, 1, 2)
    _fake_autoattack(monkeypatch, lambda x: x)
    evaluation.autoattack_correct(model, x[:8], y[:8], 8 / 255, 10)
    run = harness.Run(_run_args(tmp_path, epochs=1), _tiny_data(x, y))
    run.start_epoch()
    run.end_epoch(0, model, {}, lr=0.1, loss=1.0, acc=0.5)
    assert model.training == (mode == "train")
    assert all(torch.equal(v, _bn_state(model)[k]) for k, v in bn.items())
    with torch.no_grad(), evaluation.eval_mode(model):
        assert torch.equal(clean, model(x).argmax(1) == y)


def test_pgd_correct_counts_batch_by_batch_as_one_attack(trained):
    model, x, y = trained
    torch.manual_seed(1)
    robust = evaluation.pgd_correct(model, x, y, 48 / 255, 8 / 255, 10, batch_size=20)
    torch.manual_seed(1)  # the same attack batch by batch gives the same mask
    direct = torch.cat(
        [
            evaluation.attack_pgd(model, x[i : i + 20], y[i : i + 20], 48 / 255, 8 / 255, 10)[1]
            for i in range(0, len(y), 20)
        ]
    )
    assert torch.equal(robust, direct) and robust.float().mean() < 1


def test_input_grad_only_gives_the_input_gradient_and_no_weight_gradient(trained):
    model, x, y = trained
    view = common.InputGradOnly(model)
    xr = x.clone().requires_grad_(True)
    out = view(xr)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y), xr)
    xr2 = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(model(xr2), y), xr2)
    torch.testing.assert_close(grad, expected)
    assert all(p.requires_grad for p in model.parameters())  # handed back as found
    model.zero_grad(set_to_none=True)
    F.cross_entropy(view(x.clone().requires_grad_(True)), y).backward()  # the graph reaches x only
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "eps,iters,dataset,expected",
    [
        (8, 50, "cifar10", 2),
        (16, 50, "cifar10", 4),
        (8, 3, "cifar10", 4),
        (76.5, 50, "mnist", 2.55),
        (76.5, 20, "mnist", 76.5 * 1.5 / 20),
    ],
)
def test_the_evaluation_step_follows_epsilon(eps, iters, dataset, expected):
    """2/255 at ε = 8/255 (MNIST: 0.01 at 0.3), in proportion to ε, and long enough for iters steps to cross the
    ball (a fixed 2/255 for PGD-3 at ε = 8/255 could not reach its surface)."""
    assert math.isclose(255 * evaluation.eval_step(eps / 255, iters, dataset), expected)


def _fake_autoattack(monkeypatch, attack, seen=None):
    """A stand-in `autoattack` package with the official API: records the configuration it was run with."""

    class AutoAttack:
        def __init__(
            self,
            model,
            norm,
            eps,
            seed=None,
            version="standard",
            device=None,
            verbose=True,
            attacks_to_run=(),
        ):
            self.attacks_to_run = list(attacks_to_run) or ["apgd-ce", "apgd-t", "fab-t", "square"]
            self.version = version
            self.apgd, self.square = SimpleNamespace(n_restarts=5), SimpleNamespace(n_queries=5000)
            self.apgd_targeted, self.fab = (
                SimpleNamespace(n_target_classes=9),
                SimpleNamespace(n_target_classes=9),
            )

        def run_standard_evaluation(self, x, y, bs=250):
            if seen is not None:
                seen.append(self)
            return attack(x)

    monkeypatch.setitem(sys.modules, "autoattack", SimpleNamespace(AutoAttack=AutoAttack))


@pytest.mark.parametrize(
    "classes,attacks,targets",
    [
        (10, ["apgd-ce", "apgd-t", "fab-t", "square"], 9),
        (5, ["apgd-ce", "apgd-t", "fab-t", "square"], 4),
        (3, ["apgd-ce", "square"], None),
    ],
)
def test_autoattack_runs_the_attacks_defined_for_the_class_count(
    classes, attacks, targets, monkeypatch
):
    """The official package's targeted attacks take 9 target classes and its DLR losses need 3 and 4 classes:
    with fewer classes it crashed after training had ended."""
    seen = []
    _fake_autoattack(monkeypatch, lambda x: x, seen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, classes))
    mask, ran = evaluation.autoattack_correct(
        model, torch.rand(4, 3, 2, 2), torch.arange(4) % classes, 8 / 255, classes
    )
    assert ran == attacks and mask.shape == (4,)
    if targets:
        assert seen[0].apgd_targeted.n_target_classes == seen[0].fab.n_target_classes == targets
    else:
        assert seen[0].version == "custom" and seen[0].apgd.n_restarts == 1


def test_worst_case_is_the_per_sample_and_of_every_attack(trained, monkeypatch):
    model, x, y = trained
    torch.manual_seed(0)
    res = evaluation.evaluate(model, x, y, 16 / 255, 5, 1, 5)
    assert res["worst_case"] <= min(res["clean"], res["pgd5_1"], res["cw5"])
    # two attacks that fail on different samples: the worst case is below both
    fake = {
        "ce": torch.tensor([True, False, True, True]),
        "cw": torch.tensor([True, True, False, True]),
    }
    monkeypatch.setattr(
        evaluation,
        "pgd_correct",
        lambda m, x, y, e, s, iters, r=1, loss="ce", **k: (
            torch.ones(4, dtype=torch.bool) if iters == 0 else fake[loss]
        ),
    )
    res = evaluation.evaluate(model, x[:4], y[:4], 8 / 255, 2, 1, 2)
    assert (res["pgd2_1"], res["cw2"], res["worst_case"]) == (0.75, 0.75, 0.5)


# ------------------------------------------------------------------------------ command line


def test_recipe_defaults_help_and_mnist_recipe(capsys):
    a = fgsm_rs.get_args([])
    assert (a.dataset, a.model, a.epochs, a.batch_size, a.lr, a.epsilon, a.alpha) == (
        "cifar10",
        "preact18",
        15,
        128,
        0.2,
        8,
        10,
    )
    m = fgsm_rs.get_args(["--dataset", "mnist"])
    assert (m.model, m.epochs, m.batch_size, m.lr, m.epsilon, m.alpha, m.optimizer) == (
        "mnist-cnn",
        10,
        100,
        5e-3,
        76.5,
        95.625,
        "adam",
    )
    assert (
        fgsm_rs.get_args(["--dataset", "mnist", "--epochs", "3"]).epochs == 3
    )  # a flag beats the recipe
    with pytest.raises(SystemExit):
        fgsm_rs.get_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 15; mnist recipe 10; imagenet recipe 15)" in text
    assert "recipe default" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--epsilon", "-1"],
        ["--epochs", "0"],
        ["--dataset", "imagenet1k"],
        ["--model", "wrn-15-2"],
        ["--batch-size", "1"],
        ["--lr", "nan"],
        ["--lr-max", "0.1"],
        ["--device", "cuda:7"],
        ["--device", "gpu0"],
    ],
)
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as err:
        fgsm_rs.get_args(argv)
    assert err.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script",
    [
        "fgsm_rs",
        "fgsm_sdi",
        "fgsm_mep",
        "atlas",
        "amata",
        "las_at",
        "latent_at",
        "rmcla",
        "evaluate",
    ],
)
def test_an_epsilon_under_one_is_refused_with_what_to_write(script, capsys):
    """--epsilon is in /255 units: 0.3 (MNIST, as papers write it) trained and evaluated silently at 0.3/255."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as err:
        (module.main if script == "evaluate" else module.get_args)(
            ["--weights", "w.pt"] * (script == "evaluate") + ["--epsilon", "0.3"]
        )
    assert err.value.code == 2 and "--epsilon 76.5" in capsys.readouterr().err


def test_bad_argument_and_missing_dataset_by_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "fgsm_rs.py", "--epsilon", "-8"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--epsilon" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "fgsm_rs.py",
            "--data-dir",
            str(tmp_path / "empty"),
            "--device",
            "cpu",
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        proc.returncode == 2
        and "Traceback" not in proc.stderr
        and last.startswith("fastat: dataset 'cifar10'")
    )
    assert not out.exists()  # a failed start leaves no run folder behind


def test_logged_command_line_reproduces_the_arguments():
    args = fgsm_rs.get_args(
        ["--dataset", "mnist", "--early-stop", "--epochs", "3", "--data-dir", "d"]
    )
    assert vars(fgsm_rs.get_args(flags.command_line(args).split())) == vars(args)


def test_alpha_follows_epsilon_unless_given():
    import fgsm_sdi

    assert (
        fgsm_rs.get_args([]).alpha == 10 and fgsm_rs.get_args(["--epsilon", "16"]).alpha == 20
    )  # α = 1.25ε
    assert fgsm_rs.get_args(["--epsilon", "16", "--alpha", "4"]).alpha == 4  # an explicit α wins
    assert fgsm_sdi.get_args(["--epsilon", "4"]).alpha == 4  # SDI: α = ε
    assert math.isclose(
        fgsm_rs.get_args(["--dataset", "mnist", "--epsilon", "25.5"]).alpha, 25.5 * 1.25
    )
    assert "--alpha 20.0" in flags.command_line(fgsm_rs.get_args(["--epsilon", "16"]))


def test_true_prob_is_converted_and_checked_once(capsys):
    assert flags.smoothing_of(None, 10) == 0
    assert math.isclose(flags.smoothing_of(0.5, 10), 0.5 * 10 / 9)  # 1 − s + s/C = 0.5
    assert flags.smoothing_of(1.0, 10) == 0  # hard labels
    # 1/C (uniform labels) and below leave no signal; one class leaves no other class (C − 1 = 0)
    for true_prob, classes in ((0.05, 10), (0.1, 10), (0.5, 2), (1.0, 1)):
        with pytest.raises(common.FastatError, match="--true-prob"):
            flags.smoothing_of(true_prob, classes)


# ------------------------------------------------------------------------------ runs


def _run_args(out_dir, **kw):
    base = dict(
        method="test",
        out_dir=str(out_dir),
        resume=False,
        seed=0,
        device="cpu",
        precision="fp32",
        epsilon=8,
        epochs=3,
        batch_size=8,
        dataset="cifar10",
        model="wrn-10-1",
        eval_iters=2,
        eval_restarts=1,
        eval_cw_iters=2,
        autoattack=False,
        progress_every=0,
    )
    return SimpleNamespace(**{**base, **kw})


def _tiny_data(x=None, y=None):
    x = torch.rand(8, 3, 32, 32) if x is None else x
    y = torch.arange(len(x)) % 10 if y is None else y
    return SimpleNamespace(
        monitor=(x, y),
        test_x=(x * 255).to(torch.uint8),
        test_y=y,
        test_size=len(y),
        num_classes=10,
        class_names=[f"c{i}" for i in range(10)],
        shape=(3, 32, 32),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        train_images=len(y),
        val_size=0,
        eval_batch=4,
    )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _make("wrn-10-1")
    run = harness.Run(_run_args(tmp_path), _tiny_data())
    checkpoint = {"model": model}
    run.start_epoch()
    run.end_epoch(0, model, checkpoint, lr=0.1, loss=1.5, acc=0.3)
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    run.start_epoch()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(harness.NonFiniteLoss):
        run.end_epoch(1, model, checkpoint, lr=0.1, loss=float("nan"), acc=0.1)
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["epoch"] == 1 and torch.equal(
        kept["objects"]["model"]["fc.weight"], good["objects"]["model"]["fc.weight"]
    )
    log = (tmp_path / "log.txt").read_text()
    assert "training loss is nan" in log and "new run with a lower --lr" in log
    assert "the checkpoint of epoch 1 is intact" in log  # the one there is


def test_non_finite_loss_by_subprocess(cifar_dir, tmp_path):
    out = str(tmp_path / "nan")
    proc = run_script("fgsm_rs.py", small_args(cifar_dir, out, epochs=2, lr=1e30), expect=3)
    assert "training loss is" in proc.stdout and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "results.json"))
    # the loss is not finite in epoch 1: no checkpoint exists, and the line says so (not "epoch 0's")
    assert "no checkpoint was written" in proc.stdout and "epoch 0" not in proc.stdout


def test_checkpoints_are_flushed_to_the_disk_before_they_replace_the_last_one(
    tmp_path, monkeypatch
):
    """After a power loss a renamed-but-unsynced checkpoint can name data that never reached the disk."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b)
    )
    run = harness.Run(_run_args(tmp_path, epochs=1), _tiny_data())
    run.start_epoch()
    run.end_epoch(0, _make("wrn-10-1"), {"model": _make("wrn-10-1")}, lr=0.1, loss=1.0, acc=0.5)
    tmp = str(tmp_path / "checkpoint.pt.tmp")
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert events[events.index(("replace", tmp)) + 1] == (
        "fsync",
        str(tmp_path),
    )  # and the rename itself


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: harness.Run(_run_args(tmp_path), _tiny_data()))
    assert err.value.code == 2 and "--resume" in capsys.readouterr().err


def test_a_one_class_model_is_never_the_best(tmp_path):
    class OneClass(
        nn.Module
    ):  # predicts class 3 for every image but is "robust" on class 3's images
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return (
                F.one_hot(torch.full((len(x),), 3), 10).float() * 10 + self.w * x.flatten(1)[:, :10]
            )

    torch.manual_seed(0)
    good = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 10)
    )  # random weights: varied predictions
    run = harness.Run(_run_args(tmp_path, epochs=2), _tiny_data())
    run.start_epoch()
    run.end_epoch(0, good, {}, lr=0.1, loss=1.0, acc=0.5, score=0.1)
    run.start_epoch()
    run.end_epoch(
        1, OneClass(), {}, lr=0.1, loss=1.0, acc=0.5, score=0.9
    )  # a higher score, one class
    assert (
        run.best["epoch"] == 1
        and "not eligible as the best model" in (tmp_path / "log.txt").read_text()
    )


def test_the_monitor_runs_in_ordinary_batches_and_has_its_own_column(tmp_path, monkeypatch):
    sizes, real = [], evaluation.pgd_correct
    monkeypatch.setattr(
        evaluation,
        "pgd_correct",
        lambda *a, **k: sizes.append(k.get("batch_size")) or real(*a, **k),
    )
    run = harness.Run(_run_args(tmp_path, epochs=1, batch_size=4), _tiny_data())  # eval_batch 4
    run.start_epoch()
    run.end_epoch(0, _make("wrn-10-1"), {}, lr=0.1, loss=1.0, acc=0.5)
    assert sizes == [4] and run.rows[0]["monitor_s"] > 0
    lines = (tmp_path / "log.txt").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if "monitor_s" in line)
    first_row = next(i for i, line in enumerate(lines) if line.split()[0] == "1")
    assert header < first_row  # the header, before the first row, after the monitor's cost
    assert any(
        line.startswith("# monitor: PGD-10 (step ε/4) on 8 training images")
        for line in lines[:header]
    )


def test_weights_are_written_before_the_evaluation(tmp_path, monkeypatch):
    """An evaluation that fails (AutoAttack on a dataset it cannot attack, a lost GPU) must not lose the model."""

    def broken(*a, **k):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    model = _make("wrn-10-1")
    run = harness.Run(_run_args(tmp_path, epochs=1), _tiny_data())
    run.start_epoch()
    run.end_epoch(0, model, {"model": model}, lr=0.1, loss=1.0, acc=0.5)
    with pytest.raises(RuntimeError):
        run.finish(model)
    assert (tmp_path / "model_last.pt").exists() and (tmp_path / "model_best.pt").exists()
    loaded, res = evaluate.load_model(
        str(tmp_path / "model_best.pt")
    )  # results.json says how to load them
    assert res["final"] is None and loaded(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_resume_needs_only_the_folder_and_refuses_changed_training_flags(
    cifar_dir, tmp_path, no_checksum, capsys
):
    out = str(tmp_path / "run")
    args = small_args(cifar_dir, out, epochs=2)
    fgsm_rs.main(args)
    first = load_results(out)
    os.remove(os.path.join(out, "results.json"))  # as if interrupted during the final evaluation
    # --resume --out-dir alone restores every flag (no --model, no --dataset: no state-dict error, no download)
    fgsm_rs.main(["--resume", "--out-dir", out, "--eval-samples", "8"])
    again = load_results(out)
    assert again["args"]["model"] == "wrn-10-1" and again["args"]["eval_samples"] == 8
    assert again["epochs"] == first["epochs"]  # nothing was trained again
    capsys.readouterr()
    # a finished run says so instead of evaluating again
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: fgsm_rs.get_args(["--resume", "--out-dir", out]))
    assert err.value.code == 0 and "finished run" in capsys.readouterr().out
    # a flag that would change the training is refused: a resumed run keeps its schedule, and never records a
    # value it did not use
    os.remove(os.path.join(out, "results.json"))
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: fgsm_rs.get_args(["--resume", "--out-dir", out, "--lr", "0.05"]))
    assert (
        err.value.code == 2
        and "--lr 0.05: this run was started with 0.2" in capsys.readouterr().err
    )


def test_resume_from_an_older_checkpoint_marks_the_discarded_rows(tmp_path):
    model = _make("wrn-10-1")
    run = harness.Run(_run_args(tmp_path, epochs=3), _tiny_data())
    for epoch in range(2):
        run.start_epoch()
        run.end_epoch(epoch, model, {"model": model}, lr=0.1, loss=1.0, acc=0.5, save=epoch == 0)
    harness._end_previous_run()  # the process dies here: epoch 2's row is logged but not checkpointed
    again = harness.Run(_run_args(tmp_path, epochs=3, resume=True), _tiny_data())
    assert again.resume({"model": model}) == 1 and len(again.rows) == 1
    assert (
        "the rows of epochs 2-2 above were not checkpointed: discarded"
        in (tmp_path / "log.txt").read_text()
    )
    harness._end_previous_run()


def test_eval_command_reproduces_the_final_evaluation(cifar_dir, tmp_path, no_checksum):
    out = str(tmp_path / "run")
    fgsm_rs.main(small_args(cifar_dir, out, epochs=1))
    final = load_results(out)["final"]["last"]
    again = evaluate.main(
        [
            "--weights",
            os.path.join(out, "model_last.pt"),
            "--eval-samples",
            "32",
            "--eval-iters",
            "3",
            "--eval-restarts",
            "1",
            "--eval-cw-iters",
            "3",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["results"] == again == final


def test_plot_has_a_panel_per_numeric_column(tmp_path):
    rows = [
        {"epoch": e, "seconds": 1.0, "loss": 2.0 - e / 10, "acc": 0.1 * e, "k": e, "r": None}
        for e in (1, 2, 3)
    ]
    plots.plot_curves(rows, str(tmp_path / "c.png"))
    from PIL import Image

    w, h = Image.open(tmp_path / "c.png").size
    assert math.isclose(w / h, 13 / 6.4, rel_tol=0.05)  # 4 panels on a 2×3 grid


def test_autoattack_without_the_package_is_refused_before_training(monkeypatch, capsys):
    monkeypatch.setitem(
        sys.modules, "autoattack", None
    )  # makes `import autoattack` raise ImportError
    with pytest.raises(SystemExit) as err:
        fgsm_rs.get_args(["--autoattack"])
    assert (
        err.value.code == 2
        and "pip install git+https://github.com/fra31/auto-attack" in capsys.readouterr().err
    )


def test_a_checkpoint_holds_and_restores_the_rng_of_its_own_gpu_only(tmp_path, monkeypatch):
    """A run resumed on a machine with fewer GPUs failed: every visible GPU's RNG state was saved and restored by
    index. Only the run's own device's state is kept (CUDA faked: the calls are recorded)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every GPU's RNG state")
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set every GPU's RNG state")
    )
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device="cuda": (
            calls.append(("get", str(device))) or torch.tensor([7], dtype=torch.uint8)
        ),
    )
    monkeypatch.setattr(
        torch.cuda,
        "set_rng_state",
        lambda state, device="cuda": calls.append(("set", str(device), state.tolist())),
    )
    model = _make("wrn-10-1")
    run = harness.Run(_run_args(tmp_path, device="cuda:1"), _tiny_data())
    run.start_epoch()
    run.end_epoch(0, model, {"model": model}, lr=0.1, loss=1.0, acc=0.5)
    harness._end_previous_run()
    monkeypatch.setattr(
        torch,
        "load",
        lambda *a, map_location=None, **k: torch.serialization.load(*a, map_location="cpu", **k),
    )  # no GPU here to map the tensors to
    again = harness.Run(_run_args(tmp_path, device="cuda:0", resume=True), _tiny_data())
    again.resume({"model": model})
    harness._end_previous_run()
    assert calls == [("get", "cuda:1"), ("set", "cuda:0", [7])]
