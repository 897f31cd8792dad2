"""What every fastat method script shares: data, models, PGD evaluation and the run plumbing
(command line, per-epoch log, checkpoints and resume, results.json, curves.png).

Nothing in this file is a training method: each method's attack and training loop live in its own
script. Evaluate a saved model without training, with stronger settings if you like:

    python common.py eval --weights runs/fgsm_rs-cifar10/model_best.pt --restarts 20 --autoattack
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

# crop = zero padding of the random crop (0: no crop). MNIST gets no normalisation, as in Wong et
# al.'s MNIST code, so its mean/std are the identity.
DATASETS = {
    "cifar10": dict(classes=10, shape=(3, 32, 32), crop=4, flip=True,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)),
    "cifar100": dict(classes=100, shape=(3, 32, 32), crop=4, flip=True,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "svhn": dict(classes=10, shape=(3, 32, 32), crop=4, flip=False,  # flipped digits are other digits
                 mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    "mnist": dict(classes=10, shape=(1, 28, 28), crop=0, flip=False, mean=(0.0,), std=(1.0,)),
    "tiny-imagenet": dict(classes=200, shape=(3, 64, 64), crop=4, flip=True,
                          mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
}

LAYOUTS = {
    "cifar10": "DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} "
               "(the 'python version' archive, unpacked)",
    "cifar100": "DATA_DIR/cifar-100-python/{train,test,meta} (the 'python version' archive, unpacked)",
    "svhn": "DATA_DIR/{train_32x32.mat,test_32x32.mat} (the 'cropped digits' format)",
    "mnist": "DATA_DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "tiny-imagenet": "DATA_DIR/tiny-imagenet-200/{wnids.txt,train/WNID/images/*.JPEG,"
                     "val/images/*.JPEG,val/val_annotations.txt} (the unzipped tiny-imagenet-200.zip)",
    "folder": "DATA_DIR/train/CLASS/* and DATA_DIR/test/CLASS/* (torchvision's ImageFolder layout; val/ is "
              "accepted for test/), images of one size in any format PIL reads",
}
# Every --dataset: the fixed ones above, and "folder" (any image folder; its facts come from dataset_info()).
DATASET_NAMES = list(DATASETS) + ["folder"]


def _missing(name, data_dir, why):
    # One line, no traceback: the user needs to know where the files are expected, nothing else.
    raise SystemExit(f"fastat: dataset '{name}' not found in {os.path.abspath(data_dir)} and it could not "
                     f"be downloaded ({why}); expected layout: {LAYOUTS[name].replace('DATA_DIR', data_dir)}")


def _bad_data(message):
    """A dataset that is there but unusable: one line on stderr and exit code 2, as for a bad flag."""
    print(f"fastat: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _torchvision_split(name, data_dir, cls, **split):
    """Open a torchvision dataset; download it only when it is missing (or fails its checksum)."""
    try:
        return cls(data_dir, download=False, **split)
    except RuntimeError:
        pass
    print(f"fastat: {name} not found in {data_dir}, downloading it", file=sys.stderr, flush=True)
    try:
        # torchvision prints its own progress and per-mirror failures; keep them off the terminal
        # so that an offline failure is the single line of _missing().
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return cls(data_dir, download=True, **split)
    except Exception as err:  # offline: URLError, socket errors, HTTP errors, a bad archive ...
        _missing(name, data_dir, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _class_folders(directory):
    # torchvision's find_classes() would also take hidden folders (.ipynb_checkpoints, ...) as classes.
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _decode(samples, size=None):
    """Decode (path, label) pairs into a uint8 array N×C×H×W and int64 labels.

    Files PIL cannot identify (a README, .DS_Store, Tiny ImageNet's box files) are skipped and counted.
    Every image must be `size` (W, H), or the size of the first image: no silent resizing. The images stay
    one channel if all of them are grayscale; otherwise every image becomes RGB (a grayscale image among
    colour ones is replicated into three channels, as PIL's convert("RGB") does)."""
    from PIL import Image, UnidentifiedImageError
    arrays, labels, skipped, first = [], [], 0, None
    for path, label in samples:
        try:
            with Image.open(path) as img:
                img.load()
                if size is None:
                    size, first = img.size, path
                if img.size != size:
                    _bad_data(f"{path} is {img.size[0]}x{img.size[1]} but the images are "
                              f"{size[0]}x{size[1]}{f' (like {first})' if first else ''}: every image must have "
                              f"one size (fastat does not resize; resize the folder beforehand)")
                gray = img.mode in ("1", "L", "LA")
                arrays.append(np.asarray(img.convert("L" if gray else "RGB")))
        except UnidentifiedImageError:
            skipped += 1
            continue
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # truncated, corrupt, or huge
            _bad_data(f"cannot read image {path}: {err}")
        labels.append(label)
    if skipped:
        print(f"fastat: skipped {skipped} file(s) that are not images", file=sys.stderr, flush=True)
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64)
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
        x = np.stack(arrays).transpose(0, 3, 1, 2)
    else:
        x = np.stack(arrays)[:, None]
    return np.ascontiguousarray(x), np.array(labels, dtype=np.int64)


def _decode_cached(cache, samples, root, size=None, with_stats=False):
    """_decode() once: the arrays are cached in `cache` (an .npz beside the data) together with the list of
    files they came from, and decoded again whenever that list changes. Returns a dict with x, y (and the
    per-channel mean and std of x/255 if with_stats)."""
    files = np.array([os.path.relpath(p, root) for p, _ in samples], dtype=str)
    labels = np.array([c for _, c in samples], dtype=np.int64)
    # size and modification time of every file: an image rewritten under its old name renews the cache too;
    # a file deleted since (-1) does not: the images may be removed once decoded
    def stamp(path):
        try:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            return -1, -1
    stamps = np.array([stamp(p) for p, _ in samples], dtype=np.int64).reshape(-1, 2)
    if os.path.exists(cache):
        try:
            with np.load(cache) as f:
                cached = {k: f[k] for k in f.files}
            old = cached.get("stamps")
            if (np.array_equal(cached["files"], files) and np.array_equal(cached["labels"], labels)
                    and old is not None and old.shape == stamps.shape
                    and ((old == stamps) | (stamps == -1)).all() and (not with_stats or "mean" in cached)):
                return cached
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable or from another version: decode again
    x, y = _decode(samples, size)
    out = {"x": x, "y": y, "files": files, "labels": labels, "stamps": stamps}
    if with_stats and len(x):
        v = torch.from_numpy(x).float().div_(255).transpose(0, 1).flatten(1)  # C × (N·H·W)
        out["mean"], out["std"] = v.mean(1).numpy(), v.std(1).numpy()
    tmp = cache + ".tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **out)
        os.replace(tmp, cache)  # atomic: an interrupted write leaves no half-written cache
    except OSError:  # a read-only data directory only costs the decode next time
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return out


def _folder_samples(directory, class_to_idx):
    """(path, label) for every non-hidden file under directory/CLASS/ (recursively), in torchvision's order."""
    from torchvision.datasets.folder import make_dataset
    unknown = sorted(set(_class_folders(directory)) - set(class_to_idx))
    if unknown:
        _bad_data(f"{directory}/{unknown[0]} is not a class of the training split (classes are the folders "
                  f"of train/)")
    return make_dataset(directory, class_to_idx, allow_empty=True,
                        is_valid_file=lambda p: not os.path.basename(p).startswith("."))


_FOLDERS = {}  # (data_dir, split) → decoded split, so parse-time checks and get_data() decode once


def _folder_split(data_dir, train):
    """--dataset folder: DATA_DIR/train/CLASS/* and DATA_DIR/test/CLASS/* (or val/), torchvision's
    ImageFolder layout. Classes are the sorted folder names of train/."""
    key = (os.path.abspath(data_dir), train)
    if key in _FOLDERS:
        return _FOLDERS[key]
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, d) for d in ("test", "val") if os.path.isdir(os.path.join(data_dir, d))),
                    None)
    if not os.path.isdir(train_dir) or test_dir is None:
        _missing("folder", data_dir, "no download source for an image folder")
    classes = _class_folders(train_dir)
    if not classes:
        _bad_data(f"{train_dir} holds no class folders")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    size = None
    if not train:  # the test images must have the training images' size
        x = _folder_split(data_dir, True)["x"]
        size = (x.shape[3], x.shape[2])
    samples = _folder_samples(train_dir if train else test_dir, class_to_idx)
    split = "train" if train else "test"
    out = _decode_cached(os.path.join(data_dir, f"fastat-folder-{split}-uint8.npz"), samples, data_dir, size,
                         with_stats=train)
    if train:
        counts = np.bincount(out["y"], minlength=len(classes))
        if (counts == 0).any():
            _bad_data(f"{os.path.join(train_dir, classes[int(np.argmin(counts))])} holds no images: every class "
                      f"folder of train/ needs at least one")
    elif not len(out["y"]):
        _bad_data(f"{test_dir} holds no images")
    out["classes"] = classes
    _FOLDERS[key] = out
    return out


