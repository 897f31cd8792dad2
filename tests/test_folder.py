"""--dataset folder: any image folder in torchvision's ImageFolder layout, decoded once and cached."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import load_results, run_script, small_args


def write_folder(root, classes=("cat", "ant", "bee"), per_class=4, n_test=2, size=(12, 10), mode="RGB",
                 test_name="test", seed=0):
    """root/{train,test}/CLASS/i.png with random pixels; returns {split: [(relative path, pixels, class)]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", per_class), (test_name, n_test)):
        written[split] = []
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0]) + (() if mode == "L" else (3,))
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                rel = os.path.join(split, c, f"{i}.png")
                Image.fromarray(pixels, mode).save(os.path.join(root, rel))
                written[split].append((rel, pixels, c))
    return written


def fresh(monkeypatch):
    """Forget the in-process cache, so that a call reads the disk (the .npz cache or the images)."""
    monkeypatch.setattr(common, "_FOLDERS", {})


def test_folder_loads_exact_pixels_labels_and_sorted_classes(tmp_path, monkeypatch):
    fresh(monkeypatch)
    written = write_folder(str(tmp_path))
    x, y = common.load_split("folder", str(tmp_path), train=True)
    assert x.dtype == np.uint8 and x.shape == (12, 3, 10, 12) and y.dtype == np.int64
    order = {"ant": 0, "bee": 1, "cat": 2}  # classes are the sorted folder names
    # torchvision's order: classes in sorted order, files sorted within each
    expected = sorted(written["train"], key=lambda t: (order[t[2]], t[0]))
    assert y.tolist() == [order[c] for _, _, c in expected]
    for i, (_, pixels, _) in enumerate(expected):
        assert np.array_equal(x[i].transpose(1, 2, 0), pixels)
    tx, ty = common.load_split("folder", str(tmp_path), train=False)
    assert tx.shape == (6, 3, 10, 12) and sorted(ty.tolist()) == [0, 0, 1, 1, 2, 2]


def test_dataset_info_comes_from_the_images(tmp_path, monkeypatch):
    fresh(monkeypatch)
    write_folder(str(tmp_path), size=(24, 16))
    info = common.dataset_info("folder", str(tmp_path))
    x, _ = common.load_split("folder", str(tmp_path), train=True)
    v = x.astype(np.float64) / 255
    assert info["classes"] == 3 and info["shape"] == (3, 16, 24) and info["crop"] == 2 and info["flip"]
    assert np.allclose(info["mean"], v.mean(axis=(0, 2, 3)), atol=1e-5)
    assert np.allclose(info["std"], v.std(axis=(0, 2, 3), ddof=1), atol=1e-5)
    model = common.make_model("wrn-10-1", "folder", str(tmp_path)).eval()
    assert model(torch.rand(2, 3, 16, 24)).shape == (2, 3)
    assert torch.allclose(model.mean.flatten(), torch.tensor(info["mean"]))


def test_cache_is_used_and_renewed_when_the_files_change(tmp_path, monkeypatch):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    x, y = common.load_split("folder", str(tmp_path), train=True)
    assert os.path.exists(tmp_path / "fastat-folder-train-uint8.npz")
    fresh(monkeypatch)
    real_decode = common._decode
    monkeypatch.setattr(common, "_decode", lambda *a, **k: pytest.fail("decoded although cached"))
    x2, y2 = common.load_split("folder", str(tmp_path), train=True)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # a new image: the cache no longer describes the folder, so it is decoded again
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "train" / "bee" / "new.png")
    fresh(monkeypatch)
    monkeypatch.setattr(common, "_decode", real_decode)
    x3, y3 = common.load_split("folder", str(tmp_path), train=True)
    assert len(y3) == len(y) + 1 and (y3 == 1).sum() == (y == 1).sum() + 1


def test_grayscale_stays_one_channel_and_mixed_becomes_rgb(tmp_path, monkeypatch):
    fresh(monkeypatch)
    gray = tmp_path / "gray"
    written = write_folder(str(gray), mode="L")
    x, _ = common.load_split("folder", str(gray), train=True)
    assert x.shape == (12, 1, 10, 12)
    assert common.dataset_info("folder", str(gray))["shape"] == (1, 10, 12)
    # one grayscale image among colour ones is replicated into three channels
    mixed = tmp_path / "mixed"
    write_folder(str(mixed))
    pixels = np.arange(120, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(pixels, "L").save(mixed / "train" / "ant" / "9.png")
    x, y = common.load_split("folder", str(mixed), train=True)
    assert x.shape[1] == 3
    i = 4 - 1  # ant's images are 0..3.png then 9.png: the fifth of class 0
    assert np.array_equal(x[i + 1], np.stack([pixels] * 3)) and y[i + 1] == 0
    assert written  # the folder was written


def test_size_mismatch_exits_2_naming_the_file_and_the_size(tmp_path, monkeypatch, capsys):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    odd = tmp_path / "train" / "bee" / "2.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd)
    with pytest.raises(SystemExit) as err:
        common.load_split("folder", str(tmp_path), train=True)
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(odd) in line and "8x8" in line and "12x10" in line


def test_test_images_must_have_the_training_size(tmp_path, monkeypatch, capsys):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "test" / "ant" / "0.png")
    with pytest.raises(SystemExit) as err:
        common.load_split("folder", str(tmp_path), train=False)
    assert err.value.code == 2 and "12x10" in capsys.readouterr().err


def test_empty_class_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    os.makedirs(tmp_path / "train" / "dog")
    with pytest.raises(SystemExit) as err:
        common.load_split("folder", str(tmp_path), train=True)
    assert err.value.code == 2 and os.path.join("train", "dog") in capsys.readouterr().err


