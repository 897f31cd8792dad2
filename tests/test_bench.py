"""bench/: report.py on hand-written runs; reproduce.py end to end on a tiny image folder; epoch_time.py's FLOP
counter and peak table; profile_epoch.py's timeline; real_data.py's plan and table; gpu_check.py's CPU dry run."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT
from PIL import Image

sys.path.insert(0, os.path.join(ROOT, "bench"))
import paper_figures  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402


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
    **fields,
):
    """A results.json as Run.finish writes it, for a run of METHOD.py FLAGS on CIFAR-10 (nothing is trained).
    final None: written before the evaluation. fields: more entries, or replacements."""
    os.makedirs(run_dir)
    # --autoattack is checked at parse time (the package may not be installed here): set after parsing
    args = report.get_args(
        method,
        [
            "--dataset",
            "cifar10",
            "--device",
            "cpu",
            "--out-dir",
            str(run_dir),
            *[f for f in flags if f != "--autoattack"],
        ],
    )
    args["autoattack"] = "--autoattack" in flags
    rows = [
        {
            "epoch": e,
            "seconds": train_time / epochs_run,
            "cpu_s": 1.0,
            "monitor_s": 0.25 * e,
            "lr": 0.1,
            "loss": 1.0,
            "acc": 0.5,
            "pgd_monitor": 0.1 + 0.3 * e / epochs_run,
        }
        for e in range(1, epochs_run + 1)
    ]
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
            "images": 1000,
            "pgd": f"PGD-{args['eval_iters']}-{args['eval_restarts']}, step {step}",
            "cw_iters": args["eval_cw_iters"],
            "autoattack": args["autoattack"],
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


def table_rows(markdown):
    """The report's markdown table as {run label: {column header: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]
    assert all(len(r) == len(header) for r in rows)
    return header, {r[0]: dict(zip(header, r)) for r in rows}


def test_report_table_attack_columns_paper_figures_and_skipped_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    last = {"clean": 0.8, "pgd50_10": 0.45, "cw20": 0.44, "worst_case": 0.43}
    best = {"clean": 0.78, "pgd50_10": 0.47, "cw20": 0.46, "worst_case": 0.45}
    write_run(
        runs / "rs",
        "fgsm_rs",
        [],
        {"last": last, "best": best},
        15,
        train_time=720.0,
        best_epoch=12,
    )
    # Another evaluation (PGD-20, 1 restart), another ε, and an early stop after 3 of 15 epochs.
    short = {"clean": 0.7, "pgd20_1": 0.3, "cw20": 0.25, "worst_case": 0.2}
    write_run(
        runs / "rs16",
        "fgsm_rs",
        ["--epsilon", "16", "--early-stop", "--eval-iters", "20", "--eval-restarts", "1"],
        {"last": short, "best": short},
        3,
        log="# python ...\n# early stop: PGD-5 accuracy fell from 40.0% to 5.0%; keeping the weights of epoch 2\n",
    )
    pgd = {"clean": 0.85, "pgd50_10": 0.5, "cw20": 0.49, "autoattack": None, "worst_case": 0.48}
    write_run(
        runs / "pgd",
        "amata",
        list(paper_figures.VARIANTS["pgd10"][1]) + ["--autoattack"],
        {"last": pgd, "best": pgd},
        100,
    )
    # Training done, evaluation not (yet): a row of its own, without accuracies.
    write_run(runs / "evaluating", "fgsm_rs", [], None, 15)
    os.makedirs(runs / "broken")
    (runs / "broken" / "results.json").write_text(
        '{"method": "fgsm_rs", "args": {'
    )  # cut off mid-write
    os.makedirs(runs / "unfinished")
    (runs / "unfinished" / "log.txt").write_text("# python fgsm_rs.py\n")

    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and "broken" in warnings[0] and "unfinished" in warnings[1]
    markdown = (out / "report.md").read_text()
    header, rows = table_rows(markdown)
    assert header[0] in captured.out and set(rows) == {"rs", "rs16", "pgd", "evaluating"}

    # One column per attack and its settings: PGD-50-10 and PGD-20-1 never share one.
    assert "last PGD-50-10" in header and "last PGD-20-1" in header and "best PGD-20-1" in header
    assert rows["rs"]["last PGD-50-10"] == "45.00" and rows["rs"]["last PGD-20-1"] == "–"
    assert rows["rs16"]["last PGD-20-1"] == "30.00" and rows["rs16"]["last PGD-50-10"] == "–"
    assert rows["rs"]["best PGD-50-10"] == "47.00" and rows["rs"]["best epoch"] == "12"
    assert rows["pgd"]["last AutoAttack"] == "n/a" and rows["rs"]["last AutoAttack"] == "–"

    # The flags that differ from the recipe: α follows ε, so only --epsilon is shown; evaluation flags are not.
    assert rows["rs"]["method and flags that differ from its recipe"] == "`fgsm_rs`"
    flags = rows["rs16"]["method and flags that differ from its recipe"]
    assert (
        "--epsilon 16" in flags
        and "--early-stop" in flags
        and "--alpha" not in flags
        and "--eval" not in flags
    )
    assert rows["rs16"]["epochs"].startswith("3 of 15: early stop: PGD-5 accuracy fell")
    assert rows["rs"]["epochs"] == "15" and rows["rs"]["train time"] == "12.0 min"
    # Seconds per epoch are training; the monitor has its own column (the mean of 0.25, 0.5, ... 3.75 s).
    assert rows["rs"]["s / epoch"] == "48.0" and rows["rs"]["monitor s / epoch"] == "2.0"
    assert (
        rows["rs"]["device"] == "NVIDIA H100 (bfloat16)"
        and rows["rs"]["eval images"] == "1000 (step 2/255)"
    )
    method = "method and flags that differ from its recipe"
    assert (
        "evaluating / unfinished" in rows["evaluating"][method]
        and "unfinished" not in rows["rs"][method]
    )
    assert rows["evaluating"]["last PGD-50-10"] == "–" and rows["evaluating"]["s / epoch"] == "6.7"
    assert rows["pgd"]["method and flags that differ from its recipe"].startswith(
        "PGD-10 AT: `amata"
    )

    # Paper figures only beside a recipe run, with the paper's network and attacks named.
    paper = "paper (network: reported %, time)"
    assert rows["rs"][paper].startswith("PreActResNet18: 83.81 clean / 46.06 PGD-50-10")
    assert rows["pgd"][paper].startswith("PreActResNet18: 85.27 clean / 47.31 PGD-20 / 51.73 CW")
    assert rows["rs16"][paper] == "–"

    with Image.open(out / "report.png") as img:
        pixels = np.asarray(img.convert("L"))
    assert (
        pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels.std() > 10
    )  # two panels, not blank