def _tiny_imagenet(data_dir, train):
    """Tiny ImageNet: train/ is an image folder; val/ is relabelled from val_annotations.txt. Decoded once
    (grayscale images to RGB, as most are colour) and cached next to the data as uint8 arrays."""
    root = os.path.join(data_dir, "tiny-imagenet-200")
    if not os.path.isdir(os.path.join(root, "train")) or not os.path.isdir(os.path.join(root, "val")):
        _missing("tiny-imagenet", data_dir, "no download source: get tiny-imagenet-200.zip and unzip it there")
    class_to_idx = {c: i for i, c in enumerate(_class_folders(os.path.join(root, "train")))}  # sorted wnids
    if train:
        samples = _folder_samples(os.path.join(root, "train"), class_to_idx)
    else:
        samples = []
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            for line in f:
                if line.strip():
                    file, wnid = line.split("\t")[:2]
                    samples.append((os.path.join(root, "val", "images", file), class_to_idx[wnid]))
    out = _decode_cached(os.path.join(root, f"fastat-{'train' if train else 'val'}-uint8.npz"), samples, root,
                         size=(64, 64))
    return out["x"], out["y"]


def dataset_info(name, data_dir="data"):
    """classes, shape, crop padding, flip, mean, std of a dataset. For --dataset folder they come from the
    images: the channel count and size, padding = size/8, mean and std of the training split."""
    if name != "folder":
        return DATASETS[name]
    split = _folder_split(data_dir, train=True)
    shape = tuple(split["x"].shape[1:])
    return dict(classes=len(split["classes"]), shape=shape, crop=shape[1] // 8, flip=True,
                mean=tuple(split["mean"].tolist()), std=tuple(split["std"].tolist()))


def load_split(name, data_dir, train):
    """Return one split as (uint8 array N×C×H×W, int64 labels)."""
    from torchvision import datasets
    if name == "folder":
        split = _folder_split(data_dir, train)
        x, y = split["x"], split["y"]
    elif name == "tiny-imagenet":
        x, y = _tiny_imagenet(data_dir, train)
    elif name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = _torchvision_split(name, data_dir, cls, train=train)
        x, y = ds.data.transpose(0, 3, 1, 2), ds.targets
    elif name == "svhn":
        ds = _torchvision_split(name, data_dir, datasets.SVHN, split="train" if train else "test")
        x, y = ds.data, ds.labels
    elif name == "mnist":
        ds = _torchvision_split(name, data_dir, datasets.MNIST, train=train)
        x, y = ds.data.numpy()[:, None], ds.targets.numpy()
    else:
        raise ValueError(f"unknown dataset {name}")
    return np.ascontiguousarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)


