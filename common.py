"""What every fastat method script shares, and nothing that is a method: data, networks, PGD evaluation and the
run plumbing (command line, per-epoch table, checkpoint and resume, results.json, curves.png, torchrun).

A method script relies on this much (fgsm_rs.py is the shortest example):

    args = common.parse_args(parser, RECIPES)      # the recipe's defaults; --resume restores the run's own flags
    data = common.get_data(args)                   # data.train.epoch(e) yields (x in [0, 1] on the device, y, index)
    model = common.get_model(args, data)           # normalisation is inside: the model takes [0, 1] images
    run = common.Run(args, data)                   # run folder, log.txt, precision
    attack_model, train_model = run.models(model)  # the attacks' view; the weight step's (DDP under torchrun)
    checkpoint = dict(model=model, opt=opt, ...)   # what a checkpoint holds
    start = run.resume(checkpoint) if args.resume else 0
    for epoch in range(start, args.epochs):
        run.start_epoch()
        ...                                        # the method's epoch
        run.end_epoch(epoch, model, checkpoint, lr=..., loss=..., acc=...)
    run.finish(model)                              # the weights, then the evaluation of the last and best model

Inside the code images, ε and step sizes are in [0, 1] units; on the command line ε and steps are in /255.
DECISIONS.md gives the reasons behind the defaults.
"""
import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_LOG = []  # the open log.txt of this process's run: log() writes there too


def rank():
    """This process's rank under torchrun (0 without it)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    """The number of processes torchrun started (1 without it)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def _global_sum(t):
    """A tensor summed over the processes."""
    if world() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def mean_over_ranks(value):
    """A number averaged over the processes, so that every process takes the same decision from it."""
    device = "cuda" if world() > 1 and dist.get_backend() == "nccl" else "cpu"
    return _global_sum(torch.tensor([float(value)], dtype=torch.float64, device=device)).item() / world()


def log(line):
    """Print a line (flushed), and append it to the run's log.txt; only the first process prints."""
    if not rank():
        print(line, flush=True)
        for f in _LOG:
            f.write(line + "\n")
            f.flush()


