"""ImageNet scale: an image folder streamed from disk in every epoch, with Wong et al.'s phases.

Used for --dataset imagenet and for any folder of mixed image sizes (--dataset folder --image-size N);
common.get_data hands over to get_data() here. What it follows is the ImageNet configuration released with
Wong, Rice, Kolter, "Fast is better than free" (github.com/locuslab/fast_adversarial, ImageNet/configs):
ResNet-50, 15 epochs in three phases of crop and batch size, SGD with momentum 0.9, weight decay 1e-4, and
imagenet_lr() (a per-iteration piecewise-linear schedule peaking at 0.4), ε = 2/255; evaluated on a fixed
random 1,000 of the 50,000 validation images (--eval-samples 50000: all), resized and centre-cropped.
"""

from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from common import (
    DATASETS,
    DeviceLoader,
    FastatError,
    Progress,
    decode_images,
    eval_share,
    image_folders,
    log,
    monitor_size,
    part,
    split_validation,
    subset,
    to_images,
    uses_channels_last,
    world,
)

# Every script's recipe on --dataset imagenet starts from this (flags.parse_args): Wong et al.'s
# configuration. phases: (last epoch, crop, batch) of each phase; lr: for batches of 512 (linear_lr).
IMAGENET = dict(
    model="resnet50",
    epochs=15,
    batch_size=512,
    phases=[[6, 128, 512], [12, 224, 224], [15, 288, 128]],
    lr=0.4,
    weight_decay=1e-4,
    epsilon=2,
    eval_samples=1000,
)


class StreamLoader:
    """An image folder read from disk in every epoch by torchvision's ImageFolder in DataLoader worker
    processes (pinned memory, persistent workers). Training transform: RandomResizedCrop(crop) and a
    horizontal flip; `phases`, a list of (last epoch, crop, batch), change crop and batch size by epoch
    (Wong et al.'s progressive resizing); `folders` (one per phase, the same files: resized copies) are
    where the images are read. Yields what common.DeviceLoader yields, each process its part of every
    batch. A sample's augmentation is seeded by (seed, epoch, index): a resumed run, any number of workers
    and any number of processes see the same images."""

    def __init__(self, folders, indices, phases, seed, device, workers, flip=True,
                 channels_last=False, progress=0.0):  # fmt: skip
        self.folders = folders
        self.indices = indices
        self.phases = phases
        self.seed = seed
        self.device = device
        self.workers = workers
        self.flip = flip
        self.channels_last = channels_last
        self.progress = progress
        self.crop = None  # the crop the workers were started with
        self.sampler = []  # the batches of the current epoch: what the workers read

    def _phase_index(self, epoch):
        for k, (last, _, _) in enumerate(self.phases):
            if epoch < last:
                return k
        return len(self.phases) - 1

    def phase(self, epoch):
        """(crop, batch size) of an epoch."""
        _, crop, batch = self.phases[self._phase_index(epoch)]
        return crop, batch

    def batches(self, epoch):
        """The batches of `epoch`: the last one keeps what splits evenly over the processes, and is
        dropped if that cannot give each of them two images."""
        n = len(self.indices)
        last = n % self.phase(epoch)[1]  # the images of a partial last batch
        return n // self.phase(epoch)[1] + (last - last % world() >= 2 * world())

    def __len__(self):
        return self.batches(0)

    def steps(self, epochs):
        """Iterations in `epochs` epochs: what a per-iteration schedule is planned with."""
        return sum(self.batches(e) for e in range(epochs))

    def _start_workers(self, epoch):
        from torchvision import transforms as T

        folder = self.folders[self._phase_index(epoch)]
        folder.transform = T.Compose([
            T.RandomResizedCrop(self.crop),
            T.RandomHorizontalFlip(0.5 * self.flip),
            T.PILToTensor(),
        ])  # fmt: skip
        self.loader = torch.utils.data.DataLoader(
            _Seeded(folder, self.seed),
            batch_sampler=self.sampler,
            collate_fn=_batch,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # not the process's generator
        )

    def epoch(self, epoch):
        crop, batch = self.phase(epoch)
        if crop != self.crop:  # a new phase: new workers, with its transform and its folder
            self.crop = crop
            self._start_workers(epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=gen)].tolist()
        batches = [order[s : s + batch] for s in range(0, self.batches(epoch) * batch, batch)]
        batches[-1] = batches[-1][: len(batches[-1]) - len(batches[-1]) % world()]
        self.sampler[:] = [[(i, epoch) for i in b[part(len(b))]] for b in batches]
        progress = Progress(f"train epoch {epoch + 1}", sum(map(len, batches)), self.progress)
        unreadable = []
        for x, y, idx, bad in self.loader:
            unreadable += bad
            if x is None:
                raise FastatError(f"no image of a batch could be read, among them {bad[0]}")
            x = to_images(x.to(self.device, non_blocking=True), self.channels_last)
            y = y.to(self.device, non_blocking=True)
            yield x, y, idx.to(self.device, non_blocking=True)
            progress.update(len(y) * world())
        count = torch.tensor(len(unreadable), device=self.device)
        if dist.is_initialized():  # every process's count
            dist.all_reduce(count)
        if count:
            first = f"; {unreadable[0]}" if unreadable else ""
            log(
                f"# train epoch {epoch + 1}: {int(count)} unreadable image(s), each replaced by "
                f"another image of its batch{first}"
            )