class DeviceLoader:
    """A whole split held as a uint8 tensor on the training device. Each epoch draws a permutation
    and augments whole batches on the device (random crop with zero padding, horizontal flip), so
    no worker processes or host-to-device copies sit in the training loop.

    Yields (x, y, idx): float images in [0, 1], labels, and each sample's index in the full
    training split (per-sample memories are indexed by it). The shuffling/augmentation generator
    is seeded by (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, images, labels, indices, batch_size, device, shuffle=False, crop=0, flip=False, seed=0):
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.device = batch_size, torch.device(device)
        self.shuffle, self.crop, self.flip, self.seed = shuffle, crop, flip, seed
        # FASTAT_COUNT_FLOPS=1 (bench/epoch_time.py sets it): count the FLOPs of the first training step that
        # this process runs (everything the loop does with the first batch: attack, weight step, the method's
        # own networks) with torch's FlopCounterMode. It slows that one step, so it is off by default.
        self.count_flops = shuffle and os.environ.get("FASTAT_COUNT_FLOPS") == "1"
        self.step_flops = None

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        starts = [s for s in range(0, n, self.batch_size) if not (self.shuffle and n - s == 1)]
        # a lone last sample (n − s = 1) would make train-mode BatchNorm fail: it is dropped.
        # The whole epoch's random draws are made here, batch by batch in the order a per-batch loop would make
        # them (so the augmentation is the same), and sent to the device in one copy each: a copy from pageable
        # host memory waits for the GPU's queue to drain, and three of them per batch would stall every step.
        crops, flips = [], []
        for start in starts:
            size = min(self.batch_size, n - start)
            if self.crop:
                crops.append(torch.randint(0, 2 * self.crop + 1, (size, 2), generator=gen))
            if self.flip:
                flips.append(torch.rand(size, generator=gen) < 0.5)
        order = order.to(self.device)
        crops = torch.cat(crops).to(self.device) if crops else None
        flips = torch.cat(flips).to(self.device) if flips else None
        for start in starts:
            batch = order[start:start + self.batch_size]
            x = self.images[batch]
            if self.crop:
                x = random_crop(x, self.crop, crops[start:start + len(batch)])
            if self.flip:
                x = torch.where(flips[start:start + len(batch), None, None, None], x.flip(3), x)
            x = x.float().div_(255)
            if gpu_path(self.device):
                x = x.contiguous(memory_format=torch.channels_last)
            if self.count_flops and self.step_flops is None:
                from torch.utils.flop_counter import FlopCounterMode
                # The consumer's whole step runs between this yield and the next request, inside the counter.
                with FlopCounterMode(display=False) as counter:
                    yield x, self.labels[batch], self.indices[batch]
                self.step_flops = {"flops": counter.get_total_flops(), "batch_size": len(batch)}
                continue
            yield x, self.labels[batch], self.indices[batch]


def gpu_path(device):
    """Train in bf16 autocast with channels_last tensors? Always on CUDA. On the CPU only when the environment
    sets FASTAT_CPU_BF16=1: slow there, but it lets the tests run the GPU path's dtypes and memory layout
    (double backward, hooks, per-sample memories) on a machine without a GPU."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("FASTAT_CPU_BF16") == "1")


def random_crop(x, pad, offsets):
    """Batched random crop: zero-pad by `pad`, then cut each image at its own (row, col) offset."""
    n, c, h, w = x.shape
    offsets = offsets.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


@dataclass
class Data:
    name: str
    num_classes: int
    mean: tuple
    std: tuple
    train: DeviceLoader
    val: Optional[DeviceLoader]       # held-out slice of the training split, unaugmented
    test_x: torch.Tensor              # uint8 on the device
    test_y: torch.Tensor
    train_size: int                   # size of the full training split: rows of per-sample memories
    monitor: tuple                    # fixed (x, y) batch for the catastrophic-overfitting monitor


def get_data(args, device, val_size=0):
    info = dataset_info(args.dataset, args.data_dir)
    x, y = load_split(args.dataset, args.data_dir, train=True)
    tx, ty = load_split(args.dataset, args.data_dir, train=False)
    if val_size >= len(y):
        raise SystemExit(f"fastat: --val-size {val_size} leaves no training images ({len(y)} in the split)")
    # The validation slice does not depend on --seed, so runs with different seeds share it.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = perm[len(y) - val_size:].sort().values, perm[:len(y) - val_size].sort().values
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    train = DeviceLoader(x[train_idx], y[train_idx], train_idx, args.batch_size, device, shuffle=True,
                         crop=info["crop"], flip=info["flip"] and not getattr(args, "no_flip", False),
                         seed=args.seed)
    # no FLOP count under --compile: a step under FlopCounterMode would not be compiled (and, with some torch
    # versions, never again), so the timed epochs would be eager
    train.count_flops = train.count_flops and not getattr(args, "compile", False)
    val = DeviceLoader(x[val_idx], y[val_idx], val_idx, args.batch_size, device) if val_size else None
    source = val if val is not None else train
    m = min(args.monitor_size, len(source.labels))
    # A fixed random subset, not the first m images: an image folder (and Tiny ImageNet) lists its images
    # class by class, so the first m would be one or two classes and the monitor would measure nothing.
    pick = torch.randperm(len(source.labels), generator=torch.Generator().manual_seed(1))[:m].sort().values
    pick = pick.to(source.labels.device)
    monitor = (source.images[pick].float() / 255, source.labels[pick])
    if tx.shape[1:] != x.shape[1:]:  # a built-in dataset always matches; a folder is checked when decoded
        raise SystemExit(f"fastat: test images are {tuple(tx.shape[1:])}, training images {tuple(x.shape[1:])}")
    return Data(args.dataset, info["classes"], info["mean"], info["std"], train, val,
                torch.from_numpy(tx).to(device), torch.from_numpy(ty).to(device), len(y), monitor)


# ----------------------------------------------------------------------------------------------
# Models: all take images in [0, 1] and normalise inside (RobustBench convention, SPEC §0)
# ----------------------------------------------------------------------------------------------

