"""One table and one figure from the results.json of finished runs.

    python bench/report.py runs/reproduce-cifar10                 # every run below that directory
    python bench/report.py runs/fgsm_rs-cifar10 runs/atlas-cifar10 --out runs

Writes OUT/report.md and OUT/report.png and prints the table. One row per run: the method and the flags that
differ from its recipe (found by parsing the same dataset and model with the script's own get_args; no data is
read and no training is run), dataset (an image folder named by its directory), model, epochs run and why the run
stopped early if it did (the "# stop" or "# early stop" line in its log.txt), device and training precision,
training time, seconds per epoch of training, its ratio to the FGSM-RS run of the same dataset, model and device
(CPU seconds on a CPU: they hardly change when other work shares the machine), the per-epoch monitor's seconds
apart, evaluation size and PGD step, the last and the best model's accuracy under each attack that was run with
its 95% interval (Wilson's, over the test images evaluated: the chance of the draw of test images, not of
training), the best epoch, and, for a run of a method's default recipe (or a named variant) on a dataset its
paper reports, the paper's figures from bench/paper_figures.py, with the paper's network.

Every attack has its own column, named with its settings: a run evaluated with PGD-20-1 never shares a column
with one evaluated with PGD-50-10. The figure has robust accuracy against training time (last and best model of
each run, with their intervals) and every run's pgd_monitor against epoch, where catastrophic overfitting shows
as a sudden drop. A directory without a readable results.json (an unfinished or failed run) gets a one-line
warning and is skipped. A run whose results.json has no final numbers yet (`"final": null`: written when training
ends, before the evaluation; it stays so if the evaluation was interrupted or failed) gets a row marked
"evaluating / unfinished" with its training figures; `python SCRIPT.py --resume --out-dir RUN` evaluates it.
Runs made by `bench/reproduce.py --quick` or `--epochs` (a RUN/reproduce.json says so) are marked as quick runs,
with the evaluation they ran, and get no paper figure: they did not run the recipe.
"""

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the method scripts and common.py, imported for their get_args()

import paper_figures  # noqa: E402  (bench/, this script's own folder)

# Flags that are not part of a recipe: where and how the run was executed, and the evaluation, which the accuracy
# columns' headers and the "eval images" column name instead. dataset and model have columns of their own.
NOT_RECIPE = set(
    "method dataset model data_dir phase_data_dirs out_dir device resume workers progress_every "
    "eval_samples eval_iters eval_restarts eval_cw_iters autoattack".split()
)
# Shown when changed, but a run that changed only these still ran the recipe (a paper figure stays comparable).
NEUTRAL = {"seed", "compile", "precision"}
# A directory holding one of these is a run.
RUN_FILES = ("results.json", "checkpoint.pt", "log.txt")


def warn(message):
    print(f"report.py: warning: {message}", file=sys.stderr, flush=True)


# ---- Finding and reading runs


def find_runs(paths):
    """Run directories at or below the given paths (a path may also be a results.json), in a stable order."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(os.path.dirname(os.path.abspath(path)))
        elif not os.path.isdir(path):
            warn(f"{path}: no such file or directory, skipped")
        else:
            below = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                if any(name in filenames for name in RUN_FILES):
                    below.append(os.path.abspath(dirpath))
            if not below:
                warn(f"{path}: no run below it")
            found += below
    return list(dict.fromkeys(found))  # a run named twice is reported once


def read_results(run_dir):
    """(results.json as a dict, None), or (None, why not) when it is missing, unreadable or not what Run.finish
    writes. The one reader of results.json: the report, reproduce.py, gpu_check.py and the tests use it."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None, f"{run_dir}: no results.json (an unfinished or failed run)"
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as err:
        return None, f"{path}: unreadable ({type(err).__name__}: {str(err)[:80]})"
    if not isinstance(res, dict):
        return None, f"{path}: malformed (not a JSON object)"
    missing = [k for k in ("method", "args", "epochs", "train_time", "final") if k not in res]
    if missing:
        return None, f"{path}: malformed (no {', '.join(missing)})"
    final = res["final"]
    final_ok = final is None or (
        isinstance(final, dict) and all(isinstance(final.get(k), dict) for k in ("last", "best"))
    )
    if not (final_ok and isinstance(res["epochs"], list) and isinstance(res["args"], dict)):
        return None, f"{path}: malformed (final.last / final.best, epochs or args are not a run's)"
    return res, None