def fail(message):
    """A start that cannot work: one line on stderr and exit code 2 (as argparse's errors), no traceback."""
    if not rank():
        print(f"fastat: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class Progress:
    """A line every `every` seconds: images done, images/s, ETA. It reads the host's clock only (no GPU sync)."""

    def __init__(self, label, total, every):
        self.label, self.total, self.every, self.done = label, total, every, 0
        self.start = self.last = time.time()

    def update(self, n):
        self.done, now = self.done + n, time.time()
        if self.every and now - self.last >= self.every and self.done < self.total:
            rate, self.last = self.done / (now - self.start), now
            log(f"# {self.label}: {self.done}/{self.total} images, {rate:.1f} images/s, "
                f"ETA {(self.total - self.done) / rate:.0f} s")

# ---- Data


# crop: zero padding of the random crop (0: none). MNIST is not normalised (Wong et al.'s MNIST code).
DATASETS = {
    "cifar10": dict(classes=10, crop=4, flip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)),
    "cifar100": dict(classes=100, crop=4, flip=True, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "svhn": dict(classes=10, crop=4, flip=False,  # a flipped digit is another digit
                 mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    "mnist": dict(classes=10, crop=0, flip=False, mean=(0.0,), std=(1.0,)),
    "tiny-imagenet": dict(classes=200, crop=4, flip=True, mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
    "imagenet": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # streamed from disk
}
DATASET_NAMES = list(DATASETS) + ["folder"]  # folder: any ImageFolder; its facts come from its images


def _torchvision_split(name, data_dir, train):
    """(uint8 N×C×H×W, int64 labels) of a torchvision dataset, downloaded if it is missing."""
    from torchvision import datasets
    cls, kw = {"cifar10": (datasets.CIFAR10, {"train": train}), "cifar100": (datasets.CIFAR100, {"train": train}),
               "svhn": (datasets.SVHN, {"split": "train" if train else "test"}),
               "mnist": (datasets.MNIST, {"train": train})}[name]
    if rank():  # under torchrun the first process downloads, alone
        dist.barrier()
    try:
        ds = cls(data_dir, download=False, **kw)
    except RuntimeError:  # missing, or failed its checksum
        log(f"# {name} not found in {data_dir}: downloading it")
        try:  # torchvision prints each mirror's failure: kept off the terminal, one line says it all
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds = cls(data_dir, download=True, **kw)
        except Exception as err:  # offline: URLError, socket and HTTP errors, a bad archive ...
            fail(f"dataset '{name}' not found in {os.path.abspath(data_dir)} and it could not be downloaded "
                 f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); see README.md, 'Data layout'")
    if world() > 1 and not rank():
        dist.barrier()
    x = torch.as_tensor(ds.data)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2) if name.startswith("cifar") else x
    return x.contiguous(), torch.as_tensor(ds.labels if name == "svhn" else ds.targets, dtype=torch.int64)


def _rgb(path):
    """ImageFolder's loader, with an error that names the file."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # truncated, corrupt, or not an image despite its name
        raise OSError(f"cannot read image {path}: {err}") from None


def image_folders(name, data_dir):
    """The training and test torchvision ImageFolders of a folder (DATA_DIR/train/CLASS/*, DATA_DIR/test/CLASS/* or
    val/), ImageNet (the same) or Tiny ImageNet, the test split labelled in the training split's class order."""
    from torchvision.datasets import ImageFolder
    root = os.path.join(data_dir, "tiny-imagenet-200") if name == "tiny-imagenet" else data_dir
    test = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test is None:
        fail(f"dataset '{name}' not found in {os.path.abspath(data_dir)}; see README.md, 'Data layout'")
    try:
        train = ImageFolder(os.path.join(root, "train"), loader=_rgb)
        test = ImageFolder(root, loader=_rgb, allow_empty=True, is_valid_file=lambda p: f"{os.sep}val{os.sep}images"
                           f"{os.sep}" in p) if name == "tiny-imagenet" else ImageFolder(test, loader=_rgb)
    except FileNotFoundError as err:  # an empty class folder
        fail(f"{err} (every class folder needs at least one image)")
    if name == "tiny-imagenet":  # val/images/*.JPEG, labelled by val/val_annotations.txt
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            wnid = dict(line.split()[:2] for line in f if line.strip())
        test.samples = [(p, train.class_to_idx[wnid[os.path.basename(p)]]) for p, _ in test.samples]
    elif set(test.classes) - set(train.classes):
        fail(f"{test.root}/{sorted(set(test.classes) - set(train.classes))[0]} is not a class of train/")
    else:
        test.samples = [(p, train.class_to_idx[test.classes[c]]) for p, c in test.samples]
    return train, test


def decode_images(folder, workers, indices=None, transform=None):
    """A folder's images (all, or `indices`) as uint8 N×3×H×W and labels, decoded in DataLoader worker processes;
    `transform` (PIL → PIL) before. Without one, every image must have the first one's size: nothing is resized."""
    from torchvision import transforms as T
    folder.transform = T.Compose([t for t in (transform, T.PILToTensor()) if t])
    picked = torch.utils.data.Subset(folder, (range(len(folder)) if indices is None else indices.tolist()))
    try:
        items = [i for b in torch.utils.data.DataLoader(picked, 64, num_workers=workers, collate_fn=list) for i in b]
    except OSError as err:  # raised in a worker: the last line of its message names the file
        fail(str(err).strip().splitlines()[-1].removeprefix("OSError: "))
    for (x, _), i in zip(items, picked.indices):
        if x.shape != items[0][0].shape:
            h, w = items[0][0].shape[1:]
            fail(f"{folder.samples[i][0]} is {x.shape[2]}x{x.shape[1]} but the images are {w}x{h} (like "
                 f"{folder.samples[picked.indices[0]][0]}): every image must have one size (resize them, or give "
                 f"--image-size)")
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


def load_dataset(name, data_dir, workers=2):
    """Both splits held in memory and the dataset's facts: ((x, y), (test_x, test_y), info), x uint8 N×C×H×W, y int64,
    info: classes, shape, crop, flip, mean, std. A folder's images must have one size; they are grayscale (1 channel)
    if every pixel of both splits is gray, else RGB; its mean and std are its training images', its crop padding
    size/8."""
    if name not in ("folder", "tiny-imagenet"):
        (x, y), test = _torchvision_split(name, data_dir, True), _torchvision_split(name, data_dir, False)
        return (x, y), test, dict(DATASETS[name], shape=x.shape[1:])
    train, test = image_folders(name, data_dir)
    (x, y), (tx, ty) = decode_images(train, workers), decode_images(test, workers)
    if x.shape[1:] != tx.shape[1:]:
        fail(f"the test images are {tx.shape[3]}x{tx.shape[2]}, the training images {x.shape[3]}x{x.shape[2]}")
    if bool((x == x[:, :1]).all()) and bool((tx == tx[:, :1]).all()):  # every pixel gray: one channel
        x, tx = x[:, :1].contiguous(), tx[:, :1].contiguous()
    v = x.transpose(0, 1).flatten(1).float().div_(255)
    info = DATASETS.get(name, dict(classes=len(train.classes), crop=x.shape[2] // 8, flip=True,
                                   mean=tuple(v.mean(1).tolist()), std=tuple(v.std(1).tolist())))
    return (x, y), (tx, ty), dict(info, shape=x.shape[1:])


def _part(size):
    """This process's slice of a batch of `size` (all of it in one process)."""
    return slice(size * rank() // world(), size * (rank() + 1) // world())


class DeviceLoader:
    """A whole split held as a uint8 tensor on the training device: no worker processes, no host-to-device copies.

    epoch(e) yields (x, y, idx): float images in [0, 1], labels, and each sample's index in the full training split
    (per-sample memories are indexed by it). The permutation, crops (zero padding) and flips come from a generator
    seeded by (seed, epoch): a resumed run sees exactly the batches it would have seen. With shuffle (training),
    each of torchrun's processes takes its part of every batch (--batch-size is the batch of all of them), and a last
    batch too small to give each process two images is dropped (train-mode BatchNorm cannot take a batch of one);
    len() is the number of batches yielded, the count every per-iteration schedule is planned with."""

    def __init__(self, images, labels, indices, batch_size, shuffle=False, crop=0, flip=False, seed=0,
                 channels_last=False, progress=0.0, label="train"):
        self.images, self.labels, self.indices, self.batch_size = images, labels, indices, batch_size
        self.shuffle, self.crop, self.flip, self.seed = shuffle, crop, flip, seed
        self.channels_last, self.progress, self.label = channels_last, progress, label

    def _sizes(self):
        n, b = len(self.labels), self.batch_size
        return [min(b, n - s) for s in range(0, n, b) if not (self.shuffle and n - s < 2 * world())]

    def __len__(self):
        return len(self._sizes())

    def batches(self, epoch):
        return len(self)

    def steps(self, epochs):
        """Iterations in `epochs` epochs: what a per-iteration schedule is planned with."""
        return epochs * len(self)

    def epoch(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sizes, device, n = self._sizes(), self.labels.device, len(self.labels)
        order = (torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)).to(device)
        # All of the epoch's draws go to the device in one copy each: a copy from pageable host memory waits for
        # the GPU's queue, and three per batch would stall every step.
        crops = torch.cat([torch.randint(0, 2 * self.crop + 1, (k, 2), generator=gen) for k in sizes]).to(device) \
            if self.crop else None
        flips = torch.cat([torch.rand(k, generator=gen) < 0.5 for k in sizes]).to(device) if self.flip else None
        progress, start = Progress(f"{self.label} epoch {epoch + 1}", sum(sizes), self.progress), 0
        for size in sizes:
            part = _part(size) if self.shuffle else slice(0, size)
            part = slice(start + part.start, start + part.stop)
            batch = order[part]
            x = self.images[batch]
            x = random_crop(x, self.crop, crops[part]) if self.crop else x
            x = torch.where(flips[part, None, None, None], x.flip(3), x) if self.flip else x
            x = x.float().div_(255)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x,
                   self.labels[batch], self.indices[batch])
            progress.update(size)
            start += size


def random_crop(x, pad, offsets):
    """Batched random crop: zero-pad by `pad`, then cut each image at its own (row, col) offset."""
    n, c, h, w = x.shape
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]
    return F.pad(x, (pad,) * 4)[torch.arange(n, device=x.device)[:, None, None, None],
                                torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


class StreamLoader:
    """An image folder read from disk in every epoch by torchvision's ImageFolder in DataLoader worker processes
    (pinned memory, persistent workers): for data too large for the device's memory or of mixed image sizes
    (ImageNet). Training transform RandomResizedCrop(crop) and a horizontal flip; `phases`, a list of (last epoch,
    crop, batch), change crop and batch size by epoch (Wong et al.'s progressive resizing), `folders` (one per
    phase, the same files: resized copies) where the images are read. Yields what DeviceLoader yields, each process
    its part of every batch. A sample's augmentation is seeded by (seed, epoch, index): a resumed run, any number of
    workers and any number of processes see the same images."""

    def __init__(self, folders, indices, phases, seed, device, workers, flip=True, channels_last=False, progress=0.0):
        self.folders, self.indices, self.phases, self.seed, self.device = folders, indices, phases, seed, device
        self.flip = flip
        self.workers, self.channels_last, self.progress, self.crop, self.sampler = workers, channels_last, progress, \
            None, []

    def phase(self, epoch):
        """(crop, batch size) of an epoch."""
        return tuple(self.phases[self._k(epoch)][1:])

    def _k(self, epoch):
        return next((k for k, (last, _, _) in enumerate(self.phases) if epoch < last), len(self.phases) - 1)

    def batches(self, epoch):
        n, b = len(self.indices), self.phase(epoch)[1]
        return n // b + (n % b >= 2 * world())  # a last batch that cannot give each process two images is dropped

    def __len__(self):
        return self.batches(0)

    def steps(self, epochs):
        return sum(self.batches(e) for e in range(epochs))

    def epoch(self, epoch):
        from torchvision import transforms as T
        crop, batch = self.phase(epoch)
        if crop != self.crop:  # a new phase: new workers, with its transform and its folder
            folder = self.folders[self._k(epoch)]
            folder.transform = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(0.5 * self.flip),
                                          T.PILToTensor()])
            self.crop, self.loader = crop, torch.utils.data.DataLoader(
                _Seeded(folder, self.seed), batch_sampler=self.sampler, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                generator=torch.Generator().manual_seed(self.seed))  # not the process's generator
        order = self.indices[torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))].tolist()
        batches = [order[s:s + batch] for s in range(0, self.batches(epoch) * batch, batch)]
        self.sampler[:] = [[(i, epoch) for i in b[_part(len(b))]] for b in batches]  # what the loader reads
        progress = Progress(f"train epoch {epoch + 1}", sum(map(len, batches)), self.progress)
        for x, y, idx in self.loader:
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x,
                   y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))
            progress.update(len(y) * world())


class _Seeded(torch.utils.data.Dataset):
    """An ImageFolder indexed by (index, epoch): each sample's augmentation seeded by (seed, epoch, index)."""

    def __init__(self, folder, seed):
        self.folder, self.seed = folder, seed

    def __getitem__(self, item):
        with torch.random.fork_rng(devices=[]):  # the process's own generator is left as it was (--workers 0)
            torch.manual_seed((self.seed * 1_000_003 + item[1]) * 10_000_019 + item[0])
            return *self.folder[item[0]], item[0]


def eval_transform(size):
    """ImageNet's evaluation transform for a crop of `size`: Resize(size / 0.875) and CenterCrop (256 → 224)."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size)])


def channels_last(args):
    """The GPU path (channels_last tensors): on CUDA, or wherever a reduced precision is asked for."""
    return torch.device(args.device).type == "cuda" or args.precision in ("bf16", "fp16")


def get_data(args):
    """The dataset as a namespace: name, num_classes, shape (C, H, W), mean, std; train (a DeviceLoader, the split in
    device memory; a StreamLoader for ImageNet and a folder with --image-size), val (--val-size training images held
    out, unaugmented, or None; --val-size None holds out a tenth, at most 5,000); test_x, test_y (uint8 images and
    labels: the fixed evaluation subset, --eval-samples); monitor (fixed random x, y of training images); train_size
    (the rows of a per-sample memory), train_images; eval_batch (the batch of the monitor and the evaluation)."""
    device, kw = torch.device(args.device), dict(channels_last=channels_last(args), progress=args.progress_every)
    streamed = args.dataset == "imagenet" or bool(args.image_size)
    if args.image_size and args.dataset not in ("folder", "imagenet") or args.phase_data_dirs and not args.phases:
        fail("--image-size reads an image folder or ImageNet from disk, --phase-data-dirs ImageNet's phases: not "
             f"--dataset {args.dataset}")
    if streamed:  # ImageNet, or a folder with --image-size: read from disk, the evaluation images decoded once
        train_folder, test_folder = image_folders(args.dataset, args.data_dir)
        n = len(train_folder)
        # ImageNet's recipe: Wong et al.'s three phases, their ends and batches in proportion to --epochs and
        # --batch-size (the first phase's batch), their crops to --image-size (the last phase's crop)
        scale = args.image_size / args.phases[-1][1] if args.phases and args.image_size else 1
        phases = [[round(last * args.epochs / args.phases[-1][0]), round(crop * scale), max(2 * world(), round(
            batch * args.batch_size / args.phases[0][2]))] for last, crop, batch in args.phases] if args.phases \
            else [[args.epochs, args.image_size, args.batch_size]]
        size = phases[-1][1]
        resized = eval_transform(size)
    else:
        (x, y), (tx, ty), info = load_dataset(args.dataset, args.data_dir, args.workers)
        n = len(y)
    if args.val_size is None:
        args.val_size = min(5000, n // 10)
    if args.val_size >= n - 1:
        fail(f"--val-size {args.val_size} leaves too few training images ({n} in the split)")
    # The validation slice does not depend on --seed: runs with different seeds share it.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = perm[n - args.val_size:].sort().values, perm[:n - args.val_size].sort().values
    if streamed:
        # --phase-data-dirs: each phase's copy of the folder (Wong et al. read 160 and 352 px copies: faster to decode)
        folders = [image_folders(args.dataset, d)[0] for d in args.phase_data_dirs or [args.data_dir]]
        if len(folders) not in (1, len(phases)) or any(f.samples != [(p.replace(train_folder.root, f.root, 1), c)
                                                                      for p, c in train_folder.samples] for f in folders):
            fail(f"--phase-data-dirs: one folder per phase ({len(phases)}), each with the files of {args.data_dir}")
        train = StreamLoader(folders * (len(phases) // len(folders)), train_idx, phases, args.seed, device,
                             args.workers, flip=not args.no_flip, **kw)
        val_images = [t.to(device) for t in decode_images(train_folder, args.workers, val_idx, resized)] \
            if args.val_size else None
        pick = (val_idx if args.val_size else train_idx)[subset(len(val_idx) or len(train_idx), args.monitor_size, 1)]
        monitor = decode_images(train_folder, args.workers, pick, resized)
        tx, ty = decode_images(test_folder, args.workers, subset(len(test_folder), args.eval_samples), resized)
        v = monitor[0].transpose(0, 1).flatten(1).float().div_(255)  # a folder's mean and std: its monitor images'
        info = dict(DATASETS.get(args.dataset, dict(mean=tuple(v.mean(1).tolist()), std=tuple(v.std(1).tolist()))),
                    classes=len(train_folder.classes), shape=(3, size, size))
        eval_batch, test = phases[-1][2], slice(None)
    else:
        x, y, val_idx, train_idx = x.to(device), y.to(device), val_idx.to(device), train_idx.to(device)
        train = DeviceLoader(x[train_idx], y[train_idx], train_idx, args.batch_size, shuffle=True, crop=info["crop"],
                             flip=info["flip"] and not args.no_flip, seed=args.seed, **kw)
        val_images = (x[val_idx], y[val_idx])
        # Fixed random subsets, not the first images: an image folder lists its images class by class.
        source = val_images if args.val_size else (train.images, train.labels)
        pick = subset(len(source[1]), args.monitor_size, seed=1).to(device)
        monitor, eval_batch, test = (source[0][pick], source[1][pick]), args.batch_size, subset(len(ty), args.eval_samples)
    val = DeviceLoader(*val_images, val_idx.to(device), args.batch_size, label="validation", **kw) \
        if args.val_size else None
    return SimpleNamespace(name=args.dataset, num_classes=info["classes"], shape=tuple(info["shape"]),
                           mean=info["mean"], std=info["std"], train=train, val=val, test_x=tx[test].to(device),
                           test_y=ty[test].to(device), monitor=(monitor[0].to(device).float() / 255,
                                                                monitor[1].to(device)),
                           train_size=n, train_images=len(train_idx), eval_batch=eval_batch)


def subset(total, n=None, seed=0):
    """Indices of a fixed random subset of n out of total (sorted; all of them if n is None or ≥ total)."""
    if not n or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values

# ---- Networks: each takes images in [0, 1] and normalises inside (RobustBench's convention)


class Normalized(nn.Module):
    """Normalises with per-channel mean and std (buffers: they travel with the weights), then runs `net`."""

    def __init__(self, mean, std, net=None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = net

    def normalize(self, x):
        return (x - self.mean) / self.std

    def forward(self, x):
        return self.net(self.normalize(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-(dropout)-conv with a 1×1 conv shortcut where the shape changes (no BN on it)."""

    def __init__(self, in_planes, planes, stride=1, dropout=0.0):
        super().__init__()
        self.dropout = dropout  # between the two convs in training (WRN; Zagoruyko & Komodakis)
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if stride > 1 or in_planes != planes \
            else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        return self.conv2(F.dropout(out, self.dropout, self.training) if self.dropout else out) + shortcut


class PreActResNet18(Normalized):
    """PreActResNet18 as in Wong et al.'s fast_adversarial, including the final BN-ReLU."""

    def __init__(self, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            nn.Sequential(PreActBlock(a, b, s), PreActBlock(b, b))
            for a, b, s in ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)))
        self.bn, self.linear = nn.BatchNorm2d(512), nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x))))))
        # adaptive pooling = Wong's avg_pool2d(out, 4) on 32×32 inputs, and fits 64×64 or 28×28 as well
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))


class WideResNet(Normalized):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation, depth = 6n + 4, `dropout` in every block."""

    def __init__(self, depth=34, width=10, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,), dropout=0.0):
        super().__init__(mean, std)
        n, w = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (
            nn.Sequential(*[PreActBlock(w[k] if i == 0 else w[k + 1], w[k + 1], s if i == 0 else 1, dropout)
                            for i in range(n)]) for k, s in ((0, 1), (1, 2), (2, 2)))
        self.bn1, self.fc = nn.BatchNorm2d(w[3]), nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1))


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision's, for ImageNet


def model_name(text):
    """argparse type for --model: preact18, wrn-DEPTH-WIDTH (depth = 6n+4), mnist-cnn, lenet, resnet18/34/50/101."""
    name = {"preactresnet18": "preact18", "cnn": "mnist-cnn"}.get(text.lower(), text.lower())
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if name in ("preact18", "mnist-cnn", "lenet", *RESNETS) or (m and int(m[1]) >= 10 and (int(m[1]) - 4) % 6 == 0
                                                                and int(m[2]) >= 1):
        return name
    raise argparse.ArgumentTypeError(f"'{text}' is not a model: use preact18, wrn-DEPTH-WIDTH with depth = 6n+4 "
                                     f"(wrn-34-10, wrn-28-10, wrn-16-2, ...), mnist-cnn, lenet or resnet18/34/50/101")


def make_model(name, num_classes, shape, mean, std, dropout=0.0):
    """A network for images of `shape` (C, H, W) in [0, 1]; mean and std (per channel) normalise inside it."""
    c, h, w = shape
    if name == "preact18":
        return PreActResNet18(num_classes, c, mean, std)
    if name.startswith("wrn"):
        return WideResNet(*map(int, name.split("-")[1:]), num_classes, c, mean, std, dropout)
    if name in RESNETS:  # random init
        import torchvision
        if c != 3:
            fail(f"--model {name} takes colour images, not {c}-channel ones")
        return Normalized(mean, std, getattr(torchvision.models, name)(num_classes=num_classes))
    if name == "mnist-cnn":  # Wong et al.: conv(16,k4,s2,p1)-ReLU-conv(32,k4,s2,p1)-ReLU-FC(100)-ReLU-FC
        if (h, w) != (28, 28):
            fail(f"--model mnist-cnn only fits 28x28 images, not {w}x{h}")
        return Normalized(mean, std, nn.Sequential(
            nn.Conv2d(c, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, num_classes)))
    # lenet: pytorch/examples' mnist/main.py from Dec 2018 to Nov 2019 (the PyTorch 1.0 Amata ran): two valid 5×5
    # convs (20, 50), each ReLU + max-pool 2, FC(500)-ReLU-FC, no dropout; logits out (its log_softmax is the CE's)
    if min(h, w) < 16:
        fail(f"--model lenet needs images of at least 16x16, not {w}x{h}")
    h, w = (((s - 4) // 2 - 4) // 2 for s in (h, w))  # 4×4 on 28×28: FC(800)
    return Normalized(mean, std, nn.Sequential(
        nn.Conv2d(c, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(50 * h * w, 500), nn.ReLU(), nn.Linear(500, num_classes)))


def get_model(args, data, dropout=0.0):
    model = make_model(args.model, data.num_classes, data.shape, data.mean, data.std, dropout).to(args.device)
    return model.to(memory_format=torch.channels_last) if channels_last(args) else model

# ---- Evaluation: fp32, model in eval mode


def cw_margin(logits, y):
    """Carlini-Wagner margin: max_{k≠y} z_k − z_y, per sample (> 0 ⇔ misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1) - true


def attack_pgd(model, x, y, eps, step, iters, restarts=1, loss="ce", rand_init=True):
    """L∞ PGD on the cross-entropy (loss="ce") or the CW margin ("cw"); x N×C×H×W in [0, 1], eps and step in [0, 1]
    units. Returns (δ, robust): per sample the restart whose final δ has the highest loss, and whether the sample
    was classified correctly after *every* restart. Gradients flow to δ only; the model stays in its mode."""
    def value(logits):
        return F.cross_entropy(logits, y, reduction="none") if loss == "ce" else cw_margin(logits, y)
    best_delta, best_loss = torch.zeros_like(x), torch.full((len(y),), -math.inf, device=x.device)
    robust = torch.ones(len(y), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = torch.empty_like(x).uniform_(-eps, eps) if rand_init else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(iters):
            delta.requires_grad_(True)
            grad, = torch.autograd.grad(value(model(x + delta)).sum(), delta)
            delta = (x + (delta.detach() + step * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
        with torch.no_grad():
            logits = model(x + delta)
            final, robust = value(logits), robust & (logits.argmax(1) == y)
            # torch.where, not boolean-mask indexing, whose data-dependent size makes the host wait for the GPU
            better = final > best_loss
            best_delta = torch.where(better.view(-1, *[1] * (x.dim() - 1)), delta, best_delta)
            best_loss = torch.where(better, final, best_loss)
    return best_delta, robust


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside, and back in the mode it was found in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pgd_correct(model, x, y, eps, step, iters, restarts=1, loss="ce", batch_size=500, label=None, progress=0.0):
    """Per sample, whether it is classified correctly under PGD-iters-restarts (iters 0: clean), in batches, in eval
    mode: the BN statistics are left alone and the model comes back in its mode. x: uint8 or [0, 1] float."""
    out, meter = [], Progress(label, len(y), progress if label else 0)
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
            if iters == 0:
                with torch.no_grad():
                    out.append(model(xb).argmax(1) == yb)
            else:
                out.append(attack_pgd(model, xb, yb, eps, step, iters, restarts, loss)[1])
            meter.update(len(yb))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


def autoattack_correct(model, x, y, eps, num_classes, batch_size=500):
    """Per sample, correct under standard L∞ AutoAttack (the official package, github.com/fra31/auto-attack), and
    the attacks that ran. Its targeted attacks get min(9, C − 1) target classes; below 4 classes, where its DLR
    losses are not defined, APGD-CE and Square run (with the standard version's settings)."""
    from autoattack import AutoAttack
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    with eval_mode(model):
        few = num_classes < 4
        adversary = AutoAttack(model, "Linf", eps, version="custom" if few else "standard", device=x.device,
                               verbose=False, attacks_to_run=["apgd-ce", "square"] if few else [])
        if few:
            adversary.apgd.n_restarts, adversary.square.n_queries = 1, 5000
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = min(9, num_classes - 1)
        x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
        with torch.no_grad():
            mask = torch.cat([model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                              for i in range(0, len(y), batch_size)])
    return mask, adversary.attacks_to_run


def eval_step(eps, iters, dataset):
    """PGD step of the evaluation: 2/255 at ε = 8/255 (MNIST: 0.01 at 0.3), in proportion to ε, and at least
    1.5ε/iters so that a short attack can still cross the ball from its random start."""
    return max(eps / 30 if dataset == "mnist" else eps / 4, 1.5 * eps / iters)


def evaluate(model, x, y, eps, iters=50, restarts=10, cw_iters=20, autoattack=False, num_classes=10,
             batch_size=500, step=None, dataset="cifar10", progress=0.0):
    """The evaluation protocol: clean, PGD-iters-restarts (CE, random start, per-sample worst restart), PGD on the CW
    margin (cw_iters steps; 0: none), optional AutoAttack, and "worst_case": the share of samples correct clean and
    under every attack that ran, per sample (as RobustBench counts). x uint8 N×C×H×W, eps in [0, 1] units. A CE
    attack is weak against a model trained on soft labels: the worst case is the honest headline."""
    kw = dict(batch_size=batch_size, progress=progress)
    masks = {"clean": pgd_correct(model, x, y, eps, 0, 0, label="clean", **kw),
             f"pgd{iters}_{restarts}": pgd_correct(model, x, y, eps, step or eval_step(eps, iters, dataset), iters,
                                                   restarts, label=f"PGD-{iters}-{restarts}", **kw)}
    if cw_iters:
        masks[f"cw{cw_iters}"] = pgd_correct(model, x, y, eps, step or eval_step(eps, cw_iters, dataset), cw_iters,
                                             loss="cw", label=f"CW-{cw_iters}", **kw)
    if autoattack:
        masks["autoattack"], ran = autoattack_correct(model, x, y, eps, num_classes, batch_size) if len(y) else \
            (masks["clean"], [])  # a process with no image to attack
        log(f"# AutoAttack ran {', '.join(ran)}")
    masks["worst_case"] = torch.stack(list(masks.values())).all(0)
    return {k: m.float().mean().item() if len(m) else 0.0 for k, m in masks.items()}

# ---- Command line


def _number(cast, low, strict, what):
    def check(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text}") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return check


nonneg_float, pos_float = _number(float, 0, False, "a finite number >= 0"), _number(float, 0, True, "a number > 0")
nonneg_int, pos_int = _number(int, 0, False, "an integer >= 0"), _number(int, 1, False, "an integer >= 1")
batch_size = _number(int, 2, False, "at least 2 (train-mode BatchNorm needs two images)")


def epsilon(text):
    """argparse type for --epsilon (/255 units). Under 1/255 is no threat model anyone trains for, but a [0, 1]
    value written by mistake (0.3 on MNIST): refused, with what to write instead."""
    v = nonneg_float(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is in /255 units, i.e. {v:g}/255; for ε = {text} in [0, 1] units "
                                         f"write --epsilon {255 * v:g}" if v else "must be at least 1 (/255 units)")
    return v


def base_parser(doc, lr_help="peak learning rate", alpha_help="attack step size, /255 units (keeps its ratio to ε "
                "when only --epsilon is given)", label_smoothing=None):
    """The flags every method shares. A flag left at None is filled from the method's recipe by parse_args()."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", choices=DATASET_NAMES, help="folder: any image folder DATA_DIR/{train,test}/"
      "CLASS/* (README.md, 'Data layout'), trained with the CIFAR-10 recipe")
    a("--data-dir", default="data", help="where the dataset is (CIFAR, SVHN and MNIST are downloaded there)")
    a("--no-flip", action="store_true", help="no random horizontal flip (where a flip changes the class)")
    a("--image-size", type=pos_int, default=None, metavar="N", help="a folder of images of any size: read it from "
      "disk in every epoch, training on random resized N×N crops (ImageNet: the last phase's crop)")
    a("--phase-data-dirs", nargs="+", default=None, metavar="DIR", help="ImageNet: a copy of --data-dir per phase, "
      "resized for faster decoding (bench/resize_folder.py; Wong et al.: 160 px, 352 px, full size)")
    a("--model", type=model_name, default=None, help="preact18, wrn-DEPTH-WIDTH (e.g. wrn-34-10), mnist-cnn, lenet, "
                                                     "resnet18/34/50/101")
    a("--epochs", type=pos_int, default=None)
    a("--batch-size", type=batch_size, default=None, help="the batch of all the processes together")
    a("--lr", type=pos_float, default=None, help=lr_help)
    a("--epsilon", type=epsilon, default=None, help="L∞ radius of training and of the evaluation, /255 units")
    a("--alpha", type=nonneg_float, default=None, help=alpha_help)
    if label_smoothing:
        a("--label-smoothing", type=pos_float, default=None, metavar="TRUE_PROB", help=label_smoothing)
    a("--seed", type=int, default=0)
    a("--out-dir", default=None, help="log, checkpoint, results and weights (default runs/SCRIPT-DATASET)")
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when there is one; under torchrun each "
                                     "process takes its LOCAL_RANK's GPU)")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="autocast dtype of training. "
      "auto: bf16 on GPUs that compute it natively (Ampere and later), fp16 with loss scaling on older GPUs, fp32 on "
      "the CPU. The evaluation is fp32")
    a("--compile", action="store_true", help="torch.compile the networks for training")
    a("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1), help="processes that decode image files")
    a("--eval-samples", type=pos_int, default=None, help="evaluate on N test images, a fixed random subset")
    a("--eval-iters", type=pos_int, default=50, help="PGD steps of the final evaluation")
    a("--eval-restarts", type=pos_int, default=10, help="PGD restarts of the final evaluation")
    a("--eval-cw-iters", type=nonneg_int, default=20, help="steps of the final PGD on the CW margin (0: none)")
    a("--autoattack", action="store_true", help="also run AutoAttack (github.com/fra31/auto-attack) at the end")
    a("--monitor-size", type=pos_int, default=512, help="training images of the catastrophic-overfitting monitor "
                                                        "(PGD-10, step ε/4, after every epoch)")
    a("--val-size", type=nonneg_int, default=None, help="training images held out to choose the best model on (0: "
                                                        "the monitor's images are training images)")
    a("--progress-every", type=nonneg_float, default=10, metavar="SECONDS", help="a progress line (images/s, ETA) "
      "this often in an epoch and in the evaluation (0: none)")
    a("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint with its own "
                                            "flags; only the evaluation and where it runs (--device, ...) may change")
    return p


# Every script's recipe on --dataset imagenet, under its own "imagenet" entry: the ImageNet configuration released
# with Wong et al.'s FGSM-RS (github.com/locuslab/fast_adversarial, ImageNet/configs): ResNet-50, 15 epochs in three
# phases of crop and batch (last epoch, crop, batch), SGD momentum 0.9, weight decay 1e-4, imagenet_lr() peaking at
# 0.4, ε = 2/255; evaluated on a fixed random 1,000 of the 50,000 validation images (--eval-samples 50000: all).
IMAGENET = dict(model="resnet50", epochs=15, batch_size=512, phases=[[6, 128, 512], [12, 224, 224], [15, 288, 128]],
                lr=0.4, weight_decay=1e-4, epsilon=2, eval_samples=1000)
# What a resumed run may change: where it runs and how it is evaluated, not what it trains.
FREE_ON_RESUME = {"resume", "out_dir", "device", "data_dir", "phase_data_dirs", "workers", "compile", "progress_every",
                  "eval_samples", "eval_iters", "eval_restarts", "eval_cw_iters", "autoattack"}
_GIVEN = object()  # marks the flags that were not on the command line


def parse_args(parser, recipes, argv=None, script=None, eps_relative=("alpha",)):
    """Parse, then fill every flag left at None from recipes[dataset] over (ImageNet: IMAGENET over)
    recipes['default']. eps_relative: recipe values that are a ratio of ε (FGSM-RS's α = 1.25ε, ...) keep it when
    only ε is set (`--epsilon 16` gives α = 20/255); an explicit flag always wins. With --resume the flags come from
    the run's checkpoint, and one given with it that would change the training is refused. Under torchrun, joins the
    process group. Seeds every generator."""
    for action in parser._actions:  # -h shows each recipe's value
        values = [(k, r[action.dest]) for k, r in recipes.items() if r.get(action.dest) is not None]
        if values and action.default is None:
            action.help = (f"{action.help or ''} (" + "; ".join(f"{'default' if k == 'default' else k + ' recipe'} "
                                                                f"{_show(v)}" for k, v in values) + ")").lstrip()
    args = parser.parse_args(argv)
    given = vars(parser.parse_args(argv, argparse.Namespace(**{a.dest: _GIVEN for a in parser._actions})))
    given = {k: v for k, v in given.items() if v is not _GIVEN}
    script = script or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    args.out_dir = args.out_dir or os.path.join("runs", f"{script}-{args.dataset}")
    if args.resume and os.path.exists(os.path.join(args.out_dir, "checkpoint.pt")):
        args = _resumed_args(args.out_dir, given, script)
    else:
        recipe = {"val_size": 0, "phases": None, "model": "mnist-cnn" if args.dataset == "mnist" else "preact18",
                  **recipes.get("default", {})}
        for layer in (IMAGENET if args.dataset == "imagenet" else {}, recipes.get(args.dataset, {}), {
                k: v for k, v in vars(args).items() if v is not None and k == "epsilon"}):
            # a layer's ε moves the ε-relative values it does not set (ImageNet's ε 2: FGSM-RS's α 2.5)
            ratio = layer.get("epsilon", recipe.get("epsilon", 1)) / recipe.get("epsilon", 1)
            recipe.update({k: recipe[k] * ratio for k in eps_relative if k in recipe and k not in layer}, **layer)
        for key, value in recipe.items():
            setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
        args.method = script
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device}: {err}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.autoattack:
        try:
            import autoattack  # noqa: F401  (now, not after hours of training)
        except ImportError:
            parser.error("--autoattack needs the official package: pip install git+https://github.com/fra31/auto-attack")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # started by torchrun
        if device.type == "cuda":  # one GPU per process: its LOCAL_RANK's
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size < 2 * world():
        fail(f"--batch-size {args.batch_size} gives {world()} processes fewer than two images each")
    # Each process draws its own random starts; the networks start from the first process's weights (DDP).
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(args.seed + rank())
    return args


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _resumed_args(out, given, script):
    with contextlib.suppress(OSError, ValueError), open(os.path.join(out, "results.json")) as f:
        if json.load(f).get("final"):
            print(f"fastat: {out} is a finished run (results.json): nothing to resume. To evaluate it again: python "
                  f"evaluate.py --weights {out}/model_best.pt", flush=True)
            raise SystemExit(0)
    saved = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", mmap=True, weights_only=False)["args"]
    if saved["method"] != script:
        fail(f"{out} holds a {saved['method']}.py run, not a {script}.py one")
    for key, value in given.items():
        if key not in FREE_ON_RESUME and value != saved.get(key):
            fail(f"--{key.replace('_', '-')} {_show(value)}: this run was started with {_show(saved.get(key))}, and a "
                 f"resumed run keeps its flags; start a new run (another --out-dir) to change it")
    return argparse.Namespace(**{**saved, "device": None, **given, "out_dir": out})


def label_smoothing(true_prob, num_classes):
    """PyTorch's label_smoothing s for the soft labels of the SDI/PGI/LAS-AT authors' code (true class f, every other
    (1 − f)/(C − 1)): 1 − s + s/C = f, so s = (1 − f)·C/(C − 1). f outside [1/C, 1] is refused (s would exceed 1)."""
    if true_prob is None:
        return 0.0
    if not 1 / num_classes <= true_prob <= 1:
        fail(f"--label-smoothing {true_prob}: the true class's probability must lie between 1/C = "
             f"{1 / num_classes:.4g} (this dataset has {num_classes} classes) and 1")
    return (1 - true_prob) * num_classes / (num_classes - 1)


def imagenet_lr(opt, loader, epochs):
    """Wong et al.'s ImageNet schedule (their ImageNet configs), a LambdaLR stepped every iteration: the lr rises
    linearly from 0 to the optimiser's lr over the first epoch (a run under 15 epochs: over its first fifteenth), then
    falls linearly to 1/10 of it at 6/15 of the run,
    to 1/100 at 12/15 and to 1/1000 at the end; iteration i of epoch e is at e + (i + 1)/batches(e), the batches of
    the loader's phase (they change with the crop)."""
    counts = np.cumsum([0] + [loader.batches(e) for e in range(epochs)])
    points = [0, min(1, epochs / 15), *(np.array([6, 12, 15]) * epochs / 15)], [0, 1, 0.1, 0.01, 0.001]

    def factor(step):
        e = min(int(np.searchsorted(counts, step, side="right")) - 1, epochs - 1)
        return float(np.interp(e + (step - counts[e] + 1) / (counts[e + 1] - counts[e]), *points))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def command_line(args):
    """The flags of a parsed run as a command line that reproduces it (recipe values made explicit)."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else " " + _show(v)) for k, v in vars(args).items()
                    if k not in ("method", "resume", "phases") and v is not None and v is not False)

# ---- A training run: its folder, the per-epoch table, checkpoints, the final evaluation


class NonFiniteLoss(Exception):
    pass


class InputGradOnly(nn.Module):
    """The attacks' view of a model: model(x) with its parameters' requires_grad off during the forward pass, so
    that a backward through it computes input gradients only. Eager autograd would skip the weight gradients anyway;
    a torch.compile'd backward computes every gradient its graph was traced with (bench/RESULTS.md measures it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.model(x)
        finally:
            for p in params:
                p.requires_grad_(True)


class Run:
    """One training run in args.out_dir: log.txt (the table, also on stdout), checkpoint.pt after every epoch, and
    at the end model_last.pt, model_best.pt, results.json and curves.png (written by the first process under
    torchrun). `columns`: the method's own per-epoch columns, after epoch, seconds (training), cpu_s (the process's
    CPU time), monitor_s, lr, loss, acc and pgd_monitor."""

    # An epoch whose clean predictions put this share of the monitor images into one class is never "best": a
    # constant predictor can beat a catastrophically overfitted model on robust accuracy.
    DEGENERATE_SHARE = 0.9

    def __init__(self, args, data, columns=()):
        self.args, self.data, self.device = args, data, torch.device(args.device)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(args.precision)
        if args.precision == "auto" and self.device.type == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        self.amp = amp  # the autocast dtype of training (None: fp32), as the method cores take it
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == torch.float16)
        self.columns = ["epoch", "seconds", "cpu_s", "monitor_s", "lr", "loss", "acc", "pgd_monitor", *columns]
        torch.backends.cudnn.benchmark = True  # the shapes of a step are fixed: let cuDNN time its kernels once
        self.ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
        resumed = args.resume and os.path.exists(self.ckpt_path)
        if os.path.exists(self.ckpt_path) and not args.resume:
            fail(f"{args.out_dir} already holds a run (checkpoint.pt): pass --resume to continue it, or choose another "
                 f"--out-dir")
        if not rank():  # the first process writes every file of the run
            os.makedirs(args.out_dir, exist_ok=True)
            _LOG[:] = [open(os.path.join(args.out_dir, "log.txt"), "a" if resumed else "w")]
        self.rows, self.best, self.best_weights, self.stopped = [], {"score": -math.inf, "epoch": 0}, None, False
        self.train_time = self.save_seconds = 0.0
        if not resumed:
            log(f"# python {args.method}.py {command_line(args)}")
            if self.device.type == "cpu" and args.model in ("preact18", "wrn-34-10", "wrn-28-10", *RESNETS):
                log(f"# training {args.model} on the CPU is slow: see the ETA of the progress lines; a small --model "
                    f"such as wrn-16-2 is many times faster")
            log("  ".join(f"{c:>10}" for c in self.columns))

    def autocast(self):
        """The autocast of the training passes (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def models(self, model, double_backward=False):
        """(attack_model, train_model), sharing `model`'s parameters: the network the attacks run on (input gradients
        only: InputGradOnly) and the one the weight step runs through (trainable()). Both are torch.compile'd with
        --compile, except a train_model whose loss needs a double backward (torch.compile has none)."""
        fast = torch.compile(model) if self.args.compile else model
        if world() == 1 and not double_backward:
            return InputGradOnly(fast), fast
        return InputGradOnly(fast), self.trainable(model, compile=not double_backward)

    def trainable(self, net, compile=True):
        """A network as its weight step runs it: under torchrun in DistributedDataParallel (gradients averaged over
        the processes; attacks run on the plain module, since an input-gradient backward through DDP would leave its
        reducer waiting), torch.compile'd with --compile. Also a method's own network (SDI's generator, LAS-AT's
        strategy network)."""
        if world() > 1:
            net = nn.parallel.DistributedDataParallel(net, [self.device] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.args.compile and compile else net

    def resume(self, checkpoint):
        """Restore every object of `checkpoint` from checkpoint.pt (modules, optimisers and schedulers with
        load_state_dict, tensors with copy_, dicts with update) and the run's own state (table, best model, RNG
        states of every process); returns the epoch to continue from."""
        if not os.path.exists(self.ckpt_path):
            log(f"# --resume: no checkpoint in {self.args.out_dir}, starting from scratch")
            return 0
        ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        if len(ckpt["rng"]) != world():
            fail(f"{self.args.out_dir} was trained by {len(ckpt['rng'])} process(es): resume it with as many")
        for key, obj in checkpoint.items():
            saved = ckpt["objects"][key]
            if torch.is_tensor(obj):
                obj.copy_(saved)
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(saved)
            else:
                obj.load_state_dict(saved)
        self.rows, self.best, self.train_time = ckpt["rows"], ckpt["best"], ckpt["train_time"]
        self.stopped, done = ckpt["stopped"], ckpt["epoch"]
        if ckpt["best_weights"] is not None:  # kept on the CPU (map_location moved them)
            self.best_weights = {k: v.cpu() for k, v in ckpt["best_weights"].items()}
        if ckpt.get("scaler") and self.scaler.is_enabled():  # fp16's loss scale
            self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"][rank()]  # this process's generators; CUDA: its own device's only
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        if not rank():  # rows a skipped checkpoint left in the log (fgsm_mep.py)
            with open(os.path.join(self.args.out_dir, "log.txt")) as f:
                logged = max([int(w[0]) for w in map(str.split, f) if w and w[0].isdigit()], default=0)
            log(f"# resumed from {self.ckpt_path} after epoch {done}" + (
                f"; the rows of epochs {done + 1}-{logged} above were not checkpointed: discarded" if logged > done
                else ""))
            log("  ".join(f"{c:>10}" for c in self.columns))
        return self.args.epochs if self.stopped else done

    def start_epoch(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._start, self._cpu = time.time(), time.process_time()

    def end_epoch(self, epoch, model, checkpoint, lr, loss, acc, score=None, stop=False, save=True, **extra):
        """Close an epoch: check the loss, run the monitor, keep the best weights, log the row, write the checkpoint.

        loss, acc: the epoch's mean training loss and accuracy (on the inputs the method trains on), averaged over
        the processes here, as the method's float columns (`extra`). score: what "best" maximises (default: the
        monitor's PGD accuracy). stop: the method ends training after this epoch (every process must say the same).
        save: write checkpoint.pt (the last epoch and a stop always are)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.time() - self._start, time.process_time() - self._cpu
        self.train_time += seconds
        loss, acc = mean_over_ranks(loss), mean_over_ranks(acc)
        extra = {k: mean_over_ranks(v) if isinstance(v, float) else v for k, v in extra.items()}
        if not math.isfinite(loss):
            log(f"# epoch {epoch + 1}: the training loss is {loss}; stopping. The checkpoint of epoch {epoch} is intact, "
                f"but a resumed run would repeat this epoch: start a new run with a lower --lr or step size")
            raise NonFiniteLoss()
        _sync_buffers(model)
        # The monitor: PGD-10 on fixed training images, each process on its part of them.
        start, (x, y), eps = time.time(), _shard(self.data.monitor), self.args.epsilon / 255
        correct = pgd_correct(model, x, y, eps, eps / 4, 10, batch_size=self.data.eval_batch)
        with torch.no_grad(), eval_mode(model):
            counts = torch.bincount(torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)] + [
                y[:0]]), minlength=self.data.num_classes)
        total = _global_sum(torch.cat([counts, correct.sum()[None]]).double())
        monitor, top_share = total[-1].item() / len(self.data.monitor[1]), (total[:-1].max() / total[:-1].sum()).item()
        row = {"epoch": epoch + 1, "seconds": seconds, "cpu_s": cpu, "monitor_s": time.time() - start, "lr": lr,
               "loss": loss, "acc": acc, "pgd_monitor": monitor, **extra}
        self.rows.append(row)
        score = monitor if score is None else score
        if top_share >= self.DEGENERATE_SHARE:
            log(f"# epoch {epoch + 1}: {100 * top_share:.0f}% of the monitor images get one class; not eligible as "
                f"the best model")
        elif score > self.best["score"]:
            self.best = {"score": score, "epoch": epoch + 1}
            self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        log("  ".join(_cell(c, row.get(c)) for c in self.columns))
        self.stopped = stop
        if save or stop or epoch + 1 == self.args.epochs:
            start, rng = time.time(), [None] * world()  # every process's generators
            mine = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
            dist.all_gather_object(rng, mine) if world() > 1 else rng.__setitem__(0, mine)
            if not rank():
                _atomic_save({"epoch": epoch + 1, "rows": self.rows, "best": self.best, "stopped": stop,
                              "best_weights": self.best_weights, "train_time": self.train_time, "args": vars(self.args),
                              "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": rng,
                              "objects": {k: v if torch.is_tensor(v) or isinstance(v, dict) else v.state_dict()
                                          for k, v in checkpoint.items()}}, self.ckpt_path)
            self.save_seconds += time.time() - start

    def finish(self, model):
        """Write the weights (first: no evaluation failure can lose them), then evaluate the last and the best model
        on the fixed test subset (evaluate()'s protocol; each process its part), write results.json and curves.png."""
        args, out, data, eps = self.args, self.args.out_dir, self.data, self.args.epsilon / 255
        _sync_buffers(model)
        last = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.best_weights is None and self.rows:
            log("# no epoch was eligible as the best model (all predicted one class); best = last")
        best = self.best_weights or last
        results = {
            "method": args.method, "args": vars(args), "epochs": self.rows, "train_time": self.train_time,
            "best_epoch": self.best["epoch"] or len(self.rows), "stopped_early": len(self.rows) < args.epochs,
            "train_images": data.train_images,
            "data": {"classes": data.num_classes, "shape": list(data.shape), "mean": data.mean, "std": data.std},
            "eval": {"images": len(data.test_y), "pgd": f"PGD-{args.eval_iters}-{args.eval_restarts}, step "
                     f"{255 * eval_step(eps, args.eval_iters, args.dataset):.4g}/255", "cw_iters": args.eval_cw_iters,
                     "autoattack": args.autoattack, "batch": data.eval_batch},
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "precision": str(self.amp or torch.float32).replace("torch.", ""), "torch": torch.__version__,
            "processes": world(), "batch_per_process": args.batch_size / world(),
            "final": None}  # written now too: evaluate.py can load the weights even if this evaluation fails
        if not rank():
            _atomic_save(last, os.path.join(out, "model_last.pt"))
            _atomic_save(best, os.path.join(out, "model_best.pt"))
            _write_json(results, os.path.join(out, "results.json"))
        x, y = _shard((data.test_x, data.test_y))
        final = {}
        for name, weights, epoch in (("last", last, len(self.rows)), ("best", best, results["best_epoch"])):
            if name == "best" and all(torch.equal(best[k], last[k]) for k in last):
                final[name] = final["last"]  # the best weights are the last ones: the same numbers
                continue
            model.load_state_dict(weights)
            torch.manual_seed(args.seed + rank())  # the evaluation's random starts do not depend on training
            log(f"# evaluating the {name} model (epoch {epoch}) on {len(data.test_y)} test images")
            part = evaluate(model, x, y, eps, args.eval_iters, args.eval_restarts, args.eval_cw_iters, args.autoattack,
                            data.num_classes, data.eval_batch, dataset=args.dataset, progress=args.progress_every)
            final[name] = {k: _global_sum(torch.tensor(v * len(y), dtype=torch.float64, device=y.device)).item()
                           / len(data.test_y) for k, v in part.items()}
            log(f"# {name} model: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in final[name].items()))
        model.load_state_dict(last)
        if not rank():
            _write_json({**results, "final": final}, os.path.join(out, "results.json"))
            plot_curves(self.rows, os.path.join(out, "curves.png"), f"{args.method} on {args.dataset}")
            log(f"# train time {self.train_time:.1f} s; wrote {out}/results.json, curves.png, model_last.pt, "
                f"model_best.pt")
            _LOG.pop().close()
        return results


def _sync_buffers(model):
    """Under torchrun, the first process's buffers (BatchNorm's running statistics) in every process: DDP copies them
    at the start of each forward pass, and each process's forward then moves its own copy."""
    for b in model.buffers() if world() > 1 else ():
        dist.broadcast(b, 0)


def _shard(xy):
    """This process's contiguous part of (x, y): all of it in one process."""
    part = _part(len(xy[1]))
    return xy[0][part], xy[1][part]


def _cell(column, v):
    if isinstance(v, float) and (column in ("acc", "pgd_monitor") or column.endswith("_acc")):
        return f"{100 * v:>9.2f}%"
    if isinstance(v, float):
        return f"{v:>10.1f}" if column in ("seconds", "cpu_s", "monitor_s") else f"{v:>10.4g}"
    return f"{str(v):>10}"


def _atomic_save(obj, path):
    """torch.save that never leaves a half-written file: a temporary file, flushed to the disk (fsync), renamed over
    the old one, and the rename made durable (fsync of the folder)."""
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)


def _write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main_guard(main):
    """Run a script's main(): Ctrl-C and a non-finite loss end it with a message, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("fastat: interrupted; the last checkpoint is intact: continue with --resume --out-dir RUN", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss:
        sys.exit(3)


def plot_curves(rows, path, title=""):
    """One small panel per numeric column of the per-epoch rows (a column may be None in some epochs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch" and any(_numeric(r.get(k)) for r in rows)
            and all(_numeric(r.get(k)) or r.get(k) is None for r in rows)]
    fig, axes = plt.subplots(max(1, -(-len(keys) // 3)), 3, figsize=(12, 2.8 * max(1, -(-len(keys) // 3))),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        ax.plot(*zip(*[(r["epoch"], r[k]) for r in rows if r.get(k) is not None]), marker="o", ms=3)
        ax.set(title=k, xlabel="epoch")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _numeric(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)