def test_unknown_test_class_is_a_clear_error(tmp_path, monkeypatch, capsys):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    os.makedirs(tmp_path / "test" / "zebra")
    with pytest.raises(SystemExit) as err:
        common.load_split("folder", str(tmp_path), train=False)
    assert err.value.code == 2 and "zebra" in capsys.readouterr().err


def test_non_image_files_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    x, y = common.load_split("folder", str(tmp_path), train=True)
    assert len(y) == 12 and x.shape[0] == 12
    assert "skipped 1 file(s) that are not images" in capsys.readouterr().err


def test_a_corrupt_image_is_a_clear_error(tmp_path, monkeypatch, capsys):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    data = (tmp_path / "train" / "cat" / "1.png").read_bytes()
    (tmp_path / "train" / "cat" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SystemExit) as err:
        common.load_split("folder", str(tmp_path), train=True)
    assert err.value.code == 2 and "1.png" in capsys.readouterr().err


def test_val_is_accepted_for_test(tmp_path, monkeypatch):
    fresh(monkeypatch)
    write_folder(str(tmp_path), test_name="val")
    tx, ty = common.load_split("folder", str(tmp_path), train=False)
    assert len(ty) == 6


def test_missing_folder_is_one_line(tmp_path, monkeypatch):
    fresh(monkeypatch)
    with pytest.raises(SystemExit) as err:
        common.load_split("folder", str(tmp_path / "nowhere"), train=True)
    msg = str(err.value.code)
    assert "\n" not in msg and "train/CLASS" in msg and "nowhere" in msg


def test_no_flip_turns_the_flip_off(tmp_path, monkeypatch):
    fresh(monkeypatch)
    write_folder(str(tmp_path), size=(16, 16))
    import fgsm_rs
    args = fgsm_rs.get_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--batch-size", "4"])
    assert common.get_data(args, "cpu").train.flip and common.get_data(args, "cpu").train.crop == 2
    args = fgsm_rs.get_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--no-flip"])
    assert not common.get_data(args, "cpu").train.flip


@pytest.mark.parametrize("script", ["fgsm_rs.py", "fgsm_sdi.py", "rmcla.py"])
def test_scripts_train_on_a_folder(tmp_path, script):
    """End to end on a 3-class, 1-channel folder of 16×16 images: classes and shape flow into the models
    (the SDI generator takes the channel count, R-MC-LA its class count)."""
    data = tmp_path / "data"
    write_folder(str(data), per_class=8, size=(16, 16), mode="L")
    out = str(tmp_path / "run")
    args = small_args(str(data), out, epochs=1)
    args[args.index("cifar10")] = "folder"
    run_script(script, args + ["--eval-samples", "6"])
    res = load_results(out)
    assert res["args"]["dataset"] == "folder" and res["eval_samples"] == 6
    weights = torch.load(os.path.join(out, "model_last.pt"))
    assert weights["fc.weight"].shape[0] == 3 and weights["conv1.weight"].shape[1] == 1


def test_monitor_batch_spans_the_classes_of_a_class_ordered_folder(tmp_path, monkeypatch):
    """A folder lists its images class by class; the monitor (which picks "best") must not be the first
    images, i.e. one class."""
    fresh(monkeypatch)
    write_folder(str(tmp_path), classes=("a", "b", "c", "d"), per_class=20, size=(8, 8))
    import fgsm_rs
    args = fgsm_rs.get_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--monitor-size", "16"])
    data = common.get_data(args, "cpu")
    x, y = data.monitor
    assert len(y) == 16 and len(set(y.tolist())) == 4
    # the monitor images are training images with their own labels
    full_x, full_y = common.load_split("folder", str(tmp_path), train=True)
    for xi, yi in zip(x, y):
        match = [i for i in range(len(full_y)) if np.array_equal(full_x[i], (xi * 255).round().byte().numpy())]
        assert match and full_y[match[0]] == yi


def test_an_image_rewritten_in_place_renews_the_cache(tmp_path, monkeypatch):
    fresh(monkeypatch)
    write_folder(str(tmp_path))
    x, _ = common.load_split("folder", str(tmp_path), train=True)
    path = tmp_path / "train" / "ant" / "0.png"
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(path)  # same name, new pixels
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    fresh(monkeypatch)
    x2, _ = common.load_split("folder", str(tmp_path), train=True)
    assert (x2[0] == 7).all() and not (x[0] == 7).all()


def test_eval_subset_is_fixed_random_and_spans_a_class_ordered_set():
    y = torch.arange(100) // 10  # ten classes, in order, as a folder lists them
    pick = common.eval_subset(100, 20)
    assert torch.equal(pick, common.eval_subset(100, 20)) and len(set(pick.tolist())) == 20
    assert torch.equal(pick, pick.sort().values) and len(set(y[pick].tolist())) >= 6
    assert torch.equal(common.eval_subset(100, None), torch.arange(100))
    assert torch.equal(common.eval_subset(100, 500), torch.arange(100))


def test_atlas_holds_out_a_tenth_of_a_folder(tmp_path, monkeypatch):
    fresh(monkeypatch)
    write_folder(str(tmp_path), per_class=20, size=(8, 8))
    import atlas
    assert atlas.get_args(["--dataset", "folder", "--data-dir", str(tmp_path)]).val_size == 6
    assert atlas.get_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--val-size", "9"]).val_size == 9


def test_latent_layers_of_every_model_exist():
    import latent_at
    for name, dataset in (("preact18", "cifar10"), ("wrn-10-1", "cifar10"), ("mnist-cnn", "mnist"),
                          ("lenet", "mnist")):
        modules = dict(common.make_model(name, dataset).named_modules())
        assert all(layer in modules for layer in latent_at.latent_layers(name))