def finished(run_dir):
    """Evaluated: results.json holds the final numbers (it is written with "final": null before the
    evaluation, and stays so if the evaluation was interrupted)."""
    res, _ = read_results(run_dir)
    return res is not None and res["final"] is not None


def reproduce_info(run_dir):
    """RUN/reproduce.json, written by reproduce.py ({} when there is none): "quick" (the factor the recipe's
    length was divided by, None for a full recipe) and "eval" (the evaluation a quick run was given)."""
    try:
        with open(os.path.join(run_dir, "reproduce.json")) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def stop_reason(run_dir, res):
    """Why a run ran fewer epochs than --epochs: the last '# stop' / '# early stop' line of its log."""
    planned, ran = res["args"].get("epochs"), len(res["epochs"])
    if not isinstance(planned, int) or ran >= planned:
        return None
    reason = None
    log = os.path.join(run_dir, "log.txt")
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        for line in f:
            if re.match(r"# (early )?stop\b", line):
                reason = line[2:].strip()
    return reason or "stopped early (log.txt gives no reason)"


# ---- The flags that differ from the recipe: ask the script's own get_args()


class RecipeUnknown(Exception):
    pass


_PARSED = {}  # (method, argv) → vars of get_args(argv) or the RecipeUnknown it raised: each is parsed once


def get_args(method, argv):
    """vars() of METHOD.py's get_args(argv), or RecipeUnknown with the script's one-line complaint."""
    key = (method, tuple(argv))
    if key not in _PARSED:
        try:
            _PARSED[key] = _get_args(method, argv)
        except RecipeUnknown as err:
            _PARSED[key] = err
    if isinstance(_PARSED[key], RecipeUnknown):
        raise _PARSED[key]
    return dict(_PARSED[key])


