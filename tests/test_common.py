"""common.py: each dataset's loading path on files in its real format, the device loader, the models,
the PGD evaluation, the command line and the run plumbing."""
import argparse
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import (ROOT, class_images, load_results, run_script, small_args, write_cifar, write_mnist,
                      write_svhn, write_tiny_imagenet)

# ------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_files_load_exactly(tmp_path, no_checksum, num_classes):
    (xtr, ytr), (xte, yte) = write_cifar(str(tmp_path), n_train=50, n_test=20, num_classes=num_classes)
    name = "cifar10" if num_classes == 10 else "cifar100"
    x, y = common.load_split(name, str(tmp_path), train=True)
    assert x.shape == (50, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, xtr)
    np.testing.assert_array_equal(y, ytr)
    x, y = common.load_split(name, str(tmp_path), train=False)
    np.testing.assert_array_equal(x, xte)
    np.testing.assert_array_equal(y, yte)


def test_svhn_files_load_with_digit_zero_relabelled(tmp_path, no_checksum):
    (xtr, ytr), (xte, yte) = write_svhn(str(tmp_path), n_train=30, n_test=20)
    x, y = common.load_split("svhn", str(tmp_path), train=True)
    np.testing.assert_array_equal(x, xtr)
    np.testing.assert_array_equal(y, ytr)  # the .mat stores digit 0 as label 10
    assert y.min() == 0 and y.max() == 9


def test_mnist_raw_files_load(tmp_path):
    (xtr, ytr), _ = write_mnist(str(tmp_path), n_train=40, n_test=10)
    x, y = common.load_split("mnist", str(tmp_path), train=True)
    assert x.shape == (40, 1, 28, 28)
    np.testing.assert_array_equal(x, xtr)
    np.testing.assert_array_equal(y, ytr)


def test_tiny_imagenet_folder_val_relabel_grayscale_and_cache(tmp_path):
    colours, val_labels = write_tiny_imagenet(str(tmp_path), per_class=2, n_val=6, num_classes=5)
    x, y = common.load_split("tiny-imagenet", str(tmp_path), train=True)
    assert x.shape == (10, 3, 64, 64) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # every image, the grayscale ones included, comes back as 3 channels close to its class colour
    colour_error = np.abs(x.mean((2, 3)) - colours[y]).max(1)
    gray = np.arange(10) % 5 == 0
    assert (colour_error[~gray] < 3).all()
    assert (x[gray][:, 0] == x[gray][:, 1]).all()  # grayscale converted to RGB: equal channels
    xv, yv = common.load_split("tiny-imagenet", str(tmp_path), train=False)
    assert yv.tolist() == val_labels  # relabelled from val_annotations.txt with the train class order
    assert (np.abs(xv.mean((2, 3)) - colours[yv]).max(1) < 3).all()
    cache = tmp_path / "tiny-imagenet-200" / "fastat-val-uint8.npz"
    assert cache.exists()
    # the cache is what is read next time: remove the images and load again
    for f in (tmp_path / "tiny-imagenet-200" / "val" / "images").iterdir():
        f.unlink()
    xv2, yv2 = common.load_split("tiny-imagenet", str(tmp_path), train=False)
    np.testing.assert_array_equal(xv2, xv)
    np.testing.assert_array_equal(yv2, yv)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "tiny-imagenet"])
def test_missing_dataset_offline_is_one_clear_line(tmp_path, name, monkeypatch):
    # No network: every download attempt fails at once.
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as err:
        common.load_split(name, str(tmp_path / "nowhere"), train=True)
    message = str(err.value.code)
    assert message.startswith("fastat: dataset") and "\n" not in message
    assert os.path.join(str(tmp_path / "nowhere"), "") .rstrip("/") in message
    assert common.LAYOUTS[name].split("/")[1].split("{")[0] in message  # names the expected layout


def _args(data_dir, dataset="cifar10", batch_size=16, seed=0, monitor_size=8):
    return SimpleNamespace(dataset=dataset, data_dir=data_dir, batch_size=batch_size, seed=seed,
                           monitor_size=monitor_size)


def _find_crop_flip(aug, orig, pad=4):
    """Which (row shift, col shift, flip) of the zero-padded original gives `aug`, if any."""
    padded = F.pad(orig, (pad,) * 4)
    h, w = orig.shape[-2:]
    for flip in (False, True):
        for i in range(2 * pad + 1):
            for j in range(2 * pad + 1):
                crop = padded[:, i:i + h, j:j + w]
                if torch.equal(crop.flip(2) if flip else crop, aug):
                    return i, j, flip
    return None


