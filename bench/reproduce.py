"""Run every method's default recipe, plain training and PGD-10 AT one after the other (or side by side), then
the report: the one runner of bench/.

    python bench/reproduce.py --dataset cifar10                       # the papers' recipes, one GPU
    python bench/reproduce.py --dataset cifar10 --quick               # every recipe shrunk 10×: a budget run
    python bench/reproduce.py --dataset cifar10 --methods fgsm_rs pgd10 --model wrn-34-10
    python bench/reproduce.py --dataset folder --data-dir DIR --model wrn-16-2 --device cpu \\
        --epochs 8 atlas=3 amata=2 pgd10=2 las_at=2 --eval-iters 20 --eval-restarts 1 --monitor-size 256 \\
        --jobs 2 --threads 1 --out runs/real-data     # every method on an image folder, a 2-core CPU

Runs, cheapest first: plain (`fgsm_rs.py --alpha 0 --delta-init zero`: a zero step from a zero start is
training on clean images, exactly), fgsm_rs, n_fgsm, latent_at, fgsm_mep, fgsm_ckpt, fgsm_sdi, rmcla, grad_align,
atlas, free_at, amata_free (`free_at.py --replays-min 2`: Amata's annealing of Free's replays), amata, pgd10
(`amata.py --k-min 10 --k-max 10 --tau 20 --random-start`: PGD-10 AT with step 2/255 on Amata's recipe) and
las_at, each into OUT/NAME (default OUT: runs/reproduce-DATASET, or
runs/reproduce-DATASET-quick with --quick or --epochs, so that a quick set is never taken for the full one).
Each run's output goes to OUT/NAME/stdout.txt, and to the terminal when one run goes at a time. At the end,
bench/report.py writes OUT/report.md and OUT/report.png.

Safe to interrupt and run again with the same command: a finished run (results.json with its final numbers) is
skipped, an interrupted one continues with --resume from its last completed epoch (or evaluates again). A run that
fails is reported and the others go on; the exit code is then 1. --jobs N runs N side by side, each with
--threads threads (OMP_NUM_THREADS): two single-threaded runs on a 2-core machine.

--quick [FACTOR] divides every recipe's length by FACTOR (default 10; at least one epoch): --epochs, the
milestones of amata.py, rmcla.py, fgsm_ckpt.py and free_at.py (in epochs; a milestone that would fall at or past
the shortened run's last epoch is moved to the epoch before it, duplicates merged, none left when the run has one
epoch), the ramps of atlas.py and n_fgsm.py (ε) and grad_align.py (its step, SVHN), and ATLAS's epoch upper
bound. fgsm_sdi, fgsm_mep, las_at, fgsm_rs and latent_at place their lr
schedules at fractions of --epochs already. --epochs N [NAME=N ...] instead sets the number of epochs of every run
(N) or of one (NAME=N), its recipe shrunk in the same way by the factor that gives N epochs. A quick run is also
evaluated quickly: PGD-20 with 1 restart and CW-20 (QUICK_EVAL) instead of the scripts' PGD-50-10, on every test
image, unless --eval-iters, --eval-restarts or --eval-cw-iters are given (each one given wins). Each run's
reproduce.json records its factor and the evaluation; the report marks quick runs as such, names their
evaluation, and puts no paper figure beside them.

--model sets the network of every run, and LAS-AT's strategy network too (the paper uses one architecture for
both); with a WRN, SLAT's dropout is 0 (latent_at.py's WRN default is its authors' 0.3) so that every run trains
the same network. ATLAS holds out a tenth of the training images (at most 5,000, the paper's 5,000 of CIFAR's
50,000) for its validation rule, on any dataset: its script's default. Flags that this script does not know are
passed to every run unchanged (e.g. --batch-size 32 --monitor-size 64 --compile); the report shows them as flags
that differ from the recipe.
"""

import argparse
import concurrent.futures
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import paper_figures  # noqa: E402  (bench/)
import report  # noqa: E402  (bench/)