def _get_args(method, argv):
    script = os.path.join(ROOT, f"{method}.py")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", str(method)) or not os.path.exists(script):
        raise RecipeUnknown(f"no script {method}.py")
    try:  # imports only: every script keeps its work in main()
        module = importlib.import_module(method)
    except Exception as exc:
        raise RecipeUnknown(f"{method}.py does not import: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, "get_args") or not all(isinstance(w, str) for w in argv):
        raise RecipeUnknown(f"{method}.py has no get_args(), or the run's dataset or model is gone")
    err = io.StringIO()
    try:  # parsing reads no data: the dataset need not be there
        with contextlib.redirect_stderr(err):
            return vars(module.get_args(list(argv)))
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        raise RecipeUnknown(lines[-1] if lines else "get_args refused the flags") from None
    except Exception as exc:  # a script that fails to parse its own flags must not stop the report
        raise RecipeUnknown(f"{method}.py get_args: {type(exc).__name__}: {exc}") from None


def same(a, b):
    """Equal as flag values: 10 and 10.0 are, a list and a tuple with equal items are (JSON keeps no tuples)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def number(v):
    """A flag value as the user would type it: 10.0 as 10, 0.0002 as 0.0002."""
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


def to_argv(flags):
    """{key: value} as command-line words. False and None have no words (a store_true flag left off, an option
    not given): such a difference stays in the shown flags, as key=value."""
    words = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(number, value)]
        elif value is not None and value is not False:
            words += [flag, number(value)]
    return words


def show_flags(flags):
    return " ".join(" ".join(to_argv({k: v})) or f"{k}={v}" for k, v in flags.items())


def derived_val_size(train_images, val_size):
    """What common.get_data makes of --val-size None: a tenth of the training split, at most 5,000. The split is
    the run's training images plus those it held out."""
    return min(5000, (train_images + val_size) // 10)


# Recipe values None that common.get_data derives from the data: key → f(train_images, the run's value).
DERIVED = {"val_size": derived_val_size}


def base_argv(dataset, model=None):
    return ["--dataset", dataset, *(["--model", model] if model else []), "--device", "cpu"]


def recipe_diff(method, dataset, model, args, train_images=None):
    """The smallest set of flags that, given to METHOD.py with --dataset DATASET --model MODEL, reproduces `args`
    (every key but NOT_RECIPE). A flag that follows from another is left out: with --epsilon 16, FGSM-RS's α
    follows ε (20/255) and is not shown; ATLAS's --attack-iters 10 brings its own step and loss weights.
    A recipe value None is derived from the data when the run starts (ATLAS's --val-size: a tenth of the training
    split): the run's value is the derived one unless a flag set it. With `train_images` (results.json's, the
    images it trained on) the derived value is computed and a different one shown; without it, never shown."""
    base = base_argv(dataset, model) + ["--out-dir", os.devnull]
    recipe = get_args(method, base)

    def derived(key, value):  # the run's value is what the data made of the recipe's None
        if key not in DERIVED or recipe.get(key) is not None:
            return False
        if isinstance(train_images, int) and isinstance(value, int):
            return value == DERIVED[key](train_images, value)
        return True  # not computable without the run's image count: taken as derived

    diff = {
        k: v
        for k, v in args.items()
        if k not in NOT_RECIPE and not (k in recipe and same(v, recipe[k])) and not derived(k, v)
    }
    for key in sorted(diff, key=lambda k: list(args).index(k)):
        trial = {k: v for k, v in diff.items() if k != key and k in recipe}
        with contextlib.suppress(RecipeUnknown):
            if key in recipe and same(get_args(method, base + to_argv(trial))[key], args[key]):
                del diff[key]
    return diff


def variant_diff(method, dataset, model, flags):
    """recipe_diff() of the run that METHOD.py FLAGS would make."""
    args = get_args(method, base_argv(dataset, model) + ["--out-dir", os.devnull, *flags])
    return recipe_diff(method, dataset, model, args)


def same_flags(a, b):
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def describe(res, quick):
    """Flags that differ from the recipe, the variant's name, and the paper figures that apply."""
    args, method = res["args"], res["method"]
    dataset, model = args.get("dataset"), args.get("model")
    out = {"flags": "", "variant": None, "figures": [], "recipe_error": None}
    try:
        diff = recipe_diff(method, dataset, model, args, res.get("train_images"))
        recipe_model = get_args(method, base_argv(dataset) + ["--out-dir", os.devnull])["model"]
    except RecipeUnknown as err:
        out["recipe_error"] = str(err)
        return out
    out["flags"] = show_flags(diff)
    core = {k: v for k, v in diff.items() if k not in NEUTRAL}
    for script, flags, label in paper_figures.VARIANTS.values():
        # A named variant with more flags (--epochs 30) is still that variant.
        if script != method:
            continue
        with contextlib.suppress(RecipeUnknown):
            named = variant_diff(method, dataset, model, flags)
            if named and all(k in core and same(core[k], v) for k, v in named.items()):
                out["variant"] = label
    if quick:
        return out  # a quick run did not run the recipe: no paper figure beside it
    for fig in paper_figures.FIGURES:
        mine = fig.script == method and fig.dataset == dataset and fig.flags is not None
        if not mine or model not in (recipe_model, fig.model):
            continue
        with contextlib.suppress(RecipeUnknown):
            if same_flags(core, variant_diff(method, dataset, model, fig.flags)):
                out["figures"].append(fig)
    return out


# ---- The table


def metric_order(key):
    """clean, then PGD by steps and restarts, CW, AutoAttack, the worst case; anything else last."""
    m = re.fullmatch(r"pgd(\d+)_(\d+)", key)
    if key == "clean":
        return (0,)
    if m:
        return (1, int(m[1]), int(m[2]))
    m = re.fullmatch(r"cw(\d+)", key)
    if m:
        return (2, int(m[1]))
    return {"autoattack": (3,), "worst_case": (4,)}.get(key, (5, key))


def metric_name(key):
    """pgd50_10 → PGD-50-10 (50 steps, 10 restarts), cw20 → CW-20, ..."""
    m = re.fullmatch(r"pgd(\d+)_(\d+)", key)
    if m:
        return f"PGD-{m[1]}-{m[2]}"
    m = re.fullmatch(r"cw(\d+)", key)
    if m:
        return f"CW-{m[1]}"
    return {"autoattack": "AutoAttack", "worst_case": "worst case"}.get(key, key)


def interval(p, n, z=1.96):
    """The 95% interval (low, high) of an accuracy p measured on n images: Wilson's score interval for a binomial
    proportion (Wilson, JASA 1927), which stays inside [0, 1], holds p, and is not empty at 0% or 100%. At 0%
    and 100% its near end is p itself (rounding would move it past p by 1e-17)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def eval_images(run):
    """The number of test images the run was evaluated on (None when results.json does not say)."""
    res = run["res"]
    ev = res.get("eval") if isinstance(res.get("eval"), dict) else {}
    n = ev.get("images", res.get("eval_samples"))  # eval_samples: runs made before "eval"
    return n if isinstance(n, int) and n > 0 else None


def pct(final, key, n):
    """An accuracy in %, with its 95% interval over the n test images when n is known."""
    if key not in final:
        return "–"  # this run did not run that attack
    v = final[key]
    if v is None:
        return "n/a"  # requested but not available (AutoAttack)
    if not n:
        return f"{100 * v:.1f}"
    low, high = interval(v, n)
    return f"{100 * v:.1f} ({100 * low:.1f}–{100 * high:.1f})"


def duration(seconds):
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def mean(rows, *keys):
    """Mean over the rows of the first of `keys` a row has as a number (None if no row has one)."""
    values = [next((r[k] for k in keys if isinstance(r.get(k), (int, float))), None) for r in rows]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def cost(run):
    """Seconds per epoch of training: the process's CPU seconds on a CPU (they measure the epoch even when other
    work shares the machine), wall-clock seconds on a GPU."""
    rows = run["res"]["epochs"]
    cpu = mean(rows, "cpu_s", "cpu_seconds")  # cpu_seconds: runs made before the rename
    return cpu if run["res"].get("device") == "cpu" and cpu else mean(rows, "seconds")


def per_epoch(run):
    """Training seconds per epoch (the monitor is apart: its own column)."""
    rows = run["res"]["epochs"]
    if not rows:
        return "–"
    wall = mean(rows, "seconds") or 0.0
    cpu = mean(rows, "cpu_s", "cpu_seconds")
    on_cpu = run["res"].get("device") == "cpu" and cpu
    return f"{wall:.1f} (CPU {cpu:.1f})" if on_cpu else f"{wall:.1f}"


def ratio_cell(run):
    base = run.get("base")
    if base is None or not cost(base) or cost(run) is None:
        return "–"
    return f"{cost(run) / cost(base):.2f}"


def dataset_label(res):
    """The dataset's name; an image folder is named by its directory (runs on two folders are two datasets)."""
    args = res["args"]
    if args.get("dataset") == "folder" and args.get("data_dir"):
        return f"folder {os.path.basename(os.path.normpath(args['data_dir']))}"
    return str(args.get("dataset"))


def device_cell(run):
    res = run["res"]
    return str(res.get("device", "?")) + (f" ({res['precision']})" if res.get("precision") else "")


def eval_cell(run):
    """The number of test images, and the PGD step of the evaluation (it follows ε)."""
    ev = run["res"].get("eval") if isinstance(run["res"].get("eval"), dict) else {}
    step = re.search(r"step ([^,]+)", str(ev.get("pgd", "")))
    images = eval_images(run) or "?"
    return f"{images} (step {step[1]})" if step else str(images)


def final_of(run, which):
    """final.last / final.best ({} while the run has no final numbers)."""
    final = run["res"]["final"]
    return final[which] if final else {}


def epochs_cell(run):
    res = run["res"]
    reason = stop_reason(run["dir"], res)
    ran = len(res["epochs"])
    return f"{ran} of {res['args'].get('epochs')}: {reason}" if reason else str(ran)


def quick_eval(run):
    """The evaluation reproduce.py gave a quick run, as "PGD-20-1, CW-20" (None if it recorded none)."""
    ev = run.get("reproduce", {}).get("eval")
    if not isinstance(ev, dict) or ev.get("iters") is None:
        return None
    text = f"PGD-{ev['iters']}-{ev.get('restarts', '?')}"
    return text + (f", CW-{ev['cw_iters']}" if ev.get("cw_iters") else "")


def method_cell(run):
    res, info = run["res"], run["info"]
    text = f"`{res['method']}{' ' + info['flags'] if info['flags'] else ''}`"
    if info["variant"]:
        text = f"{info['variant']}: {text}"
    if info["recipe_error"]:
        text += f" (recipe not known: {info['recipe_error']})"
    if run["quick"]:
        ev = quick_eval(run)
        text += f" **quick (recipe ÷ {run['quick']:.3g}{'; evaluated with ' + ev if ev else ''})**"
    if res["final"] is None:
        text += " **evaluating / unfinished (no final numbers)**"
    return text


def paper_cell(run):
    if run["quick"]:
        return "– (quick run)"
    return "; ".join(f.text() for f in run["info"]["figures"]) or "–"


def build_table(runs):
    keys = {k for run in runs for which in ("last", "best") for k in final_of(run, which)}
    keys = sorted(keys, key=metric_order)
    columns = [
        ("run", lambda r: r["label"]),
        ("method and flags that differ from its recipe", method_cell),
        ("dataset", lambda r: dataset_label(r["res"])),
        ("model", lambda r: str(r["res"]["args"].get("model"))),
        ("epochs", epochs_cell),
        ("device", device_cell),
        ("train time", lambda r: duration(r["res"]["train_time"])),
        ("s / epoch", per_epoch),
        ("× FGSM-RS", ratio_cell),
        ("monitor s / epoch", lambda r: number_or_dash(mean(r["res"]["epochs"], "monitor_s"))),
        ("eval images", eval_cell),
    ]

    def accuracy(which, k):
        return f"{which} {metric_name(k)}", lambda r: pct(final_of(r, which), k, eval_images(r))

    columns += [accuracy("last", k) for k in keys]
    columns.append(("best epoch", lambda r: str(r["res"]["best_epoch"] or len(r["res"]["epochs"]))))
    columns += [accuracy("best", k) for k in keys]
    columns.append(("paper (network: reported %, time)", paper_cell))
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for run in runs:
        lines.append("| " + " | ".join(cell(run).replace("|", "\\|") for _, cell in columns) + " |")
    return "\n".join(lines)


def number_or_dash(v):
    return "–" if v is None else f"{v:.1f}"


NOTES = """Accuracies in % on `eval images` test images (a fixed random subset when fewer than the
test set), for the last model and the best one ("best": the highest per-epoch monitor on training
data, or ATLAS's validation accuracy; never the test set), each with its 95% interval in brackets:
Wilson's score interval over the evaluated test images. It covers the draw of the test images only:
a second training run (another seed) varies more. PGD-N-R: N steps and R restarts on the
cross-entropy, with the step given beside the image count (ε/4, i.e. 2/255 at ε = 8/255, MNIST ε/30;
at least 1.5ε/N), a sample counts as robust only if it survives every restart; CW-N: PGD-N on the
Carlini-Wagner margin; worst case: correct under every attack the run evaluated. s / epoch:
wall-clock training seconds (on a CPU also the process's CPU seconds); × FGSM-RS: the ratio to the
FGSM-RS run of the same dataset, model and device in this report (CPU seconds on a CPU); the
per-epoch monitor (PGD-10 on the monitor images, which picks the best model) is not training and has
its own column, monitor s / epoch; checkpoints are in neither. Paper figures
(bench/paper_figures.py) are quoted from the papers, on the network and hardware they name, under
the attacks they name: compare a figure only with our column of the same attack."""


# ---- The figure


def monitor_images(res):
    """How many images the per-epoch monitor attacked: --monitor-size of the held-out slice (ATLAS) or of the
    training images (common.get_data)."""
    args = res["args"]
    pool = args.get("val_size") or res.get("train_images")
    size = args.get("monitor_size")
    return min(size, pool) if isinstance(size, int) and isinstance(pool, int) else None


def draw_run(ax_time, ax_mon, run, key, unit, colour):
    """One run's points: its last and best model's accuracy under `key` against training time, each with its 95%
    interval over the test images; its monitor by epoch, with the interval over the monitor images as a band."""
    res = run["res"]
    n = eval_images(run)
    # The best model is placed at the time its epoch ended: that is what it cost to train. A filled dot for the
    # last model, a larger hollow diamond for the best: where they coincide, both stay visible.
    best_time = sum(r.get("seconds", 0) for r in res["epochs"][: res.get("best_epoch") or None])
    points = (("last", res["train_time"], "o", 6, colour), ("best", best_time, "D", 13, "none"))
    for which, seconds, marker, size, face in points if key else ():
        acc = final_of(run, which).get(key)
        if acc is not None:
            low, high = interval(acc, n) if n else (acc, acc)
            bar = [[100 * (acc - low)], [100 * (high - acc)]]
            style = dict(fmt=marker, ms=size, mfc=face, mew=1.5, capsize=4, elinewidth=1)
            ax_time.errorbar(seconds / unit, 100 * acc, yerr=bar, color=colour, **style)
    rows = [r for r in res["epochs"] if isinstance(r.get("pgd_monitor"), (int, float))]
    epochs = [r["epoch"] for r in rows]
    acc = [100 * r["pgd_monitor"] for r in rows]
    ax_mon.plot(epochs, acc, marker="o", ms=3, color=colour)
    m = monitor_images(res)
    if rows and m:
        low, high = zip(*[[100 * v for v in interval(r["pgd_monitor"], m)] for r in rows])
        if len(rows) == 1:  # a band needs two epochs
            bar = [[acc[0] - low[0]], [high[0] - acc[0]]]
            ax_mon.errorbar(epochs, acc, yerr=bar, color=colour, capsize=4)
        ax_mon.fill_between(epochs, low, high, color=colour, alpha=0.15, lw=0)


def figure(runs):
    """The report's figure (a matplotlib Figure): robust accuracy against training time, every point with its 95%
    interval; the per-epoch monitor, with its interval as a band. Runs are told apart by colour, named in one
    legend under both panels (no label or legend covers a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, (ax_time, ax_mon) = plt.subplots(1, 2, figsize=(14, 6), layout="constrained")
    pgd_key = {}  # the robust accuracy of the left panel: the run's strongest PGD (none before its evaluation)
    for run in runs:
        keys = sorted((k for k in final_of(run, "last") if k.startswith("pgd")), key=metric_order)
        pgd_key[run["label"]] = keys[-1] if keys else None
    attacks = sorted({k for k in pgd_key.values() if k}, key=metric_order)
    longest = max((r["res"]["train_time"] for r in runs), default=1)
    # seconds up to 10 min, minutes up to 10 h, then hours
    units = ((1, "s"), (60, "min"), (3600, "h"))
    unit, unit_name = next((u, name) for u, name in units if longest < 600 * u or name == "h")
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    several_datasets = len({dataset_label(r["res"]) for r in runs}) > 1
    handles = []
    for i, run in enumerate(runs):
        colour = colours(i % colours.N)
        key = pgd_key[run["label"]]
        label = run["label"] + (f" on {dataset_label(run['res'])}" if several_datasets else "")
        label += " (quick)" if run["quick"] else ""
        label += f" [{metric_name(key)}]" if key and len(attacks) > 1 else ""
        handles.append(Line2D([], [], color=colour, marker="o", label=label))
        draw_run(ax_time, ax_mon, run, key, unit, colour)
    gray = {"ls": "", "color": "gray"}
    legend_key = [
        Line2D([], [], marker="o", label="last model, at its training time", **gray),
        Line2D(
            [], [], marker="D", mfc="none", ms=9, label="best model, at its epoch's end", **gray
        ),
        Line2D([], [], marker="|", ms=14, label="95% interval over the test images", **gray),
        Patch(color="gray", alpha=0.3, label="95% interval over the monitor images"),
    ]
    # the runs in the first columns of the legend (padded with blank entries), the key in the last
    rows = max(len(legend_key), -(-len(handles) // 3))
    handles += [Line2D([], [], ls="", label="")] * (-len(handles) % rows)
    times = [r["res"]["train_time"] for r in runs if r["res"]["train_time"] > 0]
    if times and max(times) / min(times) > 30:
        ax_time.set_xscale("log")
    ax_time.margins(x=0.1, y=0.1)
    if ax_time.get_xscale() == "linear":
        ax_time.set_xlim(left=max(0, ax_time.get_xlim()[0]))  # no negative time
    attack = metric_name(attacks[0]) if len(attacks) == 1 else "PGD (attack in [ ])"
    ax_time.set(
        xlabel=f"training time ({unit_name})", ylabel=f"{attack} accuracy on the test images (%)"
    )
    ax_time.set_title("robust accuracy against training time", fontsize=11)
    last_epoch = max((r["epoch"] for run in runs for r in run["res"]["epochs"]), default=1)
    ax_mon.set(xlabel="epoch", xlim=(0.5, last_epoch + 0.5), ylim=(0, None))
    ax_mon.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_mon.set_ylabel("PGD-10 accuracy on the monitor images (%)")
    ax_mon.set_title("per-epoch monitor: catastrophic overfitting is a sudden drop", fontsize=11)
    fig.legend(
        handles=handles + legend_key,
        loc="outside lower center",
        ncol=len(handles) // rows + 1,
        fontsize=8,
    )
    return fig


def plot(runs, path):
    import matplotlib.pyplot as plt

    fig = figure(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----


def collect(paths):
    """The finished runs at or below `paths`, each with its results, label, quick factor, recipe facts and the
    FGSM-RS run that its cost is compared with."""
    runs = []
    for d in find_runs(paths):
        res, problem = read_results(d)
        if problem:
            warn(f"{problem}, skipped")
            continue
        info = reproduce_info(d)
        runs.append({"dir": d, "res": res, "quick": info.get("quick"), "reproduce": info})
    top = os.path.commonpath([r["dir"] for r in runs]) if len(runs) > 1 else None
    for r in runs:
        r["label"] = os.path.relpath(r["dir"], top) if top else os.path.basename(r["dir"])
        r["info"] = describe(r["res"], r["quick"])

    def where(r):
        return dataset_label(r["res"]), r["res"]["args"].get("model"), r["res"].get("device")

    # The FGSM-RS run at each place that is not a named variant (plain training is one): one of the recipe's
    # (no flag differs) if there is one, a finished one before one still evaluating, else the first.
    fgsm_rs = [b for b in runs if b["res"]["method"] == "fgsm_rs" and not b["info"]["variant"]]
    fgsm_rs.sort(key=lambda b: (bool(b["info"]["flags"]), b["res"]["final"] is None))
    bases = {}
    for b in fgsm_rs:
        bases.setdefault(where(b), b)
    for r in runs:
        r["base"] = bases.get(where(r))
    return runs


def other_figures(runs):
    """The papers' figures for the methods and datasets of these runs that no run stands beside (another
    recipe, or one the papers do not state: Jia et al.'s re-runs of the baselines), as a markdown table."""
    shown = {id(f) for r in runs for f in r["info"]["figures"]}
    pairs = {(r["res"]["method"], r["res"]["args"].get("dataset")) for r in runs}
    rows = []
    for f in paper_figures.FIGURES:
        if (f.script, f.dataset) not in pairs or id(f) in shown:
            continue
        variant = f"`{f.label()}`" if f.flags is not None else f"{f.script}.py, recipe not stated"
        rows.append(f"| {variant} | {f.network} | {f.reported} | {f.when() or '–'} | {f.cite()} |")
    head = "| variant | network | reported (%) | training time | source |\n|---|---|---|---|---|"
    return "\n".join([head, *rows]) if rows else ""


def write_report(runs, out_dir, sources):
    os.makedirs(out_dir, exist_ok=True)
    table = build_table(runs)
    others = other_figures(runs)
    if others:
        why = "no run above has their recipe, or the papers do not state it"
        others = (
            f"The papers' other figures for these methods and datasets ({why}):\n\n{others}\n\n"
        )
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(
            f"# fastat report\n\nRuns below {', '.join(f'`{s}`' for s in sources)}; written by "
            f"`python bench/report.py`.\n\n{table}\n\n{others}{NOTES}\n\n![report](report.png)\n"
        )
    plot(runs, os.path.join(out_dir, "report.png"))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, directories to search for runs below, or results.json files",
    )
    p.add_argument(
        "--out", help="where report.md and report.png go (default: the RUN_DIR if one, else .)"
    )
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] if len(args.runs) == 1 and os.path.isdir(args.runs[0]) else ".")
    runs = collect(args.runs)
    if not runs:
        print("report.py: no finished run (results.json) found; nothing written", file=sys.stderr)
        return 1
    print(write_report(runs, out, args.runs))
    print(f"\nwrote {out}/report.md and {out}/report.png ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
