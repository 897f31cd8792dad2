"""--dataset folder (any image folder in torchvision's ImageFolder layout) and Tiny ImageNet: decoded into memory by
torchvision's ImageFolder in DataLoader workers, checked, and trained on."""

import os

import numpy as np
import pytest
import torch
from conftest import load_results, small_args, write_tiny_imagenet
from PIL import Image

import common
import harness


def write_folder(
    root,
    classes=("cat", "ant", "bee"),
    per_class=4,
    n_test=2,
    size=(12, 10),
    mode="RGB",
    test_name="test",
    seed=0,
):
    """root/{train,test}/CLASS/i.png with random pixels; returns {split: [(relative path, pixels, class)]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", per_class), (test_name, n_test)):
        written[split] = []
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(
                    0, 256, size=(size[1], size[0]) + (() if mode == "L" else (3,)), dtype=np.uint8
                )
                rel = os.path.join(split, c, f"{i}.png")
                Image.fromarray(pixels, mode).save(os.path.join(root, rel))
                written[split].append((rel, pixels, c))
    return written


def load(root, name="folder"):
    return common.load_dataset(name, str(root), workers=1)


def test_folder_loads_exact_pixels_labels_and_sorted_classes(tmp_path):
    written = write_folder(str(tmp_path))
    (x, y), (tx, ty), info = load(tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 10, 12) and y.dtype == torch.int64
    order = {
        "ant": 0,
        "bee": 1,
        "cat": 2,
    }  # classes are the sorted folder names, files sorted within each
    expected = sorted(written["train"], key=lambda t: (order[t[2]], t[0]))
    assert y.tolist() == [order[c] for _, _, c in expected]
    for i, (_, pixels, _) in enumerate(expected):
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), pixels)
    assert tx.shape == (6, 3, 10, 12) and ty.tolist() == [0, 0, 1, 1, 2, 2]
    # the facts come from the images: classes, shape, a crop padding of size/8, the training images' mean and std
    v = x.double() / 255
    assert (
        info["classes"] == 3
        and tuple(info["shape"]) == (3, 10, 12)
        and info["crop"] == 1
        and info["flip"]
    )
    assert np.allclose(info["mean"], v.mean((0, 2, 3)), atol=1e-5)
    assert np.allclose(info["std"], v.std((0, 2, 3)), atol=1e-5)


def test_grayscale_stays_one_channel_and_any_colour_makes_every_split_rgb(tmp_path):
    write_folder(str(tmp_path / "gray"), mode="L")
    (x, _), (tx, _), info = load(tmp_path / "gray")
    assert x.shape[1] == tx.shape[1] == 1 and info["shape"][0] == 1
    # one colour image among grayscale training images, a grayscale test split: the channel count is decided once
    # for the dataset (was refused: "test images are (1, 10, 12), training images (3, 10, 12)")
    mixed = tmp_path / "mixed"
    write_folder(str(mixed), mode="L")
    colour = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(colour).save(mixed / "train" / "ant" / "9.png")
    (x, y), (tx, _), _ = load(mixed)
    assert x.shape[1] == tx.shape[1] == 3
    assert (
        np.array_equal(x[4].permute(1, 2, 0).numpy(), colour) and y[4] == 0
    )  # ant: 0..3.png, then 9.png
    assert (
        tx[:, 0] == tx[:, 1]
    ).all()  # the grayscale test images are replicated into three channels
    # an image stored as RGB whose pixels are gray does not make a grayscale dataset colour
    gray_rgb = tmp_path / "gray-rgb"
    write_folder(str(gray_rgb), mode="L")
    Image.fromarray(np.repeat(colour[..., :1], 3, 2)).save(gray_rgb / "train" / "ant" / "9.png")
    assert load(gray_rgb)[0][0].shape[1] == 1


def test_size_mismatch_exits_2_naming_the_file_and_the_size(tmp_path, capsys):
    write_folder(str(tmp_path))
    odd = (
        tmp_path / "test" / "bee" / "1.png"
    )  # in the test split: the sizes are checked across the splits
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd)
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: load(tmp_path))
    line = capsys.readouterr().err.strip()
    assert (
        err.value.code == 2
        and "\n" not in line
        and str(odd) in line
        and "8x8" in line
        and "12x10" in line
    )


@pytest.mark.parametrize(
    "problem", ["empty class", "unknown test class", "corrupt image", "missing"]
)
def test_a_bad_folder_is_one_clear_line(tmp_path, capsys, problem):
    write_folder(str(tmp_path))
    if problem == "empty class":
        os.makedirs(tmp_path / "train" / "dog")
        expected = "dog"
    elif problem == "unknown test class":
        os.makedirs(tmp_path / "test" / "zebra")
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "test" / "zebra" / "0.png")
        expected = "zebra"
    elif problem == "corrupt image":
        data = (tmp_path / "train" / "cat" / "1.png").read_bytes()
        (tmp_path / "train" / "cat" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
        expected = os.path.join("cat", "1.png")
    else:
        tmp_path = tmp_path / "nowhere"
        expected = "Data layout"
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: load(tmp_path))
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line and expected in line and "Traceback" not in line


def test_each_file_is_listed_once_and_the_splits_are_counted(tmp_path, log_lines):
    """A symbolic link back up the tree (a loop) listed the class's files 41 times (8,200 samples from 200 files),
    in the test split too; a directory reached through links is now walked once. A linked class folder is read."""
    write_folder(str(tmp_path / "data"), per_class=4, n_test=2)
    data = tmp_path / "data"
    os.symlink(data / "train" / "cat", data / "train" / "cat" / "loop")  # train/cat/loop/loop/...
    os.symlink(data / "test", data / "test" / "ant" / "all")  # every test class again, inside ant
    os.symlink(
        data / "train" / "bee", data / "train" / "cat" / "bees"
    )  # bee's folder, walked already
    write_folder(str(tmp_path / "other"), classes=("dog",), per_class=3, n_test=0, seed=1)
    os.symlink(
        tmp_path / "other" / "train" / "dog", data / "train" / "dog"
    )  # a linked class folder
    (x, y), (tx, ty), info = load(data)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3 and ty.tolist() == [0, 0, 1, 1, 2, 2]
    assert len({bytes(i.numpy()) for i in x}) == 15 and len({bytes(i.numpy()) for i in tx}) == 6
    import fgsm_rs

    args = fgsm_rs.get_args(["--dataset", "folder", "--data-dir", str(data), "--device", "cpu"])
    common.get_data(args)
    assert (
        "# folder: 15 training images, 0 validation images, 6 test images, 4 classes" in log_lines
    )


def test_a_folder_of_one_class_is_refused_in_one_line(tmp_path, capsys):
    """One class scored 100% clean and robust (and topped the comparison report); R-MC-LA then stopped on NaN."""
    write_folder(str(tmp_path), classes=("cat",))
    import fgsm_rs

    args = fgsm_rs.get_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as err:
        harness.main_guard(lambda: common.get_data(args))
    line = capsys.readouterr().err.strip()
    assert (
        err.value.code == 2 and "\n" not in line and "one class" in line and str(tmp_path) in line
    )


def test_non_image_files_are_skipped_and_val_is_accepted_for_test(tmp_path):
    write_folder(str(tmp_path), test_name="val")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (x, y), (tx, ty), _ = load(tmp_path)
    assert len(y) == 12 and len(ty) == 6


def test_tiny_imagenet_val_relabel_and_grayscale(tmp_path):
    colours, val_labels = write_tiny_imagenet(str(tmp_path), per_class=2, n_val=6, num_classes=5)
    (x, y), (tx, ty), info = load(tmp_path, "tiny-imagenet")
    assert x.shape == (10, 3, 64, 64) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # every image, the grayscale ones included, comes back as 3 channels close to its class colour
    colour_error = (x.float().mean((2, 3)) - torch.tensor(colours[y.numpy()])).abs().max(1).values
    gray = torch.arange(10) % 5 == 0
    assert (colour_error[~gray] < 3).all() and (x[gray][:, 0] == x[gray][:, 1]).all()
    assert (
        ty.tolist() == val_labels
    )  # relabelled from val_annotations.txt with the training class order
    assert info["classes"] == 200 and tuple(info["shape"]) == (3, 64, 64)


def test_no_flip_turns_the_flip_off_and_the_monitor_spans_the_classes(tmp_path):
    write_folder(str(tmp_path), classes=("a", "b", "c", "d"), per_class=20, size=(16, 16))
    import fgsm_rs

    base = [
        "--dataset",
        "folder",
        "--data-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--monitor-size",
        "16",
    ]
    data = common.get_data(fgsm_rs.get_args(base))
    assert (
        data.train.flip
        and data.train.crop == 2
        and not common.get_data(fgsm_rs.get_args(base + ["--no-flip"])).train.flip
    )
    # a folder lists its images class by class: the monitor (which picks "best") is a random subset, not one class
    x, y = data.monitor
    assert len(y) == 16 and len(set(y.tolist())) == 4
    (full_x, full_y), _, _ = load(tmp_path)
    for xi, yi in zip(x, y):
        match = [i for i in range(len(full_y)) if torch.equal(full_x[i], (xi * 255).round().byte())]
        assert match and full_y[match[0]] == yi


def test_subsets_are_fixed_random_and_span_a_class_ordered_set():
    y = torch.arange(100) // 10  # ten classes, in order, as a folder lists them
    pick = common.subset(100, 20)
    assert torch.equal(pick, common.subset(100, 20)) and len(set(pick.tolist())) == 20
    assert torch.equal(pick, pick.sort().values) and len(set(y[pick].tolist())) >= 6
    assert torch.equal(common.subset(100, None), torch.arange(100))
    assert torch.equal(common.subset(100, 500), torch.arange(100))


@pytest.mark.parametrize("script", ["fgsm_rs", "fgsm_sdi", "rmcla"])
def test_scripts_train_on_a_folder(tmp_path, script):
    """End to end on a 3-class, 1-channel folder of 16×16 images: classes and shape flow into the models (the SDI
    generator takes the channel count, R-MC-LA its class count)."""
    import importlib

    data = tmp_path / "data"
    write_folder(str(data), per_class=8, size=(16, 16), mode="L")
    out = str(tmp_path / "run")
    args = small_args(str(data), out, epochs=1, eval_samples=6)
    args[args.index("cifar10")] = "folder"
    importlib.import_module(script).main(args + ["--milestones"] * (script == "rmcla"))
    res = load_results(out)
    assert (
        res["args"]["dataset"] == "folder"
        and res["eval"]["images"] == 6
        and res["data"]["classes"] == 3
    )
    weights = torch.load(os.path.join(out, "model_last.pt"))
    assert weights["fc.weight"].shape[0] == 3 and weights["conv1.weight"].shape[1] == 1
