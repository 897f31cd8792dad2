"""ImageNet scale without ImageNet: a tiny folder of JPEGs of different sizes streamed from disk (torchvision's
ImageFolder in DataLoader workers), ResNet-50, Wong et al.'s three phases of crop, batch and lr, a resume across a
phase boundary, and what refuses to run at that scale."""

import os
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import comparable, load_results
from PIL import Image

import common
import fgsm_rs
import harness
import imagenet


def write_imagenet(root, classes=3, per_class=8, n_val=2, seed=0):
    """root/{train,val}/nWNID/*.JPEG: a colour per class plus noise, every image of its own size (40-90 px)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(classes, 3))
    for split, n in (("train", per_class), ("val", n_val)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"n{c:08d}"), exist_ok=True)
            for i in range(n):
                h, w = rng.integers(40, 90, size=2)
                pixels = np.clip(colours[c] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(
                    os.path.join(root, split, f"n{c:08d}", f"{split}_{c}_{i}.JPEG")
                )


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    write_imagenet(root)
    return root


def _flags(data_dir, out, *extra):
    return [
        "--dataset",
        "imagenet",
        "--data-dir",
        data_dir,
        "--image-size",
        "32",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--workers",
        "1",
        "--eval-iters",
        "2",
        "--eval-restarts",
        "1",
        "--eval-cw-iters",
        "2",
        "--monitor-size",
        "4",
        "--device",
        "cpu",
        "--out-dir",
        out,
        *extra,
    ]


def test_the_recipe_is_wongs_imagenet_configuration(imagenet_dir):
    args = fgsm_rs.get_args(
        ["--dataset", "imagenet", "--data-dir", imagenet_dir, "--device", "cpu"]
    )
    assert (
        args.model,
        args.epochs,
        args.lr,
        args.weight_decay,
        args.epsilon,
        args.alpha,
        args.eval_samples,
    ) == ("resnet50", 15, 0.4, 1e-4, 2, 2.5, 1000)
    assert args.phases == [[6, 128, 512], [12, 224, 224], [15, 288, 128]]
    assert (
        fgsm_rs.get_args(["--dataset", "imagenet", "--epsilon", "4"]).alpha == 5
    )  # their 4/255 runs: α 5/255


def test_three_phases_of_crop_batch_and_lr_against_hand_computed_values(imagenet_dir):
    """Wong's phases: epochs 1-6 crop 128, batch 512; 7-12 crop 224, batch 224; 13-15 crop 288, batch 128; the lr
    linear 0 → 0.4 over epoch 1, → 0.04 at 6, → 0.004 at 12, → 0.0004 at 15, set at epoch + (i+1)/batches."""
    args = fgsm_rs.get_args(
        [
            "--dataset",
            "imagenet",
            "--data-dir",
            imagenet_dir,
            "--device",
            "cpu",
            "--workers",
            "0",
            "--batch-size",
            "16",
        ]
    )
    data = common.get_data(args)
    loader = data.train
    assert data.train_images == 24 and data.val is None
    # --batch-size is the first phase's batch; the others keep Wong's proportions: 16, 224·16/512 = 7, 128·16/512 = 4
    assert [loader.phase(e) for e in (0, 5, 6, 11, 12, 14)] == [
        (128, 16),
        (128, 16),
        (224, 7),
        (224, 7),
        (288, 4),
        (288, 4),
    ]
    assert [loader.batches(e) for e in (0, 6, 12)] == [
        2,
        4,
        6,
    ]  # 24 images: 16 + 8; 7 + 7 + 7 + 3; 6 × 4
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = imagenet.imagenet_lr(opt, loader, 15)
    lrs = []
    for e in range(15):
        for i in range(loader.batches(e)):
            lrs.append((e, i, opt.param_groups[0]["lr"]))
            opt.step()
            sched.step()
    at = {(e, i): lr for e, i, lr in lrs}
    expected = {
        (0, 0): 0.2,
        (0, 1): 0.4,
        (1, 0): 0.4 - 0.36 * 0.5 / 5,
        (5, 1): 0.04,
        (6, 0): 0.04 - 0.036 / 4 / 6,
        (6, 3): 0.04 - 0.036 / 6,
        (11, 3): 0.004,
        (12, 0): 0.004 - 0.0036 / 6 / 3,
        (14, 5): 0.0004,
    }
    for key, lr in expected.items():
        assert abs(at[key] - lr) < 1e-9, (key, at[key], lr)
    # the evaluation images: Resize + CenterCrop to the last phase's crop
    assert data.test_x.shape == (6, 3, 288, 288) and data.monitor[0].shape[1:] == (3, 288, 288)


def test_fgsm_rs_on_imagenet_resumes_exactly_across_a_phase_boundary(imagenet_dir, tmp_path):
    """ResNet-50 at a small crop (--image-size 32: the phases crop 14, 25 and 32 px), three epochs = three phases;
    interrupted after the first (the end of phase 1) and resumed: the same numbers as an uninterrupted run."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    fgsm_rs.main(_flags(imagenet_dir, full))
    end_epoch = harness.Run.end_epoch

    def interrupted(run, epoch, *args, **kwargs):  # Ctrl-C right after epoch 1's checkpoint
        end_epoch(run, epoch, *args, **kwargs)
        if epoch == 0:
            raise KeyboardInterrupt

    with mock.patch.object(harness.Run, "end_epoch", interrupted), pytest.raises(KeyboardInterrupt):
        fgsm_rs.main(_flags(imagenet_dir, part))

    fgsm_rs.main(["--resume", "--out-dir", part])  # the flags come from the checkpoint
    a, b = load_results(full), load_results(part)
    assert comparable(a) == comparable(b)
    assert (
        a["args"]["model"] == "resnet50"
        and a["data"]["shape"] == [3, 32, 32]
        and len(a["epochs"]) == 3
    )
    assert (
        a["epochs"][0]["lr"] > a["epochs"][1]["lr"] > a["epochs"][2]["lr"] > 0
    )  # down the three phases
    weights = torch.load(os.path.join(full, "model_last.pt"))
    assert weights["net.fc.weight"].shape == (3, 2048)  # ResNet-50's 2048 features, three classes


