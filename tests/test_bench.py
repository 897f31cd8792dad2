"""bench/report.py on hand-written runs; bench/reproduce.py end to end on a tiny image folder."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import paper_figures  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402


def write_run(run_dir, method, flags, final, epochs_run, train_time=100.0, best_epoch=None, log=None):
    """A results.json as Run.finish writes it, for a run of METHOD.py FLAGS on CIFAR-10 (nothing is trained)."""
    os.makedirs(run_dir)
    args = report.get_args(method, ["--dataset", "cifar10", "--device", "cpu", "--out-dir", str(run_dir), *flags])
    rows = [{"epoch": e, "seconds": train_time / epochs_run, "cpu_seconds": 1.0, "lr": 0.1, "loss": 1.0, "acc": 0.5,
             "pgd_monitor": 0.1 + 0.3 * e / epochs_run} for e in range(1, epochs_run + 1)]
    res = {"method": method, "args": args, "epochs": rows, "train_time": train_time,
           "best_epoch": best_epoch or epochs_run, "eval_samples": 1000, "final": final, "device": "NVIDIA H100",
           "torch": "2.14.1"}
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
    write_run(runs / "rs", "fgsm_rs", [], {"last": last, "best": best}, 15, train_time=720.0, best_epoch=12)
    # Another evaluation (PGD-20, 1 restart), another ε, and an early stop after 3 of 15 epochs.
    short = {"clean": 0.7, "pgd20_1": 0.3, "cw20": 0.25, "worst_case": 0.2}
    write_run(runs / "rs16", "fgsm_rs", ["--epsilon", "16", "--early-stop", "--eval-iters", "20", "--eval-restarts",
                                         "1"], {"last": short, "best": short}, 3,
              log="# python ...\n# early stop: PGD-5 accuracy fell from 40.0% to 5.0%; keeping the weights of epoch 2\n")
    pgd = {"clean": 0.85, "pgd50_10": 0.5, "cw20": 0.49, "autoattack": None, "worst_case": 0.48}
    write_run(runs / "pgd", "amata", list(paper_figures.VARIANTS["pgd10"][1]) + ["--autoattack"],
              {"last": pgd, "best": pgd}, 100)
    os.makedirs(runs / "broken")
    (runs / "broken" / "results.json").write_text('{"method": "fgsm_rs", "args": {')  # cut off mid-write
    os.makedirs(runs / "unfinished")
    (runs / "unfinished" / "log.txt").write_text("# python fgsm_rs.py\n")

    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and "broken" in warnings[0] and "unfinished" in warnings[1]
    markdown = (out / "report.md").read_text()
    header, rows = table_rows(markdown)
    assert header[0] in captured.out and set(rows) == {"rs", "rs16", "pgd"}

    # One column per attack and its settings: PGD-50-10 and PGD-20-1 never share one.
    assert "last PGD-50-10" in header and "last PGD-20-1" in header and "best PGD-20-1" in header
    assert rows["rs"]["last PGD-50-10"] == "45.00" and rows["rs"]["last PGD-20-1"] == "–"
    assert rows["rs16"]["last PGD-20-1"] == "30.00" and rows["rs16"]["last PGD-50-10"] == "–"
    assert rows["rs"]["best PGD-50-10"] == "47.00" and rows["rs"]["best epoch"] == "12"
    assert rows["pgd"]["last AutoAttack"] == "n/a" and rows["rs"]["last AutoAttack"] == "–"

    # The flags that differ from the recipe: α follows ε, so only --epsilon is shown; evaluation flags are not.
    assert rows["rs"]["method and flags that differ from its recipe"] == "`fgsm_rs`"
    flags = rows["rs16"]["method and flags that differ from its recipe"]
    assert "--epsilon 16" in flags and "--early-stop" in flags and "--alpha" not in flags and "--eval" not in flags
    assert rows["rs16"]["epochs"].startswith("3 of 15: early stop: PGD-5 accuracy fell")
    assert rows["rs"]["epochs"] == "15" and rows["rs"]["train time"] == "12.0 min"
    assert rows["pgd"]["method and flags that differ from its recipe"].startswith("PGD-10 AT: `amata")

    # Paper figures only beside a recipe run, with the paper's network and attacks named.
    paper = "paper (network: reported %, time)"
    assert rows["rs"][paper].startswith("PreActResNet18: 83.81 clean / 46.06 PGD-50-10")
    assert rows["pgd"][paper].startswith("PreActResNet18: 85.27 clean / 47.31 PGD-20 / 51.73 CW")
    assert rows["rs16"][paper] == "–"

    with Image.open(out / "report.png") as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels.std() > 10  # two panels, not blank


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
    assert table.count("\n") == len(paper_figures.FIGURES) + 1 and "85.52 clean / 47.62 PGD-20" in table


def test_quick_shrinks_every_recipe_by_one_factor(tmp_path):
    args = argparse.Namespace(model=None, quick=10.0, dataset="cifar10", data_dir=str(tmp_path))
    assert reproduce.run_flags(args, "amata", ()) == ["--epochs", "10", "--milestones", "8", "9"]  # 100; 75, 90
    assert reproduce.run_flags(args, "rmcla", ()) == ["--epochs", "20", "--milestones", "10", "15"]  # 200; 100, 150
    assert reproduce.run_flags(args, "atlas", ()) == ["--epochs", "10", "--ramp-epochs", "1.5"]  # ≤ 100; ramp 15
    assert reproduce.run_flags(args, "fgsm_sdi", ()) == ["--epochs", "11"]  # its milestones are fractions already
    assert reproduce.run_flags(args, "fgsm_rs", ()) == ["--epochs", "2"]  # 1.5 rounds up
    # The network of every run, LAS-AT's strategy network included; a full run keeps the recipe's length.
    args.quick, args.model = None, "wrn-16-2"
    assert reproduce.run_flags(args, "las_at", ()) == ["--model", "wrn-16-2", "--strategy-model", "wrn-16-2"]


def write_folder(root, classes=3, per_class=8, n_test=2, size=16):
    """root/{train,test}/cCLASS/i.png: a colour per class plus noise, so one epoch has something to learn."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, size=(classes, 3))
    for split, n in (("train", per_class), ("test", n_test)):
        for c in range(classes):
            os.makedirs(root / split / f"c{c}")
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