import common  # noqa: E402
import flags  # noqa: E402

# (name, script, flags), cheapest first, so that the short runs have results while the long ones train.
PLAN = (
    ("plain", *paper_figures.VARIANTS["plain"][:2]),
    ("fgsm_rs", "fgsm_rs", ()),
    ("n_fgsm", "n_fgsm", ()),
    ("latent_at", "latent_at", ()),
    ("fgsm_mep", "fgsm_mep", ()),
    ("fgsm_ckpt", "fgsm_ckpt", ()),
    ("fgsm_sdi", "fgsm_sdi", ()),
    ("rmcla", "rmcla", ()),
    ("grad_align", "grad_align", ()),
    ("atlas", "atlas", ()),
    ("free_at", "free_at", ()),
    ("amata_free", *paper_figures.VARIANTS["amata_free"][:2]),
    ("amata", "amata", ()),
    ("pgd10", *paper_figures.VARIANTS["pgd10"][:2]),
    ("las_at", "las_at", ()),
)
NAMES = [name for name, _, _ in PLAN]
# The evaluation of a quick run, for each flag not given: PGD-20-1 and CW-20 (the scripts: PGD-50-10, CW-20).
QUICK_EVAL = {"eval_iters": 20, "eval_restarts": 1, "eval_cw_iters": 20}


def shrink(value, factor):
    """value / factor, rounded half up, at least 1 (a milestone or an epoch count)."""
    return max(1, int(value / factor + 0.5))


def fit_milestones(milestones, epochs):
    """Milestones (epochs after which the lr drops) moved below `epochs`: one at or past the last epoch would never
    take effect (the scripts refuse it), so it goes to the epoch before; duplicates are merged, and none is left
    when the run has a single epoch."""
    return sorted({min(m, epochs - 1) for m in milestones if min(m, epochs - 1) >= 1})


def epochs_item(word):
    """--epochs' N or NAME=N."""
    name, _, n = word.rpartition("=")
    if not n.isdigit() or int(n) < 1 or (name and name not in NAMES):
        raise argparse.ArgumentTypeError(
            f"{word}: expected N or NAME=N, NAME one of {' '.join(NAMES)}"
        )
    return name or None, int(n)


def factor_of(args, name, recipe_epochs):
    """The factor this run's recipe is shrunk by (None: the full recipe)."""
    epochs = dict(args.epochs or ())
    n = epochs.get(name, epochs.get(None))
    return recipe_epochs / n if n else args.quick


def run_flags(args, name, script, flags):
    """The flags of one run and its shrink factor: the variant's, the network, --quick's or --epochs' shrinking."""
    words = list(flags)
    if args.model:
        words += ["--model", args.model]
        if script == "las_at":
            words += ["--strategy-model", args.model]
        if script == "latent_at" and args.model.startswith("wrn"):
            words += ["--dropout", "0"]
    if not (args.quick or args.epochs):
        return words, None
    # The recipe's own numbers, for this dataset, as the script fills them in (parsing reads no data).
    recipe = report.get_args(script, ["--dataset", args.dataset, "--device", "cpu", *words])
    factor = factor_of(args, name, recipe["epochs"])
    if not factor:
        return words, None
    epochs = shrink(recipe["epochs"], factor)
    words += ["--epochs", str(epochs)]
    if "milestones" in recipe:  # amata, rmcla, fgsm_ckpt, free_at: milestones in epochs
        shrunk = fit_milestones([shrink(m, factor) for m in recipe["milestones"]], epochs)
        words += ["--milestones", *map(str, shrunk)]
    # ramps in epochs (floats): ATLAS's and N-FGSM's ε ramp, GradAlign's step ramp (SVHN)
    for key in ("ramp_epochs", "alpha_ramp_epochs"):
        if key in recipe:
            ramp = report.number(round(recipe[key] / factor, 6))
            words += [f"--{key.replace('_', '-')}", ramp]
    return words, factor