def test_a_folder_of_mixed_sizes_is_streamed_with_image_size(imagenet_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = _flags(
        imagenet_dir, out, "--model", "wrn-10-1", "--progress-every", "1e-9", "--epochs", "1"
    )
    flags[flags.index("imagenet")] = "folder"
    data_dir = flags[flags.index("--data-dir") + 1]
    os.rename(os.path.join(data_dir, "val"), os.path.join(data_dir, "test"))
    try:
        fgsm_rs.main(flags)
    finally:
        os.rename(os.path.join(data_dir, "test"), os.path.join(data_dir, "val"))
    res = load_results(out)
    assert res["data"]["shape"] == [3, 32, 32] and res["train_images"] == 24
    assert "# train epoch 1: 16/24 images" in capsys.readouterr().out  # progress inside the epoch


@pytest.mark.parametrize(
    "script,flags,message",
    [
        ("fgsm_mep", ["--prior", "momentum"], "--prior batch"),
        ("fgsm_mep", ["--prior", "epoch"], "--prior batch"),
        ("fgsm_rs", ["--delta-init", "previous"], "phases"),
    ],
)
def test_what_cannot_run_at_imagenet_scale_refuses_in_one_line(
    imagenet_dir, script, flags, message, capsys
):
    import importlib

    with pytest.raises(SystemExit) as err:
        importlib.import_module(script).get_args(
            ["--dataset", "imagenet", "--data-dir", imagenet_dir, *flags]
        )
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_resized_copies_made_with_torchvision_feed_their_phases(imagenet_dir, tmp_path):
    """bench/resize_folder.py makes Wong et al.'s resized copies (shorter side 16 px here); --phase-data-dirs reads
    each phase from its copy."""
    import sys

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    )
    import resize_folder

    small = str(tmp_path / "small")
    resize_folder.main([imagenet_dir, small, "--size", "16", "--workers", "1"])
    names = sorted(
        os.path.relpath(os.path.join(d, f), small) for d, _, fs in os.walk(small) for f in fs
    )
    assert names == sorted(
        os.path.relpath(os.path.join(d, f), imagenet_dir)
        for d, _, fs in os.walk(imagenet_dir)
        for f in fs
    )
    with (
        Image.open(os.path.join(small, names[0])) as img,
        Image.open(os.path.join(imagenet_dir, names[0])) as big,
    ):
        assert (
            min(img.size) == 16 and abs(img.size[0] / img.size[1] - big.size[0] / big.size[1]) < 0.1
        )
    args = fgsm_rs.get_args(
        [
            "--dataset",
            "imagenet",
            "--data-dir",
            imagenet_dir,
            "--phase-data-dirs",
            small,
            small,
            imagenet_dir,
            "--image-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    loader = common.get_data(args).train
    assert [f.root for f in loader.folders] == [os.path.join(small, "train")] * 2 + [
        os.path.join(imagenet_dir, "train")
    ]
    x, _, _ = next(loader.epoch(0))
    assert x.shape[-1] == 14  # phase 1's crop, cut from the 16 px copy
    with pytest.raises(SystemExit):  # copies that do not hold the same files are refused
        harness.main_guard(
            lambda: common.get_data(
                fgsm_rs.get_args(
                    [
                        "--dataset",
                        "imagenet",
                        "--data-dir",
                        imagenet_dir,
                        "--phase-data-dirs",
                        str(tmp_path),
                        "--device",
                        "cpu",
                    ]
                )
            )
        )


def test_the_streamed_loader_yields_what_it_plans_and_shards_each_batch(imagenet_dir, monkeypatch):
    args = fgsm_rs.get_args(
        [
            "--dataset",
            "imagenet",
            "--data-dir",
            imagenet_dir,
            "--image-size",
            "16",
            "--epochs",
            "3",
            "--batch-size",
            "10",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    loader = common.get_data(args).train  # 24 images; phases of batch 10, 4, 2
    state = torch.get_rng_state()
    whole = {e: [idx.tolist() for _, _, idx in loader.epoch(e)] for e in range(3)}
    assert torch.equal(
        torch.get_rng_state(), state
    )  # the per-sample seeds leave the process's generator alone
    assert [len(whole[e]) for e in range(3)] == [loader.batches(e) for e in range(3)] == [3, 6, 12]
    assert loader.steps(3) == 21 and len(loader) == 3
    for e in range(3):
        assert sorted(i for b in whole[e] for i in b) == list(
            range(24)
        )  # every image once (4 = 24 − 2·10: kept)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: rank)
        monkeypatch.setattr(common, "world", lambda: 2)
        parts.append([idx.tolist() for _, _, idx in loader.epoch(1)])
    for a, c, b in zip(*parts, whole[1]):
        assert a + c == b and not set(a) & set(c)  # each process its part of the one-process batch


def test_an_unreadable_image_is_replaced_in_its_batch_and_counted(
    imagenet_dir, tmp_path, log_lines, monkeypatch
):
    """One truncated JPEG stopped a streamed run mid-epoch with a worker's traceback. Now each process's part of
    a batch keeps its size (torchrun's processes step together), the image is replaced by the first readable one
    of its part, every epoch is the same in every pass (a resumed run sees the same batches), and the log counts
    it."""
    import shutil

    data_dir = str(tmp_path / "data")
    shutil.copytree(imagenet_dir, data_dir)
    flags = ["--dataset", "imagenet", "--data-dir", data_dir, "--image-size", "16", "--epochs", "3"]
    flags += ["--batch-size", "10", "--monitor-size", "4", "--device", "cpu"]
    args = fgsm_rs.get_args(flags + ["--workers", "0"])
    monitor = common.subset(24, 4, 1).tolist()  # the monitor's images are decoded at the start
    bad = next(i for i in range(24) if i not in monitor)
    path = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(data_dir, "train")) for f in fs
    )[bad]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    loader = common.get_data(args).train
    epochs = [[(x, idx.tolist()) for x, _, idx in loader.epoch(e)] for e in range(3)]
    for e, batches in enumerate(epochs):
        sizes = [len(idx) for _, idx in batches]
        assert sizes == [
            min(loader.phase(e)[1], 24 - k * loader.phase(e)[1]) for k in range(len(sizes))
        ]
        assert len(sizes) == loader.batches(e) and bad not in sum((i for _, i in batches), [])
    counted = [line for line in log_lines if "unreadable image(s), each replaced" in line]
    assert len(counted) == 3 and counted[0].startswith("# train epoch 1: 1 ") and path in counted[0]
    again = common.get_data(fgsm_rs.get_args(flags + ["--workers", "1"])).train  # in a worker
    for e in range(3):
        for (x, idx), (y, idy) in zip(epochs[e], [(x, i.tolist()) for x, _, i in again.epoch(e)]):
            assert idx == idy and torch.equal(x, y)
    parts = []
    for rank in (0, 1):  # two processes: each part keeps its size
        monkeypatch.setattr(common, "rank", lambda: rank)
        monkeypatch.setattr(common, "world", lambda: 2)
        parts.append([len(idx) for _, _, idx in loader.epoch(0)])
    assert [a + b for a, b in zip(*parts)] == [len(i) for _, i in epochs[0]]


def test_a_streamed_folder_of_one_class_is_refused(imagenet_dir, tmp_path, capsys):
    data_dir = tmp_path / "data"
    for split in ("train", "val"):  # linked class folders are read
        os.makedirs(data_dir / split)
        os.symlink(os.path.join(imagenet_dir, split, "n00000000"), data_dir / split / "n00000000")
    args = fgsm_rs.get_args(
        ["--dataset", "imagenet", "--data-dir", str(data_dir), "--device", "cpu"]
    )
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: common.get_data(args))
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line and "one class" in line


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 7, 15, 30])
def test_a_short_run_keeps_the_phases_order_and_starts_with_the_first(epochs):
    """--epochs 1 rounded the first phase's end to 0: the run trained in the second phase only."""
    args = SimpleNamespace(
        phases=imagenet.IMAGENET["phases"], epochs=epochs, batch_size=512, image_size=None
    )
    run = imagenet.phases(args)
    loader = imagenet.StreamLoader(None, None, run, 0, None, 0)
    order = [loader._phase_index(e) for e in range(epochs)]
    assert order[0] == 0 and order == sorted(order) and run[-1][0] == epochs
    assert [p[1:] for p in run] == [[128, 512], [224, 224], [288, 128]]
    if epochs >= 3:  # room for every phase
        assert order[-1] == 2 and len(set(order)) == 3