def reproduce_cmd(data, out, methods, *extra):
    return [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--dataset", "folder", "--data-dir",
            str(data), "--out", str(out), "--methods", *methods, "--quick", "100", "--model", "wrn-10-1",
            "--eval-samples", "6", "--eval-iters", "2", "--eval-restarts", "1", "--device", "cpu",
            "--batch-size", "32", *extra]


def run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_reproduce_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    write_folder(tmp_path / "data")
    out = tmp_path / "out"
    cmd = reproduce_cmd(tmp_path / "data", out, ["plain", "fgsm_rs"])
    first = run(cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in ("plain", "fgsm_rs"):
        res = report.load_results(str(out / name))
        assert len(res["epochs"]) == 1 and res["args"]["batch_size"] == 32 and res["eval_samples"] == 6
        assert "pgd2_1" in res["final"]["last"] and res["args"]["model"] == "wrn-10-1"
    assert report.load_results(str(out / "plain"))["args"]["alpha"] == 0
    header, rows = table_rows((out / "report.md").read_text())
    assert set(rows) == {"plain", "fgsm_rs"} and "last PGD-2-1" in header and (out / "report.png").stat().st_size
    method = "method and flags that differ from its recipe"
    assert rows["plain"][method].startswith("plain training: `fgsm_rs") and "--alpha 0" in rows["plain"][method]
    assert all("quick (recipe ÷ 100)" in r[method] and "--epochs 1" in r[method] for r in rows.values())
    assert all(r["paper (network: reported %, time)"] == "– (quick run)" for r in rows.values())

    before = {n: (out / n / "results.json").stat().st_mtime_ns for n in ("plain", "fgsm_rs")}
    second = run(cmd)
    assert second.returncode == 0, second.stdout + second.stderr
    for name in ("plain", "fgsm_rs"):
        assert f"# {name}: results.json there, skipped" in second.stdout
        assert f"# {name}: python" not in second.stdout  # the line that announces a launch
    assert {n: (out / n / "results.json").stat().st_mtime_ns for n in ("plain", "fgsm_rs")} == before


def test_run_one_resumes_skips_and_reports_failures(tmp_path, capsys):
    """reproduce.run_one with a stand-in for a script that exits with the code given as its first argument."""
    args = argparse.Namespace(out=str(tmp_path), quick=None)
    stub = [sys.executable, "-c", "import sys; print('ARGS', sys.argv[1:]); sys.exit(int(sys.argv[1]))"]
    status, text = reproduce.run_one(args, "a", stub + ["2"])
    assert status == "failed" and "exit 2" in text and "ARGS ['2']" in (tmp_path / "a" / "stdout.txt").read_text()
    assert reproduce.run_one(args, "b", stub + ["130"])[0] == "interrupted"  # a script's exit code on Ctrl-C
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"")  # what the interrupted run left
    status, text = reproduce.run_one(args, "b", stub + ["0"])
    assert status == "finished" and "resumed" in text and "ARGS ['0', '--resume']" in capsys.readouterr().out
    (tmp_path / "b" / "results.json").write_text('{"final": {"last": {}}')  # cut off: not finished
    assert reproduce.run_one(args, "b", stub + ["0"])[0] == "finished"
    (tmp_path / "b" / "results.json").write_text('{"final": {}}')
    assert reproduce.run_one(args, "b", stub + ["2"])[0] == "done before"  # not run again: it would fail


