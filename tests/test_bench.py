"""bench/: report.py on hand-written runs (its table, its figure and curves.png, each checked through matplotlib's
objects); reproduce.py end to end on a tiny image folder, its --quick and --epochs plans, side by side; the
launcher's FLOP counter, epoch_time.py's peak table; profile_epoch.py's timeline; gpu_check.py's CPU dry run."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, os.path.join(ROOT, "bench"))
import launch  # noqa: E402
import paper_figures  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402

METHOD = "method and flags that differ from its recipe"


def write_run(
    run_dir,
    method,
    flags,
    final,
    epochs_run,
    train_time=100.0,
    best_epoch=None,
    log=None,
    step="2/255",
    images=1000,
    dataset="cifar10",
    **fields,
):
    """A results.json as Run.finish writes it, for a run of METHOD.py FLAGS on DATASET (nothing is trained).
    final None: written before the evaluation. fields: more entries, or replacements."""
    os.makedirs(run_dir)
    # --autoattack is checked at parse time (the package may not be installed here): set after parsing
    argv = ["--dataset", dataset, "--device", "cpu", "--out-dir", str(run_dir)]
    args = report.get_args(method, argv + [f for f in flags if f != "--autoattack"])
    args["autoattack"] = "--autoattack" in flags
    row = {"cpu_s": 1.0, "lr": 0.1, "loss": 1.0, "acc": 0.5}
    rows = [
        {"epoch": e, "seconds": train_time / epochs_run, "monitor_s": 0.25 * e, **row}
        | {"pgd_monitor": 0.1 + 0.3 * e / epochs_run}
        for e in range(1, epochs_run + 1)
    ]
    pgd = f"PGD-{args['eval_iters']}-{args['eval_restarts']}, step {step}"
    res = {
        "method": method,
        "args": args,
        "epochs": rows,
        "train_time": train_time,
        "best_epoch": best_epoch or epochs_run,
        "stopped_early": False,
        "train_images": 50000,
        "data": {"classes": 10, "shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
        "eval": {
            "images": images,
            "pgd": pgd,
            "cw_iters": args["eval_cw_iters"],
            "autoattack": False,
        },
        "device": "NVIDIA H100",
        "precision": "bfloat16",
        "torch": "2.14.1",
        "final": final,
        **fields,
    }
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(res, f)
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write(log or "# python ...\n")


def table_rows(markdown, which=0):
    """The report's markdown table (its first, or `which`) as {first cell: {column header: cell}}."""
    tables = [[]]
    for line in markdown.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    lines = [line for line in [t for t in tables if t][which] if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]
    assert all(len(r) == len(header) for r in rows)
    return header, {r[0]: dict(zip(header, r)) for r in rows}


def test_the_papers_figures_without_a_matching_run_are_listed_beside_the_runs(tmp_path):
    """Jia et al. do not state their baselines' recipes: no run stands beside those figures, but the report
    lists them for the methods and datasets it has runs of, and only those."""
    runs = tmp_path / "runs"
    final = {"clean": 0.8, "pgd50_10": 0.45, "cw20": 0.44, "worst_case": 0.43}
    write_run(runs / "ga", "grad_align", [], {"last": final, "best": final}, 30)
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    _, others = table_rows(text, which=1)
    assert list(others) == ["grad_align.py, recipe not stated"]  # no other method's figures
    listed = text[text.index("The papers' other figures") :]
    assert "83.96 clean" in listed and "80.83 clean" in listed  # Jia et al.'s Tables IV and VI