def test_the_recipe_lr_follows_the_batch_unless_given():
    """Wong et al.'s 0.4 is for batches of 512: a smaller --batch-size got it unscaled, without a word. The linear
    scaling rule (DECISIONS.md, 'ImageNet lr and batch'); an explicit --lr wins; a method's own ImageNet lr too."""
    import atlas

    base = ["--dataset", "imagenet", "--device", "cpu"]
    assert fgsm_rs.get_args(base).lr == 0.4
    assert fgsm_rs.get_args(base + ["--batch-size", "128"]).lr == pytest.approx(0.1)
    assert fgsm_rs.get_args(base + ["--batch-size", "128", "--lr", "0.3"]).lr == 0.3
    assert atlas.get_args(base + ["--batch-size", "256"]).lr == pytest.approx(0.05)
    assert (
        fgsm_rs.get_args(["--batch-size", "128"]).lr == fgsm_rs.get_args([]).lr
    )  # CIFAR: as given


@pytest.mark.parametrize("epochs", [1, 2, 3, 15, 30])
def test_the_imagenet_lr_rises_then_falls_for_any_length(epochs):
    loader = SimpleNamespace(batches=lambda e: 4)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = imagenet.imagenet_lr(opt, loader, epochs)
    lrs = []
    for _ in range(4 * epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # by hand: the peak after min(1, E/15) epochs, 1/10, 1/100, 1/1000 of it at 6/15, 12/15 and 15/15 of the run
    times, values = (
        [0, min(1, epochs / 15), 0.4 * epochs, 0.8 * epochs, epochs],
        [0, 0.4, 0.04, 0.004, 0.0004],
    )
    assert lrs == pytest.approx(
        [np.interp(e + (i + 1) / 4, times, values) for e in range(epochs) for i in range(4)]
    )
    peak = lrs.index(max(lrs))
    assert max(lrs) <= 0.4 and lrs[-1] == pytest.approx(0.0004)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1])) and all(
        a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :])
    )


