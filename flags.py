"""The command line of every fastat script: the flag types ([0, 1] mistakes on /255 values refused),
the flags all methods share, the recipes that fill what a command leaves out, and --resume's flags.

A method script's get_args():

    p = flags.base_parser(__doc__)                 # the shared flags
    p.add_argument("--k-max", type=flags.pos_int)  # the method's own
    args = flags.parse_args(p, RECIPES, argv)      # recipe values for what was not given

On the command line ε and step sizes are /255 units; in the code they are [0, 1] units.
"""

import argparse
import contextlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist

import common
from common import FastatError, rank, world


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


nonneg_float = _number(float, 0, False, "a finite number >= 0")
pos_float = _number(float, 0, True, "a number > 0")
nonneg_int = _number(int, 0, False, "an integer >= 0")
pos_int = _number(int, 1, False, "an integer >= 1")
batch_size = _number(int, 2, False, "at least 2 (train-mode BatchNorm needs two images)")


def seed(text):
    """argparse type for --seed: what every generator takes (numpy's: below 2^32, less the ranks added)."""
    v = nonneg_int(text)
    if v > 2**32 - 1 - 4096:
        raise argparse.ArgumentTypeError(f"must be below {2**32 - 4096}, got {text}")
    return v


def per255(flag, zero=False):
    """argparse type for a radius or step size in /255 units (--epsilon, --alpha, ...). A value strictly
    between 0 and 1 is no threat model anyone trains for, but a [0, 1] value written by mistake (0.3 on
    MNIST): refused, with what to write instead; so is one above 255 (more than the pixel range). zero: 0
    is allowed (it has a meaning there, e.g. --alpha 0: no attack step)."""

    def check(text):
        v = nonneg_float(text)
        if v == 0 and not zero:
            raise argparse.ArgumentTypeError("must be at least 1 (/255 units)")
        if 0 < v < 1:
            raise argparse.ArgumentTypeError(
                f"{text} is in /255 units, i.e. {v:g}/255; for {text} in [0, 1] units write "
                f"{flag} {255 * v:g}"
            )
        if v > 255:
            raise argparse.ArgumentTypeError(
                f"{text}/255 is more than the whole pixel range (255/255)"
            )
        return v

    return check


epsilon = per255("--epsilon")