def test_report_table_attack_columns_paper_figures_and_skipped_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    last = {"clean": 0.8, "pgd50_10": 0.45, "cw20": 0.44, "worst_case": 0.43}
    best = {"clean": 0.78, "pgd50_10": 0.47, "cw20": 0.46, "worst_case": 0.45}
    write_run(runs / "rs", "fgsm_rs", [], {"last": last, "best": best}, 15, 720.0, best_epoch=12)
    # Another evaluation (PGD-20, 1 restart), another ε, and an early stop after 3 of 15 epochs.
    short = {"clean": 0.7, "pgd20_1": 0.3, "cw20": 0.25, "worst_case": 0.2}
    stop = "# early stop: PGD-5 accuracy fell from 40.0% to 5.0%; keeping the weights of epoch 2\n"
    flags = "--epsilon 16 --early-stop --eval-iters 20 --eval-restarts 1".split()
    write_run(runs / "rs16", "fgsm_rs", flags, {"last": short, "best": short}, 3, log=stop)
    pgd = {"clean": 0.85, "pgd50_10": 0.5, "cw20": 0.49, "autoattack": None, "worst_case": 0.48}
    flags = list(paper_figures.VARIANTS["pgd10"][1]) + ["--autoattack"]
    write_run(runs / "pgd", "amata", flags, {"last": pgd, "best": pgd}, 100)
    # Training done, evaluation not (yet): a row of its own, without accuracies.
    write_run(runs / "evaluating", "fgsm_rs", [], None, 15)
    os.makedirs(runs / "broken")
    (runs / "broken" / "results.json").write_text('{"method": "fgsm_rs", "args": {')  # cut off
    os.makedirs(runs / "unfinished")
    (runs / "unfinished" / "log.txt").write_text("# python fgsm_rs.py\n")

    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and "broken" in warnings[0] and "unfinished" in warnings[1]
    header, rows = table_rows((out / "report.md").read_text())
    assert header[0] in captured.out and set(rows) == {"rs", "rs16", "pgd", "evaluating"}

    # One column per attack and its settings: PGD-50-10 and PGD-20-1 never share one. Every accuracy has its
    # 95% interval over the 1,000 test images (Wilson: 45% of 1,000 is 41.9-48.1).
    assert "last PGD-50-10" in header and "last PGD-20-1" in header and "best PGD-20-1" in header
    assert rows["rs"]["last PGD-50-10"] == "45.0 (41.9–48.1)" and rows["rs"]["last PGD-20-1"] == "–"
    assert (
        rows["rs16"]["last PGD-20-1"].startswith("30.0 (") and rows["rs16"]["last PGD-50-10"] == "–"
    )
    assert rows["rs"]["best PGD-50-10"].startswith("47.0 (") and rows["rs"]["best epoch"] == "12"
    assert rows["pgd"]["last AutoAttack"] == "n/a" and rows["rs"]["last AutoAttack"] == "–"

    # The flags that differ from the recipe: α follows ε, so only --epsilon is shown; evaluation flags are not.
    assert rows["rs"][METHOD] == "`fgsm_rs`"
    flags = rows["rs16"][METHOD]
    assert "--epsilon 16" in flags and "--early-stop" in flags
    assert "--alpha" not in flags and "--eval" not in flags
    assert rows["rs16"]["epochs"].startswith("3 of 15: early stop: PGD-5 accuracy fell")
    assert rows["rs"]["epochs"] == "15" and rows["rs"]["train time"] == "12.0 min"
    # Seconds per epoch are training; the monitor has its own column (the mean of 0.25, 0.5, ... 3.75 s).
    assert rows["rs"]["s / epoch"] == "48.0" and rows["rs"]["monitor s / epoch"] == "2.0"
    assert rows["rs"]["device"] == "NVIDIA H100 (bfloat16)"
    assert rows["rs"]["eval images"] == "1000 (step 2/255)" and rows["rs"]["dataset"] == "cifar10"
    assert "evaluating / unfinished" in rows["evaluating"][METHOD]
    assert "unfinished" not in rows["rs"][METHOD]
    assert rows["evaluating"]["last PGD-50-10"] == "–" and rows["evaluating"]["s / epoch"] == "6.7"
    assert rows["pgd"][METHOD].startswith("PGD-10 AT: `amata")
    # The cost beside FGSM-RS's (the first FGSM-RS run of the same dataset, model and device): 1.0 s ÷ 48 s
    assert rows["rs"]["× FGSM-RS"] == "1.00" and rows["pgd"]["× FGSM-RS"] == "0.02"

    # Paper figures only beside a recipe run, with the paper's network and attacks named.
    paper = "paper (network: reported %, time)"
    assert rows["rs"][paper].startswith("PreActResNet18: 83.81 clean / 46.06 PGD-50-10")
    assert rows["pgd"][paper].startswith("PreActResNet18: 85.27 clean / 47.31 PGD-20 / 51.73 CW")
    assert rows["rs16"][paper] == "–"

    with Image.open(out / "report.png") as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels.std() > 10  # not blank


def test_wilson_interval_reference_values():
    """Wilson's interval: 50 of 100 is 40.38-59.62%; 0 of 10 is 0 to z²/(n + z²) = 27.75%, not the empty interval
    that a standard error gives at 0%."""
    low, high = report.interval(0.5, 100)
    assert abs(low - 0.40383) < 1e-4 and abs(high - 0.59617) < 1e-4
    low, high = report.interval(0.0, 10)
    assert low == 0.0 and abs(high - 1.96**2 / (10 + 1.96**2)) < 1e-9
    assert report.pct({"pgd": 1.0}, "pgd", 10) == "100.0 (72.2–100.0)"
    # it holds the accuracy, at 0% and 100% too (an error bar cannot be negative)
    for n in range(1, 300):
        for p in (0.0, 1.0, 0.5, 1 / 3):
            low, high = report.interval(p, n)
            assert 0.0 <= low <= p <= high <= 1.0, (p, n)


def fractions(final):
    return {"last": final, "best": final}