def test_loader_batches_indices_and_augmentation(tmp_path, no_checksum):
    write_cifar(str(tmp_path), n_train=40, n_test=10)
    data = common.get_data(_args(str(tmp_path)), "cpu")
    full_x, full_y = common.load_split("cifar10", str(tmp_path), train=True)
    full_x = torch.from_numpy(full_x)
    seen, crops = [], set()
    for x, y, idx in data.train.epoch(0):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and len(x) == len(y) == len(idx)
        assert 0 <= x.min() and x.max() <= 1
        assert torch.equal(y, torch.from_numpy(full_y)[idx])  # labels follow the samples
        for k in range(len(y)):
            # the augmented image is a crop (+ flip) of exactly the sample that idx names
            found = _find_crop_flip((x[k] * 255).round().to(torch.uint8), full_x[idx[k]])
            assert found is not None
            crops.add(found)
        seen += idx.tolist()
    assert sorted(seen) == list(range(40))  # one epoch = each training sample once
    assert len(crops) > 5 and {c[2] for c in crops} == {False, True}  # it does augment
    order0 = torch.cat([i for _, _, i in data.train.epoch(0)])
    order1 = torch.cat([i for _, _, i in data.train.epoch(1)])
    assert torch.equal(order0, torch.tensor(seen)) and not torch.equal(order0, order1)


def test_mnist_loader_has_no_augmentation(tmp_path):
    write_mnist(str(tmp_path), n_train=30, n_test=10)
    data = common.get_data(_args(str(tmp_path), "mnist"), "cpu")
    full_x = torch.from_numpy(common.load_split("mnist", str(tmp_path), train=True)[0])
    for x, y, idx in data.train.epoch(3):
        assert torch.equal(x, full_x[idx].float() / 255)


def test_validation_slice_is_disjoint_and_fixed(tmp_path, no_checksum):
    write_cifar(str(tmp_path), n_train=60, n_test=10)
    data = common.get_data(_args(str(tmp_path), seed=1), "cpu", val_size=15)
    val = torch.cat([i for _, _, i in data.val.epoch(0)])
    train = torch.cat([i for e in range(3) for _, _, i in data.train.epoch(e)])
    assert len(val) == 15 and len(set(val.tolist())) == 15
    assert not set(val.tolist()) & set(train.tolist())
    assert set(val.tolist()) | set(train.tolist()) == set(range(60))
    assert data.train_size == 60
    # the monitor batch comes from the validation slice when there is one (a fixed random part of it)
    val_images = data.val.images.float() / 255
    for xm, ym in zip(*data.monitor):
        rows = [i for i in range(15) if torch.equal(val_images[i], xm)]
        assert rows and data.val.labels[rows[0]] == ym
    # the slice does not depend on --seed
    other = common.get_data(_args(str(tmp_path), seed=7), "cpu", val_size=15)
    assert torch.equal(other.val.indices, data.val.indices)


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 4 * 4).view(2, 1, 4, 4).float()
    out = common.random_crop(x, 2, torch.tensor([[0, 0], [2, 3]]))
    assert torch.equal(out[0, 0, 2:, 2:], x[0, 0, :2, :2]) and (out[0, 0, :2] == 0).all()
    assert torch.equal(out[1, 0, :, :3], x[1, 0, :, 1:]) and (out[1, 0, :, 3] == 0).all()

# ---------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,dataset,shape,classes", [
    ("preact18", "cifar10", (3, 32, 32), 10), ("preact18", "tiny-imagenet", (3, 64, 64), 200),
    ("wrn-16-2", "cifar100", (3, 32, 32), 100), ("wrn-10-1", "svhn", (3, 32, 32), 10),
    ("mnist-cnn", "mnist", (1, 28, 28), 10), ("wrn-10-1", "mnist", (1, 28, 28), 10)])
def test_model_output_shapes(name, dataset, shape, classes):
    model = common.make_model(name, dataset).eval()
    assert model(torch.rand(2, *shape)).shape == (2, classes)