def test_reproduce_goes_on_after_a_failure_and_stops_at_an_interrupt(monkeypatch, tmp_path):
    visited, reported = [], []

    def fake_run(args, name, cmd):
        visited.append(name)
        return {"fgsm_rs": ("failed", "FAILED"), "amata": ("interrupted", "")}.get(name, ("finished", ""))
    monkeypatch.setattr(reproduce, "run_one", fake_run)
    monkeypatch.setattr(report, "main", lambda argv: reported.append(argv))
    common = ["--dataset", "cifar10", "--out", str(tmp_path)]
    assert reproduce.main(common + ["--methods", "plain", "fgsm_rs", "latent_at"]) == 1
    assert visited == ["plain", "fgsm_rs", "latent_at"] and reported == [[str(tmp_path), "--out", str(tmp_path)]]
    visited.clear()
    assert reproduce.main(common + ["--methods", "amata", "las_at"]) == 130
    assert visited == ["amata"] and len(reported) == 1  # no report of a batch that was stopped


def test_step_flops_count_the_attack_and_the_weight_step(cifar_dir, tmp_path):
    """FASTAT_COUNT_FLOPS=1 counts the first training step inside the loop: plain training is one forward and
    one backward (about 3 forwards; the first conv needs no input gradient), FGSM-RS adds the attack's forward
    and input-only backward (about 2 forwards more)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import common
    from conftest import load_results, run_script, small_args
    model = common.make_model("wrn-10-1", "cifar10")
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(32, 3, 32, 32))
    forward = counter.get_total_flops()
    steps = {}
    for name, extra in (("plain", {"alpha": 0, "delta_init": "zero"}), ("fgsm", {})):
        out = str(tmp_path / name)
        run_script("fgsm_rs.py", small_args(cifar_dir, out, epochs=1, **extra), env={"FASTAT_COUNT_FLOPS": "1"})
        res = load_results(out)
        assert res["step_flops"]["batch_size"] == 32 and res["train_images"] == 256
        steps[name] = res["step_flops"]["flops"] / forward
    assert 2.5 < steps["plain"] <= 3.0
    assert 1.8 < steps["fgsm"] - steps["plain"] < 2.01


def test_epoch_time_peak_table():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import epoch_time
    assert epoch_time.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert epoch_time.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert epoch_time.peak_bf16("Some Unknown GPU") is None


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _Event:
    def __init__(self, name, start, end, parent=None):
        self.name, self.time_range, self.cpu_parent = name, _Range(start, end), parent


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
    events = [fwd, _Event("aten::conv2d", 2, 18, fwd), _Event("aten::relu", 5, 10), bwd,
              _Event("aten::convolution_backward", 21, 49, bwd), sign, _Event("aten::empty", 51, 52, sign), opt,
              _Event("aten::_foreach_add_", 61, 69, opt), item, _Event("aten::_local_scalar_dense", 80, 81, item),
              _Event(pe.FORWARD, 95, 120)]
    s = pe.summarize(events, (0, 100))
    assert s["window_s"] == 100e-6
    assert abs(s["forward"] - 0.25) < 1e-12 and abs(s["backward"] - 0.30) < 1e-12
    assert abs(s["inside"] - 0.55) < 1e-12 and abs(s["outside"] - 0.45) < 1e-12
    assert abs(s["optimizer"] - 0.10) < 1e-12 and abs(s["other_ops"] - 0.12) < 1e-12
    assert abs(s["python"] - 0.23) < 1e-12
    assert s["top_outside"][0] == ("aten::sign", 0.10) and s["top_outside"][1] == ("aten::item", 0.02)
    assert s["syncs"] == {"aten::_local_scalar_dense": 1}
    # the same scalar read inside one_hot's CPU-only range check is not a sync on CUDA: not counted
    one_hot = _Event("aten::one_hot", 80, 82)
    events[-3:-1] = [one_hot, _Event("aten::_local_scalar_dense", 80, 81, _Event("aten::item", 80, 81, one_hot))]
    assert pe.summarize(events, (0, 100))["syncs"] == {}
    # `if tensor:` is one sync, though is_nonzero reads its scalar through _local_scalar_dense
    is_nonzero = _Event("aten::is_nonzero", 80, 82)
    events[-3:-1] = [is_nonzero, _Event("aten::_local_scalar_dense", 80, 81, _Event("aten::item", 80, 81, is_nonzero))]
    assert pe.summarize(events, (0, 100))["syncs"] == {"aten::is_nonzero": 1}


def test_profile_epoch_marks_each_forward_and_finds_no_host_sync(tmp_path):
    """End to end on a tiny image folder (4 batches an epoch): two profiled batches; FGSM-RS runs two forward
    passes per step (attack, weight step), plain training one; neither reads a value back to the host."""
    write_folder(tmp_path / "data", classes=4, per_class=32)
    out = tmp_path / "profile.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "profile_epoch.py"), "--dataset", "folder", "--data-dir",
           str(tmp_path / "data"), "--model", "wrn-10-1", "--batch-size", "32", "--device", "cpu", "--skip", "1",
           "--batches", "2", "--out", str(out), "fgsm_rs.py", "fgsm_rs.py --alpha 0 --delta-init zero"]
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


def test_report_knows_atlas_folder_recipe_when_the_folder_is_gone(tmp_path):
    """ATLAS's default --val-size on a folder is a tenth of its images, read at parse time: the report still finds
    the recipe of a folder run whose folder has moved (as if it held 50,000 images), and uses the real folder's
    size when it is there."""
    args = report.get_args("atlas", ["--dataset", "cifar10", "--device", "cpu", "--out-dir", os.devnull,
                                     "--val-size", "500", "--ramp-epochs", "1.5"])
    args.update(dataset="folder", data_dir=str(tmp_path / "gone"))
    assert report.recipe_diff("atlas", "folder", args["model"], args) == {"val_size": 500, "ramp_epochs": 1.5}
    write_folder(tmp_path / "data", classes=3, per_class=20)  # 60 images: the default --val-size is 6
    args.update(data_dir=str(tmp_path / "data"), val_size=6)
    assert report.recipe_diff("atlas", "folder", args["model"], args) == {"ramp_epochs": 1.5}
