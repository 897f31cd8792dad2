"""Data and networks that every fastat method script shares; nothing here is a method.

The modules beside the method scripts, one sentence each:
    common.py      the datasets held in memory (CIFAR-10/100, SVHN, MNIST, image folders, Tiny ImageNet), the
                   device loader, and the networks;
    evaluation.py  the evaluation protocol: PGD, CW, AutoAttack and the worst case over them, each process
                   of torchrun attacking its share;
    imagenet.py    ImageNet (or any folder of mixed image sizes) streamed from disk, with Wong et al.'s phases
                   of crop and batch and their learning-rate schedule;
    flags.py       the command line: flag types, the flags every method shares, recipes, --resume's flags,
                   the same flags in every process;
    harness.py     the run around a method: torchrun, the run folder, checkpoints and resume, the per-epoch
                   table, the final evaluation, results.json;
    plots.py       how a run shows its columns: the table's cells and curves.png.
This file imports none of the others at import time (imagenet.py only for a streamed dataset): copy it
alone for "their PreActResNet18" (or evaluation.py with it for "their evaluation protocol").

Images are in [0, 1] inside the code and the networks normalise inside (RobustBench's convention), so ε and
step sizes are [0, 1] units here; on the command line they are /255. Errors a user can fix raise FastatError
with a one-line message; the scripts print it and exit 2 (harness.main_guard).
"""

import contextlib
import io
import logging
import os
import re
import shutil
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("fastat")  # log(): a run's table and progress lines
logger.setLevel(logging.INFO)


class FastatError(Exception):
    """Something a user can fix (missing data, a flag that cannot work): one line, no traceback."""


def log(line):
    """A line for the run's table and log.txt (harness.py decides where it goes; only the first process)."""
    logger.info(line)


def rank():
    """This process's rank under torchrun (0 without it)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    """The number of processes torchrun started (1 without it)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def part(size):
    """This process's slice of `size` items (all of them in one process)."""
    return slice(size * rank() // world(), size * (rank() + 1) // world())


def eval_share(total, batch_size):
    """This process's part of an evaluation of `total` images in batches of `batch_size`: whole batches,
    contiguous (all of them in one process), so that each image is attacked in the batch, with the random
    start, that one process would give it. The first processes take the extra batches: the first one, which
    prints the progress, has the most to do."""
    batches = -(-total // batch_size)
    first, last = (-(-batches * r // world()) for r in (rank(), rank() + 1))
    return slice(min(total, first * batch_size), min(total, last * batch_size))


class Progress:
    """A line every `every` seconds: images done, images/s, ETA. Reads the host's clock only (no GPU sync)."""

    def __init__(self, label, total, every):
        self.label = label
        self.total = total
        self.every = every
        self.done = 0
        self.start = self.last = time.time()

    def update(self, n, detail="", partial=0.0):
        """`n` more images done; `detail` is added to the line (e.g. the attack's step); `partial`: the images of
        a batch under way, times the share of its work done (counted in the rate and the ETA)."""
        self.done += n
        now = time.time()
        done = self.done + partial
        if not self.every or now - self.last < self.every or not 0 < done < self.total:
            return
        self.last = now
        rate = done / (now - self.start)
        eta = (self.total - done) / rate
        log(
            f"# {self.label}: {self.done}/{self.total} images{detail}, {rate:.1f} images/s, "
            f"ETA {eta:.0f} s"
        )


# ---- Data

# crop: zero padding of the random crop (0: none). MNIST is not normalised (Wong et al.'s MNIST code).
DATASETS = {
    "cifar10": dict(
        classes=10, crop=4, flip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)
    ),
    "cifar100": dict(
        classes=100, crop=4, flip=True, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)
    ),
    # a flipped digit is another digit
    "svhn": dict(
        classes=10, crop=4, flip=False, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)
    ),
    "mnist": dict(classes=10, crop=0, flip=False, mean=(0.0,), std=(1.0,)),
    "tiny-imagenet": dict(
        classes=200, crop=4, flip=True, mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)
    ),
    "imagenet": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # imagenet.py
}
# folder: any ImageFolder; its facts come from its images
DATASET_NAMES = list(DATASETS) + ["folder"]


# What each torchvision dataset reads (training, test split): there but failing its check, never downloaded over
_KEPT = {
    "cifar10": ("cifar-10-batches-py",) * 2,
    "cifar100": ("cifar-100-python",) * 2,
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
    "mnist": ("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-images-idx3-ubyte"),
}


