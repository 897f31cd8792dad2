"""How a run shows its per-epoch columns: the table's cells (log.txt and stdout), and curves.png, a panel per
column titled with what it measures, accuracies in %, epochs on whole-number ticks. (bench/report.py draws the
comparison of runs, report.png.)"""

import os

# What each per-epoch column is, as curves.png titles its panel (a method's own column: its name). acc and loss
# are measured on the inputs the method trains on: the attacked ones (the clean ones for plain training).
CURVE_TITLES = {
    "seconds": "seconds of training (wall clock)",
    "cpu_s": "CPU seconds of the process while training\n"
    "(all its threads: above the wall clock if several)",
    "monitor_s": "seconds of the PGD-10 monitor (not training)",
    "lr": "learning rate at the end of the epoch",
    "loss": "training loss on the attacked inputs",
    "acc": "training accuracy on the attacked inputs (%)",
    "pgd_monitor": "PGD-10 accuracy on the monitor images (%)",
}


def is_accuracy(column):
    """A column that holds a fraction of images (logged and plotted in %)."""
    return column in ("acc", "pgd_monitor") or column.endswith("_acc")


def curves_figure(rows, title=""):
    """curves.png as a matplotlib Figure: one panel per numeric column of the per-epoch rows (a column may be
    None in some epochs), titled with what it measures (CURVE_TITLES); accuracies in % on a 0-100 axis, times
    from 0, epochs on whole-number ticks with half an epoch of room on either side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    keys = []
    for k in rows[0] if rows else {}:
        values = [r.get(k) for r in rows]
        if (
            k != "epoch"
            and any(map(numeric, values))
            and all(numeric(v) or v is None for v in values)
        ):
            keys.append(k)
    panel_rows = max(1, -(-len(keys) // 3))
    fig, axes = plt.subplots(panel_rows, 3, figsize=(13, 3.2 * panel_rows), squeeze=False)
    last_epoch = max((r["epoch"] for r in rows), default=1)
    for ax, k in zip(axes.flat, keys):
        scale = 100 if is_accuracy(k) else 1
        points = [(r["epoch"], scale * r[k]) for r in rows if r.get(k) is not None]
        ax.plot(*zip(*points), marker="o", ms=4)
        ax.set_title(CURVE_TITLES.get(k, k + (" (%)" if scale == 100 else "")), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if scale == 100:
            ax.set_ylim(0, 100)
        elif k in ("seconds", "cpu_s", "monitor_s", "lr"):
            ax.set_ylim(0, 1.1 * max(v for _, v in points) or 1)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rows, path, title=""):
    """curves_figure(rows, title) written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cell(column, v):
    """A value as the per-epoch table shows it: accuracies in %, times in seconds."""
    if isinstance(v, float) and is_accuracy(column):
        return f"{100 * v:>9.2f}%"
    if isinstance(v, float) and column in ("seconds", "cpu_s", "monitor_s"):
        return f"{v:>10.1f}"
    if isinstance(v, float):
        return f"{v:>10.4g}"
    return f"{str(v):>10}"


def data_name(args):
    """The data a run trained on, as a title names it (a folder by its name)."""
    if args.dataset == "folder":
        return f"folder {os.path.basename(os.path.normpath(args.data_dir))}"
    return args.dataset
