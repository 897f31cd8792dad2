"""Every method on a real image folder, each recipe compressed to a few epochs, and the table of results.

    python bench/real_data.py --data-dir ../shared/data/cifar10-slice --out runs/real-data

runs, with `--dataset folder --model wrn-16-2` and the same number of epochs for the FGSM-cost methods:
plain training (the floor), FGSM-RS, FGSM-SDI, FGSM-MEP, SLAT, R-MC-LA, ATLAS, Amata, PGD-10 AT (through
amata.py) and LAS-AT. A recipe that counts in epochs is compressed in proportion (milestones, ATLAS's ε ramp and
validation slice); SDI, MEP, LAS-AT, FGSM-RS and SLAT place their lr schedule at fractions of --epochs already.
`--jobs` runs go side by side, each with `--threads` threads (two single-threaded runs on a 2-core machine).

Safe to interrupt and run again: a finished run (results.json) is skipped, an interrupted one goes on with
--resume. Each run writes its output to RUN/stdout.txt. At the end, and with `--table-only` at any time, the
table (markdown, as in README "Measured here") is printed and written to OUT/table.md: per run, the command,
epochs, seconds per epoch of training (wall clock, and CPU time of the process) and the ratio of CPU time to
FGSM-RS's, the seconds per epoch of the per-epoch monitor (PGD-10 on --monitor-size images, which picks the best
model; not training, so apart), then clean / worst-case / PGD / CW accuracy of the last and the best model (worst
case: correct under every attack). The ratio uses CPU time because a single-threaded run's CPU time hardly
changes when other work shares the machine, and its wall time does. A run whose evaluation has not finished
(results.json with no final numbers) is listed as such and goes on with --resume on the next invocation.

Milestones in epochs (Amata, R-MC-LA) are scaled with the run's epochs and kept below them (a milestone at or past
the last epoch never takes effect, and the scripts refuse it): with 2 epochs Amata's 75% and 90% both become 1.
"""

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time

from reproduce import fit_milestones  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runs(epochs, slow_epochs):
    """(name, script, flags, epochs). `epochs` for the FGSM-cost methods, `slow_epochs` for those that cost
    several times more per epoch (ATLAS, Amata, PGD-10 AT, LAS-AT)."""
    e, s = epochs, slow_epochs

    def scaled(
        fractions, n
    ):  # milestones at these fractions of n epochs, each below n (none when n is 1)
        return [str(m) for m in fit_milestones([max(1, round(f * n)) for f in fractions], n)]

    # Amata: lr ×0.1 at 75% and 90% of its 100 epochs; R-MC-LA: at 50% and 75% of its 200.
    amata_ms = scaled((0.75, 0.9), s)
    return [
        ("plain", "fgsm_rs.py", ["--alpha", "0", "--delta-init", "zero"], e),
        ("fgsm_rs", "fgsm_rs.py", [], e),
        ("fgsm_sdi", "fgsm_sdi.py", [], e),
        ("fgsm_mep", "fgsm_mep.py", [], e),
        # wrn-16-2 stands in for every method's PreActResNet18 here: no dropout (latent_at.py's default for a WRN
        # is its authors' 0.3), so that all runs train the same network.
        ("latent_at", "latent_at.py", ["--dropout", "0"], e),
        ("rmcla", "rmcla.py", ["--milestones", *scaled((0.5, 0.75), e)], e),
        # ATLAS trains until its validation rule stops it (the paper's runs peaked near epoch 30 of a 15-epoch
        # ramp): the ramp is kept at half the run, and the held-out slice at the paper's 10% of the training set.
        ("atlas", "atlas.py", ["--ramp-epochs", f"{s / 2:g}", "--val-size", "500"], s),
        ("amata", "amata.py", ["--milestones", *amata_ms], s),
        (
            "pgd10",
            "amata.py",
            [
                "--k-min",
                "10",
                "--k-max",
                "10",
                "--tau",
                "20",
                "--random-start",
                "--milestones",
                *amata_ms,
            ],
            s,
        ),
        ("las_at", "las_at.py", ["--strategy-model", "wrn-16-2"], s),
    ]


def command(args, script, flags, epochs, out_dir, resume):
    cmd = [
        sys.executable,
        os.path.join(ROOT, script),
        "--dataset",
        "folder",
        "--data-dir",
        args.data_dir,
        "--model",
        args.model,
        "--epochs",
        str(epochs),
        "--eval-iters",
        str(args.eval_iters),
        "--eval-restarts",
        str(args.eval_restarts),
        "--monitor-size",
        str(args.monitor_size),
        "--device",
        "cpu",
        "--out-dir",
        out_dir,
        *flags,
    ]
    return cmd + (["--resume"] if resume else [])