def evaluation(args):
    """The evaluation every run gets: {eval_iters, eval_restarts, eval_cw_iters}, each as given, else QUICK_EVAL's
    under --quick or --epochs, else None (the script's default)."""
    quick = args.quick or args.epochs
    given = {k: getattr(args, k) for k in QUICK_EVAL}
    return {k: QUICK_EVAL[k] if v is None and quick else v for k, v in given.items()}


def evaluation_record(args):
    """The evaluation as reproduce.json records it: iters, restarts, cw_iters, samples, the scripts' defaults
    for the device filled in (None samples: every test image)."""
    defaults = flags.eval_defaults(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ev = {k: v if v is not None else defaults[k] for k, v in evaluation(args).items()}
    names = {"iters": "eval_iters", "restarts": "eval_restarts", "cw_iters": "eval_cw_iters"}
    return {**{k: ev[v] for k, v in names.items()}, "samples": args.eval_samples}


def command(args, name, script, flags):
    """(the command line of one run, its shrink factor)."""
    own, factor = run_flags(args, name, script, flags)
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--dataset", args.dataset]
    cmd += ["--data-dir", args.data_dir, "--out-dir", os.path.join(args.out, name), *own]
    given = {"device": args.device, "eval_samples": args.eval_samples, **evaluation(args)}
    for flag, value in given.items():
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    return cmd + (["--autoattack"] if args.autoattack else []) + args.passthrough, factor


def run_one(args, name, cmd, factor=None):
    """Run (or skip, or resume) one run; returns ("done before" | "finished" | "failed" | "interrupted", text).
    Its output goes to RUN/stdout.txt, and to this process's stdout unless runs go side by side."""
    run_dir = os.path.join(args.out, name)
    marker = os.path.join(run_dir, "reproduce.json")
    shown = shlex.join(["python", os.path.relpath(cmd[1])] + cmd[2:])
    before = None
    if os.path.exists(marker):
        with open(marker) as f:
            before = json.load(f).get("command")
    if before is not None and before != shown:
        print(f"# {name}: note: started before as `{before}`; kept (another --out for a new set)")
    if report.finished(run_dir):
        return "done before", "results.json there, skipped"
    resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    os.makedirs(run_dir, exist_ok=True)
    if before is None:  # tells report.py how the run was made (its shrink factor, its evaluation)
        with open(marker, "w") as f:
            record = {"name": name, "quick": factor, "eval": getattr(args, "eval", None)}
            json.dump({**record, "command": shown}, f, indent=1)
    print(f"# {name}: {shown}{' --resume' if resume else ''}", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if getattr(args, "threads", None):
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    echo = getattr(args, "jobs", 1) == 1
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.Popen(cmd + ["--resume"] * resume, env=env, **pipe)
    with open(os.path.join(run_dir, "stdout.txt"), "a") as log, proc:
        try:
            for line in proc.stdout:  # to the run's stdout.txt (and to the terminal)
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the run too: it checkpoints its last epoch and exits. Wait for that.
            code = proc.wait()
            code = code if code in (130, -signal.SIGINT) else 130
    took = f"{time.time() - start:.0f} s{' (resumed)' if resume else ''}"
    if code in (130, -signal.SIGINT):
        return "interrupted", f"interrupted after {took}"
    if code != 0:
        return "failed", f"FAILED: exit {code} after {took}; see {run_dir}/stdout.txt"
    return "finished", f"finished in {took}"


def run_all(args, commands):
    """Every run, args.jobs side by side, in the plan's order; none starts after one was interrupted.
    Returns [(name, status, text)] of the runs visited."""
    stop = threading.Event()

    def one(name, cmd, factor):
        if stop.is_set():
            return name, "not started", "not started (interrupted)"
        status, text = run_one(args, name, cmd, factor)
        if status == "interrupted":
            stop.set()
        print(f"# {name}: {text}", flush=True)
        return name, status, text

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, name, *c) for name, c in commands]
        while True:
            try:
                outcomes = [f.result() for f in futures]
                break
            except KeyboardInterrupt:  # the runs got Ctrl-C too: they save and exit; start no other
                stop.set()
    return [o for o in outcomes if o[1] != "not started"]