def _torchvision_split(name, data_dir, train):
    """(uint8 N×C×H×W, int64 labels, class names) of a torchvision dataset, downloaded if its files are not
    in data_dir. Raises FastatError if its files there fail torchvision's check or the download fails."""
    from torchvision import datasets

    split = "train" if train else "test"
    cls = getattr(datasets, name.upper())  # CIFAR10, CIFAR100, SVHN, MNIST
    files = os.path.abspath(os.path.join(data_dir, _KEPT[name][0 if train else 1]))
    kw = {"split": split} if name == "svhn" else {"train": train}
    if rank():  # under torchrun the first process downloads, alone
        dist.barrier()
    try:
        ds = cls(data_dir, download=False, **kw)
    except Exception:  # missing, or failing torchvision's checksum
        if os.path.exists(files):
            raise FastatError(
                f"dataset '{name}': {files} is there but fails torchvision's checks (a subset, a "
                f"re-pickled or partial copy?); move it away to download the official files, see "
                f"README.md, 'Data layout'"
            ) from None
        ds = _download(cls, name, data_dir, kw)
    if world() > 1 and not rank():
        dist.barrier()
    x = torch.as_tensor(ds.data)
    if x.ndim == 3:  # MNIST: N×H×W
        x = x[:, None]
    elif name.startswith("cifar"):  # N×H×W×C
        x = x.permute(0, 3, 1, 2)
    labels = ds.labels if name == "svhn" else ds.targets
    # SVHN's labels are the digits (torchvision maps its 10 to 0); it names no classes
    names = [str(c) for c in range(10)] if name == "svhn" else list(ds.classes)
    return x.contiguous(), torch.as_tensor(labels, dtype=torch.int64), names


def _download(cls, name, data_dir, kw):
    """torchvision's dataset `cls` downloaded into data_dir. Raises FastatError (one line) if the download
    fails, after removing what it wrote: a failed load leaves no folder or partial archive behind."""
    log(f"# {name} not found in {data_dir}: downloading it")
    top = os.path.abspath(data_dir)  # the deepest folder of data_dir's path that exists
    while not os.path.isdir(top):
        top = os.path.dirname(top)
    before = set(os.listdir(top))
    try:  # torchvision prints each mirror's failure: kept off the terminal, one line says it all
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return cls(data_dir, download=True, **kw)
    except Exception as err:  # offline: URLError, socket and HTTP errors, a bad archive ...
        for path in [os.path.join(top, f) for f in set(os.listdir(top)) - before]:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        raise FastatError(
            f"dataset '{name}' not found in {os.path.abspath(data_dir)} and it could not be "
            f"downloaded ({type(err).__name__}: {' '.join(str(err).split())}); see README.md, "
            f"'Data layout'"
        ) from None