def model_name(text):
    """argparse type for --model (common.model_name)."""
    try:
        return common.model_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Help(argparse.RawDescriptionHelpFormatter):
    """-h keeps the docstring's layout and shows every flag's default (a recipe's values are shown by
    parse_args: the flags whose default is None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or "(default" in text
        ):
            return text
        return f"{text} (default {_show(action.default)})".lstrip()


def base_parser(doc, true_prob=None, **helps):
    """The flags every method shares. A flag left at None is filled from the method's recipe by
    parse_args(). helps: a method's own help text for a shared flag (lr="...", alpha="...");
    true_prob: the help of --true-prob (the soft labels of the Jia et al. authors' code), for the
    methods that have it."""
    p = argparse.ArgumentParser(description=doc, formatter_class=Help)

    def a(flag, help=None, **kw):
        p.add_argument(flag, help=helps.pop(flag[2:].replace("-", "_"), help), **kw)

    a("--dataset", default="cifar10", choices=common.DATASET_NAMES,
      help="folder: any image folder DATA_DIR/{train,test}/CLASS/* (README.md, 'Data layout'), "
      "trained with the CIFAR-10 recipe")  # fmt: skip
    a(
        "--data-dir",
        default="data",
        help="where the dataset is (CIFAR, SVHN, MNIST: downloaded there)",
    )
    a(
        "--no-flip",
        action="store_true",
        help="no random horizontal flip (where a flip changes the class)",
    )
    a("--image-size", type=pos_int, default=None, metavar="N",
      help="a folder of images of any size: read it from disk in every epoch, training on random "
      "resized N×N crops (ImageNet: the last phase's crop)")  # fmt: skip
    a("--phase-data-dirs", nargs="+", default=None, metavar="DIR",
      help="ImageNet: a copy of --data-dir per phase, resized for faster decoding "
      "(bench/resize_folder.py; Wong et al.: 160 px, 352 px, full size)")  # fmt: skip
    a("--model", type=model_name, default=None, help=common.MODELS)
    a("--epochs", type=pos_int, default=None, help="passes over the training images")
    a("--batch-size", type=batch_size, default=None, help="the batch of all the processes together")
    a("--lr", type=pos_float, default=None, help="peak learning rate")
    a("--weight-decay", type=nonneg_float, default=None, help="L2 weight decay of the optimiser")
    a("--epsilon", type=epsilon, default=None,
      help="L∞ radius of training and of the evaluation, /255 units")  # fmt: skip
    a("--alpha", type=per255("--alpha", zero=True), default=None,
      help="attack step size, /255 units (keeps its ratio to ε when only --epsilon is given)")  # fmt: skip
    if true_prob:
        a("--true-prob", type=true_probability, default=None, metavar="F", help=true_prob)
    a("--seed", type=seed, default=0,
      help="random seed (under torchrun each process adds its rank)")  # fmt: skip
    a(
        "--out-dir",
        default=None,
        help="log, checkpoint, results and weights (default runs/SCRIPT-DATASET)",
    )
    a("--device", default=None,
      help="cuda, cuda:1, cpu (default: cuda when there is one; under torchrun each process takes "
      "its LOCAL_RANK's GPU)")  # fmt: skip
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
      help="autocast dtype of training. auto: bf16 on GPUs that compute it natively (Ampere and "
      "later), fp16 with loss scaling on older GPUs, fp32 on the CPU. The evaluation is fp32")  # fmt: skip
    a("--compile", action="store_true", help="torch.compile the networks for training")
    a("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1),
      help="processes that decode image files")  # fmt: skip
    eval_flags(p)
    a("--monitor-size", type=pos_int, default=None,
      help="training images of the catastrophic-overfitting monitor: PGD-10, step ε/4, after every "
      "epoch (default: a fiftieth of the training images, 32 to 512: a tenth of an FGSM epoch's "
      "passes)")  # fmt: skip
    a("--val-size", type=nonneg_int, default=None,
      help="training images held out to choose the best model on (0: the monitor's images are "
      "training images)")  # fmt: skip
    a("--progress-every", type=nonneg_float, default=10, metavar="SECONDS",
      help="a progress line (images/s, ETA) this often in an epoch and in the evaluation "
      "(0: none)")  # fmt: skip
    a("--resume", action="store_true",
      help="continue the run in --out-dir from its last checkpoint with its own flags; only the "
      "evaluation and where it runs (--device, ...) may change")  # fmt: skip
    if helps:
        raise TypeError(f"base_parser has no flag {', '.join(helps)}")
    return p


# ---- The evaluation's flags: method scripts (base_parser) and evaluate.py

# The attacks of the final evaluation by device (README.md, 'Evaluation protocol'): the full protocol on a
# GPU; on a CPU, where its 520 attack steps per image take long, 40 steps per image.
FULL_EVAL = {"eval_iters": 50, "eval_restarts": 10, "eval_cw_iters": 20}
CPU_EVAL = {"eval_iters": 20, "eval_restarts": 1, "eval_cw_iters": 20}
AUTOATTACK_INSTALL = "pip install git+https://github.com/fra31/auto-attack"


def eval_flags(p, default=None):
    """Add the evaluation's flags to parser p. default: what a flag left out means, in words (evaluate.py:
    "the run's"; it also gets --eval-step and --no-autoattack); without it (a method script) the attacks
    are the device's (eval_defaults, filled by parse_args) and the test images all of them."""

    def shown(key):
        if default:
            return f" (default: {default})"
        if FULL_EVAL[key] == CPU_EVAL[key]:
            return f" (default {FULL_EVAL[key]})"
        return f" (default {FULL_EVAL[key]} on a GPU, {CPU_EVAL[key]} on a CPU)"

    samples = f" (default: {default})" if default else ""
    p.add_argument(
        "--eval-samples",
        type=pos_int,
        default=None,
        help="evaluate on N test images, a fixed random subset" + samples,
    )
    p.add_argument(
        "--eval-iters",
        type=pos_int,
        default=None,
        help="PGD steps of the evaluation" + shown("eval_iters"),
    )
    p.add_argument(
        "--eval-restarts",
        type=pos_int,
        default=None,
        help="PGD restarts of the evaluation" + shown("eval_restarts"),
    )
    p.add_argument(
        "--eval-cw-iters",
        type=nonneg_int,
        default=None,
        help="steps of PGD on the CW margin, 0: none" + shown("eval_cw_iters"),
    )
    aa = "also run AutoAttack (github.com/fra31/auto-attack)"
    if not default:
        p.add_argument("--autoattack", action="store_true", help=aa)
        return
    p.add_argument("--autoattack", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{aa} (default: {default})")  # fmt: skip
    p.add_argument("--eval-step", type=per255("--eval-step"), default=None,
                   help="PGD step, /255 units (default: as the run: 2 at ε = 8, MNIST 2.55 at ε = "
                   "76.5, in proportion to ε, and at least 1.5ε/iterations)")  # fmt: skip


def eval_defaults(device):
    """The evaluation's attacks where a command gives none: FULL_EVAL on a GPU, CPU_EVAL on a CPU."""
    return CPU_EVAL if torch.device(device).type == "cpu" else FULL_EVAL


def check_autoattack(parser, args):
    """With --autoattack, refuse now (parser.error) if the official package is missing: not after hours of
    training."""
    if args.autoattack:
        try:
            import autoattack  # noqa: F401
        except ImportError:
            parser.error(f"--autoattack needs the official package: {AUTOATTACK_INSTALL}")


def eval_note(args, origin=None):
    """The note of the line that starts an evaluation: where its attacks come from (origin: "CPU default",
    "the run's") and, when they are fewer than the full protocol's, the flags that run it:
    " (CPU default; the full protocol: --eval-iters 50 --eval-restarts 10)"."""
    short = {k: v for k, v in FULL_EVAL.items() if getattr(args, k) < v}
    parts = [origin] if origin else []
    if short:
        parts.append("the full protocol: " + command_line(argparse.Namespace(**short)))
    return f" ({'; '.join(parts)})" if parts else ""


# What a resumed run may change: where it runs and how it is evaluated, not what it trains.
FREE_ON_RESUME = {
    "resume", "out_dir", "device", "data_dir", "phase_data_dirs", "workers", "compile",
    "progress_every", "eval_samples", "eval_iters", "eval_restarts", "eval_cw_iters", "autoattack",
}  # fmt: skip
_GIVEN = object()  # marks the flags that were not on the command line


def _show_recipes(parser, recipes):
    """-h shows each recipe's value beside a flag whose default comes from the recipes: parse_args's base
    (PreActResNet18, Wong's MNIST CNN, no held-out images), the method's recipes, ImageNet's layer."""
    import imagenet

    layers = {"default": {"model": "preact18", "val_size": 0, **recipes.get("default", {})}}
    layers["mnist"] = {"model": "mnist-cnn"}
    for name, recipe in recipes.items():
        layers[name] = {**layers.get(name, {}), **recipe}
    image_net = {k: v for k, v in imagenet.IMAGENET.items() if k != "phases"}
    layers["imagenet"] = {**image_net, **recipes.get("imagenet", {})}
    for action in parser._actions:
        values = [(k, r[action.dest]) for k, r in layers.items() if r.get(action.dest) is not None]
        if not values or action.default is not None:
            continue
        shown = [f"{'default' if k == 'default' else k + ' recipe'} {_show(v)}" for k, v in values]
        action.help = f"{action.help or ''} ({'; '.join(shown)})".lstrip()


def parse_args(parser, recipes, argv=None, script=None, eps_relative=("alpha",)):
    """Parse, then fill every flag left at None from recipes[dataset] over (ImageNet: imagenet.IMAGENET
    over) recipes['default']. eps_relative: recipe values that are a ratio of ε (FGSM-RS's α = 1.25ε, ...)
    keep it when only ε is set (`--epsilon 16` gives α = 20/255); an explicit flag always wins. With
    --resume the flags come from the run's checkpoint, and one given with it that would change the
    training is refused (FastatError). The evaluation's attacks left out are the device's (eval_defaults).
    Starts nothing: harness.setup(args) does."""
    _show_recipes(parser, recipes)
    args = parser.parse_args(argv)
    marked = argparse.Namespace(**{a.dest: _GIVEN for a in parser._actions})
    given = {k: v for k, v in vars(parser.parse_args(argv, marked)).items() if v is not _GIVEN}
    script = script or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    args.out_dir = args.out_dir or os.path.join("runs", f"{script}-{args.dataset}")
    saved = _resumed_args(args.out_dir, given, script) if args.resume else None
    if saved:
        args = saved
    else:
        model = "mnist-cnn" if args.dataset == "mnist" else "preact18"
        recipe = {"val_size": 0, "phases": None, "model": model, **recipes.get("default", {})}
        layers = [recipes.get(args.dataset, {})]
        if args.dataset == "imagenet":  # Wong et al.'s configuration under the method's own
            import imagenet

            layers.insert(0, imagenet.IMAGENET)
        if args.epsilon is not None:
            layers.append({"epsilon": args.epsilon})
        for layer in layers:
            # a layer's ε moves the ε-relative values it does not set (ImageNet's ε 2: FGSM-RS's α 2.5)
            ratio = layer.get("epsilon", recipe.get("epsilon", 1)) / recipe.get("epsilon", 1)
            recipe.update(
                {k: recipe[k] * ratio for k in eps_relative if k in recipe and k not in layer}
            )
            recipe.update(layer)
        for key, value in recipe.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if args.dataset == "imagenet" and "lr" not in given:  # the recipe's lr is for its batch
            args.lr = imagenet.linear_lr(args.lr, args.batch_size, recipe["batch_size"])
        args.method = script
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device}: {err}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(
            f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    for key, value in eval_defaults(device).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_autoattack(parser, args)
    return args


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class Finished(FastatError):
    """A finished run was asked to resume: nothing to do (exit 0)."""


def saved_args(out):
    """The flags a run in folder `out` was started with: from its checkpoint.pt, or, before its first
    checkpoint, from the args.json it writes when it starts; None if it holds neither. Raises
    FastatError if checkpoint.pt cannot be read."""
    path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(path):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["args"]
        except Exception as err:  # truncated, another program's file, not a torch file at all
            raise FastatError(
                f"{path} cannot be read as a fastat checkpoint ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); move it away to start the run "
                f"again, or give another --out-dir"
            ) from None
    return _recorded(out).get("args")


def _recorded(out):
    """The args.json a run writes when it starts ({} if there is none)."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(out, "args.json")) as f:
            return json.load(f)
    return {}


def _resumed_args(out, given, script):
    """--resume: the folder's own flags, with the given ones that may change (FREE_ON_RESUME); None when
    the folder holds no run yet and the command gives one, its --dataset named (a cluster's restart
    repeats the whole command). Raises Finished for a finished run, FastatError for a folder without a
    run and a command that names no --dataset, another script's run, or a flag that would change the
    training."""
    changed = [k for k in given if k not in FREE_ON_RESUME]
    with contextlib.suppress(OSError, ValueError), open(os.path.join(out, "results.json")) as f:
        if json.load(f).get("final"):
            ignored = ""
            if changed:
                ignored = f" ({', '.join('--' + k.replace('_', '-') for k in changed)} ignored)"
            raise Finished(
                f"{out} is a finished run (results.json): nothing to resume{ignored}. To evaluate "
                f"it again: python evaluate.py --weights {out}/model_best.pt"
            )
    saved = saved_args(out)
    processes = _recorded(out).get("processes")
    started = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    if saved and processes and processes != started:  # refused before the data is read
        raise FastatError(
            f"{out} was trained by {processes} process(es): resume it with as many (this start has "
            f"{started})"
        )
    # A folder without a run starts one only when the command names its data: a mistyped --out-dir
    # with a flag or two must not start the default recipe somewhere new.
    if saved is None and "dataset" not in given:
        where = "holds no checkpoint.pt or args.json"
        if not os.path.isdir(out):
            where = "does not exist"
        raise FastatError(
            f"--resume: {os.path.abspath(out)} {where}: there is no run to resume. To start one "
            f"there, give its flags (--dataset at least) with --resume, or leave --resume out"
        )
    if saved is None:
        return None
    if saved["method"] != script:
        raise FastatError(f"{out} holds a {saved['method']}.py run, not a {script}.py one")
    for key, value in given.items():
        if key not in FREE_ON_RESUME and value != saved.get(key):
            raise FastatError(
                f"--{key.replace('_', '-')} {_show(value)}: this run was started with "
                f"{_show(saved.get(key))}, and a resumed run keeps its flags; start a new run "
                f"(another --out-dir) to change it"
            )
    return argparse.Namespace(**{**saved, "device": None, **given, "out_dir": out})


def milestones(args, parser=None, argv=None, fractions=()):
    """args.milestones (epochs after which a per-epoch MultiStepLR multiplies the lr by 0.1) against
    args.epochs. With `parser` (a script's get_args; argv: its command line): a milestone at or past
    --epochs would never act during training and is refused with parser.error, the given or the recipe's
    values named, and milestones at `fractions` of the run suggested. Returns the line a run logs when
    several milestones fall on one epoch (a short run: their drops come at once), else None."""
    late = [m for m in args.milestones if m >= args.epochs]
    shown = " ".join(map(str, args.milestones))
    if late and parser is not None:
        given = parser.parse_known_args(argv)[0].milestones is not None
        where = f"--milestones {shown}" if given else f"the recipe's milestones {shown}"
        fit = [min(args.epochs - 1, max(1, round(f * args.epochs))) for f in fractions]
        example = f"e.g. --milestones {' '.join(map(str, fit))}; " if args.epochs > 1 else ""
        parser.error(
            f"{where}: {late[0]} is not below --epochs {args.epochs}, so the lr would never drop "
            f"during training; pass --milestones below {args.epochs} ({example}--milestones "
            f"alone: no drop)"
        )
    shared = sorted({m for m in args.milestones if args.milestones.count(m) > 1})
    if not shared:
        return None
    drops = [f"{args.milestones.count(m)} after epoch {m}" for m in shared]
    return (
        f"# milestones {shown}: lr drops at once, {', '.join(drops)} (×0.1 each); the run is too "
        f"short to space them"
    )


def collapsed_milestones(milestones, steps, lr):
    """The line a run logs when the two milestones of a per-iteration MultiStepLR (×0.1 at each, `steps`
    iterations in all) fall on one iteration, as in a short run: the lr then skips its middle value.
    Else None."""
    if milestones[0] != milestones[1]:
        return None
    return (
        f"# both lr milestones fall on iteration {milestones[0]} of {steps}: the lr drops "
        f"from {lr:g} to {lr * 0.01:g} at once, never running at {lr * 0.1:g}; a longer run "
        f"separates them"
    )


def true_probability(text):
    """argparse type for --true-prob: a probability of the true class, 0 < F ≤ 1 (whether it is above
    1/C, C classes, is checked once the data is known: smoothing_of)."""
    v = pos_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"a probability is at most 1, got {text}")
    return v


def smoothing_of(true_prob, num_classes):
    """PyTorch's label_smoothing s that gives the soft labels of the SDI/PGI/LAS-AT authors' code: the
    true class gets probability F = true_prob, each other class (1 − F)/(C − 1). PyTorch's target is
    (1 − s)·onehot + s/C, so 1 − s + s/C = F, s = (1 − F)·C/(C − 1). None (no --true-prob): 0, hard
    labels. FastatError for F ≤ 1/C (uniform or worse labels: no signal left) and for a one-class
    dataset (C − 1 = 0 other classes)."""
    if true_prob is None:
        return 0.0
    if num_classes < 2:
        raise FastatError(
            f"--true-prob {true_prob:g}: this dataset has one class, so there is no other class "
            f"to give probability to; leave --true-prob out"
        )
    if true_prob <= 1 / num_classes:
        raise FastatError(
            f"--true-prob {true_prob:g}: the true class's probability must be above 1/C = "
            f"{1 / num_classes:.4g} (this dataset has {num_classes} classes; 1/C is the uniform "
            f"label, which says nothing of the class)"
        )
    return (1 - true_prob) * num_classes / (num_classes - 1)


def command_line(args):
    """The flags of a parsed run as a command line that reproduces it (recipe values made explicit)."""
    words = []
    for key, value in vars(args).items():
        if key in ("method", "resume", "phases") or value is None or value is False:
            continue
        words.append(f"--{key.replace('_', '-')}" + ("" if value is True else " " + _show(value)))
    return " ".join(words)


# Flags that may differ between torchrun's processes: where each one runs and reads its files.
LOCAL_FLAGS = {"device", "data_dir", "phase_data_dirs", "workers", "progress_every"}


def check_processes(args, training=True):
    """Under torchrun every process must train the same run (a --seed, --lr or --epochs that differs on
    one node would train other images, end with other weights or hang at the shorter run's end), and a
    training batch must give each process the same number of images, two at least (DDP averages their
    gradients with equal weights; train-mode BatchNorm needs two). Raises FastatError naming what is
    wrong. training False: evaluate.py, whose processes take whole evaluation batches."""
    if training and (args.batch_size % world() or args.batch_size < 2 * world()):
        raise FastatError(
            f"--batch-size {args.batch_size} does not give each of the {world()} processes the "
            f"same number of images, at least two: give a multiple of {world()}, at least "
            f"{2 * world()}"
        )
    if world() == 1:
        return
    mine = {k: v for k, v in vars(args).items() if k not in LOCAL_FLAGS}
    every = [None] * world()
    dist.all_gather_object(every, mine)
    for other, theirs in enumerate(every):
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                flag = "--" + key.replace("_", "-")
                raise FastatError(
                    f"{flag} differs between the processes: {_show(theirs.get(key))} in "
                    f"process {other}, {_show(mine.get(key))} in process {rank()}; start "
                    f"every node with the same command"
                )