class _Seeded(torch.utils.data.Dataset):
    """An ImageFolder indexed by (index, epoch): each sample's augmentation seeded by (seed, epoch, index).
    An unreadable image gives (None, the error's message, index): _batch replaces it."""

    def __init__(self, folder, seed):
        self.folder = folder
        self.seed = seed

    def __getitem__(self, item):
        index, epoch = item
        # the process's generator is left alone (--workers 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            try:
                return *self.folder[index], index
            except OSError as err:  # truncated or corrupt (common._rgb names the file)
                return None, str(err), index


def _batch(items):
    """A process's part of a batch, (x, y, index) items, as (x, y, indices, the unreadable images'
    messages): an unreadable image (x None) is replaced by the first readable one of the part, so that
    every part keeps its size (torchrun's processes step together) and a resumed run sees the same batch;
    x is None if none is readable."""
    bad = [y for x, y, _ in items if x is None]
    good = [item for item in items if item[0] is not None]
    if not good:
        return None, None, None, bad
    x, y, idx = torch.utils.data.default_collate([good[0] if i[0] is None else i for i in items])
    return x, y, idx, bad


def eval_transform(size):
    """ImageNet's evaluation transform for a crop of `size`: Resize(size / 0.875), CenterCrop (256 → 224)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size)])


def phases(args):
    """The run's phases, (last epoch, crop, batch) each. ImageNet's recipe (args.phases, Wong et al.'s three)
    is scaled: its ends to --epochs (the first at least 1: a short run keeps the phases' order and never
    skips the first), its batches to --batch-size (the first phase's batch), its crops to --image-size
    (the last phase's crop); without phases, one phase of --image-size and --batch-size."""
    if not args.phases:
        return [[args.epochs, args.image_size, args.batch_size]]
    last_epoch = args.phases[-1][0]
    first_batch = args.phases[0][2]
    crop_scale = args.image_size / args.phases[-1][1] if args.image_size else 1
    scaled = []
    for last, crop, batch in args.phases:
        end = max(1, round(last * args.epochs / last_epoch))
        # a multiple of the processes (each takes an equal part), at least two images each
        batch = world() * max(2, round(batch * args.batch_size / first_batch / world()))
        scaled.append([end, round(crop * crop_scale), batch])
    return scaled


def linear_lr(lr, batch_size, recipe_batch):
    """The lr for batches of `batch_size` images from a recipe's lr for `recipe_batch` (Wong et al.'s 0.4
    for 512): lr × batch_size / recipe_batch, Goyal et al.'s linear scaling rule (DECISIONS.md, 'ImageNet
    lr and batch'). flags.parse_args applies it on --dataset imagenet when --lr is not given."""
    return lr * batch_size / recipe_batch


def get_data(args):
    """common.get_data's namespace for a folder read from disk (ImageNet, or a folder with --image-size):
    the training split streamed (StreamLoader), the validation, monitor and test images decoded once with
    the evaluation transform at the last phase's crop. Raises FastatError if the data cannot be read."""
    if args.dataset not in ("folder", "imagenet"):
        raise FastatError(
            f"--image-size reads an image folder or ImageNet: not --dataset {args.dataset}"
        )
    if args.phase_data_dirs and not args.phases:
        raise FastatError(
            f"--phase-data-dirs reads ImageNet's phases: not --dataset {args.dataset}"
        )
    device = torch.device(args.device)
    run_phases = phases(args)
    size = run_phases[-1][1]
    resized = eval_transform(size)
    train_folder, test_folder = image_folders(args.dataset, args.data_dir)
    labels = torch.tensor(train_folder.targets)
    train_idx, val_idx = split_validation(args, labels, len(test_folder))
    shown = ", ".join(" ".join(map(str, p)) for p in run_phases)
    log(f"# phases (last epoch, crop, batch): {shown}; lr {args.lr:g} for this --batch-size")
    folders = [train_folder]
    # each phase's copy (Wong et al. read 160 and 352 px copies: faster to decode)
    if args.phase_data_dirs:
        folders = [image_folders(args.dataset, d)[0] for d in args.phase_data_dirs]
    for f in folders:
        moved = [(p.replace(train_folder.root, f.root, 1), c) for p, c in train_folder.samples]
        if len(folders) not in (1, len(run_phases)) or f.samples != moved:
            raise FastatError(
                f"--phase-data-dirs: one folder per phase ({len(run_phases)}), each with the files "
                f"of {args.data_dir}"
            )
    train = StreamLoader(
        folders * (len(run_phases) // len(folders)), train_idx, run_phases, args.seed, device,
        args.workers, flip=not args.no_flip, channels_last=uses_channels_last(args),
        progress=args.progress_every,
    )  # fmt: skip
    val = None
    if len(val_idx):
        val_x, val_y = decode_images(train_folder, args.workers, val_idx, resized)
        val = DeviceLoader(val_x.to(device), val_y.to(device), val_idx.to(device), args.batch_size,
                           channels_last=uses_channels_last(args), label="validation")  # fmt: skip
    source = val_idx if len(val_idx) else train_idx
    pick = source[subset(len(source), monitor_size(args, len(train_idx)), 1)]
    monitor_x, monitor_y = decode_images(train_folder, args.workers, pick, resized)
    test = subset(len(test_folder), args.eval_samples)
    mine = test[
        eval_share(len(test), run_phases[-1][2])
    ]  # this process's batches of the evaluation
    test_x, test_y = decode_images(test_folder, args.workers, mine, resized)
    if args.dataset in DATASETS:
        mean, std = DATASETS[args.dataset]["mean"], DATASETS[args.dataset]["std"]
    else:  # a folder's mean and std: its monitor images'
        pixels = monitor_x.transpose(0, 1).flatten(1).float().div_(255)
        mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
    return SimpleNamespace(
        name=args.dataset,
        num_classes=len(train_folder.classes),
        class_names=train_folder.classes,
        shape=(3, size, size),
        mean=mean,
        std=std,
        train=train,
        val=val,
        val_size=len(val_idx),
        test_x=test_x.to(device),
        test_y=test_y.to(device),
        test_size=len(test),
        monitor=(monitor_x.to(device).float() / 255, monitor_y.to(device)),
        train_size=len(train_folder),
        train_images=len(train_idx),
        eval_batch=run_phases[-1][2],
    )


def imagenet_lr(opt, loader, epochs):
    """Wong et al.'s ImageNet schedule (their ImageNet configs), a LambdaLR stepped every iteration: the lr
    rises linearly from 0 to the optimiser's lr over the first epoch (a run under 15 epochs: over its first
    fifteenth), then falls linearly to 1/10 of it at 6/15 of the run, to 1/100 at 12/15 and to 1/1000 at
    the end; iteration i of epoch e is at e + (i + 1)/batches(e), the batches of the loader's phase (they
    change with the crop)."""
    counts = np.cumsum([0] + [loader.batches(e) for e in range(epochs)])
    epochs_at = [0, min(1, epochs / 15), *(np.array([6, 12, 15]) * epochs / 15)]
    factors = [0, 1, 0.1, 0.01, 0.001]

    def factor(step):
        e = min(int(np.searchsorted(counts, step, side="right")) - 1, epochs - 1)
        position = e + (step - counts[e] + 1) / (counts[e + 1] - counts[e])
        return float(np.interp(position, epochs_at, factors))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
