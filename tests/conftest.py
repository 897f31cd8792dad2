"""Tiny datasets written in each dataset's real on-disk format, and helpers to run scripts.

The images are learnable on purpose: each class is a fixed random colour pattern plus noise, so a
small network reaches high clean accuracy within an epoch or two and attacks have something to break.
"""

import logging
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import launch  # noqa: E402  (bench/: the launcher every test run of a script goes through)
import report  # noqa: E402  (bench/: the one reader of results.json)
from launch import comparable  # noqa: E402  (what a resumed run must share with an uninterrupted one)


def class_images(n, num_classes, shape, seed, noise=40):
    """uint8 images N×C×H×W and labels: a per-class pattern (same for every split) plus noise."""
    patterns = np.random.default_rng(1234).integers(30, 226, size=(num_classes,) + shape)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = patterns[y] + rng.normal(0, noise, size=(n,) + shape)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_cifar(root, n_train=256, n_test=64, num_classes=10):
    """cifar-10-batches-py / cifar-100-python pickles, as in the official 'python version' archive."""
    (xtr, ytr), (xte, yte) = (
        class_images(n_train, num_classes, (3, 32, 32), 0),
        class_images(n_test, num_classes, (3, 32, 32), 1),
    )
    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        parts = np.array_split(np.arange(n_train), 5)
        files = [(f"data_batch_{i + 1}", xtr[p], ytr[p]) for i, p in enumerate(parts)] + [
            ("test_batch", xte, yte)
        ]
        for name, x, y in files:
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({"data": x.reshape(len(x), -1), "labels": y.tolist()}, f)
        with open(os.path.join(folder, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump(
                    {
                        "data": x.reshape(len(x), -1),
                        "fine_labels": y.tolist(),
                        "coarse_labels": (y // 5).tolist(),
                    },
                    f,
                )
        with open(os.path.join(folder, "meta"), "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return (xtr, ytr), (xte, yte)


def write_svhn(root, n_train=128, n_test=64):
    """train_32x32.mat / test_32x32.mat: X is H×W×C×N, labels 1..10 with 10 meaning digit 0."""
    from scipy.io import savemat

    os.makedirs(root, exist_ok=True)
    out = []
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = class_images(n, 10, (3, 32, 32), seed)
        savemat(
            os.path.join(root, f"{name}_32x32.mat"),
            {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None].astype(np.uint8)},
        )
        out.append((x, y))
    return out


def write_mnist(root, n_train=200, n_test=100, gz=False):
    """MNIST/raw idx files (big-endian headers)."""
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    out = []
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = class_images(n, 10, (1, 28, 28), seed)
        images = struct.pack(">IIII", 2051, n, 28, 28) + x[:, 0].tobytes()
        labels = struct.pack(">II", 2049, n) + y.astype(np.uint8).tobytes()
        for suffix, payload in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            with open(os.path.join(folder, f"{prefix}-{suffix}"), "wb") as f:
                f.write(payload)
        out.append((x, y))
    return out


def write_tiny_imagenet(root, per_class=4, n_val=8, num_classes=200, gray_every=5):
    """tiny-imagenet-200: train/WNID/images/*.JPEG, val/images + val_annotations.txt, wnids.txt.
    Every `gray_every`-th image is saved as grayscale (the real set has some)."""
    from PIL import Image

    base = os.path.join(root, "tiny-imagenet-200")
    wnids = [f"n{i:08d}" for i in range(num_classes)]
    with open(os.makedirs(base, exist_ok=True) or os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    colours = np.random.default_rng(0).integers(0, 256, size=(num_classes, 3))
    k = 0
    for c, wnid in enumerate(wnids):
        folder = os.path.join(base, "train", wnid, "images")
        os.makedirs(folder, exist_ok=True)
        for j in range(per_class):
            img = Image.fromarray(np.full((64, 64, 3), colours[c], dtype=np.uint8))
            img = img.convert("L") if k % gray_every == 0 else img
            img.save(os.path.join(folder, f"{wnid}_{j}.JPEG"), quality=95)
            k += 1
    os.makedirs(os.path.join(base, "val", "images"), exist_ok=True)
    val_labels = [(7 * i) % num_classes for i in range(n_val)]
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for i, c in enumerate(val_labels):
            Image.fromarray(np.full((64, 64, 3), colours[c], dtype=np.uint8)).save(
                os.path.join(base, "val", "images", f"val_{i}.JPEG"), quality=95
            )
            f.write(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n")
    return colours, val_labels


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """In-process runs use one thread: two test workers share the two cores, and sums run in one fixed order."""
    torch.set_num_threads(1)


def copy_of(function):
    """`function` defined again from its source in a namespace that holds only torch (as torch, nn and F): the proof
    that a method's core copies into another project without this repository."""
    import inspect
    import textwrap

    namespace = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(textwrap.dedent(inspect.getsource(function)), namespace)
    return namespace[function.__name__]


@pytest.fixture
def log_lines():
    """The lines common.log writes during a test (without harness.setup, nothing prints them)."""
    import common

    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    common.logger.addHandler(handler)
    common.logger.setLevel(logging.INFO)
    yield lines
    common.logger.removeHandler(handler)


@pytest.fixture
def no_checksum():
    """torchvision checks the official md5 of CIFAR/SVHN files; test-made files cannot match it."""
    with launch.no_checksum():
        yield


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 (256 train / 64 test images) shared by the end-to-end tests."""
    root = str(tmp_path_factory.mktemp("cifar10"))
    write_cifar(root)
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mnist"))
    write_mnist(root)
    return root


def small_args(data_dir, out_dir, epochs=2, **extra):
    """Flags for a CPU smoke run of any method script on the tiny CIFAR-10: a small WRN, short eval."""
    args = [
        "--dataset",
        "cifar10",
        "--data-dir",
        data_dir,
        "--model",
        "wrn-10-1",
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--eval-samples",
        "32",
        "--eval-iters",
        "3",
        "--eval-restarts",
        "1",
        "--eval-cw-iters",
        "3",
        "--monitor-size",
        "32",
        "--device",
        "cpu",
        "--out-dir",
        out_dir,
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def run_script(script, args, env=None, expect=0, timeout=600):
    """Run a method script in a subprocess (through tests/_launch.py) and check its exit code."""
    # One thread: float reductions then run in one fixed order, so two runs of the same command are
    # bitwise equal whatever the machine's load (with several threads, MKL may change its thread count).
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "_launch.py"),
            os.path.join(ROOT, script),
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0", **one_thread, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect is not None:
        assert proc.returncode == expect, (
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
        )
    return proc


def load_results(out_dir):
    """A run's results.json (report.read_results: the one reader), which must be there and read."""
    res, problem = report.read_results(str(out_dir))
    assert res is not None, problem
    return res


def check_outputs(out_dir, epochs):
    """The files every run writes, and a results.json that holds what it should."""
    for name in (
        "log.txt",
        "results.json",
        "curves.png",
        "model_last.pt",
        "model_best.pt",
        "checkpoint.pt",
    ):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    res = load_results(out_dir)
    assert [r["epoch"] for r in res["epochs"]] == list(range(1, epochs + 1))
    for which in ("last", "best"):
        for key in ("clean", "pgd3_1", "cw3", "worst_case"):
            assert 0.0 <= res["final"][which][key] <= 1.0
    with open(os.path.join(out_dir, "log.txt")) as f:
        log = f.read()
    assert log.count("\n") >= epochs + 2
    return res


def check_resume(script, data_dir, tmp_path, epochs=2, in_process=True, **extra):
    """An interrupted run (Ctrl-C right after epoch 1's checkpoint) resumed with --resume ends with exactly the
    numbers of an uninterrupted run. in_process: the three runs in this process (faster; common's state is set up
    by each run); else each in its own process, as a real interruption is (tests/_launch.py)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    if in_process:
        import importlib

        main = importlib.import_module(script[:-3]).main
        with launch.no_checksum():
            main(small_args(data_dir, full, epochs, **extra))
            with launch.interrupt_after(1), pytest.raises(KeyboardInterrupt):
                main(small_args(data_dir, part, epochs, **extra))
            assert not os.path.exists(os.path.join(part, "results.json"))
            main(small_args(data_dir, part, epochs, resume=True, **extra))
    else:
        run_script(script, small_args(data_dir, full, epochs, **extra))
        proc = run_script(
            script,
            small_args(data_dir, part, epochs, **extra),
            env={"FASTAT_TEST_INTERRUPT_AFTER_EPOCH": "1"},
            expect=130,
        )
        assert "--resume" in proc.stderr
        assert not os.path.exists(os.path.join(part, "results.json"))
        run_script(script, ["--resume", "--out-dir", part])  # the flags come from the checkpoint
    a, b = load_results(full), load_results(part)
    assert comparable(a) == comparable(b)
    return a, b
