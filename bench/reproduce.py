"""Run every method's default recipe, plain training and PGD-10 AT one after the other, then the report.

    python bench/reproduce.py --dataset cifar10                          # the papers' recipes, one GPU
    python bench/reproduce.py --dataset cifar10 --quick                  # every recipe shrunk 10×: a budget run
    python bench/reproduce.py --dataset cifar10 --methods fgsm_rs pgd10 --model wrn-34-10
    python bench/reproduce.py --dataset folder --data-dir ../shared/data/cifar10-slice --model wrn-16-2 \\
        --quick --device cpu                                              # the same on a CPU, small image folder

Runs, cheapest first: plain (`fgsm_rs.py --alpha 0 --delta-init zero`: a zero step from a zero start is
training on clean images, exactly), fgsm_rs, latent_at, fgsm_mep, fgsm_sdi, rmcla, atlas, amata, pgd10
(`amata.py --k-min 10 --k-max 10 --tau 20 --random-start`: PGD-10 AT with step 2/255 on Amata's recipe) and
las_at, each into OUT/NAME (default OUT: runs/reproduce-DATASET, or runs/reproduce-DATASET-quick with --quick, so
that a quick set is never taken for the full one). Each run's output goes to the terminal and to
OUT/NAME/stdout.txt. At the end, bench/report.py writes OUT/report.md and OUT/report.png.

Safe to interrupt and run again with the same command: a finished run (a results.json) is skipped, an interrupted
one continues with --resume from its last completed epoch. A run that fails is reported and the others go on; the
exit code is then 1.

--quick [FACTOR] divides every recipe's length by FACTOR (default 10; at least one epoch): --epochs, the
milestones of amata.py and rmcla.py (in epochs; a milestone that would fall at or past the shortened run's last
epoch is moved to the epoch before it, duplicates merged, none left when the run has one epoch), ATLAS's
--ramp-epochs and its epoch upper bound. fgsm_sdi, fgsm_mep, las_at, fgsm_rs and latent_at place their lr
schedules at fractions of --epochs already. A quick run is also evaluated quickly: PGD-20 with 1 restart and CW-20
(QUICK_EVAL) instead of the scripts' PGD-50-10, on every test image, unless --eval-iters, --eval-restarts or
--eval-cw-iters are given (each one given wins). Each run's reproduce.json records the quick factor and the
evaluation; the report marks quick runs as such, names their evaluation, and puts no paper figure beside them.

--model sets the network of every run, and LAS-AT's strategy network too (the paper uses one architecture for
both). ATLAS holds out a tenth of the training images (at most 5,000, the paper's 5,000 of CIFAR's 50,000) for
its validation rule, on any dataset: its script's default. Flags that this script does not know are passed to
every run unchanged (e.g. --batch-size 32 --monitor-size 64 --compile); the report shows them as flags that
differ from the recipe.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
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
    ("latent_at", "latent_at", ()),
    ("fgsm_mep", "fgsm_mep", ()),
    ("fgsm_sdi", "fgsm_sdi", ()),
    ("rmcla", "rmcla", ()),
    ("atlas", "atlas", ()),
    ("amata", "amata", ()),
    ("pgd10", *paper_figures.VARIANTS["pgd10"][:2]),
    ("las_at", "las_at", ()),
)
NAMES = [name for name, _, _ in PLAN]
# The evaluation of a --quick run, for each flag not given: PGD-20-1 and CW-20 (the scripts: PGD-50-10, CW-20).
QUICK_EVAL = {"eval_iters": 20, "eval_restarts": 1, "eval_cw_iters": 20}


def shrink(value, factor):
    """value / factor, rounded half up, at least 1 (a milestone or an epoch count)."""
    return max(1, int(value / factor + 0.5))


def fit_milestones(milestones, epochs):
    """Milestones (epochs after which the lr drops) moved below `epochs`: one at or past the last epoch would never
    take effect (the scripts refuse it), so it goes to the epoch before; duplicates are merged, and none is left
    when the run has a single epoch."""
    return sorted({min(m, epochs - 1) for m in milestones if min(m, epochs - 1) >= 1})


def run_flags(args, script, flags):
    """The flags of one run: the variant's, the network, --quick's shrinking."""
    words = list(flags)
    if args.model:
        words += ["--model", args.model]
        if script == "las_at":
            words += ["--strategy-model", args.model]
        if script == "latent_at" and args.model.startswith("wrn"):
            # one network for every method: latent_at.py's WRN default is its authors' dropout 0.3
            words += ["--dropout", "0"]
    if args.quick:
        # The recipe's own numbers, for this dataset, as the script fills them in (parsing reads no data).
        recipe = report.get_args(script, ["--dataset", args.dataset, "--device", "cpu", *words])
        epochs = shrink(recipe["epochs"], args.quick)
        words += ["--epochs", str(epochs)]
        if "milestones" in recipe:  # amata.py, rmcla.py: milestones in epochs
            words += [
                "--milestones",
                *map(
                    str,
                    fit_milestones([shrink(m, args.quick) for m in recipe["milestones"]], epochs),
                ),
            ]
        if "ramp_epochs" in recipe:  # atlas.py: ε ramp in epochs (a float)
            words += ["--ramp-epochs", report.number(recipe["ramp_epochs"] / args.quick)]
    return words


def evaluation(args):
    """The evaluation every run gets: {eval_iters, eval_restarts, eval_cw_iters}, each as given, else QUICK_EVAL's
    under --quick, else None (the script's default)."""
    return {
        k: getattr(args, k)
        if getattr(args, k) is not None
        else QUICK_EVAL[k]
        if args.quick
        else None
        for k in QUICK_EVAL
    }


def evaluation_record(args):
    """The evaluation as reproduce.json records it: iters, restarts, cw_iters, samples, the scripts' defaults
    for the device filled in (None samples: every test image)."""
    defaults = flags.eval_defaults(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ev = {k: v if v is not None else defaults[k] for k, v in evaluation(args).items()}
    return {
        "iters": ev["eval_iters"],
        "restarts": ev["eval_restarts"],
        "cw_iters": ev["eval_cw_iters"],
        "samples": args.eval_samples,
    }


def command(args, name, script, flags):
    cmd = [
        sys.executable,
        os.path.join(ROOT, f"{script}.py"),
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        "--out-dir",
        os.path.join(args.out, name),
        *run_flags(args, script, flags),
    ]
    given = {"device": args.device, "eval_samples": args.eval_samples, **evaluation(args)}
    for flag, value in given.items():
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    return cmd + (["--autoattack"] if args.autoattack else []) + args.passthrough


def finished(run_dir):
    """A run is finished when its results.json reads and holds the final numbers. A run writes results.json with
    "final": null when training ends and fills it in after its evaluation: until then (or when the evaluation was
    interrupted) the run is resumed, which runs the evaluation again."""
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            return isinstance(json.load(f).get("final"), dict)
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def run_one(args, name, cmd):
    """Run (or skip, or resume) one run; returns ("done before" | "finished" | "failed" | "interrupted", text)."""
    run_dir = os.path.join(args.out, name)
    marker = os.path.join(run_dir, "reproduce.json")
    shown = shlex.join(["python", os.path.relpath(cmd[1])] + cmd[2:])
    before = None
    if os.path.exists(marker):
        with open(marker) as f:
            before = json.load(f).get("command")
    if before is not None and before != shown:
        print(
            f"# {name}: note: started before as `{before}`; kept as it is (choose another --out for a new set)",
            flush=True,
        )
    if finished(run_dir):
        return "done before", "results.json there, skipped"
    resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    os.makedirs(run_dir, exist_ok=True)
    if before is None:
        with open(
            marker, "w"
        ) as f:  # tells report.py how the run was made (quick or not, its evaluation)
            json.dump(
                {
                    "name": name,
                    "quick": args.quick,
                    "eval": getattr(args, "eval", None),
                    "command": shown,
                },
                f,
                indent=1,
            )
    print(f"# {name}: {shown}{' --resume' if resume else ''}", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        open(os.path.join(run_dir, "stdout.txt"), "a") as log,
        subprocess.Popen(
            cmd + (["--resume"] if resume else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        ) as proc,
    ):
        try:
            for line in proc.stdout:  # to the terminal and to the run's stdout.txt
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the run too: it checkpoints its last epoch and exits. Wait for that.
            code = proc.wait()
            code = code if code in (130, -signal.SIGINT) else 130
    took = f"{time.time() - start:.0f} s{' (resumed)' if resume else ''}"
    if code in (130, -signal.SIGINT):
        return "interrupted", f"interrupted after {took}"
    if code != 0:
        return (
            "failed",
            f"FAILED: exit {code} after {took}; see {os.path.join(run_dir, 'stdout.txt')}",
        )
    return "finished", f"finished in {took}"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # unknown flags go to the runs: no guessing at prefixes
    p.add_argument(
        "--dataset",
        required=True,
        choices=common.DATASET_NAMES,
        help="the dataset of every run (folder: an image folder DATA_DIR/{train,test}/CLASS/*)",
    )
    p.add_argument(
        "--data-dir", default="data", help="where the dataset lives (as the scripts' --data-dir)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=NAMES,
        default=None,
        metavar="NAME",
        help=f"run only these, in the plan's order (default: all of {' '.join(NAMES)})",
    )
    p.add_argument(
        "--model",
        type=flags.model_name,
        default=None,
        help="network of every run, e.g. wrn-16-2 on a CPU (default: each recipe's, PreActResNet18)",
    )
    p.add_argument(
        "--quick",
        type=flags.pos_float,
        nargs="?",
        const=10.0,
        default=None,
        metavar="FACTOR",
        help="divide every recipe's length by FACTOR (default 10): epochs, epoch milestones, ATLAS's ramp",
    )
    p.add_argument(
        "--out",
        default=None,
        help="one folder per run, and the report (default runs/reproduce-DATASET, -quick appended with "
        "--quick)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: each script's, cuda if present)",
    )
    p.add_argument(
        "--eval-samples",
        type=flags.pos_int,
        default=None,
        help="evaluate on N test images, a fixed random subset (default: all)",
    )
    p.add_argument(
        "--eval-iters",
        type=flags.pos_int,
        default=None,
        help="PGD steps of the final evaluation (50; --quick: 20)",
    )
    p.add_argument(
        "--eval-restarts",
        type=flags.pos_int,
        default=None,
        help="PGD restarts of the final evaluation (10; --quick: 1)",
    )
    p.add_argument(
        "--eval-cw-iters",
        type=flags.nonneg_int,
        default=None,
        help="steps of the final PGD on the CW margin, 0: none (20; --quick: 20)",
    )
    p.add_argument(
        "--autoattack", action="store_true", help="also run AutoAttack in every final evaluation"
    )
    args, args.passthrough = p.parse_known_args(argv)
    if args.passthrough and not args.passthrough[0].startswith("--"):
        p.error(f"unexpected argument {args.passthrough[0]}")
    if args.out is None:
        args.out = os.path.join("runs", f"reproduce-{args.dataset}{'-quick' if args.quick else ''}")
    args.eval = evaluation_record(args)
    plan = [r for r in PLAN if not args.methods or r[0] in args.methods]
    try:
        commands = [(name, command(args, name, script, flags)) for name, script, flags in plan]
    except report.RecipeUnknown as err:
        p.error(f"a script refused the flags: {err}")
    if args.passthrough:
        print(f"# passed to every run: {shlex.join(args.passthrough)}")
    if args.quick:
        ev = args.eval
        cw = f" and CW-{ev['cw_iters']}" if ev["cw_iters"] else ""
        print(
            f"# quick: recipes ÷ {report.number(args.quick)}, evaluated with PGD-{ev['iters']}-{ev['restarts']}{cw}"
        )

    outcomes, start = [], time.time()
    for name, cmd in commands:
        status, text = run_one(args, name, cmd)
        print(f"# {name}: {text}", flush=True)
        outcomes.append((name, status, text))
        if status == "interrupted":
            break
    print(f"\n# {len(outcomes)} of {len(commands)} runs visited in {time.time() - start:.0f} s:")
    for name, status, text in outcomes:
        print(f"#   {name:10} {text}")
    if outcomes and outcomes[-1][1] == "interrupted":
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
