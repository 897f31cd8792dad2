"""ImageNet scale without ImageNet: a tiny folder of JPEGs of different sizes streamed from disk (torchvision's
ImageFolder in DataLoader workers), ResNet-50, Wong et al.'s three phases of crop, batch and lr, a resume across a
phase boundary, and what refuses to run at that scale."""
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import common
import fgsm_rs
from conftest import comparable, load_results


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
                Image.fromarray(pixels).save(os.path.join(root, split, f"n{c:08d}", f"{split}_{c}_{i}.JPEG"))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    write_imagenet(root)
    return root


def _flags(data_dir, out, *extra):
    return ["--dataset", "imagenet", "--data-dir", data_dir, "--image-size", "32", "--epochs", "3", "--batch-size",
            "16", "--workers", "1", "--eval-iters", "2", "--eval-restarts", "1", "--eval-cw-iters", "2",
            "--monitor-size", "4", "--device", "cpu", "--out-dir", out, *extra]


def test_the_recipe_is_wongs_imagenet_configuration(imagenet_dir):
    args = fgsm_rs.get_args(["--dataset", "imagenet", "--data-dir", imagenet_dir, "--device", "cpu"])
    assert (args.model, args.epochs, args.lr, args.weight_decay, args.epsilon, args.alpha, args.eval_samples) == \
        ("resnet50", 15, 0.4, 1e-4, 2, 2.5, 1000)
    assert args.phases == [[6, 128, 512], [12, 224, 224], [15, 288, 128]]
    assert fgsm_rs.get_args(["--dataset", "imagenet", "--epsilon", "4"]).alpha == 5  # their 4/255 runs: α 5/255


def test_three_phases_of_crop_batch_and_lr_against_hand_computed_values(imagenet_dir):
    """Wong's phases: epochs 1-6 crop 128, batch 512; 7-12 crop 224, batch 224; 13-15 crop 288, batch 128; the lr
    linear 0 → 0.4 over epoch 1, → 0.04 at 6, → 0.004 at 12, → 0.0004 at 15, set at epoch + (i+1)/batches."""
    args = fgsm_rs.get_args(["--dataset", "imagenet", "--data-dir", imagenet_dir, "--device", "cpu", "--workers", "0",
                             "--batch-size", "16"])
    data = common.get_data(args)
    loader = data.train
    assert data.train_images == 24 and data.val is None
    # --batch-size is the first phase's batch; the others keep Wong's proportions: 16, 224·16/512 = 7, 128·16/512 = 4
    assert [loader.phase(e) for e in (0, 5, 6, 11, 12, 14)] == [(128, 16), (128, 16), (224, 7), (224, 7), (288, 4),
                                                                (288, 4)]
    assert [loader.batches(e) for e in (0, 6, 12)] == [2, 4, 6]  # 24 images: 16 + 8; 7 + 7 + 7 + 3; 6 × 4
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = common.imagenet_lr(opt, loader, 15)
    lrs = []
    for e in range(15):
        for i in range(loader.batches(e)):
            lrs.append((e, i, opt.param_groups[0]["lr"]))
            opt.step()
            sched.step()
    at = {(e, i): lr for e, i, lr in lrs}
    expected = {(0, 0): 0.2, (0, 1): 0.4, (1, 0): 0.4 - 0.36 * 0.5 / 5, (5, 1): 0.04, (6, 0): 0.04 - 0.036 / 4 / 6,
                (6, 3): 0.04 - 0.036 / 6, (11, 3): 0.004, (12, 0): 0.004 - 0.0036 / 6 / 3, (14, 5): 0.0004}
    for key, lr in expected.items():
        assert abs(at[key] - lr) < 1e-9, (key, at[key], lr)
    # the evaluation images: Resize + CenterCrop to the last phase's crop
    assert data.test_x.shape == (6, 3, 288, 288) and data.monitor[0].shape[1:] == (3, 288, 288)


def test_fgsm_rs_on_imagenet_resumes_exactly_across_a_phase_boundary(imagenet_dir, tmp_path):
    """ResNet-50 at a small crop (--image-size 32: the phases crop 14, 25 and 32 px), three epochs = three phases;
    interrupted after the first (the end of phase 1) and resumed: the same numbers as an uninterrupted run."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    fgsm_rs.main(_flags(imagenet_dir, full))
    end_epoch = common.Run.end_epoch

    def interrupted(run, epoch, *args, **kwargs):  # Ctrl-C right after epoch 1's checkpoint
        end_epoch(run, epoch, *args, **kwargs)
        if epoch == 0:
            raise KeyboardInterrupt
    with mock.patch.object(common.Run, "end_epoch", interrupted), pytest.raises(KeyboardInterrupt):
        fgsm_rs.main(_flags(imagenet_dir, part))
    common._LOG.clear()
    fgsm_rs.main(["--resume", "--out-dir", part])  # the flags come from the checkpoint
    a, b = load_results(full), load_results(part)
    assert comparable(a) == comparable(b)
    assert a["args"]["model"] == "resnet50" and a["data"]["shape"] == [3, 32, 32] and len(a["epochs"]) == 3
    assert a["epochs"][0]["lr"] > a["epochs"][1]["lr"] > a["epochs"][2]["lr"] > 0  # down the three phases
    weights = torch.load(os.path.join(full, "model_last.pt"))
    assert weights["net.fc.weight"].shape == (3, 2048)  # ResNet-50's 2048 features, three classes


def test_a_folder_of_mixed_sizes_is_streamed_with_image_size(imagenet_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = _flags(imagenet_dir, out, "--model", "wrn-10-1", "--progress-every", "1e-9", "--epochs", "1")
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


@pytest.mark.parametrize("script,flags,message", [
    ("fgsm_mep", ["--prior", "momentum"], "--prior batch"), ("fgsm_mep", ["--prior", "epoch"], "--prior batch"),
    ("fgsm_rs", ["--delta-init", "previous"], "phases")])
def test_what_cannot_run_at_imagenet_scale_refuses_in_one_line(imagenet_dir, script, flags, message, capsys):
    import importlib
    with pytest.raises(SystemExit) as err:
        importlib.import_module(script).get_args(["--dataset", "imagenet", "--data-dir", imagenet_dir, *flags])
    assert err.value.code == 2 and message in capsys.readouterr().err