def test_report_figure_shows_intervals_keeps_points_clear_and_names_folders(tmp_path):
    """report.png: every point has its 95% interval as an error bar and the axis holds it (one image out of 200
    cannot fill the plot); the legend sits under the panels (it covers no point) and no label is drawn inside
    them, so six runs never overlap; the best model is a hollow marker larger than the last model's dot (both
    stay visible where they coincide); the monitor's epochs are whole numbers, a 1-epoch run with room on either
    side; runs on two image folders are named by their folders, in the table and the legend."""
    runs = tmp_path / "runs"
    for i, name in enumerate(["plain", "fgsm_rs", "fgsm_sdi", "fgsm_mep", "latent_at", "rmcla"]):
        p = 0.18 + 0.001 * i
        final = fractions({"clean": 0.3, "pgd50_10": p, "cw20": p, "worst_case": p})
        write_run(
            runs / name, name.replace("plain", "fgsm_rs"), [], final, 1, 100.0 + i, images=200
        )
    collected = report.collect([str(runs)])
    fig = report.figure(collected)
    ax_time, ax_mon = fig.axes
    fig.canvas.draw()
    legend = fig.legends[0]
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in (ax_time, ax_mon))
    assert not ax_time.texts and not ax_time.get_legend() and not ax_mon.get_legend()
    assert [t.get_text() for t in legend.get_texts()][:6] == [r["label"] for r in collected]
    bars = [c for c in ax_time.containers if hasattr(c, "has_yerr")]
    assert len(bars) == 12  # the last and the best model of six runs
    for run, (last, best) in zip(collected, zip(bars[::2], bars[1::2])):
        acc = run["res"]["final"]["last"]["pgd50_10"]
        low, high = (100 * v for v in report.interval(acc, 200))
        (segment,) = last.lines[2][0].get_segments()
        assert np.allclose(segment[:, 1], [low, high])
        bottom, top = ax_time.get_ylim()
        assert bottom <= low and top >= high and top - bottom > 10  # the intervals, not 0.5 points
        dot, diamond = last.lines[0], best.lines[0]
        assert (
            diamond.get_markerfacecolor() == "none"
            and diamond.get_markersize() > dot.get_markersize()
        )
    ticks = [t for t in ax_mon.get_xticks() if ax_mon.get_xlim()[0] <= t <= ax_mon.get_xlim()[1]]
    assert ticks == [1.0] and ax_mon.get_xlim() == (0.5, 1.5)
    import matplotlib.pyplot as plt

    plt.close(fig)

    # Two image folders: two datasets, each named by its folder.
    folders = tmp_path / "folders"
    final = fractions({"clean": 0.5, "pgd20_1": 0.3})
    for name in ("slice-a", "slice-b"):
        write_run(folders / name, "fgsm_rs", [], final, 2, dataset="folder")
        res = json.loads((folders / name / "results.json").read_text())
        res["args"]["data_dir"] = f"/data/{name}/"
        (folders / name / "results.json").write_text(json.dumps(res))
    collected = report.collect([str(folders)])
    _, rows = table_rows(report.build_table(collected))
    assert (
        rows["slice-a"]["dataset"] == "folder slice-a"
        and rows["slice-b"]["dataset"] == "folder slice-b"
    )
    fig = report.figure(collected)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "slice-a on folder slice-a" in labels and "slice-b on folder slice-b" in labels
    plt.close(fig)


def test_curves_panels_say_what_they_measure():
    """curves.png: accuracies in % on a 0-100 axis (the log's unit), each panel titled with what it measures (the
    training accuracy is on the attacked inputs; cpu_s is the process's CPU time), whole-number epoch ticks, and a
    1-epoch run on an axis from 0.5 to 1.5, not 0.96-1.04."""
    import matplotlib.pyplot as plt

    import plots

    row = {"epoch": 1, "seconds": 12.0, "cpu_s": 20.0, "monitor_s": 3.0, "lr": 0.1, "loss": 1.9}
    row.update(acc=0.31, pgd_monitor=0.22, val_acc=0.4, K_t=2)
    for rows in ([row], [{**row, "epoch": e} for e in range(1, 8)]):
        fig = plots.curves_figure(rows, "fgsm_rs on cifar10")
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        acc = panels["training accuracy on the attacked inputs (%)"]
        monitor = panels["PGD-10 accuracy on the monitor images (%)"]
        assert list(acc.lines[0].get_ydata()) == [31.0] * len(rows) and acc.get_ylim() == (0, 100)
        assert list(monitor.lines[0].get_ydata()) == [22.0] * len(rows)
        assert list(panels["val_acc (%)"].lines[0].get_ydata()) == [40.0] * len(rows)
        assert any(t.startswith("CPU seconds of the process") for t in panels)
        assert "seconds of training (wall clock)" in panels and "K_t" in panels
        for ax in panels.values():
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert (
                (low, high) == (0.5, len(rows) + 0.5) and ticks and all(t == int(t) for t in ticks)
            )
        plt.close(fig)


def test_paper_figures_name_flags_that_the_scripts_accept():
    for fig in paper_figures.FIGURES:
        assert fig.results and all(0 < float(v) < 100 for _, v in fig.results)  # quoted as numbers
        if fig.flags is not None:
            report.get_args(fig.script, ["--dataset", fig.dataset, "--device", "cpu", *fig.flags])
    table = paper_figures.markdown_table()
    assert table.count("\n") == len(paper_figures.FIGURES) + 1
    assert "85.52 clean / 47.62 PGD-20" in table


def plan_args(**given):
    """reproduce.py's parsed flags, without a command line."""
    unset = "model quick epochs device eval_samples eval_iters eval_restarts eval_cw_iters".split()
    args = argparse.Namespace(dataset="cifar10", data_dir="data", out="out", autoattack=False)
    vars(args).update({k: None for k in unset}, passthrough=[])
    vars(args).update(given)
    return args