def test_preact18_matches_wong_architecture():
    model = common.make_model("preact18", "cifar10")
    # Counted by hand from Wong's preact_resnet.py: stem conv 1,728; stages 147,968 + 525,184 + 2,098,944 +
    # 8,392,192 (BN-conv-BN-conv blocks, 1×1 conv shortcuts without BN); final BN 1,024; linear 5,130.
    assert sum(p.numel() for p in model.parameters()) == 11_172_170
    assert isinstance(model.bn, nn.BatchNorm2d)  # the final BN-ReLU


def test_wrn_depth_and_width():
    model = common.make_model("wrn-16-2", "cifar10")
    assert len(model.block1) == 2 and model.conv1.out_channels == 16 and model.fc.in_features == 128


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    model = common.make_model("wrn-10-1", "cifar10").eval()
    plain = common.make_model("wrn-10-1", "cifar10").eval()
    plain.load_state_dict(model.state_dict())
    plain.mean.zero_()
    plain.std.fill_(1)
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(common.DATASETS["cifar10"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(common.DATASETS["cifar10"]["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain((x - mean) / std))
    assert "mean" in model.state_dict()  # travels with the weights


@pytest.mark.parametrize("text,ok", [("preact18", True), ("wrn-34-10", True), ("WRN-16-2", True),
                                     ("mnist-cnn", True), ("wrn-12-2", False), ("wrn-16", False),
                                     ("resnet50", False), ("wrn-4-1", False)])
def test_model_names(text, ok):
    if ok:
        common.model_name(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            common.model_name(text)

# ---------------------------------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for a few hundred steps on the class-pattern images (clean accuracy ~100%)."""
    torch.manual_seed(0)
    x, y = class_images(200, 10, (3, 32, 32), seed=0, noise=60)
    x, y = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 10))
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
    eps = 8 / 255
    delta, _ = common.attack_pgd(model, x, y, eps, 2 / 255, 10, restarts=2)
    assert delta.abs().max() <= eps + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    delta, _ = common.attack_pgd(model, x, y, eps, 2 / 255, 10, loss="cw")
    assert delta.abs().max() <= eps + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1


def test_pgd_loss_above_fgsm_above_clean(trained):
    model, x, y = trained
    eps = 8 / 255
    clean = _loss(model, x, y).mean()
    fgsm, _ = common.attack_pgd(model, x, y, eps, eps, 1, rand_init=False)  # one FGSM step
    pgd, _ = common.attack_pgd(model, x, y, eps, 2 / 255, 20)
    assert clean < _loss(model, x + fgsm, y).mean() < _loss(model, x + pgd, y).mean()


def test_more_restarts_never_lower_the_per_sample_loss(trained):
    model, x, y = trained
    losses, robust = [], []
    for restarts in (1, 3):
        torch.manual_seed(5)  # the first restart of the 3-restart run is the 1-restart run
        delta, ok = common.attack_pgd(model, x, y, 12 / 255, 2 / 255, 5, restarts=restarts)
        losses.append(_loss(model, x + delta, y))
        robust.append(ok)
    assert (losses[1] >= losses[0] - 1e-6).all() and (losses[1] > losses[0] + 1e-4).any()
    assert (robust[1] <= robust[0]).all()  # a sample counts as robust only if every restart failed


def test_pgd_restarts_keep_the_best_without_a_host_sync(trained):
    """The per-sample choice of the best restart is a torch.where, not boolean-mask indexing (whose
    data-dependent size makes the host wait for a GPU; LAS-AT runs this attack in its training loop)."""
    from torch.profiler import ProfilerActivity, profile
    model, x, y = trained
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        common.attack_pgd(model, x, y, 8 / 255, 2 / 255, 2, restarts=3)
    names = {e.name for e in prof.events()}
    assert "aten::where" in names and not names & {"aten::nonzero", "aten::masked_select", "aten::index_put_"}


def test_cw_margin_and_its_attack(trained):
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    torch.testing.assert_close(common.cw_margin(logits, torch.tensor([1, 0])), torch.tensor([-3.0, 3.0]))
    model, x, y = trained
    before = common.cw_margin(model(x), y)
    delta, ok = common.attack_pgd(model, x, y, 8 / 255, 2 / 255, 10, loss="cw")
    with torch.no_grad():
        after = common.cw_margin(model(x + delta), y)
    assert after.mean() > before.mean() + 0.5
    assert torch.equal(ok, after <= 0)  # the CW margin is > 0 exactly when the sample is misclassified


def test_pgd_accuracy_restores_the_mode_and_counts(trained):
    model, x, y = trained
    model.train()
    clean = common.pgd_accuracy(model, x, y, 8 / 255, 2 / 255, 0)
    torch.manual_seed(1)
    robust = common.pgd_accuracy(model, x, y, 48 / 255, 8 / 255, 10, batch_size=20)
    assert model.training
    model.eval()
    with torch.no_grad():
        assert clean == (model(x).argmax(1) == y).float().mean().item()
    torch.manual_seed(1)  # the same attack batch by batch gives the same count
    direct = torch.cat([common.attack_pgd(model, x[i:i + 20], y[i:i + 20], 48 / 255, 8 / 255, 10)[1]
                        for i in range(0, len(y), 20)])
    assert robust == direct.float().mean().item() < clean

# ------------------------------------------------------------------------------ command line, runs


def test_recipe_defaults_and_mnist_recipe():
    import fgsm_rs
    a = fgsm_rs.get_args([])
    assert (a.dataset, a.model, a.epochs, a.batch_size, a.lr_max, a.epsilon, a.alpha) == \
        ("cifar10", "preact18", 15, 128, 0.2, 8, 10)
    m = fgsm_rs.get_args(["--dataset", "mnist"])
    assert (m.model, m.epochs, m.batch_size, m.lr_max, m.epsilon, m.alpha, m.optimizer) == \
        ("mnist-cnn", 10, 100, 5e-3, 76.5, 95.625, "adam")
    assert fgsm_rs.get_args(["--dataset", "mnist", "--epochs", "3"]).epochs == 3  # a flag beats the recipe


@pytest.mark.parametrize("argv", [["--epsilon", "-1"], ["--epochs", "0"], ["--dataset", "imagenet"],
                                  ["--model", "wrn-15-2"], ["--model", "mnist-cnn"], ["--batch-size", "-4"],
                                  ["--lr-max", "nan"]])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    import fgsm_rs
    with pytest.raises(SystemExit) as err:
        fgsm_rs.get_args(argv)
    assert err.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_argument_exits_2_by_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "fgsm_rs.py", "--epsilon", "-8"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--epsilon" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_by_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "fgsm_rs.py", "--data-dir", str(tmp_path / "empty"), "--device", "cpu",
                           "--out-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastat: dataset 'cifar10' not found") and "cifar-10-batches-py" in last


def _run_args(out_dir, **kw):
    base = dict(method="test", out_dir=str(out_dir), resume=False, seed=0, device="cpu", epsilon=8, epochs=3,
                dataset="cifar10", eval_samples=None, eval_iters=2, eval_restarts=1, autoattack=False)
    return SimpleNamespace(**{**base, **kw})


def _tiny_data():
    x = torch.rand(8, 3, 32, 32)
    return SimpleNamespace(monitor=(x, torch.arange(8) % 10), test_x=(x * 255).to(torch.uint8),
                           test_y=torch.arange(8) % 10, num_classes=10)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = common.make_model("wrn-10-1", "cifar10")
    run = common.Run(_run_args(tmp_path))
    run.track(model=model)
    epochs = run.epochs()
    next(epochs)
    run.end_epoch(0, model, _tiny_data(), lr=0.1, loss=1.5, acc=0.3)
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    next(epochs)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(common.NonFiniteLoss):
        run.end_epoch(1, model, _tiny_data(), lr=0.1, loss=float("nan"), acc=0.1)
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["epochs_done"] == 1 and torch.equal(kept["tracked"]["model"]["fc.weight"],
                                                      good["tracked"]["model"]["fc.weight"])
    assert "training loss is nan" in (tmp_path / "log.txt").read_text()


def test_non_finite_loss_by_subprocess(cifar_dir, tmp_path):
    out = str(tmp_path / "nan")
    proc = run_script("fgsm_rs.py", small_args(cifar_dir, out, epochs=2, lr_max=1e30), expect=3)
    assert "training loss is" in proc.stdout and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_an_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as err:
        common.Run(_run_args(tmp_path))
    assert "--resume" in str(err.value.code)


def test_eval_command_reproduces_the_final_evaluation(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    run_script("fgsm_rs.py", small_args(cifar_dir, out, epochs=1))
    final = load_results(out)["final"]["last"]
    proc = run_script("common.py", ["eval", "--weights", os.path.join(out, "model_last.pt"), "--eval-samples", "32",
                                    "--pgd-iters", "3", "--restarts", "1", "--device", "cpu",
                                    "--out", str(tmp_path / "eval.json")])
    with open(tmp_path / "eval.json") as f:
        again = json.load(f)["results"]
    assert again == final and "pgd3_1" in proc.stdout


def test_plot_has_a_panel_per_numeric_column(tmp_path):
    rows = [{"epoch": e, "seconds": 1.0, "loss": 2.0 - e / 10, "acc": 0.1 * e, "k": e} for e in (1, 2, 3)]
    common.plot_curves(rows, str(tmp_path / "c.png"))
    from PIL import Image
    w, h = Image.open(tmp_path / "c.png").size
    assert w > 0 and h > 0 and math.isclose(w / h, 12 / 5.6, rel_tol=0.05)  # 4 panels on a 2×3 grid


def test_logged_command_line_reproduces_the_arguments():
    import fgsm_rs
    args = fgsm_rs.get_args(["--dataset", "mnist", "--early-stop", "--epochs", "3", "--data-dir", "d"])
    again = fgsm_rs.get_args(common.command_line(args).split())
    assert vars(again) == vars(args)


def test_autoattack_without_a_package_says_so(trained, monkeypatch, capsys):
    model, x, y = trained
    monkeypatch.setitem(sys.modules, "autoattack", None)  # makes `import autoattack` raise ImportError
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    assert common.autoattack_accuracy(model, x, y, 8 / 255, 10) is None
    assert "AutoAttack skipped" in capsys.readouterr().out
    res = common.evaluate(model, x[:8], y[:8], 8 / 255, 2 / 255, pgd_iters=2, restarts=1, cw_iters=2, autoattack=True)
    assert res["autoattack"] is None and set(res) == {"clean", "pgd2_1", "cw2", "autoattack", "worst_case"}


def test_resume_with_changed_training_flags_warns(tmp_path):
    model = common.make_model("wrn-10-1", "cifar10")
    run = common.Run(_run_args(tmp_path, epochs=1))
    run.track(model=model)
    for epoch in run.epochs():
        run.end_epoch(epoch, model, _tiny_data(), lr=0.1, loss=1.0, acc=0.5)
    run.log_file.close()
    again = common.Run(_run_args(tmp_path, epochs=3, resume=True, eval_samples=4))
    again.track(model=model)
    assert [e for e in again.epochs()] == [1, 2]  # continues after the saved epoch
    log = (tmp_path / "log.txt").read_text()
    assert "--epochs was 1" in log and "--eval-samples" not in log


# ------------------------------------------------------------------- worst case, degenerate best, α(ε)


def test_worst_case_is_the_per_sample_and_of_every_attack(trained, monkeypatch):
    model, x, y = trained
    torch.manual_seed(0)
    res = common.evaluate(model, x, y, 16 / 255, 4 / 255, pgd_iters=5, restarts=1, cw_iters=5)
    assert res["worst_case"] <= min(res["clean"], res["pgd5_1"], res["cw5"])
    # the same masks, by hand: a sample counts only if it survives clean, PGD and CW
    torch.manual_seed(0)
    masks = [common.pgd_accuracy(model, x, y, 16 / 255, 4 / 255, it, 1, loss, per_sample=True)
             for it, loss in ((0, "ce"), (5, "ce"), (5, "cw"))]
    assert res["worst_case"] == (masks[0] & masks[1] & masks[2]).float().mean().item()
    # two attacks that fail on different samples: the worst case is below both
    fake = {"ce": torch.tensor([True, False, True, True]), "cw": torch.tensor([True, True, False, True])}
    monkeypatch.setattr(common, "pgd_accuracy", lambda m, x, y, e, s, iters, r=1, loss="ce", batch_size=500,
                        label=None, per_sample=False: torch.ones(4, dtype=torch.bool) if iters == 0 else fake[loss])
    res = common.evaluate(model, x[:4], y[:4], 8 / 255, 2 / 255, pgd_iters=2, restarts=1, cw_iters=2)
    assert (res["pgd2_1"], res["cw2"], res["worst_case"]) == (0.75, 0.75, 0.5)


class _OneClass(nn.Module):
    """Predicts class 3 for every image (a collapsed model) but is 'robust' on class 3's images."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.one_hot(torch.full((len(x),), 3), 10).float() * 10 + self.w * x.flatten(1)[:, :10]


def test_a_one_class_model_is_never_the_best(tmp_path):
    torch.manual_seed(0)
    good = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # random weights: varied predictions
    run = common.Run(_run_args(tmp_path, epochs=2))
    data = _tiny_data()
    run.track(model=good)
    epochs = run.epochs()
    next(epochs)
    # epoch 1: a model with varied predictions and some score; epoch 2: a constant predictor, higher score
    assert common.top_class_share(good, data.monitor[0]) < common.DEGENERATE_SHARE
    run.end_epoch(0, good, data, lr=0.1, loss=1.0, acc=0.5, score=0.1)
    next(epochs)
    collapsed = _OneClass()
    assert common.top_class_share(collapsed, data.monitor[0]) == 1.0
    run.end_epoch(1, collapsed, data, lr=0.1, loss=1.0, acc=0.5, score=0.9)
    assert run.best["epoch"] == 1
    assert "not eligible as the best model" in (tmp_path / "log.txt").read_text()


def test_alpha_follows_epsilon_unless_given():
    import fgsm_rs
    import fgsm_sdi
    assert fgsm_rs.get_args([]).alpha == 10  # the recipe: ε 8, α 10
    assert fgsm_rs.get_args(["--epsilon", "16"]).alpha == 20  # α = 1.25ε
    assert fgsm_rs.get_args(["--epsilon", "16", "--alpha", "4"]).alpha == 4  # an explicit α wins
    assert fgsm_sdi.get_args(["--epsilon", "4"]).alpha == 4  # SDI: α = ε
    mnist = fgsm_rs.get_args(["--dataset", "mnist", "--epsilon", "25.5"])
    assert math.isclose(mnist.alpha, 25.5 * 1.25)  # the MNIST recipe's ratio (0.375 / 0.3)
    # the logged command line holds the resolved value
    assert "--alpha 20" in common.command_line(fgsm_rs.get_args(["--epsilon", "16"]))


def test_memory_side_files_never_overwrite_the_file_the_checkpoint_names(tmp_path):
    """A skipped checkpoint (the 5% budget) must not make the next save rewrite the side file that the
    checkpoint on disk still needs: an interruption during that write would lose the run."""
    memory = torch.zeros(4)
    run = common.Run(_run_args(tmp_path, epochs=4))
    run.track(model=nn.Linear(2, 2), memory=memory)
    run.train_time = 100.0

    def named():
        return torch.load(tmp_path / "checkpoint.pt", weights_only=False)["tracked"]["memory"]["file"]
    memory.fill_(1)
    run._save_checkpoint(1)
    first = named()
    run._save_seconds = 1e9  # over budget: epoch 2 is not saved
    memory.fill_(2)
    run._save_checkpoint(2)
    assert named() == first
    run._save_seconds = 0.0
    memory.fill_(3)
    run._save_checkpoint(3)
    assert named() != first  # epoch 3 went to the other file; epoch 1's file is untouched until then
    raw = np.fromfile(tmp_path / first, dtype=np.float32)
    assert np.array_equal(raw, np.ones(4, np.float32))


def test_loader_draws_the_epoch_up_front_with_the_per_batch_augmentation():
    """The loader makes an epoch's random draws before its first batch (one device copy each, no per-batch
    host-to-device copies); the batches are those of the per-batch loop it replaced, draw for draw."""
    torch.manual_seed(0)
    n, bs = 2 * 8 + 1, 8  # a lone last sample, which is dropped
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8)
    labels, indices = torch.arange(n) % 3, torch.arange(n) * 10
    loader = common.DeviceLoader(images, labels, indices, bs, "cpu", shuffle=True, crop=2, flip=True, seed=4)

    def per_batch(epoch):  # the loop as it was written before: draws interleaved with the batches
        gen = torch.Generator().manual_seed(4 * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            batch = order[start:start + bs]
            if len(batch) == 1:
                break
            x = common.random_crop(images[batch], 2, torch.randint(0, 5, (len(batch), 2), generator=gen))
            x = torch.where((torch.rand(len(batch), generator=gen) < 0.5)[:, None, None, None], x.flip(3), x)
            yield x.float().div_(255), labels[batch], indices[batch]
    for epoch in (0, 3):
        got, want = list(loader.epoch(epoch)), list(per_batch(epoch))
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            for u, v in zip(a, b):
                assert torch.equal(u, v)
