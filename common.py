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
}


def _missing(name, data_dir, why):
    # One line, no traceback: the user needs to know where the files are expected, nothing else.
    raise SystemExit(f"fastat: dataset '{name}' not found in {os.path.abspath(data_dir)} and it could not "
                     f"be downloaded ({why}); expected layout: {LAYOUTS[name].replace('DATA_DIR', data_dir)}")


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


def _tiny_imagenet(data_dir, train):
    """Tiny ImageNet: train as an image folder, val relabelled from val_annotations.txt; decoded
    once (grayscale images to RGB) and cached next to the data as a uint8 array."""
    root = os.path.join(data_dir, "tiny-imagenet-200")
    if not os.path.isdir(os.path.join(root, "train")) or not os.path.isdir(os.path.join(root, "val")):
        _missing("tiny-imagenet", data_dir, "no download source: get tiny-imagenet-200.zip and unzip it there")
    split = "train" if train else "val"
    cache = os.path.join(root, f"fastat-{split}-uint8.npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            return f["x"], f["y"]
    from PIL import Image
    from torchvision.datasets import ImageFolder
    train_folder = ImageFolder(os.path.join(root, "train"))  # class index = sorted wnid order
    if train:
        samples = train_folder.samples
    else:
        samples = []
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            for line in f:
                if line.strip():
                    file, wnid = line.split("\t")[:2]
                    samples.append((os.path.join(root, "val", "images", file), train_folder.class_to_idx[wnid]))
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in samples]).transpose(0, 3, 1, 2)
    y = np.array([c for _, c in samples], dtype=np.int64)
    try:
        np.savez(cache, x=x, y=y)
    except OSError:  # a read-only data directory only costs the decode next time
        pass
    return x, y