def test_every_script_runs_an_epoch_on_streamed_imagenet(imagenet_dir, tmp_path):
    """Each script with ImageNet's three phases (in 3 epochs), a small net and crop; FGSM-MEP with its batch prior,
    whose slot is made anew at each phase's crop. Then evaluate.py repeats a streamed run's evaluation."""
    import importlib

    import evaluate

    own = {
        "atlas": ["--ramp-epochs", "1", "--val-size", "4", "--val-iters", "1"],
        "fgsm_mep": ["--prior", "batch"],
        "las_at": ["--strategy-model", "wrn-10-1", "--iters-set", "1", "--strategy-every", "5"],
        "amata": ["--k-min", "1", "--k-max", "1", "--milestones", "2"],
        "rmcla": ["--milestones", "2"],
    }
    for script in (
        "fgsm_rs",
        "fgsm_sdi",
        "fgsm_mep",
        "atlas",
        "amata",
        "las_at",
        "latent_at",
        "rmcla",
    ):
        out = str(tmp_path / script)
        importlib.import_module(script).main(
            _flags(
                imagenet_dir,
                out,
                "--model",
                "wrn-10-1",
                "--image-size",
                "16",
                "--batch-size",
                "10",
                "--workers",
                "0",
                *own.get(script, []),
            )
        )
        res = load_results(out)
        assert len(res["epochs"]) == 3 and res["data"]["shape"] == [3, 16, 16], script
    again = evaluate.main(
        [
            "--weights",
            str(tmp_path / "fgsm_rs" / "model_last.pt"),
            "--eval-iters",
            "2",
            "--eval-restarts",
            "1",
            "--eval-cw-iters",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
        ]
    )
    assert again == load_results(tmp_path / "fgsm_rs")["final"]["last"]