def load_results(out_dir):
    """results.json, or None when there is none yet (or it does not read)."""
    try:
        with open(os.path.join(out_dir, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished(out_dir):
    """Evaluated: results.json holds the final numbers (it is written with "final": null before the evaluation)."""
    res = load_results(out_dir)
    return isinstance(res, dict) and isinstance(res.get("final"), dict)


def run_one(args, name, script, flags, epochs):
    out_dir = os.path.join(args.out, name)
    if finished(out_dir):
        return name, "done before"
    resume = os.path.exists(os.path.join(out_dir, "checkpoint.pt"))
    os.makedirs(out_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.time()
    with open(os.path.join(out_dir, "stdout.txt"), "a") as log:
        code = subprocess.call(
            command(args, script, flags, epochs, out_dir, resume),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return name, f"exit {code} after {time.time() - start:.0f} s" + (" (resumed)" if resume else "")


def pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def table(args, plan):
    """Markdown table of the finished runs (the unfinished ones are listed as such)."""
    rows, base = [], None
    for name, script, flags, epochs in plan:
        res = load_results(os.path.join(args.out, name))
        if not isinstance(res, dict) or not res.get("epochs"):
            rows.append((name, script, flags, epochs, None))
            continue

        def mean(
            *keys,
        ):  # over all epochs: a CPU has little warm-up, and Amata's cost changes by epoch
            v = [
                next((r[k] for k in keys if isinstance(r.get(k), (int, float))), None)
                for r in res["epochs"]
            ]
            v = [x for x in v if x is not None]
            return sum(v) / len(v) if v else None

        # cpu_seconds: runs made before the rename to cpu_s (they had no monitor_s)
        per_epoch = (mean("seconds"), mean("cpu_s", "cpu_seconds"), mean("monitor_s"))
        if name == "fgsm_rs" and per_epoch[1]:
            base = per_epoch[1]
        rows.append((name, script, flags, epochs, (res, per_epoch)))
    attack = f"pgd{args.eval_iters}_{args.eval_restarts}"
    pgd = f"PGD-{args.eval_iters}{'' if args.eval_restarts == 1 else f'-{args.eval_restarts}'}"
    lines = [
        f"| run: `python SCRIPT --dataset folder --model {args.model}` plus | epochs | s / epoch (wall, CPU) | "
        f"× FGSM-RS (CPU) | monitor s / epoch | last: clean / worst case / {pgd} / CW-20 | "
        f"best epoch: clean / worst / PGD / CW |",
        "|---|---|---|---|---|---|---|",
    ]

    def sec(v):
        return "–" if v is None else f"{v:.0f}"

    for name, script, flags, epochs, found in rows:
        shown = " ".join([script, *map(shlex.quote, flags)])
        if found is None:
            lines.append(f"| `{shown}` | {epochs} | not run | | | | |")
            continue
        res, (wall, cpu, monitor) = found
        ran = len(res["epochs"])
        ratio = f"{cpu / base:.2f}" if base and cpu else "–"
        head = (
            f"| `{shown}` | {ran}{'' if ran == epochs else f' of {epochs}'} | {sec(wall)}, {sec(cpu)} | {ratio} | "
            f"{sec(monitor)} |"
        )
        fin = res.get("final")
        if not isinstance(fin, dict):
            lines.append(f"{head} evaluating / unfinished | |")
            continue

        def cells(which):
            f = fin[which]
            return " / ".join(pct(f.get(k)) for k in ("clean", "worst_case", attack, "cw20"))

        best = (
            "= last"
            if res["best_epoch"] in (0, ran) and fin["best"] == fin["last"]
            else cells("best")
        )
        lines.append(f"{head} {cells('last')} | {res['best_epoch'] or ran}: {best} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", required=True, help="an image folder: DATA_DIR/{train,test}/CLASS/*"
    )
    p.add_argument("--out", default="runs/real-data", help="one sub-folder per run")
    p.add_argument("--model", default="wrn-16-2")
    p.add_argument(
        "--epochs", type=int, default=8, help="epochs of the FGSM-cost methods (and plain training)"
    )
    p.add_argument(
        "--slow-epochs",
        type=int,
        default=None,
        help="epochs of ATLAS, Amata, PGD-10 AT and LAS-AT (default: --epochs)",
    )
    p.add_argument(
        "--run-epochs",
        nargs="*",
        metavar="NAME=E",
        help="epochs of single runs, e.g. las_at=2 (milestones and ATLAS's ramp scale with them)",
    )
    p.add_argument("--eval-iters", type=int, default=20, help="PGD steps of the final evaluation")
    p.add_argument(
        "--eval-restarts", type=int, default=1, help="PGD restarts of the final evaluation"
    )
    p.add_argument(
        "--monitor-size",
        type=int,
        default=256,
        help="images of the per-epoch PGD-10 monitor that picks the best model (a script's default is 512)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="threads of each run")
    p.add_argument(
        "--only",
        nargs="*",
        help="run only these, in this order (names as in the table: plain, fgsm_rs, ...)",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="print the table of what has finished, run nothing",
    )
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        p.error(f"--data-dir {args.data_dir}: no train/ folder there")
    plan = runs(args.epochs, args.slow_epochs or args.epochs)
    names = [r[0] for r in plan]
    for item in (
        args.run_epochs or []
    ):  # NAME=E: that run's epochs (its milestones and ramp as built above)
        name, _, e = item.partition("=")
        if name not in names or not e.isdigit() or int(e) < 1:
            p.error(
                f"--run-epochs {item}: expected NAME=EPOCHS with NAME one of {', '.join(names)}"
            )
        plan = [r if r[0] != name else runs(int(e), int(e))[names.index(name)] for r in plan]
    for name in args.only or []:
        if name not in names:
            p.error(f"--only {name}: not one of {', '.join(names)}")
    # --only also sets the order: the runs named first start first
    todo = [next(r for r in plan if r[0] == name) for name in args.only] if args.only else plan
    if not args.table_only:
        start = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for fut in concurrent.futures.as_completed(
                [pool.submit(run_one, args, *r) for r in todo]
            ):
                name, what = fut.result()
                print(f"{time.strftime('%H:%M:%S')} {name}: {what}", flush=True)
        print(
            f"batch wall time {time.time() - start:.0f} s ({args.jobs} side by side, {args.threads} thread(s) each)"
        )
    text = table(args, plan)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