def test_quick_shrinks_every_recipe_by_one_factor():
    def words(args, script):
        return reproduce.run_flags(args, script, script, ())[0]

    args = plan_args(quick=10.0)
    assert words(args, "amata") == "--epochs 10 --milestones 8 9".split()  # 100; 75, 90
    assert words(args, "rmcla") == "--epochs 20 --milestones 10 15".split()  # 200; 100, 150
    assert words(args, "atlas") == "--epochs 10 --ramp-epochs 1.5".split()  # ≤ 100; ramp 15
    assert words(args, "fgsm_sdi") == ["--epochs", "11"]  # its milestones are fractions already
    assert words(args, "fgsm_rs") == ["--epochs", "2"]  # 1.5 rounds up
    # Milestones stay below the shortened run's epochs (one at or past the end never fires; the scripts refuse it):
    # moved to the epoch before, merged, none left in a one-epoch run.
    args.quick = 100.0
    assert words(args, "amata") == ["--epochs", "1", "--milestones"]  # 0.75, 0.9 → 1, 1
    assert words(args, "rmcla") == ["--epochs", "2", "--milestones", "1"]  # 1, 1.5 → 1, 2
    for script in ("amata", "rmcla"):  # and the scripts accept them
        report.get_args(script, ["--dataset", "cifar10", "--device", "cpu", *words(args, script)])
    assert reproduce.fit_milestones([3, 8, 9, 12], 9) == [3, 8]
    # The network of every run, LAS-AT's strategy network included; a full run keeps the recipe's length.
    args = plan_args(model="wrn-16-2")
    assert words(args, "las_at") == "--model wrn-16-2 --strategy-model wrn-16-2".split()
    assert reproduce.run_flags(args, "las_at", "las_at", ())[1] is None


def test_epochs_sets_each_runs_length_and_shrinks_its_schedule():
    """--epochs 8 atlas=3 amata=2 pgd10=2 las_at=2 (the old bench/real_data.py's plan): every run gets its epochs,
    its epoch-counted schedule shrunk by the factor that gives them, and the quick evaluation; every command
    parses; --epochs refuses a name outside the plan."""
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=reproduce.epochs_item, nargs="+")
    given = p.parse_args("--epochs 8 atlas=3 amata=2 pgd10=2 las_at=2".split()).epochs
    args = plan_args(dataset="folder", model="wrn-16-2", epochs=given)
    plan = {name: reproduce.command(args, name, s, f) for name, s, f in reproduce.PLAN}
    for name, (cmd, factor) in plan.items():
        epochs = cmd[cmd.index("--epochs") + 1]
        assert epochs == {"atlas": "3", "amata": "2", "pgd10": "2", "las_at": "2"}.get(name, "8")
        assert factor and cmd[cmd.index("--eval-iters") + 1] == "20"  # a quick run's evaluation
        report.get_args(os.path.basename(cmd[1])[:-3], cmd[2:])
    assert plan["amata"][0][-8:-6] == ["--milestones", "1"] and plan["amata"][1] == 50  # 100 → 2
    assert "--milestones 4 6" in " ".join(plan["rmcla"][0])  # 200 → 8: 100, 150 → 4, 6
    assert "--dropout 0" in " ".join(plan["latent_at"][0])  # one network for every method
    with pytest.raises(SystemExit):
        p.parse_args(["--epochs", "cifar=3"])


def test_quick_evaluates_quickly_unless_told_otherwise():
    """--quick runs get PGD-20-1 and CW-20 (not the scripts' PGD-50-10) for every evaluation flag not given; a full
    run passes none, so each script evaluates with its default."""

    def flags(**given):
        args = plan_args(**given)
        cmd, _ = reproduce.command(args, "fgsm_rs", "fgsm_rs", ())
        evals = {w: cmd[i + 1] for i, w in enumerate(cmd) if w.startswith("--eval")}
        return evals, reproduce.evaluation_record(args)

    given, record = flags(quick=10.0)
    assert given == {"--eval-iters": "20", "--eval-restarts": "1", "--eval-cw-iters": "20"}
    assert record == {"iters": 20, "restarts": 1, "cw_iters": 20, "samples": None}
    given, record = flags(quick=10.0, eval_iters=7, eval_cw_iters=0)
    assert given == {"--eval-iters": "7", "--eval-restarts": "1", "--eval-cw-iters": "0"}
    given, record = flags(device="cuda")
    assert given == {} and record == {"iters": 50, "restarts": 10, "cw_iters": 20, "samples": None}
    given, record = flags(device="cpu")  # the scripts' CPU default
    assert given == {} and record == {"iters": 20, "restarts": 1, "cw_iters": 20, "samples": None}