class Normalized(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalize(self, x):
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Normalized):
    """PreActResNet18 as in Wong et al.'s fast_adversarial, including the final BN-ReLU."""

    def __init__(self, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # adaptive pooling = Wong's avg_pool2d(out, 4) on 32×32 inputs, and also fits 64×64 / 28×28
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBasic(nn.Module):
    def __init__(self, in_planes, planes, stride, dropout=0.0):
        super().__init__()
        self.dropout = dropout  # drop rate between the two convs (Zagoruyko & Komodakis), train mode only
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        out = self.conv2(F.dropout(out, self.dropout, self.training) if self.dropout else out)
        return out + shortcut


class WideResNet(Normalized):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation; depth = 6n + 4. dropout: drop rate
    inside every block (default 0, no dropout; latent_at.py sets its authors' 0.3)."""

    def __init__(self, depth=34, width=10, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,), dropout=0.0):
        super().__init__(mean, std)
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._group(widths[2], widths[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _group(in_planes, planes, n, stride, dropout=0.0):
        return nn.Sequential(*[WideBasic(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, dropout)
                               for i in range(n)])

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class MnistCNN(Normalized):
    """Wong et al.'s MNIST net (SPEC §1): conv(1→16,k4,s2,p1)–ReLU–conv(16→32,k4,s2,p1)–ReLU–FC(1568→100)–ReLU–FC(10)."""

    def __init__(self, num_classes=10, in_channels=1, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, num_classes))

    def forward(self, x):
        return self.net(self.normalize(x))


class LeNet(Normalized):
    """The LeNet of pytorch/examples mnist/main.py from Dec 2018 to Nov 2019 (the PyTorch 1.0 that Amata ran;
    later versions use conv 32/64 k3 with dropout): conv(1→20,k5)–ReLU–maxpool 2–conv(20→50,k5)–ReLU–maxpool 2–
    FC(800→500)–ReLU–FC(10), no padding, no dropout. It returns logits (the original ends in log_softmax, which
    the cross-entropy applies itself). The first FC layer's width follows the image size: 50·4·4 = 800 on 28×28."""

    def __init__(self, num_classes=10, in_channels=1, mean=(0.0,), std=(1.0,), image_size=(28, 28)):
        super().__init__(mean, std)
        h, w = (((s - 4) // 2 - 4) // 2 for s in image_size)  # two valid 5×5 convolutions, each then pooled by 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(50 * h * w, 500), nn.ReLU(), nn.Linear(500, num_classes))

    def forward(self, x):
        return self.net(self.normalize(x))


def model_name(text):
    """argparse type for --model: preact18, wrn-DEPTH-WIDTH (depth = 6n+4), mnist-cnn or lenet."""
    name = text.lower()
    if name in ("preact18", "preactresnet18"):
        return "preact18"
    if name in ("mnist-cnn", "cnn"):
        return "mnist-cnn"
    if name == "lenet":
        return "lenet"
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if m and int(m[1]) >= 10 and (int(m[1]) - 4) % 6 == 0 and int(m[2]) >= 1:
        return name
    raise argparse.ArgumentTypeError(
        f"'{text}' is not a model: use preact18, wrn-DEPTH-WIDTH with depth = 6n+4 (wrn-34-10, wrn-28-10, "
        f"wrn-16-2, ...), mnist-cnn or lenet")


def make_model(name, dataset, data_dir="data"):
    info = dataset_info(dataset, data_dir)
    kw = dict(num_classes=info["classes"], in_channels=info["shape"][0], mean=info["mean"], std=info["std"])
    if name == "preact18":
        return PreActResNet18(**kw)
    if name == "mnist-cnn":
        return MnistCNN(**kw)
    if name == "lenet":
        return LeNet(image_size=info["shape"][1:], **kw)
    depth, width = map(int, name.split("-")[1:])
    return WideResNet(depth, width, **kw)


def get_model(args, device):
    model = make_model(args.model, args.dataset, args.data_dir).to(device)
    if gpu_path(device):
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------------
# Attacks for evaluation (fp32, model in eval mode)
# ----------------------------------------------------------------------------------------------

def cw_margin(logits, y):
    """Carlini-Wagner margin: max_{k≠y} z_k − z_y, per sample (> 0 ⇔ misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def attack_loss(logits, y, loss):
    return F.cross_entropy(logits, y, reduction="none") if loss == "ce" else cw_margin(logits, y)


def attack_pgd(model, x, y, eps, step, iters, restarts=1, loss="ce", rand_init=True):
    """L∞ PGD. Returns (delta, robust): per sample the restart whose final δ has the highest loss,
    and whether the sample was classified correctly after *every* restart (the honest accuracy).
    Gradients flow to δ only; the model's .grad fields are not touched."""
    best_delta = torch.zeros_like(x)
    best_loss = torch.full((len(y),), -float("inf"), device=x.device)
    robust = torch.ones(len(y), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = torch.empty_like(x).uniform_(-eps, eps) if rand_init else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(iters):
            delta.requires_grad_(True)
            grad, = torch.autograd.grad(attack_loss(model(x + delta), y, loss).sum(), delta)
            delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        with torch.no_grad():
            logits = model(x + delta)
            final = attack_loss(logits, y, loss)
            robust &= logits.argmax(1) == y
            # torch.where, not best_delta[better] = ...: a boolean mask has a data-dependent size, so indexing
            # with it makes the host wait for the GPU (LAS-AT runs this attack inside its training loop).
            better = final > best_loss
            best_delta = torch.where(better.view(-1, *[1] * (x.dim() - 1)), delta, best_delta)
            best_loss = torch.where(better, final, best_loss)
    return best_delta, robust


def pgd_accuracy(model, x, y, eps, step, iters, restarts=1, loss="ce", batch_size=500, label=None,
                 per_sample=False):
    """Robust accuracy over a whole set in batches; prints progress every few seconds if `label`.
    per_sample: return the bool mask of samples classified correctly instead of the accuracy."""
    was_training = model.training
    model.eval()
    correct, done, last_print, masks = 0, 0, time.time(), []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        if iters == 0:
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
        else:
            ok = attack_pgd(model, xb, yb, eps, step, iters, restarts, loss)[1]
        masks.append(ok)
        correct += ok.sum().item()
        done += len(yb)
        if label and (time.time() - last_print > 5 or done == len(y)):
            print(f"  {label}: {done}/{len(y)} images, accuracy so far {100 * correct / done:.2f}%", flush=True)
            last_print = time.time()
    model.train(was_training)
    if per_sample:
        return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=y.device)
    return correct / max(len(y), 1)


def autoattack_accuracy(model, x, y, eps, num_classes, batch_size=500, per_sample=False):
    """Standard L∞ AutoAttack via the official `autoattack` package, else `torchattacks`.
    per_sample: return the bool mask of samples that survive instead of the accuracy."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    model.eval()
    try:
        from autoattack import AutoAttack
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=x.device)
        x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
    except ImportError:
        try:
            import torchattacks
        except ImportError:
            print("AutoAttack skipped: install the official package (pip install "
                  "git+https://github.com/fra31/auto-attack) or torchattacks", flush=True)
            return None
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes)
        x_adv = torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])
    with torch.no_grad():
        ok = torch.cat([model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                        for i in range(0, len(y), batch_size)])
    return ok if per_sample else ok.float().mean().item()


def eval_subset(total, n=None):
    """Indices of the test images to evaluate: all of them, or a fixed random subset of n (sorted). Not the first
    n: an image folder (and Tiny ImageNet's train-ordered val) may list its images class by class."""
    if not n or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values


def eval_step(dataset):
    """PGD step of the evaluation protocol (SPEC §0): 2/255, MNIST 0.01."""
    return 0.01 if dataset == "mnist" else 2 / 255


def evaluate(model, x, y, eps, step, pgd_iters=50, restarts=10, cw_iters=20, autoattack=False,
             num_classes=10, batch_size=500):
    """SPEC §0: clean, PGD-50-10 (CE, random start, per-sample worst restart), PGD-20 on the CW margin, and
    "worst_case": the share of samples classified correctly clean and under every attack that ran (per
    sample, as RobustBench counts). CE-based PGD is weak against models trained on soft labels (R-MC-LA,
    label smoothing) without their being robust; the worst case is the honest headline then."""
    model = model.float()
    masks = {"clean": pgd_accuracy(model, x, y, eps, step, 0, batch_size=batch_size, label="clean",
                                   per_sample=True)}
    masks[f"pgd{pgd_iters}_{restarts}"] = pgd_accuracy(model, x, y, eps, step, pgd_iters, restarts, "ce",
                                                       batch_size, label=f"PGD-{pgd_iters}-{restarts}",
                                                       per_sample=True)
    if cw_iters:
        masks[f"cw{cw_iters}"] = pgd_accuracy(model, x, y, eps, step, cw_iters, 1, "cw", batch_size,
                                              label=f"CW-{cw_iters}", per_sample=True)
    if autoattack:
        masks["autoattack"] = autoattack_accuracy(model, x, y, eps, num_classes, batch_size, per_sample=True)
    ran = [m for m in masks.values() if m is not None]
    masks["worst_case"] = torch.stack(ran).all(0)
    n = max(len(y), 1)
    return {k: None if m is None else m.sum().item() / n for k, m in masks.items()}


# ----------------------------------------------------------------------------------------------
# Command line shared by every method script
# ----------------------------------------------------------------------------------------------

def _nonneg_float(text):
    v = float(text)
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _pos_float(text):
    v = float(text)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _pos_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return v


def _nonneg_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


nonneg_float, pos_float, pos_int, nonneg_int = _nonneg_float, _pos_float, _pos_int, _nonneg_int


def base_parser(doc, lr_flag="--lr-max", lr_help="peak learning rate",
                alpha_help="attack step size, in /255 units (default: the recipe's ratio to ε, times --epsilon)"):
    """The flags every method shares. Flags left at None are filled from the method's recipe for
    the chosen dataset by parse_args()."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASET_NAMES,
                   help="folder: any image folder DATA_DIR/{train,test}/CLASS/* (the CIFAR-10 recipe is used)")
    p.add_argument("--data-dir", default="data", help="where datasets live / are downloaded to")
    p.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flip (for data where a flip changes the class: digits, text)")
    p.add_argument("--model", type=model_name, default=None,
                   help="preact18 (default; mnist-cnn for MNIST, lenet for Amata's MNIST recipe), wrn-DEPTH-WIDTH "
                        "(e.g. wrn-34-10), mnist-cnn, lenet")
    p.add_argument("--epochs", type=pos_int, default=None, help="training epochs (recipe default)")
    p.add_argument("--batch-size", type=pos_int, default=None)
    p.add_argument(lr_flag, type=pos_float, default=None, help=lr_help)
    p.add_argument("--epsilon", type=nonneg_float, default=None,
                   help="L∞ radius of training and of the final evaluation, in /255 units")
    p.add_argument("--alpha", type=nonneg_float, default=None,
                   help=alpha_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="log, checkpoint, results and weights (default runs/SCRIPT-DATASET)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--eval-samples", type=pos_int, default=None,
                   help="evaluate on N test images, a fixed random subset (default: all)")
    p.add_argument("--eval-iters", type=pos_int, default=50, help="PGD steps of the final evaluation")
    p.add_argument("--eval-restarts", type=pos_int, default=10, help="PGD restarts of the final evaluation")
    p.add_argument("--autoattack", action="store_true", help="also run AutoAttack in the final evaluation")
    p.add_argument("--monitor-size", type=pos_int, default=512,
                   help="images in the fixed batch of the catastrophic-overfitting monitor (PGD-10, step ε/4)")
    p.add_argument("--val-size", type=nonneg_int, default=None,
                   help="training images held out for validation; the best model is chosen on them "
                        "(0: on the monitor batch, drawn from training images)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last epoch")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    return p


def parse_args(parser, recipes, argv=None, script=None, eps_relative=("alpha",)):
    """Parse, then fill every flag left at None from recipes[dataset] (or recipes['default']).

    eps_relative: recipe values that are a ratio of ε (the FGSM step α = 1.25ε of FGSM-RS, ...). When the user
    sets --epsilon but not one of these, it keeps the recipe's ratio to ε instead of the recipe's absolute
    value: `--epsilon 16` trains FGSM-RS with α = 20/255, not 10/255. An explicit flag always wins."""
    args = parser.parse_args(argv)
    recipe = {"val_size": 0, **recipes.get("default", {}), **recipes.get(args.dataset, {})}
    recipe.setdefault("model", "mnist-cnn" if args.dataset == "mnist" else "preact18")
    if args.epsilon is not None and recipe.get("epsilon"):
        for key in eps_relative:
            if getattr(args, key, None) is None and key in recipe:
                setattr(args, key, recipe[key] * args.epsilon / recipe["epsilon"])
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model == "mnist-cnn" and dataset_info(args.dataset, args.data_dir)["shape"][1:] != (28, 28):
        parser.error("--model mnist-cnn only fits 28x28 images (--dataset mnist)")
    script = script or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    args.method = script
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{script}-{args.dataset}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


# ----------------------------------------------------------------------------------------------
# Run plumbing: seed, log, checkpoints/resume, monitor, results.json, curves.png, weights
# ----------------------------------------------------------------------------------------------

class NonFiniteLoss(Exception):
    pass


# An epoch whose clean predictions on the monitor batch put at least this share into one class is not
# eligible as "best" (issue: a constant predictor won against catastrophically overfitted models).
DEGENERATE_SHARE = 0.9


def top_class_share(model, x, batch_size=500):
    """Share of the images that get the most frequent predicted class (clean inputs, eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return torch.bincount(pred).max().item() / max(len(pred), 1)


class Run:
    """One training run in args.out_dir.

        run = Run(args)
        run.track(model=model, opt=opt, sched=sched)       # everything a resume must restore
        for epoch in run.epochs():                          # loads the checkpoint on --resume
            ...train one epoch...
            run.end_epoch(epoch, model, data, lr=..., loss=..., acc=...)
        run.finish(model, data)

    `run.state` is a dict for the method's own values (saved with every checkpoint, restored on
    resume before the first epoch starts). Objects passed to track() are restored in place:
    modules, optimisers and schedulers via load_state_dict, tensors (per-sample memories) via copy_.
    """

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        os.makedirs(args.out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
        if os.path.exists(self.ckpt_path) and not args.resume:
            raise SystemExit(f"fastat: {args.out_dir} already holds a run (checkpoint.pt); pass --resume to "
                             f"continue it, or choose another --out-dir")
        self.log_file = open(os.path.join(args.out_dir, "log.txt"), "a" if args.resume else "w")
        self.tracked, self.state, self.rows = {}, {}, []
        self.best = {"score": -float("inf"), "epoch": 0, "weights": None}
        self.train_time, self.start_epoch, self.stopped = 0.0, 0, False
        self._columns = None

    # -- helpers the training loops use
    def autocast(self):
        """bf16 autocast for training on CUDA; a no-op on the CPU (fp32), unless FASTAT_CPU_BF16=1."""
        if gpu_path(self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compile(self, model):
        return torch.compile(model) if self.args.compile else model

    def print(self, line):
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def track(self, **objects):
        """Objects a resume must restore. A tensor (a per-sample memory: GBs for FGSM-MEP) is not serialised
        into checkpoint.pt: its raw bytes are written in place into NAME.0.bin or NAME.1.bin, in turn (the
        one that the checkpoint on disk does not name), and checkpoint.pt then names the file. Rewriting a file that already exists is a copy into
        the page cache, several times cheaper than torch.save of a new file; and the file being rewritten is
        never the one that the checkpoint.pt on disk names, so an interrupted save leaves the last checkpoint
        whole. Still, rewriting GBs every epoch can outlast a fast epoch (and a slow disk throttles it): a run
        that tracks a tensor skips an epoch's checkpoint while its saves so far have cost more than 5% of its
        training time, and always saves its last epoch. An interruption then resumes from the last save, a
        few epochs back at worst, and exactly: everything in a checkpoint is of the same epoch."""
        self.tracked.update(objects)
        # A tensor on the GPU goes through one host buffer per tensor, allocated here once: a fresh host copy
        # at every save would page-fault its GBs again each time.
        self._host_copies = {**getattr(self, "_host_copies", {}),
                             **{k: torch.empty(v.numel() * v.element_size(), dtype=torch.uint8)
                                for k, v in objects.items() if torch.is_tensor(v) and v.device.type != "cpu"}}

    # -- checkpoints
    def _save_checkpoint(self, epochs_done):
        spent = getattr(self, "_save_seconds", 0.0)  # seconds spent saving since this process started
        budgeted = any(torch.is_tensor(v) for v in self.tracked.values())  # see track()
        if budgeted and spent > 0.05 * self.train_time and not (self.stopped or epochs_done >= self.args.epochs):
            return
        start = time.time()
        tracked = {}
        # The slot that the checkpoint.pt on disk does not name (not the epoch's parity: with skipped epochs
        # that could be the file the last checkpoint needs).
        slot = 1 - getattr(self, "_slot", 1)
        for k, v in self.tracked.items():
            if not torch.is_tensor(v):
                tracked[k] = v.state_dict()
                continue
            name = f"{k}.{slot}.bin"  # see track(): written before checkpoint.pt names it
            path = os.path.join(os.path.dirname(self.ckpt_path), name)
            data = v.detach().contiguous().reshape(-1).view(torch.uint8)
            if k in self._host_copies:
                data = self._host_copies[k].copy_(data)
            with open(path, "r+b" if os.path.exists(path) else "wb") as f:
                f.write(data.numpy().data)
                f.truncate()
            tracked[k] = {"file": name, "dtype": str(v.dtype), "shape": list(v.shape)}
        ckpt = {
            "epochs_done": epochs_done, "rows": self.rows, "best": self.best, "train_time": self.train_time,
            "stopped": self.stopped, "state": self.state, "args": vars(self.args), "tracked": tracked,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.cuda else None},
        }
        tmp = self.ckpt_path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, self.ckpt_path)  # atomic: an interruption never leaves a half-written checkpoint
        self._slot = slot
        self._save_seconds = spent + time.time() - start

    def _load_checkpoint(self):
        ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        for k, v in self.tracked.items():
            saved = ckpt["tracked"][k]
            if torch.is_tensor(v) and isinstance(saved, dict):  # raw bytes in the side file track() describes
                raw = np.fromfile(os.path.join(os.path.dirname(self.ckpt_path), saved["file"]), dtype=np.uint8)
                if saved["dtype"] != str(v.dtype) or len(raw) != v.numel() * v.element_size():
                    raise SystemExit(f"fastat: {saved['file']} does not hold the {k} of this run")
                v.copy_(torch.from_numpy(raw).view(v.dtype).view(v.shape))
                self._slot = int(saved["file"].rsplit(".", 2)[1])  # the next save writes the other slot
            elif torch.is_tensor(v):  # a checkpoint.pt written before the side files
                v.copy_(saved)
            else:
                v.load_state_dict(ckpt["tracked"][k])
        self.rows, self.best, self.train_time = ckpt["rows"], ckpt["best"], ckpt["train_time"]
        if self.best["weights"] is not None:  # map_location moved them to the device; they are kept on the CPU
            self.best["weights"] = {k: v.cpu() for k, v in self.best["weights"].items()}
        self.stopped, self.start_epoch = ckpt["stopped"], ckpt["epochs_done"]
        # Flags that only affect evaluation or where the run happens may change; others change the run.
        free = {"resume", "device", "out_dir", "data_dir", "eval_samples", "eval_iters", "eval_restarts",
                "autoattack", "compile"}
        for key, saved in ckpt.get("args", {}).items():
            if key not in free and getattr(self.args, key, saved) != saved:
                self.print(f"# warning: --{key.replace('_', '-')} was {saved} when this run started and is "
                           f"{getattr(self.args, key)} now; the resumed run is not the run that was started")
        self.state.clear()
        self.state.update(ckpt["state"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    # -- the epoch loop
    def epochs(self):
        if self.args.resume:
            if os.path.exists(self.ckpt_path):
                self._load_checkpoint()
                self.print(f"# resumed from {self.ckpt_path} after epoch {self.start_epoch}")
            else:
                self.print(f"# --resume: no checkpoint in {self.args.out_dir}, starting from scratch")
        else:
            self.print(f"# python {self.args.method}.py {command_line(self.args)}")
        for epoch in range(self.start_epoch, self.args.epochs):
            if self.stopped:
                break
            self._sync()
            self._epoch_start, self._epoch_cpu_start = time.time(), time.process_time()
            yield epoch

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def end_epoch(self, epoch, model, data, lr, loss, acc, score=None, stop=False, **extra):
        """Close an epoch: check the loss, run the monitor, keep the best weights, log, checkpoint.

        loss/acc: the epoch's mean training loss and accuracy (on the training inputs the method
        uses, e.g. x+δ). score: what "best" maximises (default: the monitor's PGD accuracy).
        stop: the method ends training after this epoch (early stopping). extra: more columns.
        """
        self._sync()
        seconds = time.time() - self._epoch_start
        # CPU time of this process: on a CPU run it measures the epoch's cost even when other work shares the
        # machine (wall-clock seconds then grow, CPU seconds hardly). Meaningless on CUDA, where the host waits.
        cpu_seconds = time.process_time() - self._epoch_cpu_start
        self.train_time += seconds
        if not math.isfinite(loss):
            self.print(f"# epoch {epoch + 1}: training loss is {loss}; stopping. The last checkpoint in "
                       f"{self.ckpt_path} is intact (lower the learning rate or step size and --resume).")
            raise NonFiniteLoss()
        x, y = data.monitor
        eps = self.args.epsilon / 255
        monitor = pgd_accuracy(model, x, y, eps, eps / 4, 10, batch_size=len(y))
        top_share = top_class_share(model, x)
        row = {"epoch": epoch + 1, "seconds": seconds, "cpu_seconds": cpu_seconds, "lr": lr, "loss": loss, "acc": acc, "pgd_monitor": monitor,
               **extra}
        self.rows.append(row)
        score = monitor if score is None else score
        if top_share >= DEGENERATE_SHARE:
            # A model that predicts one class can beat a catastrophically overfitted one on robust accuracy
            # (it is "robust" on that class's images): never call it the best.
            self.print(f"# epoch {epoch + 1}: {100 * top_share:.0f}% of the monitor images get one class; "
                       f"not eligible as the best model")
        elif score > self.best["score"]:
            self.best = {"score": score, "epoch": epoch + 1,
                         "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        self._log_row(row)
        self.stopped = stop
        self._save_checkpoint(epoch + 1)
        if os.environ.get("FASTAT_INTERRUPT_AFTER_EPOCH") == str(epoch + 1):
            # Test hook: behave like a Ctrl-C arriving right after this epoch's checkpoint.
            raise KeyboardInterrupt

    def _log_row(self, row):
        if self._columns is None:
            self._columns = list(row)
            self.print("  ".join(f"{c:>10}" for c in self._columns))
        cells = []
        for c in self._columns:
            v = row.get(c)
            if isinstance(v, bool) or isinstance(v, int):
                cells.append(f"{v:>10d}")
            elif isinstance(v, float) and (c in ("acc", "pgd_monitor") or c.endswith("_acc")):
                cells.append(f"{100 * v:>9.2f}%")
            elif isinstance(v, float):
                cells.append(f"{v:>10.4g}" if c not in ("seconds", "cpu_seconds") else f"{v:>10.1f}")
            else:
                cells.append(f"{str(v):>10}")
        self.print("  ".join(cells))

    # -- the end of a run
    def finish(self, model, data):
        """Evaluate the last and the best model (SPEC §0), write results.json, curves.png, weights."""
        args, out = self.args, self.args.out_dir
        pick = eval_subset(len(data.test_y), args.eval_samples).to(data.test_y.device)
        n = len(pick)
        x, y = data.test_x[pick], data.test_y[pick]
        eps, step = args.epsilon / 255, eval_step(args.dataset)
        last = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best = self.best["weights"] or last
        best_epoch = self.best["epoch"] or len(self.rows)
        if self.best["weights"] is None and self.rows:
            self.print("# no epoch was eligible as the best model (all predicted one class); best = last")
        final = {}
        for name, weights, epoch in (("last", last, len(self.rows)), ("best", best, best_epoch)):
            if name == "best" and all(torch.equal(best[k], last[k]) for k in last):
                final["best"] = final["last"]  # the best weights are the last ones: same numbers
                continue
            model.load_state_dict(weights)
            torch.manual_seed(args.seed)  # the evaluation's random starts do not depend on training
            self.print(f"# evaluating the {name} model (epoch {epoch}) on {n} test images")
            final[name] = evaluate(model, x, y, eps, step, args.eval_iters, args.eval_restarts,
                                   autoattack=args.autoattack, num_classes=data.num_classes)
        model.load_state_dict(last)
        for name in ("last", "best"):
            self.print(f"# {name:4} model: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in final[name].items()
                                                          if v is not None))
        torch.save(last, os.path.join(out, "model_last.pt"))
        torch.save(best, os.path.join(out, "model_best.pt"))
        results = {"method": args.method, "args": vars(args), "epochs": self.rows, "train_time": self.train_time,
                   "best_epoch": self.best["epoch"], "stopped_early": self.stopped and len(self.rows) < args.epochs,
                   "train_images": len(data.train.labels), "step_flops": data.train.step_flops,
                   "eval_samples": n, "final": final,
                   "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
                   "precision": "bf16 autocast, channels_last" if gpu_path(self.device) else "fp32",
                   "torch": torch.__version__}
        tmp = os.path.join(out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, os.path.join(out, "results.json"))
        plot_curves(self.rows, os.path.join(out, "curves.png"), title=f"{args.method} on {args.dataset}")
        self.print(f"# train time {self.train_time:.1f} s; wrote {out}/results.json, curves.png, model_last.pt, "
                   f"model_best.pt")
        self.log_file.close()
        return results


def command_line(args):
    """The flags of a parsed run as a command line that reproduces it (recipe values made explicit)."""
    words = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key == "method" or value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return " ".join(words)


def main_guard(main):
    """Run a script's main(): Ctrl-C and a non-finite loss end it with a message, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("fastat: interrupted; the last checkpoint (after every epoch; fgsm_mep.py may skip some to bound "
              "its cost) is intact: rerun with --resume", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss:
        sys.exit(3)


def plot_curves(rows, path, title=""):
    """One small panel per numeric column of the per-epoch rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    # a column may be None in some epochs (e.g. LAS-AT's reward when no strategy update happened)
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch" and any(number(r.get(k)) for r in rows)
            and all(number(r.get(k)) or r.get(k) is None for r in rows)]
    cols = 3
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, k in zip(axes.flat, keys):
        points = [(e, r[k]) for e, r in zip(epochs, rows) if r.get(k) is not None]
        ax.plot(*zip(*points), marker="o", ms=3)
        ax.set_title(k)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# python common.py eval: evaluate saved weights without training
# ----------------------------------------------------------------------------------------------

def eval_main(argv=None):
    p = argparse.ArgumentParser(prog="common.py eval", description="Evaluate saved weights (SPEC §0 protocol). "
                                "Dataset, model, ε and data dir default to those in results.json beside the weights.")
    p.add_argument("--weights", required=True, help="a model_last.pt / model_best.pt state dict")
    p.add_argument("--dataset", choices=DATASET_NAMES)
    p.add_argument("--model", type=model_name)
    p.add_argument("--data-dir")
    p.add_argument("--epsilon", type=nonneg_float, help="/255 units")
    p.add_argument("--eval-samples", type=pos_int, default=None,
                   help="N test images, the fixed random subset that training runs use (default: all)")
    p.add_argument("--pgd-iters", type=pos_int, default=50)
    p.add_argument("--restarts", type=pos_int, default=10)
    p.add_argument("--step", type=pos_float, default=None, help="/255 units (default 2; MNIST 0.01·255)")
    p.add_argument("--cw-iters", type=nonneg_int, default=20)
    p.add_argument("--autoattack", action="store_true")
    p.add_argument("--batch-size", type=pos_int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if not os.path.exists(args.weights):
        p.error(f"--weights {args.weights}: no such file")
    saved = {}
    results_path = os.path.join(os.path.dirname(args.weights), "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            saved = json.load(f)["args"]
    for key in ("dataset", "model", "data_dir", "epsilon"):
        if getattr(args, key) is None:
            if key not in saved:
                p.error(f"--{key.replace('_', '-')} is needed (no results.json beside the weights)")
            setattr(args, key, saved[key])
    model = make_model(args.model, args.dataset, args.data_dir).to(args.device)
    model.load_state_dict(torch.load(args.weights, map_location=args.device))
    x, y = load_split(args.dataset, args.data_dir, train=False)
    pick = eval_subset(len(y), args.eval_samples).numpy()
    n = len(pick)
    x, y = torch.from_numpy(x[pick]).to(args.device), torch.from_numpy(y[pick]).to(args.device)
    torch.manual_seed(args.seed)
    step = args.step / 255 if args.step else eval_step(args.dataset)
    res = evaluate(model, x, y, args.epsilon / 255, step, args.pgd_iters, args.restarts, args.cw_iters,
                   args.autoattack, dataset_info(args.dataset, args.data_dir)["classes"], args.batch_size)
    print(f"{args.weights} on {n} {args.dataset} test images, eps {args.epsilon}/255:")
    for k, v in res.items():
        if v is not None:
            print(f"  {k:>12}  {100 * v:6.2f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=1)
    return res


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "eval":
        raise SystemExit("usage: python common.py eval --weights PATH [options]  (see python common.py eval -h)")
    eval_main(sys.argv[2:])