def test_report_without_finished_runs_writes_nothing(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no results.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_paper_figures_name_flags_that_the_scripts_accept():
    for fig in paper_figures.FIGURES:
        assert fig.results and all(0 < float(v) < 100 for _, v in fig.results)  # quoted as numbers
        if fig.flags is not None:
            report.get_args(fig.script, ["--dataset", fig.dataset, "--device", "cpu", *fig.flags])
    table = paper_figures.markdown_table()
    assert (
        table.count("\n") == len(paper_figures.FIGURES) + 1
        and "85.52 clean / 47.62 PGD-20" in table
    )


def test_quick_shrinks_every_recipe_by_one_factor(tmp_path):
    args = argparse.Namespace(model=None, quick=10.0, dataset="cifar10", data_dir=str(tmp_path))
    assert reproduce.run_flags(args, "amata", ()) == [
        "--epochs",
        "10",
        "--milestones",
        "8",
        "9",
    ]  # 100; 75, 90
    assert reproduce.run_flags(args, "rmcla", ()) == [
        "--epochs",
        "20",
        "--milestones",
        "10",
        "15",
    ]  # 200; 100, 150
    assert reproduce.run_flags(args, "atlas", ()) == [
        "--epochs",
        "10",
        "--ramp-epochs",
        "1.5",
    ]  # ≤ 100; ramp 15
    assert reproduce.run_flags(args, "fgsm_sdi", ()) == [
        "--epochs",
        "11",
    ]  # its milestones are fractions already
    assert reproduce.run_flags(args, "fgsm_rs", ()) == ["--epochs", "2"]  # 1.5 rounds up
    # Milestones stay below the shortened run's epochs (one at or past the end never fires; the scripts refuse it):
    # moved to the epoch before, merged, none left in a one-epoch run.
    args.quick = 100.0
    assert reproduce.run_flags(args, "amata", ()) == [
        "--epochs",
        "1",
        "--milestones",
    ]  # 0.75, 0.9 → 1, 1
    assert reproduce.run_flags(args, "rmcla", ()) == [
        "--epochs",
        "2",
        "--milestones",
        "1",
    ]  # 1, 1.5 → 1, 2
    for script in ("amata", "rmcla"):  # and the scripts accept them
        report.get_args(
            script,
            ["--dataset", "cifar10", "--device", "cpu", *reproduce.run_flags(args, script, ())],
        )
    assert reproduce.fit_milestones([3, 8, 9, 12], 9) == [3, 8]
    # The network of every run, LAS-AT's strategy network included; a full run keeps the recipe's length.
    args.quick, args.model = None, "wrn-16-2"
    assert reproduce.run_flags(args, "las_at", ()) == [
        "--model",
        "wrn-16-2",
        "--strategy-model",
        "wrn-16-2",
    ]


def test_quick_evaluates_quickly_unless_told_otherwise():
    """--quick runs get PGD-20-1 and CW-20 (not the scripts' PGD-50-10) for every evaluation flag not given; a full
    run passes none, so each script evaluates with its default."""

    def flags(*argv):
        args = argparse.Namespace(
            dataset="cifar10",
            data_dir="data",
            model=None,
            quick=None,
            out="out",
            device=None,
            eval_samples=None,
            eval_iters=None,
            eval_restarts=None,
            eval_cw_iters=None,
            autoattack=False,
            passthrough=[],
        )
        for k, v in zip(argv[::2], argv[1::2]):
            setattr(args, k, v)
        cmd = reproduce.command(args, "fgsm_rs", "fgsm_rs", ())
        return {
            w: cmd[i + 1] for i, w in enumerate(cmd) if w.startswith("--eval")
        }, reproduce.evaluation_record(args)

    given, record = flags("quick", 10.0)
    assert given == {"--eval-iters": "20", "--eval-restarts": "1", "--eval-cw-iters": "20"}
    assert record == {"iters": 20, "restarts": 1, "cw_iters": 20, "samples": None}
    given, record = flags("quick", 10.0, "eval_iters", 7, "eval_cw_iters", 0)
    assert given == {"--eval-iters": "7", "--eval-restarts": "1", "--eval-cw-iters": "0"}
    given, record = flags()
    assert given == {} and record == {"iters": 50, "restarts": 10, "cw_iters": 20, "samples": None}


def write_folder(root, classes=3, per_class=8, n_test=2, size=16):
    """root/{train,test}/cCLASS/i.png: a colour per class plus noise, so one epoch has something to learn."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, size=(classes, 3))
    for split, n in (("train", per_class), ("test", n_test)):
        for c in range(classes):
            os.makedirs(root / split / f"c{c}")
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(
                    np.uint8
                )
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


def reproduce_cmd(data, out, methods, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "bench", "reproduce.py"),
        "--dataset",
        "folder",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--methods",
        *methods,
        "--quick",
        "100",
        "--model",
        "wrn-10-1",
        "--eval-samples",
        "6",
        "--eval-iters",
        "2",
        "--eval-restarts",
        "1",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        *extra,
    ]


def run(cmd, **env):
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def test_reproduce_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    write_folder(tmp_path / "data")
    out = tmp_path / "out"
    cmd = reproduce_cmd(tmp_path / "data", out, ["plain", "fgsm_rs"])
    first = run(cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in ("plain", "fgsm_rs"):
        res = report.load_results(str(out / name))
        assert (
            len(res["epochs"]) == 1
            and res["args"]["batch_size"] == 32
            and res["eval"]["images"] == 6
        )
        assert "pgd2_1" in res["final"]["last"] and res["args"]["model"] == "wrn-10-1"
        # the given --eval-iters 2 --eval-restarts 1 win; CW is the quick run's CW-20
        assert "cw20" in res["final"]["last"]
        marker = json.loads((out / name / "reproduce.json").read_text())
        assert marker["quick"] == 100 and marker["eval"] == {
            "iters": 2,
            "restarts": 1,
            "cw_iters": 20,
            "samples": 6,
        }
    assert report.load_results(str(out / "plain"))["args"]["alpha"] == 0
    header, rows = table_rows((out / "report.md").read_text())
    assert (
        set(rows) == {"plain", "fgsm_rs"}
        and "last PGD-2-1" in header
        and (out / "report.png").stat().st_size
    )
    method = "method and flags that differ from its recipe"
    assert (
        rows["plain"][method].startswith("plain training: `fgsm_rs")
        and "--alpha 0" in rows["plain"][method]
    )
    assert all(
        "quick (recipe ÷ 100; evaluated with PGD-2-1, CW-20)" in r[method]
        and "--epochs 1" in r[method]
        for r in rows.values()
    )
    assert all(r["paper (network: reported %, time)"] == "– (quick run)" for r in rows.values())

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
    assert (
        status == "failed"
        and "exit 2" in text
        and "ARGS ['2']" in (tmp_path / "a" / "stdout.txt").read_text()
    )
    assert (
        reproduce.run_one(args, "b", stub + ["130"])[0] == "interrupted"
    )  # a script's exit code on Ctrl-C
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"")  # what the interrupted run left
    status, text = reproduce.run_one(args, "b", stub + ["0"])
    assert (
        status == "finished"
        and "resumed" in text
        and "ARGS ['0', '--resume']" in capsys.readouterr().out
    )
    (tmp_path / "b" / "results.json").write_text('{"final": {"last": {}}')  # cut off: not finished
    assert reproduce.run_one(args, "b", stub + ["0"])[0] == "finished"
    # written when training ended, before the evaluation: not finished, resumed (which evaluates again)
    (tmp_path / "b" / "results.json").write_text('{"final": null}')
    status, text = reproduce.run_one(args, "b", stub + ["0"])
    assert status == "finished" and "resumed" in text
    (tmp_path / "b" / "results.json").write_text('{"final": {}}')
    assert (
        reproduce.run_one(args, "b", stub + ["2"])[0] == "done before"
    )  # not run again: it would fail


def test_reproduce_goes_on_after_a_failure_and_stops_at_an_interrupt(monkeypatch, tmp_path):
    visited, reported = [], []

    def fake_run(args, name, cmd):
        visited.append(name)
        return {"fgsm_rs": ("failed", "FAILED"), "amata": ("interrupted", "")}.get(
            name, ("finished", "")
        )

    monkeypatch.setattr(reproduce, "run_one", fake_run)
    monkeypatch.setattr(report, "main", lambda argv: reported.append(argv))
    common = ["--dataset", "cifar10", "--out", str(tmp_path)]
    assert reproduce.main(common + ["--methods", "plain", "fgsm_rs", "latent_at"]) == 1
    assert visited == ["plain", "fgsm_rs", "latent_at"] and reported == [
        [str(tmp_path), "--out", str(tmp_path)]
    ]
    visited.clear()
    assert reproduce.main(common + ["--methods", "amata", "las_at"]) == 130
    assert visited == ["amata"] and len(reported) == 1  # no report of a batch that was stopped


def test_step_flops_count_the_attack_and_the_weight_step(tmp_path):
    """epoch_time.py's outside counter (common.DeviceLoader.epoch wrapped) counts the first training step inside the
    loop: plain training is one forward and one backward (about 3 forwards; the first conv needs no input
    gradient), FGSM-RS adds the attack's forward and input-only backward (about 2 forwards more). The library is
    left as it was found."""
    import epoch_time
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
        argv = [
            "--dataset",
            "folder",
            "--data-dir",
            str(tmp_path / "data"),
            "--model",
            "wrn-10-1",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--eval-samples",
            "2",
            "--eval-iters",
            "1",
            "--eval-restarts",
            "1",
            "--eval-cw-iters",
            "0",
            "--monitor-size",
            "8",
            "--progress-every",
            "0",
            "--workers",
            "0",
            "--out-dir",
            str(out),
            *extra,
        ]
        with epoch_time.count_first_step():
            if (
                name == "compiled"
            ):  # not counted under --compile (torch.compile made a no-op: nothing compiles)
                real_compile, torch.compile = torch.compile, lambda module, **kw: module
                try:
                    fgsm_rs.main(argv + ["--compile"])
                finally:
                    torch.compile = real_compile
            else:
                fgsm_rs.main(argv)
        assert (flags.parse_args, common.DeviceLoader.epoch) == real
        if name == "compiled":
            assert not (out / epoch_time.FLOPS_FILE).exists() and (out / "results.json").exists()
            continue
        flops = json.loads((out / epoch_time.FLOPS_FILE).read_text())
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


def test_real_data_plan_and_table(tmp_path):
    """Every run of bench/real_data.py's plan parses (milestones kept below the epochs: with 2 epochs Amata's go to
    1), and the table shows training and monitor seconds apart, from cpu_s (and the old cpu_seconds)."""
    import real_data

    for epochs in (1, 2, 8):
        for name, script, flags, e in real_data.runs(epochs, epochs):
            report.get_args(
                script[:-3], ["--dataset", "folder", "--device", "cpu", "--epochs", str(e), *flags]
            )
    plan = real_data.runs(2, 2)
    assert dict((n, f) for n, _, f, _ in plan)["amata"] == ["--milestones", "1"]
    assert dict((n, f) for n, _, f, _ in real_data.runs(1, 1))["rmcla"] == ["--milestones"]
    args = argparse.Namespace(out=str(tmp_path), model="wrn-16-2", eval_iters=20, eval_restarts=1)
    final = {"clean": 0.4, "worst_case": 0.2, "pgd20_1": 0.25, "cw20": 0.21}
    for name, cpu_key, fin in (
        ("plain", "cpu_s", final),
        ("fgsm_rs", "cpu_s", final),
        ("fgsm_sdi", "cpu_seconds", final),
        ("fgsm_mep", "cpu_s", None),
    ):
        os.makedirs(tmp_path / name)
        rows = [
            {
                "epoch": e,
                "seconds": 20.0,
                cpu_key: 10.0 * (2 if name == "fgsm_sdi" else 1),
                "monitor_s": 3.0,
            }
            for e in (1, 2)
        ]
        (tmp_path / name / "results.json").write_text(
            json.dumps(
                {"epochs": rows, "best_epoch": 2, "final": fin and {"last": fin, "best": fin}}
            )
        )
    lines = [
        [c.strip() for c in line.strip()[1:-1].split("|")]
        for line in real_data.table(args, plan).splitlines()
    ]
    header, rows = lines[0], {r[0]: dict(zip(lines[0], r)) for r in lines[2:]}
    assert all(len(r) == len(header) for r in lines)
    assert "monitor s / epoch" in header
    rs = rows["`fgsm_rs.py`"]
    assert rs["s / epoch (wall, CPU)"] == "20, 10" and rs["monitor s / epoch"] == "3"
    assert rs["× FGSM-RS (CPU)"] == "1.00"
    assert rows["`fgsm_sdi.py`"]["× FGSM-RS (CPU)"] == "2.00"
    assert rows["`fgsm_mep.py`"][header[5]] == "evaluating / unfinished"
    assert rows["`las_at.py --strategy-model wrn-16-2`"]["s / epoch (wall, CPU)"] == "not run"
    assert real_data.finished(str(tmp_path / "fgsm_rs")) and not real_data.finished(
        str(tmp_path / "fgsm_mep")
    )


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """bench/gpu_check.sh with a tiny network and folder on the CPU (without its --compile steps: compiling on a
    CPU takes minutes): every step runs and is ok, the resumed run equals the uninterrupted one, and the one
    summary file names every step with its command, time and numbers."""
    write_folder(tmp_path / "data", classes=3, per_class=16)
    out = tmp_path / "check"
    proc = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "bench", "gpu_check.sh"),
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--model",
            "wrn-10-1",
            "--batch-size",
            "16",
            "--no-compile",
            "--epoch-time-epochs",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert proc.returncode == 0, proc.stdout + proc.stderr + json.dumps(summary, indent=1)[-3000:]
    scripts = ["fgsm_rs", "fgsm_sdi", "fgsm_mep", "atlas", "amata", "las_at", "latent_at", "rmcla"]
    assert list(steps) == scripts + [
        "resume fgsm_rs",
        "compile fgsm_rs",
        "compile fgsm_mep",
        "epoch_time fgsm_rs",
    ]
    for name, step in steps.items():
        if name.startswith("compile"):
            assert step["status"] == "skipped (--no-compile)"
            continue
        assert step["status"] == "ok", (name, step)
        assert step["seconds"] > 0 and step["commands"]
    for name in scripts:
        assert (
            steps[name]["epochs"] == 1
            and steps[name]["images_per_s"] > 0
            and steps[name]["device"] == "cpu"
        )
        assert set(steps[name]["last"]) == {"clean", "pgd10_1", "cw10", "worst_case"}
        assert steps[name]["monitor_s"][0] >= 0
    assert (
        "--ramp-epochs 0" in steps["atlas"]["commands"][0]
        and "--val-size 4" in steps["atlas"]["commands"][0]
    )
    assert steps["resume fgsm_rs"]["equal"] and steps["resume fgsm_rs"]["exit"] == [0, 130, 0]
    rows = steps["epoch_time fgsm_rs"]["rows"]
    assert (
        [r["spec"] for r in rows] == ["fgsm_rs.py"]
        and rows[0]["images_per_s"] > 0
        and rows[0]["flops_per_s"] > 0
    )
    assert summary["torch"] and summary["seconds"] < summary["budget_s"]
    assert "| resume fgsm_rs | ok |" in proc.stdout