def main(argv=None):
    # allow_abbrev off: the flags this script does not know go to the runs, no guessing at prefixes
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=common.DATASET_NAMES,
        help="the dataset of every run (folder: an image folder DATA_DIR/{train,test}/CLASS/*)",
    )
    p.add_argument(
        "--data-dir", default="data", help="the dataset's folder (the scripts' --data-dir)"
    )
    p.add_argument(
        "--methods", nargs="+", choices=NAMES, metavar="NAME", help="run only these, in this order"
    )
    p.add_argument(
        "--model", type=flags.model_name, help="every run's network (default: the recipe's)"
    )
    p.add_argument(
        "--quick",
        type=flags.pos_float,
        nargs="?",
        const=10.0,
        metavar="FACTOR",
        help="divide every recipe's length by FACTOR (10): epochs, milestones, ATLAS's ramp",
    )
    p.add_argument(
        "--epochs",
        type=epochs_item,
        nargs="+",
        metavar="N|NAME=N",
        help="every run's epochs (N) or one run's (NAME=N), the recipe shrunk as by --quick",
    )
    p.add_argument("--out", help="the runs' folder (default runs/reproduce-DATASET[-quick])")
    p.add_argument(
        "--device", help="cpu, cuda, cuda:1, ... (default: each script's, cuda if present)"
    )
    p.add_argument("--jobs", type=flags.pos_int, default=1, help="runs side by side (default 1)")
    p.add_argument("--threads", type=flags.pos_int, help="OMP_NUM_THREADS of every run")
    p.add_argument("--eval-samples", type=flags.pos_int, help="test images (default: all)")
    p.add_argument("--eval-iters", type=flags.pos_int, help="PGD steps (50; quick: 20)")
    p.add_argument("--eval-restarts", type=flags.pos_int, help="PGD restarts (10; quick: 1)")
    p.add_argument("--eval-cw-iters", type=flags.nonneg_int, help="CW steps, 0: none (20)")
    p.add_argument("--autoattack", action="store_true", help="also AutoAttack in every evaluation")
    args, args.passthrough = p.parse_known_args(argv)
    if args.passthrough and not args.passthrough[0].startswith("--"):
        p.error(f"unexpected argument {args.passthrough[0]}")
    if args.out is None:
        quick = "-quick" if args.quick or args.epochs else ""
        args.out = os.path.join("runs", f"reproduce-{args.dataset}{quick}")
    args.eval = evaluation_record(args)
    plan = [r for name in args.methods or NAMES for r in PLAN if r[0] == name]
    try:
        commands = [(name, command(args, name, script, flags)) for name, script, flags in plan]
    except report.RecipeUnknown as err:
        p.error(f"a script refused the flags: {err}")
    if args.passthrough:
        print(f"# passed to every run: {shlex.join(args.passthrough)}")
    if args.quick or args.epochs:
        ev = args.eval
        cw = f" and CW-{ev['cw_iters']}" if ev["cw_iters"] else ""
        shrunk = f"recipes ÷ {report.number(args.quick)}" if args.quick else "recipes shrunk"
        print(f"# quick: {shrunk}, evaluated with PGD-{ev['iters']}-{ev['restarts']}{cw}")

    start = time.time()
    outcomes = run_all(args, commands)
    print(f"\n# {len(outcomes)} of {len(commands)} runs visited in {time.time() - start:.0f} s:")
    for name, status, text in outcomes:
        print(f"#   {name:10} {text}")
    if any(status == "interrupted" for _, status, _ in outcomes):
        print("# interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print()
    report.main([args.out, "--out", args.out])
    failed = [name for name, status, _ in outcomes if status == "failed"]
    if failed:
        print(f"# failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