def load_split(name, data_dir, train):
    """Return one split as (uint8 array N×C×H×W, int64 labels)."""
    from torchvision import datasets
    if name == "tiny-imagenet":
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

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            batch = order[start:start + self.batch_size].to(self.device)
            if self.shuffle and len(batch) == 1:
                break  # a lone last sample would make train-mode BatchNorm fail
            x = self.images[batch]
            if self.crop:
                x = random_crop(x, self.crop, torch.randint(0, 2 * self.crop + 1, (len(batch), 2), generator=gen))
            if self.flip:
                x = torch.where((torch.rand(len(batch), generator=gen) < 0.5).to(self.device)[:, None, None, None],
                                x.flip(3), x)
            x = x.float().div_(255)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[batch], self.indices[batch]


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
    info = DATASETS[args.dataset]
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
                         crop=info["crop"], flip=info["flip"], seed=args.seed)
    val = DeviceLoader(x[val_idx], y[val_idx], val_idx, args.batch_size, device) if val_size else None
    source = val if val is not None else train
    m = min(args.monitor_size, len(source.labels))
    monitor = (source.images[:m].float() / 255, source.labels[:m])
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
    def __init__(self, in_planes, planes, stride):
        super().__init__()
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
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(Normalized):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation, no dropout; depth = 6n + 4."""

    def __init__(self, depth=34, width=10, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1)
        self.block2 = self._group(widths[1], widths[2], n, 2)
        self.block3 = self._group(widths[2], widths[3], n, 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _group(in_planes, planes, n, stride):
        return nn.Sequential(*[WideBasic(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
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


def model_name(text):
    """argparse type for --model: preact18, wrn-DEPTH-WIDTH (depth = 6n+4) or mnist-cnn."""
    name = text.lower()
    if name in ("preact18", "preactresnet18"):
        return "preact18"
    if name in ("mnist-cnn", "cnn"):
        return "mnist-cnn"
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if m and int(m[1]) >= 10 and (int(m[1]) - 4) % 6 == 0 and int(m[2]) >= 1:
        return name
    raise argparse.ArgumentTypeError(
        f"'{text}' is not a model: use preact18, wrn-DEPTH-WIDTH with depth = 6n+4 (wrn-34-10, wrn-28-10, "
        f"wrn-16-2, ...) or mnist-cnn")


def make_model(name, dataset):
    info = DATASETS[dataset]
    kw = dict(num_classes=info["classes"], in_channels=info["shape"][0], mean=info["mean"], std=info["std"])
    if name == "preact18":
        return PreActResNet18(**kw)
    if name == "mnist-cnn":
        return MnistCNN(**kw)
    depth, width = map(int, name.split("-")[1:])
    return WideResNet(depth, width, **kw)


def get_model(args, device):
    model = make_model(args.model, args.dataset).to(device)
    if torch.device(device).type == "cuda":
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
            better = final > best_loss
            best_delta[better], best_loss[better] = delta[better], final[better]
    return best_delta, robust


def pgd_accuracy(model, x, y, eps, step, iters, restarts=1, loss="ce", batch_size=500, label=None):
    """Robust accuracy over a whole set in batches; prints progress every few seconds if `label`."""
    was_training = model.training
    model.eval()
    correct, done, last_print = 0, 0, time.time()
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        if iters == 0:
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
        else:
            ok = attack_pgd(model, xb, yb, eps, step, iters, restarts, loss)[1]
        correct += ok.sum().item()
        done += len(yb)
        if label and (time.time() - last_print > 5 or done == len(y)):
            print(f"  {label}: {done}/{len(y)} images, accuracy so far {100 * correct / done:.2f}%", flush=True)
            last_print = time.time()
    model.train(was_training)
    return correct / max(len(y), 1)


def autoattack_accuracy(model, x, y, eps, num_classes, batch_size=500):
    """Standard L∞ AutoAttack via the official `autoattack` package, else `torchattacks`."""
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
        return sum((model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                   for i in range(0, len(y), batch_size)) / len(y)


def eval_step(dataset):
    """PGD step of the evaluation protocol (SPEC §0): 2/255, MNIST 0.01."""
    return 0.01 if dataset == "mnist" else 2 / 255


def evaluate(model, x, y, eps, step, pgd_iters=50, restarts=10, cw_iters=20, autoattack=False,
             num_classes=10, batch_size=500):
    """SPEC §0: clean, PGD-50-10 (CE, random start, per-sample worst restart), PGD-20 on the CW margin."""
    model = model.float()
    out = {"clean": pgd_accuracy(model, x, y, eps, step, 0, batch_size=batch_size, label="clean")}
    out[f"pgd{pgd_iters}_{restarts}"] = pgd_accuracy(model, x, y, eps, step, pgd_iters, restarts, "ce",
                                                     batch_size, label=f"PGD-{pgd_iters}-{restarts}")
    if cw_iters:
        out[f"cw{cw_iters}"] = pgd_accuracy(model, x, y, eps, step, cw_iters, 1, "cw", batch_size,
                                            label=f"CW-{cw_iters}")
    if autoattack:
        out["autoattack"] = autoattack_accuracy(model, x, y, eps, num_classes, batch_size)
    return out


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


def base_parser(doc, lr_flag="--lr-max", lr_help="peak learning rate", alpha_help="attack step size, in /255 units"):
    """The flags every method shares. Flags left at None are filled from the method's recipe for
    the chosen dataset by parse_args()."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    p.add_argument("--data-dir", default="data", help="where datasets live / are downloaded to")
    p.add_argument("--model", type=model_name, default=None,
                   help="preact18 (default; mnist-cnn for MNIST), wrn-DEPTH-WIDTH (e.g. wrn-34-10), mnist-cnn")
    p.add_argument("--epochs", type=pos_int, default=None, help="training epochs (recipe default)")
    p.add_argument("--batch-size", type=pos_int, default=None)
    p.add_argument(lr_flag, type=pos_float, default=None, help=lr_help)
    p.add_argument("--epsilon", type=nonneg_float, default=None, help="L∞ radius, in /255 units")
    p.add_argument("--alpha", type=nonneg_float, default=None, help=alpha_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="log, checkpoint, results and weights (default runs/SCRIPT-DATASET)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--eval-samples", type=pos_int, default=None,
                   help="evaluate on the first N test images (default: all)")
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