def write_folder(root, classes=3, per_class=8, n_test=2, size=16):
    """root/{train,test}/cCLASS/i.png: a colour per class plus noise, so one epoch has something to learn."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, size=(classes, 3))
    for split, n in (("train", per_class), ("test", n_test)):
        for c in range(classes):
            os.makedirs(root / split / f"c{c}")
            for i in range(n):
                pixels = colours[c] + rng.normal(0, 30, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.png"
                )


def run(cmd, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_reproduce_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    write_folder(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--dataset", "folder"]
    cmd += [
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--methods",
        "plain",
        "fgsm_rs",
    ]
    cmd += "--quick 100 --model wrn-10-1 --eval-samples 6 --eval-iters 2 --eval-restarts 1".split()
    cmd += "--device cpu --batch-size 32 --jobs 2 --threads 1".split()
    first = run(cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in ("plain", "fgsm_rs"):
        res, _ = report.read_results(str(out / name))
        assert len(res["epochs"]) == 1 and res["args"]["batch_size"] == 32
        assert res["eval"]["images"] == 6 and res["args"]["model"] == "wrn-10-1"
        # the given --eval-iters 2 --eval-restarts 1 win; CW is the quick run's CW-20
        assert "pgd2_1" in res["final"]["last"] and "cw20" in res["final"]["last"]
        marker = json.loads((out / name / "reproduce.json").read_text())
        assert marker["quick"] == 100
        assert marker["eval"] == {"iters": 2, "restarts": 1, "cw_iters": 20, "samples": 6}
        # side by side, a run's output goes to its stdout.txt only
        assert "# evaluating the last model" in (out / name / "stdout.txt").read_text()
        assert "# evaluating the last model" not in first.stdout
    assert report.read_results(str(out / "plain"))[0]["args"]["alpha"] == 0
    header, rows = table_rows((out / "report.md").read_text())
    assert set(rows) == {"plain", "fgsm_rs"} and "last PGD-2-1" in header
    assert (out / "report.png").stat().st_size
    assert (
        rows["plain"][METHOD].startswith("plain training: `fgsm_rs")
        and "--alpha 0" in rows["plain"][METHOD]
    )
    for r in rows.values():
        assert (
            "quick (recipe ÷ 100; evaluated with PGD-2-1, CW-20)" in r[METHOD]
            and "--epochs 1" in r[METHOD]
        )
        assert r["paper (network: reported %, time)"] == "– (quick run)"
    assert rows["plain"]["dataset"] == "folder data"

    before = {n: (out / n / "results.json").stat().st_mtime_ns for n in ("plain", "fgsm_rs")}
    second = run(cmd)
    assert second.returncode == 0, second.stdout + second.stderr
    for name in ("plain", "fgsm_rs"):
        assert f"# {name}: results.json there, skipped" in second.stdout
        assert f"# {name}: python" not in second.stdout  # the line that announces a launch
    assert {
        n: (out / n / "results.json").stat().st_mtime_ns for n in ("plain", "fgsm_rs")
    } == before


def test_run_one_resumes_skips_and_reports_failures(tmp_path, capsys):
    """reproduce.run_one with a stand-in for a script that exits with the code given as its first argument."""
    args = argparse.Namespace(out=str(tmp_path), quick=None)
    stub = [
        sys.executable,
        "-c",
        "import sys; print('ARGS', sys.argv[1:]); sys.exit(int(sys.argv[1]))",
    ]
    status, text = reproduce.run_one(args, "a", stub + ["2"])
    assert status == "failed" and "exit 2" in text
    assert "ARGS ['2']" in (tmp_path / "a" / "stdout.txt").read_text()
    assert (
        reproduce.run_one(args, "b", stub + ["130"])[0] == "interrupted"
    )  # a script's exit code on Ctrl-C
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"")  # what the interrupted run left
    status, text = reproduce.run_one(args, "b", stub + ["0"])
    assert status == "finished" and "resumed" in text
    assert "ARGS ['0', '--resume']" in capsys.readouterr().out
    results = {"method": "fgsm_rs", "args": {}, "epochs": [], "train_time": 1.0}
    (tmp_path / "b" / "results.json").write_text('{"final": {"last": {}}')  # cut off: not finished
    assert reproduce.run_one(args, "b", stub + ["0"])[0] == "finished"
    # written when training ended, before the evaluation: not finished, resumed (which evaluates again)
    (tmp_path / "b" / "results.json").write_text(json.dumps({**results, "final": None}))
    status, text = reproduce.run_one(args, "b", stub + ["0"])
    assert status == "finished" and "resumed" in text
    final = {"last": {}, "best": {}}
    (tmp_path / "b" / "results.json").write_text(json.dumps({**results, "final": final}))
    assert (
        reproduce.run_one(args, "b", stub + ["2"])[0] == "done before"
    )  # not run again: it would fail


@pytest.mark.parametrize("jobs", [1, 2])
def test_reproduce_goes_on_after_a_failure_and_stops_at_an_interrupt(monkeypatch, tmp_path, jobs):
    """A failed run is reported and the others go on; after an interrupted one no run starts (side by side too:
    the run beside it goes on to its end), and no report is written."""
    visited = []
    reported = []

    def fake_run(args, name, cmd, factor=None):
        visited.append(name)
        return {"fgsm_rs": ("failed", "FAILED"), "amata": ("interrupted", "")}.get(
            name, ("finished", "")
        )

    monkeypatch.setattr(reproduce, "run_one", fake_run)
    monkeypatch.setattr(report, "main", lambda argv: reported.append(argv))
    common = ["--dataset", "cifar10", "--out", str(tmp_path), "--jobs", str(jobs)]
    assert reproduce.main(common + ["--methods", "plain", "fgsm_rs", "latent_at"]) == 1
    assert sorted(visited) == ["fgsm_rs", "latent_at", "plain"]
    assert reported == [[str(tmp_path), "--out", str(tmp_path)]]
    visited.clear()
    assert reproduce.main(common + ["--methods", "amata", "rmcla", "las_at"]) == 130
    assert visited[0] == "amata" and "las_at" not in visited and len(reported) == 1


def test_step_flops_count_the_attack_and_the_weight_step(tmp_path):
    """The launcher's FLOP counter (the loader's epoch() wrapped) counts the first training step inside the loop:
    plain training is one forward and one backward (about 3 forwards; the first conv needs no input gradient),
    FGSM-RS adds the attack's forward and input-only backward (about 2 forwards more). The library is left as it
    was found."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import common
    import fgsm_rs
    import flags

    write_folder(tmp_path / "data", classes=3, per_class=16)
    model = common.make_model("wrn-10-1", 3, (3, 16, 16), (0.5,) * 3, (0.25,) * 3)
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(16, 3, 16, 16))
    forward = counter.get_total_flops()
    real = (flags.parse_args, common.DeviceLoader.epoch)
    steps = {}
    for name, extra in (
        ("plain", ["--alpha", "0", "--delta-init", "zero"]),
        ("fgsm", []),
        ("compiled", []),
    ):
        out = tmp_path / name
        argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--out-dir", str(out)]
        argv += "--model wrn-10-1 --epochs 1 --batch-size 16 --device cpu --eval-samples 2".split()
        argv += "--eval-iters 1 --eval-restarts 1 --eval-cw-iters 0 --monitor-size 8".split()
        argv += "--progress-every 0 --workers 0".split()
        with launch.count_flops():
            if (
                name == "compiled"
            ):  # not counted under --compile (torch.compile made a no-op: nothing compiles)
                with launch.patched(torch, "compile", lambda module, **kw: module):
                    fgsm_rs.main(argv + extra + ["--compile"])
            else:
                fgsm_rs.main(argv + extra)
        assert (flags.parse_args, common.DeviceLoader.epoch) == real
        if name == "compiled":
            assert not (out / launch.FLOPS_FILE).exists() and (out / "results.json").exists()
            continue
        flops = json.loads((out / launch.FLOPS_FILE).read_text())
        assert flops["batch_size"] == 16
        steps[name] = flops["flops"] / forward
    assert 2.5 < steps["plain"] <= 3.0
    assert 1.8 < steps["fgsm"] - steps["plain"] < 2.01