def _rgb(path):
    """ImageFolder's loader, with an error that names the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # truncated, corrupt, or not an image despite its name
        raise OSError(f"cannot read image {path}: {err}") from None


def _list_images(directory, class_to_idx, extensions, **_):
    """ImageFolder's listing (its make_dataset, with its arguments): (path, class) of the images under each
    directory/CLASS. Each folder is walked once, a class folder only as its class: a symbolic link to a
    folder already walked (a loop) would list its files again. Raises FastatError for a class without images."""
    from torchvision.datasets.folder import has_file_allowed_extension

    classes = {os.path.realpath(os.path.join(directory, name)) for name in class_to_idx}
    seen = set()  # the real paths of the folders walked
    samples = []
    for name, label in sorted(class_to_idx.items()):
        found = len(samples)
        top = os.path.join(directory, name)
        for root, dirs, files in os.walk(top, followlinks=True):
            dirs.sort()  # top-down in this order: the same listing on every file system
            real = os.path.realpath(root)
            if real in seen or (root != top and real in classes):
                dirs.clear()
                continue
            seen.add(real)
            files = [f for f in sorted(files) if has_file_allowed_extension(f, extensions)]
            samples += [(os.path.join(root, f), label) for f in files]
        if len(samples) == found:
            raise FastatError(f"{top} holds no image (every class folder needs at least one)")
    return samples


def image_folders(name, data_dir):
    """The training and test torchvision ImageFolders of a folder (DATA_DIR/train/CLASS/*, and test/ or
    val/), of ImageNet (the same) or Tiny ImageNet, the test split labelled in the training split's class
    order; each listed by _list_images. Raises FastatError if the layout is not there."""
    from torchvision.datasets import ImageFolder

    def folder(path):
        images = ImageFolder.__new__(ImageFolder)
        images.make_dataset = _list_images  # what ImageFolder.__init__ lists the files with
        ImageFolder.__init__(images, path, loader=_rgb)
        return images

    root = os.path.join(data_dir, "tiny-imagenet-200") if name == "tiny-imagenet" else data_dir
    # Tiny ImageNet: val/images/*.JPEG, labelled by val/val_annotations.txt (test/ has no labels)
    tests = ["val"] if name == "tiny-imagenet" else ["test", "val"]
    tests = [os.path.join(root, d) for d in tests if os.path.isdir(os.path.join(root, d))]
    if not os.path.isdir(os.path.join(root, "train")) or not tests:
        where = os.path.abspath(data_dir)
        raise FastatError(f"dataset '{name}' not found in {where}; see README.md, 'Data layout'")
    try:
        train = folder(os.path.join(root, "train"))
        test = folder(tests[0])
    except FileNotFoundError as err:  # no class folder
        raise FastatError(str(err)) from None
    if name == "tiny-imagenet":
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            wnid = dict(line.split()[:2] for line in f if line.strip())
        test.samples = [(p, train.class_to_idx[wnid[os.path.basename(p)]]) for p, _ in test.samples]
        return train, test
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise FastatError(f"{test.root}/{unknown[0]} is not a class of train/")
    test.samples = [(p, train.class_to_idx[test.classes[c]]) for p, c in test.samples]
    return train, test


def decode_images(folder, workers, indices=None, transform=None):
    """A folder's images (all, or `indices`) as uint8 N×3×H×W and int64 labels, decoded in DataLoader
    worker processes; `transform` (PIL → PIL) before. Without one, every image must have the first one's
    size: nothing is resized. Raises FastatError on an unreadable image or a size that differs."""
    from torchvision import transforms as T

    folder.transform = T.Compose([t for t in (transform, T.PILToTensor()) if t])
    picked = list(range(len(folder))) if indices is None else indices.tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(folder, picked), 64, num_workers=workers, collate_fn=list
    )
    try:
        items = [item for batch in loader for item in batch]
    except OSError as err:  # raised in a worker: the last line of its message names the file
        raise FastatError(str(err).strip().splitlines()[-1].removeprefix("OSError: ")) from None
    first = items[0][0].shape if items else None
    for (x, _), i in zip(items, picked):
        if x.shape != first:
            raise FastatError(
                f"{folder.samples[i][0]} is {x.shape[2]}x{x.shape[1]} but the images are "
                f"{first[2]}x{first[1]} (like {folder.samples[picked[0]][0]}): every image must "
                f"have one size (resize them, or give --image-size)"
            )
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)
    if not items:  # no index (a process with no share of the evaluation)
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), labels
    return torch.stack([x for x, _ in items]), labels


def load_dataset(name, data_dir, workers=2):
    """Both splits held in memory and the dataset's facts: ((x, y), (test_x, test_y), info); x uint8
    N×C×H×W, y int64; info: classes, class_names (label i is class_names[i]: torchvision's list, a folder's
    subfolders of train/), shape, crop, flip, mean, std. A folder's images must have one size; they are
    grayscale (1 channel) if every pixel of both splits is gray, else RGB; its mean and std are its training
    images', its crop padding size/8. Raises FastatError if the data cannot be read."""
    if name not in ("folder", "tiny-imagenet"):
        x, y, names = _torchvision_split(name, data_dir, True)
        tx, ty, _ = _torchvision_split(name, data_dir, False)
        return (x, y), (tx, ty), dict(DATASETS[name], shape=x.shape[1:], class_names=names)
    train, test = image_folders(name, data_dir)
    x, y = decode_images(train, workers)
    tx, ty = decode_images(test, workers)
    if x.shape[1:] != tx.shape[1:]:
        raise FastatError(
            f"the test images are {tx.shape[3]}x{tx.shape[2]}, the training images "
            f"{x.shape[3]}x{x.shape[2]}"
        )
    # every pixel gray: one channel
    if bool((x == x[:, :1]).all()) and bool((tx == tx[:, :1]).all()):
        x, tx = x[:, :1].contiguous(), tx[:, :1].contiguous()
    if name in DATASETS:
        info = dict(DATASETS[name], shape=x.shape[1:], class_names=train.classes)
        return (x, y), (tx, ty), info
    pixels = x.transpose(0, 1).flatten(1).float().div_(255)
    info = dict(
        classes=len(train.classes),
        crop=x.shape[2] // 8,
        flip=True,
        mean=tuple(pixels.mean(1).tolist()),
        std=tuple(pixels.std(1).tolist()),
        shape=x.shape[1:],
        class_names=train.classes,
    )
    return (x, y), (tx, ty), info


def to_images(x, channels_last=False):
    """uint8 images to float in [0, 1], in the channels_last layout when asked."""
    x = x.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class DeviceLoader:
    """A whole split held as a uint8 tensor on the training device: no worker processes, no host-to-device
    copies.

    epoch(e) yields (x, y, idx): float images in [0, 1], labels, and each sample's index in the full
    training split (per-sample memories are indexed by it). The permutation, crops (zero padding) and flips
    come from a generator seeded by (seed, epoch): a resumed run sees exactly the batches it would have
    seen. With shuffle (training), each of torchrun's processes takes an equal part of every batch
    (--batch-size is the batch of all of them): the last batch loses the images that do not split evenly,
    and is dropped if it cannot give each process two (train-mode BatchNorm cannot take a batch of one);
    len() is the number of batches yielded, the count every per-iteration schedule is planned with."""

    def __init__(self, images, labels, indices, batch_size, shuffle=False, crop=0, flip=False,
                 seed=0, channels_last=False, progress=0.0, label="train"):  # fmt: skip
        self.images = images
        self.labels = labels
        self.indices = indices
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.channels_last = channels_last
        self.progress = progress
        self.label = label

    def _sizes(self):
        n = len(self.labels)
        sizes = [min(self.batch_size, n - start) for start in range(0, n, self.batch_size)]
        if self.shuffle and sizes:
            # the last batch: the same share for every process (DDP averages their gradients with
            # equal weights), at least two images each
            sizes[-1] -= sizes[-1] % world()
            if sizes[-1] < 2 * world():
                sizes.pop()
        return sizes

    def __len__(self):
        return len(self._sizes())

    def batches(self, epoch):
        """The batches of `epoch` (the same in every epoch)."""
        return len(self)

    def steps(self, epochs):
        """Iterations in `epochs` epochs: what a per-iteration schedule is planned with."""
        return epochs * len(self)

    def epoch(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sizes = self._sizes()
        device = self.labels.device
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(device)
        # All of the epoch's draws go to the device in one copy each: a copy from pageable host memory
        # waits for the GPU's queue, and three per batch would stall every step.
        if self.crop:
            crops = [torch.randint(0, 2 * self.crop + 1, (k, 2), generator=gen) for k in sizes]
            crops = torch.cat(crops).to(device)
        if self.flip:
            flips = torch.cat([torch.rand(k, generator=gen) < 0.5 for k in sizes]).to(device)
        progress = Progress(f"{self.label} epoch {epoch + 1}", sum(sizes), self.progress)
        start = 0
        for size in sizes:
            mine = part(size) if self.shuffle else slice(0, size)
            mine = slice(start + mine.start, start + mine.stop)
            batch = order[mine]
            x = self.images[batch]
            if self.crop:
                x = random_crop(x, self.crop, crops[mine])
            if self.flip:
                x = torch.where(flips[mine, None, None, None], x.flip(3), x)
            yield to_images(x, self.channels_last), self.labels[batch], self.indices[batch]
            progress.update(size)
            start += size


def random_crop(x, pad, offsets):
    """Batched random crop: zero-pad by `pad`, then cut each image at its own (row, col) offset."""
    n, c, h, w = x.shape
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]
    images = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return F.pad(x, (pad,) * 4)[images, channels, rows, cols]


def uses_channels_last(args):
    """The GPU path (channels_last tensors): on CUDA, or wherever a reduced precision is asked for."""
    return torch.device(args.device).type == "cuda" or args.precision in ("bf16", "fp16")


def subset(total, n=None, seed=0):
    """Indices of a fixed random subset of n out of total (sorted; all of them if n is None or ≥ total)."""
    if not n or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def monitor_size(args, train_images):
    """--monitor-size, or by default a fiftieth of the training images (32 to 512): PGD-10 on them costs
    about a tenth of the forward-backward passes of an FGSM epoch."""
    return args.monitor_size or min(512, max(32, train_images // 50))


def split_validation(args, labels, test_size):
    """(training indices, validation indices) of the training split, int64 `labels`: --val-size images held
    out (None: a tenth, at most 5,000), the same whatever --seed is, so that runs with different seeds
    share them. Logs the splits' sizes and the classes. Raises FastatError if the labels hold fewer than
    2 classes (every prediction would be right) or --val-size leaves too few training images."""
    n = len(labels)
    classes = len(torch.unique(labels))
    if classes < 2:
        raise FastatError(
            f"dataset '{args.dataset}' in {os.path.abspath(args.data_dir)}: every training "
            f"image is of one class, and a classifier needs two or more"
        )
    val_size = min(5000, n // 10) if args.val_size is None else args.val_size
    if val_size >= n - 1:
        raise FastatError(
            f"--val-size {val_size} leaves too few training images ({n} in the split)"
        )
    log(
        f"# {args.dataset}: {n - val_size} training images, {val_size} validation images, "
        f"{test_size} test images, {classes} classes"
    )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[: n - val_size].sort().values, perm[n - val_size :].sort().values


def get_data(args):
    """The dataset as a namespace: name, num_classes, class_names, shape (C, H, W), mean, std; train (a
    DeviceLoader, the split in device memory; an imagenet.StreamLoader for ImageNet and a folder with
    --image-size); val (--val-size training images held out, unaugmented, or None); val_size; test_x, test_y
    (uint8 images and labels: this process's share, eval_share, of the fixed evaluation subset of test_size
    images, --eval-samples); monitor (a fixed random subset of training images, x in [0, 1] and y);
    train_size (the rows of a per-sample memory), train_images; eval_batch (the batch of the monitor and of
    the evaluation). Raises FastatError if the data cannot be read."""
    if args.dataset == "imagenet" or args.image_size:
        import imagenet

        return imagenet.get_data(args)
    if args.phase_data_dirs:
        raise FastatError(
            f"--phase-data-dirs reads ImageNet's phases: not --dataset {args.dataset}"
        )
    device = torch.device(args.device)
    fast = uses_channels_last(args)
    (x, y), (test_x, test_y), info = load_dataset(args.dataset, args.data_dir, args.workers)
    train_idx, val_idx = split_validation(args, y, len(test_y))
    x, y = x.to(device), y.to(device)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    train = DeviceLoader(
        x[train_idx], y[train_idx], train_idx, args.batch_size, shuffle=True, crop=info["crop"],
        flip=info["flip"] and not args.no_flip, seed=args.seed, channels_last=fast,
        progress=args.progress_every,
    )  # fmt: skip
    val = None
    if len(val_idx):
        val = DeviceLoader(
            x[val_idx], y[val_idx], val_idx, args.batch_size, channels_last=fast, label="validation"
        )
    # Fixed random subsets, not the first images: an image folder lists its images class by class.
    source = val or train
    pick = subset(len(source.labels), monitor_size(args, len(train_idx)), seed=1).to(device)
    test = subset(len(test_y), args.eval_samples)
    mine = test[eval_share(len(test), args.batch_size)]  # this process's batches of the evaluation
    return SimpleNamespace(
        name=args.dataset,
        num_classes=info["classes"],
        class_names=list(info["class_names"]),
        shape=tuple(info["shape"]),
        mean=info["mean"],
        std=info["std"],
        train=train,
        val=val,
        val_size=len(val_idx),
        test_x=test_x[mine].to(device),
        test_y=test_y[mine].to(device),
        test_size=len(test),
        monitor=(source.images[pick].float() / 255, source.labels[pick]),
        train_size=len(y),
        train_images=len(train_idx),
        eval_batch=args.batch_size,
    )


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
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride > 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + shortcut


class PreActResNet18(Normalized):
    """PreActResNet18 as in Wong et al.'s fast_adversarial, including the final BN-ReLU."""

    def __init__(self, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(64, 64), PreActBlock(64, 64))
        self.layer2 = nn.Sequential(PreActBlock(64, 128, 2), PreActBlock(128, 128))
        self.layer3 = nn.Sequential(PreActBlock(128, 256, 2), PreActBlock(256, 256))
        self.layer4 = nn.Sequential(PreActBlock(256, 512, 2), PreActBlock(512, 512))
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # adaptive pooling = Wong's avg_pool2d(out, 4) on 32×32 inputs, and fits 64×64 or 28×28 as well
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))


class WideResNet(Normalized):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation, depth = 6n + 4, `dropout` in every
    block."""

    def __init__(self, depth=34, width=10, num_classes=10, in_channels=3, mean=(0.0,), std=(1.0,),
                 dropout=0.0):  # fmt: skip
        super().__init__(mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)

        def group(k, stride):
            first = PreActBlock(widths[k], widths[k + 1], stride, dropout)
            rest = [PreActBlock(widths[k + 1], widths[k + 1], 1, dropout) for _ in range(n - 1)]
            return nn.Sequential(first, *rest)

        self.block1 = group(0, 1)
        self.block2 = group(1, 2)
        self.block3 = group(2, 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1))


class InputGradOnly(nn.Module):
    """A compiled model as the attacks use it: model(x) with its parameters' requires_grad off during the
    forward pass, so that a backward through it computes input gradients only. Eager autograd skips the
    weight gradients anyway; a torch.compile'd backward computes every gradient its graph was traced with
    (bench/RESULTS.md measures it)."""

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


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision's, for ImageNet
MODELS = (
    "preact18, wrn-DEPTH-WIDTH with depth = 6n+4 (wrn-34-10, wrn-16-2, ...), mnist-cnn, lenet, "
)
MODELS += ", ".join(RESNETS)


def model_name(text):
    """The canonical name of a network: preact18, wrn-DEPTH-WIDTH (depth = 6n+4), mnist-cnn, lenet,
    resnet18/34/50/101. Raises ValueError for anything else."""
    name = {"preactresnet18": "preact18", "cnn": "mnist-cnn"}.get(text.lower(), text.lower())
    if name in ("preact18", "mnist-cnn", "lenet", *RESNETS):
        return name
    wrn = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if wrn and int(wrn[1]) >= 10 and (int(wrn[1]) - 4) % 6 == 0 and int(wrn[2]) >= 1:
        return name
    raise ValueError(f"'{text}' is not a model: use {MODELS}")


def make_model(name, num_classes, shape, mean, std, dropout=0.0):
    """A network for images of `shape` (C, H, W) in [0, 1]; mean and std (per channel) normalise inside
    it. Raises FastatError if the network cannot take such images."""
    c, h, w = shape
    if name == "preact18":
        return PreActResNet18(num_classes, c, mean, std)
    if name.startswith("wrn"):
        depth, width = map(int, name.split("-")[1:])
        return WideResNet(depth, width, num_classes, c, mean, std, dropout)
    if name in RESNETS:  # random init
        import torchvision

        if c != 3:
            raise FastatError(f"--model {name} takes colour images, not {c}-channel ones")
        return Normalized(mean, std, getattr(torchvision.models, name)(num_classes=num_classes))
    # mnist-cnn, Wong et al.'s: conv(16,k4,s2,p1)-ReLU-conv(32,k4,s2,p1)-ReLU-FC(100)-ReLU-FC
    if name == "mnist-cnn":
        if (h, w) != (28, 28):
            raise FastatError(f"--model mnist-cnn only fits 28x28 images, not {w}x{h}")
        return Normalized(mean, std, nn.Sequential(
            nn.Conv2d(c, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, num_classes),
        ))  # fmt: skip
    # lenet: pytorch/examples' mnist/main.py from Dec 2018 to Nov 2019 (the PyTorch 1.0 Amata ran): two
    # valid 5×5 convs (20, 50), each ReLU + max-pool 2, FC(500)-ReLU-FC, no dropout; logits out (its
    # log_softmax is the CE's)
    if min(h, w) < 16:
        raise FastatError(f"--model lenet needs images of at least 16x16, not {w}x{h}")
    h, w = (((s - 4) // 2 - 4) // 2 for s in (h, w))  # 4×4 on 28×28: FC(800)
    return Normalized(mean, std, nn.Sequential(
        nn.Conv2d(c, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(50 * h * w, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    ))  # fmt: skip


def get_model(args, data, dropout=0.0):
    """args.model for `data`, on args.device, channels_last on the GPU path."""
    model = make_model(args.model, data.num_classes, data.shape, data.mean, data.std, dropout)
    model = model.to(args.device)
    return model.to(memory_format=torch.channels_last) if uses_channels_last(args) else model