def parse_args(parser, recipes, argv=None, script=None):
    """Parse, then fill every flag left at None from recipes[dataset] (or recipes['default'])."""
    args = parser.parse_args(argv)
    recipe = {"val_size": 0, **recipes.get("default", {}), **recipes.get(args.dataset, {})}
    recipe.setdefault("model", "mnist-cnn" if args.dataset == "mnist" else "preact18")
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model == "mnist-cnn" and args.dataset != "mnist":
        parser.error("--model mnist-cnn only fits --dataset mnist")
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
        """bf16 autocast for training on CUDA; a no-op on the CPU (fp32)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def compile(self, model):
        return torch.compile(model) if self.args.compile else model

    def print(self, line):
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def track(self, **objects):
        self.tracked.update(objects)

    # -- checkpoints
    def _save_checkpoint(self, epochs_done):
        ckpt = {
            "epochs_done": epochs_done, "rows": self.rows, "best": self.best, "train_time": self.train_time,
            "stopped": self.stopped, "state": self.state, "args": vars(self.args),
            "tracked": {k: (v.detach().cpu() if torch.is_tensor(v) else v.state_dict())
                        for k, v in self.tracked.items()},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.cuda else None},
        }
        tmp = self.ckpt_path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, self.ckpt_path)  # atomic: an interruption never leaves a half-written checkpoint

    def _load_checkpoint(self):
        ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        for k, v in self.tracked.items():
            if torch.is_tensor(v):
                v.copy_(ckpt["tracked"][k])
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
            self._epoch_start = time.time()
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
        self.train_time += seconds
        if not math.isfinite(loss):
            self.print(f"# epoch {epoch + 1}: training loss is {loss}; stopping. The checkpoint of epoch "
                       f"{epoch} in {self.ckpt_path} is intact (lower the learning rate or step size and --resume).")
            raise NonFiniteLoss()
        x, y = data.monitor
        eps = self.args.epsilon / 255
        monitor = pgd_accuracy(model, x, y, eps, eps / 4, 10, batch_size=len(y))
        row = {"epoch": epoch + 1, "seconds": seconds, "lr": lr, "loss": loss, "acc": acc, "pgd_monitor": monitor,
               **extra}
        self.rows.append(row)
        score = monitor if score is None else score
        if score > self.best["score"]:
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
                cells.append(f"{v:>10.4g}" if c != "seconds" else f"{v:>10.1f}")
            else:
                cells.append(f"{str(v):>10}")
        self.print("  ".join(cells))

    # -- the end of a run
    def finish(self, model, data):
        """Evaluate the last and the best model (SPEC §0), write results.json, curves.png, weights."""
        args, out = self.args, self.args.out_dir
        n = args.eval_samples or len(data.test_y)
        x, y = data.test_x[:n], data.test_y[:n]
        eps, step = args.epsilon / 255, eval_step(args.dataset)
        last = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best = self.best["weights"] or last
        best_epoch = self.best["epoch"] or len(self.rows)
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
                   "best_epoch": self.best["epoch"], "eval_samples": n, "final": final,
                   "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
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
        print("fastat: interrupted; the last completed epoch is checkpointed: rerun with --resume", file=sys.stderr)
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
    p.add_argument("--dataset", choices=list(DATASETS))
    p.add_argument("--model", type=model_name)
    p.add_argument("--data-dir")
    p.add_argument("--epsilon", type=nonneg_float, help="/255 units")
    p.add_argument("--eval-samples", type=pos_int, default=None, help="first N test images (default: all)")
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
    model = make_model(args.model, args.dataset).to(args.device)
    model.load_state_dict(torch.load(args.weights, map_location=args.device))
    x, y = load_split(args.dataset, args.data_dir, train=False)
    n = args.eval_samples or len(y)
    x, y = torch.from_numpy(x[:n]).to(args.device), torch.from_numpy(y[:n]).to(args.device)
    torch.manual_seed(args.seed)
    step = args.step / 255 if args.step else eval_step(args.dataset)
    res = evaluate(model, x, y, args.epsilon / 255, step, args.pgd_iters, args.restarts, args.cw_iters,
                   args.autoattack, DATASETS[args.dataset]["classes"], args.batch_size)
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