def test_epoch_time_peak_table_and_rows():
    import epoch_time

    assert epoch_time.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert epoch_time.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert epoch_time.peak_bf16("NVIDIA H200") == 989e12
    assert epoch_time.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert (
        epoch_time.peak_bf16("NVIDIA L40S") == 362e12
        and epoch_time.peak_bf16("NVIDIA L40") == 181e12
    )
    assert epoch_time.peak_bf16("NVIDIA L4") == 121e12
    # GeForce: the dense bf16 tensor rate with fp32 accumulation, not the FP32 rate (82.6 and 35.6)
    assert epoch_time.peak_bf16("NVIDIA GeForce RTX 4090") == 165.2e12
    assert epoch_time.peak_bf16("NVIDIA GeForce RTX 3090") == 71e12
    for unknown in (
        "Some Unknown GPU",
        "NVIDIA A10G",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA H100 NVL",
        "NVIDIA GeForce RTX 3090 Ti",
    ):
        assert epoch_time.peak_bf16(unknown) is None, unknown

    def res(seconds, precision, compiled=False):
        return {
            "epochs": [{"seconds": s, "monitor_s": 0.5} for s in seconds],
            "train_images": 1000,
            "device": "NVIDIA H100 80GB HBM3",
            "torch": "2.14",
            "precision": precision,
            "args": {"compile": compiled},
        }

    flops = {"flops": 4.0e9 * 100, "batch_size": 100}  # 4 GFLOP per image
    rows = epoch_time.finish_rows(
        [
            epoch_time.spec_row("fgsm_rs.py", res([9.0, 1.0, 1.0], "bfloat16"), flops),
            epoch_time.spec_row(
                "fgsm_rs.py --compile", res([60.0, 0.5, 0.5], "bfloat16", True), None
            ),
            epoch_time.spec_row("fgsm_rs.py --precision fp32", res([9.0, 2.0], "float32"), flops),
            {"spec": "las_at.py", "status": "failed: exit 1: boom"},
        ]
    )
    eager, compiled, fp32, failed = rows
    assert (
        eager["seconds_per_epoch"] == 1.0 and eager["images_per_s"] == 1000
    )  # the warm-up epoch left out
    assert eager["monitor_s_per_epoch"] == 0.5 and eager["flops_per_s"] == 4e12
    assert abs(eager["peak_fraction"] - 4e12 / 989e12) < 1e-12
    # the compiled step is not counted: its twin's count, marked
    assert compiled["flops_source"] == "from 'fgsm_rs.py'" and compiled["flops_per_s"] == 8e12
    assert compiled["ratio"] == 0.5
    assert (
        fp32["flops_per_s"] == 2e12 and fp32["peak_fraction"] is None
    )  # not compared with the bf16 peak
    text = epoch_time.table(rows)
    assert "failed: exit 1" in text and "from 'fgsm_rs.py'" in text and "monitor" in text


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _Event:
    def __init__(self, name, start, end, parent=None, gpu=False):
        from torch.autograd import DeviceType

        self.name, self.time_range, self.cpu_parent = name, _Range(start, end), parent
        self.device_type = DeviceType.CUDA if gpu else DeviceType.CPU


def test_profile_shares_are_the_union_of_the_marked_ranges():
    """A hand-made timeline of one step in a 100 µs window: forward 0–20, backward 20–50 (its operators nested),
    an attack operator 50–60 with a child, the optimiser step 60–70 (its operators nested), a 5 µs operator inside
    the forward range (not outside), a forward range that runs past the window; the rest is Python."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import profile_epoch as pe

    fwd = _Event(pe.FORWARD, 0, 20)
    bwd = _Event(pe.BACKWARD + ": ConvolutionBackward0", 20, 50)
    sign = _Event("aten::sign", 50, 60)
    opt = _Event("Optimizer.step#SGD.step", 60, 70)
    item = _Event("aten::item", 80, 82)
    events = [
        fwd,
        _Event("aten::conv2d", 2, 18, fwd),
        _Event("aten::relu", 5, 10),
        bwd,
        _Event("aten::convolution_backward", 21, 49, bwd),
        sign,
        _Event("aten::empty", 51, 52, sign),
        opt,
        _Event("aten::_foreach_add_", 61, 69, opt),
        item,
        _Event("aten::_local_scalar_dense", 80, 81, item),
        _Event(pe.FORWARD, 95, 120),
    ]
    s = pe.summarize(events, (0, 100))
    # On CUDA the profile also holds the GPU's kernels and the GPU-side copies of the marked ranges, on the GPU's
    # clock: the host's shares are the same with them.
    gpu = [
        _Event("void cutlass_kernel", 50, 100, gpu=True),
        _Event(pe.FORWARD, 55, 95, gpu=True),
        _Event(pe.BACKWARD + ": ConvolutionBackward0", 70, 100, gpu=True),
        _Event("aten::_local_scalar_dense", 90, 91, gpu=True),
    ]
    assert pe.summarize(events + gpu, (0, 100)) == s
    assert pe.host_events(events + gpu) == events
    assert s["window_s"] == 100e-6
    assert abs(s["forward"] - 0.25) < 1e-12 and abs(s["backward"] - 0.30) < 1e-12
    assert abs(s["inside"] - 0.55) < 1e-12 and abs(s["outside"] - 0.45) < 1e-12
    assert abs(s["optimizer"] - 0.10) < 1e-12 and abs(s["other_ops"] - 0.12) < 1e-12
    assert abs(s["python"] - 0.23) < 1e-12
    assert s["top_outside"][0] == ("aten::sign", 0.10) and s["top_outside"][1] == (
        "aten::item",
        0.02,
    )
    assert s["syncs"] == {"aten::_local_scalar_dense": 1}
    # the same scalar read inside one_hot's CPU-only range check is not a sync on CUDA: not counted
    one_hot = _Event("aten::one_hot", 80, 82)
    events[-3:-1] = [
        one_hot,
        _Event("aten::_local_scalar_dense", 80, 81, _Event("aten::item", 80, 81, one_hot)),
    ]
    assert pe.summarize(events, (0, 100))["syncs"] == {}
    # `if tensor:` is one sync, though is_nonzero reads its scalar through _local_scalar_dense
    is_nonzero = _Event("aten::is_nonzero", 80, 82)
    events[-3:-1] = [
        is_nonzero,
        _Event("aten::_local_scalar_dense", 80, 81, _Event("aten::item", 80, 81, is_nonzero)),
    ]
    assert pe.summarize(events, (0, 100))["syncs"] == {"aten::is_nonzero": 1}


def test_profile_epoch_marks_each_forward_and_finds_no_host_sync(tmp_path):
    """End to end on a tiny image folder (4 batches an epoch): two profiled batches; FGSM-RS runs two forward
    passes per step (attack, weight step), plain training one; neither reads a value back to the host."""
    write_folder(tmp_path / "data", classes=4, per_class=32)
    out = tmp_path / "profile.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "profile_epoch.py"),
        "--dataset",
        "folder",
        "--data-dir",
        str(tmp_path / "data"),
        "--model",
        "wrn-10-1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--skip",
        "1",
        "--batches",
        "2",
        "--out",
        str(out),
        "fgsm_rs.py",
        "fgsm_rs.py --alpha 0 --delta-init zero",
    ]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    fgsm, plain = json.loads(out.read_text())
    assert (fgsm["forward_calls"], plain["forward_calls"]) == (4, 2)
    for r in (fgsm, plain):
        assert r["syncs"] == {} and r["window_s"] > 0
        assert 0 < r["outside"] < 0.5 and r["forward"] > 0.1 and r["backward"] > 0.1
        parts = r["inside"] + r["optimizer"] + r["other_ops"] + r["python"]
        assert abs(parts - 1) < 1e-9 and min(r["optimizer"], r["other_ops"], r["python"]) >= 0
    assert "fgsm_rs.py --alpha 0 --delta-init zero" in proc.stdout
    bad = run(cmd[:-2] + ["--skip", "99", "fgsm_rs.py"])
    assert bad.returncode != 0 and "--skip 99 leaves no batch to profile" in bad.stderr


def test_report_recipe_values_derived_from_the_data(tmp_path):
    """ATLAS's --val-size is None in its recipe: a tenth of the training split, at most 5,000, when the run starts.
    The report reads no data (the folder may be gone): the run's value is shown as a flag only when it is not the
    derived one (train_images + val_size = the split). A None that is not derived (a flag left off) still counts."""
    args = report.get_args(
        "atlas",
        [
            "--dataset",
            "cifar10",
            "--device",
            "cpu",
            "--out-dir",
            os.devnull,
            "--ramp-epochs",
            "1.5",
        ],
    )
    args.update(
        dataset="folder", data_dir=str(tmp_path / "gone"), val_size=508
    )  # 5,085 images: a tenth is 508
    assert report.recipe_diff("atlas", "folder", args["model"], args, train_images=4577) == {
        "ramp_epochs": 1.5
    }
    args.update(val_size=500)  # given on the command line
    assert report.recipe_diff("atlas", "folder", args["model"], args, train_images=4585) == {
        "val_size": 500,
        "ramp_epochs": 1.5,
    }
    args.update(val_size=5000)  # CIFAR-10: 45,000 + 5,000
    assert report.recipe_diff("atlas", "cifar10", args["model"], args, train_images=45000) == {
        "ramp_epochs": 1.5
    }
    assert report.recipe_diff("atlas", "cifar10", args["model"], args) == {
        "ramp_epochs": 1.5
    }  # count unknown
    sdi = report.get_args(
        "fgsm_sdi",
        [
            "--dataset",
            "cifar10",
            "--device",
            "cpu",
            "--out-dir",
            os.devnull,
            "--true-prob",
            "0.9",
        ],
    )
    assert report.recipe_diff("fgsm_sdi", "cifar10", sdi["model"], sdi, train_images=50000) == {
        "true_prob": 0.9
    }


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """bench/gpu_check.sh with a tiny network and folder on the CPU (without its --compile steps: compiling on a
    CPU takes minutes), run by this interpreter ($PYTHON): every step runs and is ok, the resumed run equals the
    uninterrupted one, and the one summary file names every step with its command, time and numbers."""
    write_folder(tmp_path / "data", classes=3, per_class=16)
    out = tmp_path / "check"
    cmd = [
        "bash",
        os.path.join(ROOT, "bench", "gpu_check.sh"),
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    cmd += (
        "--device cpu --model wrn-10-1 --batch-size 16 --no-compile --epoch-time-epochs 2".split()
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert proc.returncode == 0, proc.stdout + proc.stderr + json.dumps(summary, indent=1)[-3000:]
    scripts = ["fgsm_rs", "fgsm_sdi", "fgsm_mep", "atlas", "amata", "las_at", "latent_at", "rmcla"]
    scripts += ["free_at", "grad_align", "fgsm_ckpt", "n_fgsm"]
    others = ["resume fgsm_rs", "compile fgsm_rs", "compile fgsm_mep", "epoch_time fgsm_rs"]
    assert list(steps) == scripts + others
    for name, step in steps.items():
        if name.startswith("compile"):
            assert step["status"] == "skipped (--no-compile)"
            continue
        assert step["status"] == "ok", (name, step)
        assert step["seconds"] > 0 and step["commands"]
    for name in scripts:
        step = steps[name]
        assert step["epochs"] == 1 and step["images_per_s"] > 0 and step["device"] == "cpu"
        assert set(step["last"]) == {"clean", "pgd10_1", "cw10", "worst_case"}
        assert step["monitor_s"][0] >= 0
    assert "--ramp-epochs 0" in steps["atlas"]["commands"][0]
    assert "--val-size 4" in steps["atlas"]["commands"][0]
    assert steps["resume fgsm_rs"]["equal"] and steps["resume fgsm_rs"]["exit"] == [0, 130, 0]
    assert (
        "bench/launch.py --deterministic --interrupt-after 1"
        in steps["resume fgsm_rs"]["commands"][1]
    )
    rows = steps["epoch_time fgsm_rs"]["rows"]
    assert [r["spec"] for r in rows] == ["fgsm_rs.py"]
    assert rows[0]["images_per_s"] > 0 and rows[0]["flops_per_s"] > 0
    assert summary["torch"] and summary["seconds"] < summary["budget_s"]
    assert "| resume fgsm_rs | ok |" in proc.stdout
