"""One command for the day a GPU is lent: does every path that only a GPU exercises work, and how fast is it?

    bash bench/gpu_check.sh ../shared/data/cifar10-slice              # = python bench/gpu_check.py DIR
    python bench/gpu_check.py DIR --device cpu --model wrn-10-1 --batch-size 16 --no-compile   # a CPU dry run

On an image folder DIR (DIR/{train,test}/CLASS/*, e.g. the 5,085-image CIFAR-10 slice), in this order, each step
with its own time limit and the whole within --budget seconds (8 min, sized for one H100-class GPU; it has not run
on a GPU yet, so the limits are estimates):

  1. every script, one epoch on --device (cuda) with the recipe's network (PreActResNet18) and batch size, eager,
     training precision auto (bf16 on the GPU), evaluated briefly (PGD-10-1 and CW-10 on 500 test images): fgsm_rs,
     fgsm_sdi, fgsm_mep, atlas (--ramp-epochs 0: ε at its full value from the start; --val-size a tenth of the
     images, at most 500), amata (--milestones with no value: no lr drop inside one epoch), las_at (its recipe;
     --strategy-every lowered only when an epoch has fewer than its 20 batches), latent_at, rmcla (--milestones
     with no value);
  2. resume: fgsm_rs for 2 epochs, uninterrupted; the same command interrupted right after epoch 1's checkpoint
     (this file's launcher wraps harness.Run.end_epoch to raise KeyboardInterrupt there, as Ctrl-C would), then
     `--resume --out-dir RUN`; the two results.json must be equal in every figure but the timings. These three
     runs use deterministic kernels (cuDNN autotuning off, torch.use_deterministic_algorithms, warn only), so
     that a difference is the resume's, not the GPU's rounding;
  3. --compile: fgsm_rs and fgsm_mep one epoch each (they must finish; the compile time is inside their epoch);
  4. bench/epoch_time.py on fgsm_rs, eager and compiled, 3 epochs: training images/s, TFLOP/s and the fraction
     of the GPU's dense bf16 peak (the first epoch, the warm-up, is left out).

A failed or timed-out step is recorded and the next one runs; steps that no longer fit in the budget are recorded
as skipped. Everything goes to --out (default runs/gpu-check-DATE-TIME): one folder per run, logs/STEP.log with
each step's output, and ONE summary file, summary.json: the GPU's name, torch's version (with its CUDA build),
and per step its command(s), status (ok, failed, timeout, mismatch, skipped), exit code, seconds, training
images/s and the key numbers (accuracies, the monitor's seconds, the resume comparison, epoch_time's rows). The
summary is also printed as a table. --device, --model and --batch-size override the defaults so that the
same steps can be dry-run on a
CPU with a tiny network and folder (tests/test_bench.py does, with --no-compile: compiling on a CPU is slow).
The exit code is 0 when every step that ran is ok, else 1.
"""

import argparse
import json
import os
import runpy
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)

# (script, its own flags for one meaningful epoch, time limit in seconds)
SCRIPTS = [
    ("fgsm_rs", [], 90),
    ("fgsm_sdi", [], 90),
    ("fgsm_mep", [], 90),
    ("atlas", ["--ramp-epochs", "0"], 100),  # + --val-size, from the folder's size
    ("amata", ["--milestones"], 90),
    ("las_at", [], 120),
    ("latent_at", [], 90),
    ("rmcla", ["--milestones"], 90),
]
LAS_AT_BATCH = 128  # las_at.py's recipe batch size
RESUME_LIMIT, COMPILE_LIMIT, EPOCH_TIME_LIMIT = 180, 180, 240
EVAL = [
    "--eval-iters",
    "10",
    "--eval-restarts",
    "1",
    "--eval-cw-iters",
    "10",
    "--eval-samples",
    "500",
]
SUMMARY_RESERVE = 5  # seconds kept for writing the summary


# ---- The launcher: a script run with test-only changes made from outside the library


def launch(script, argv, interrupt_after=0, deterministic=False):
    """Run SCRIPT ARGV in this process as `python SCRIPT ARGV` would. interrupt_after N: KeyboardInterrupt right after
    epoch N's end_epoch (its checkpoint written), as a Ctrl-C there would. deterministic: after Run() (which turns
    cuDNN autotuning on) autotuning off and deterministic kernels on, so that two processes compute alike."""
    sys.path.insert(0, ROOT)
    import torch

    import harness

    if deterministic:
        real_init = harness.Run.__init__

        def init(run, *a, **kw):
            real_init(run, *a, **kw)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)

        harness.Run.__init__ = init
    if interrupt_after:
        real_end = harness.Run.end_epoch

        def end_epoch(run, epoch, *a, **kw):
            real_end(run, epoch, *a, **kw)
            if epoch + 1 == interrupt_after:
                raise KeyboardInterrupt

        harness.Run.end_epoch = end_epoch
    sys.argv = [script, *argv]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


# ---- Running steps


class Clock:
    """The whole check's deadline: a step gets min(its limit, what is left)."""

    def __init__(self, budget):
        self.start, self.deadline = time.time(), time.time() + budget

    def allow(self, limit):
        return min(limit, self.deadline - time.time() - SUMMARY_RESERVE)


def run_cmd(cmd, log, timeout, env=None):
    """Run cmd (its output appended to `log`), killed with its children after `timeout` seconds.
    Returns (exit code or None on timeout, seconds)."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        try:
            code = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        f.write(f"# exit {code} after {time.time() - start:.1f} s\n")
    return code, time.time() - start


def log_tail(log, lines=6):
    try:
        with open(log, errors="replace") as f:
            return [
                line.rstrip()
                for line in f.readlines()
                if line.strip() and not line.startswith("# exit")
            ][-lines:]
    except OSError:
        return []


def load_results(run_dir):
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_numbers(res):
    """The key numbers of a finished run: per-epoch training seconds, images/s, the monitor's seconds, the
    last model's accuracies, precision and device."""
    rows = res["epochs"]
    seconds = [r["seconds"] for r in rows]
    final = res.get("final") or {}
    return {
        "epochs": len(rows),
        "train_images": res.get("train_images"),
        "seconds_per_epoch": seconds,
        "images_per_s": res["train_images"] / seconds[-1] if seconds and seconds[-1] > 0 else None,
        "monitor_s": [r.get("monitor_s") for r in rows],
        "loss": [r.get("loss") for r in rows],
        "pgd_monitor": [r.get("pgd_monitor") for r in rows],
        "last": final.get("last"),
        "precision": res.get("precision"),
        "device": res.get("device"),
        "torch": res.get("torch"),
    }


def comparable(res):
    """What an uninterrupted and a resumed run must share: every per-epoch figure but the timings, the best
    epoch, the final numbers."""
    rows = [
        {k: v for k, v in r.items() if k not in ("seconds", "cpu_s", "monitor_s")}
        for r in res["epochs"]
    ]
    return {"epochs": rows, "best_epoch": res.get("best_epoch"), "final": res.get("final")}


def max_difference(a, b):
    """The largest absolute difference between the numbers of two equally shaped JSON values (inf if their shapes
    or non-numeric values differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max([max_difference(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max([max_difference(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


class Check:
    def __init__(self, args):
        self.args, self.clock, self.steps = args, Clock(args.budget), []
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    def base(self, script, out_dir, epochs=1):
        a = self.args
        cmd = [
            os.path.join(ROOT, f"{script}.py"),
            "--dataset",
            "folder",
            "--data-dir",
            a.data_dir,
            "--epochs",
            str(epochs),
            "--device",
            a.device,
            "--out-dir",
            out_dir,
            *EVAL,
        ]
        for flag in ("model", "batch_size"):
            if getattr(a, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        return cmd

    def record(self, step):
        self.steps.append(step)
        extra = f", {step['images_per_s']:.0f} images/s" if step.get("images_per_s") else ""
        print(f"# {step['name']}: {step['status']} ({step['seconds']:.0f} s{extra})", flush=True)

    def skip_if_late(self, name, limit):
        timeout = self.clock.allow(limit)
        if timeout < 10:
            self.record(
                {
                    "name": name,
                    "status": "skipped: out of time (--budget)",
                    "seconds": 0.0,
                    "commands": [],
                }
            )
            return None
        return timeout

    def script_step(self, name, script, own, limit):
        """One run of SCRIPT for one epoch; ok when it exits 0 with its final numbers."""
        timeout = self.skip_if_late(name, limit)
        if timeout is None:
            return
        out_dir = os.path.join(self.args.out, name)
        cmd = [sys.executable, *self.base(script, out_dir), *own]
        log = os.path.join(self.args.out, "logs", f"{name}.log")
        code, seconds = run_cmd(cmd, log, timeout)
        step = {
            "name": name,
            "commands": [shlex.join(["python", *cmd[1:]])],
            "exit": code,
            "seconds": seconds,
            "log": log,
        }
        res = load_results(out_dir)
        if code is None:
            step["status"] = f"timeout ({timeout:.0f} s)"
        elif code != 0:
            step["status"] = f"failed (exit {code})"
        elif not res or not isinstance(res.get("final"), dict):
            step["status"] = "failed (no final numbers in results.json)"
        else:
            step["status"] = "ok"
        if res and res.get("epochs"):
            step.update(run_numbers(res))
        if step["status"] != "ok":
            step["tail"] = log_tail(log)
        self.record(step)

    def resume_step(self, limit=RESUME_LIMIT):
        """fgsm_rs for 2 epochs, uninterrupted and interrupted + resumed; the results must be equal."""
        name = "resume fgsm_rs"
        timeout = self.skip_if_late(name, limit)
        if timeout is None:
            return
        end = time.time() + timeout
        full, part = (os.path.join(self.args.out, f"resume-{k}") for k in ("full", "part"))
        log = os.path.join(self.args.out, "logs", "resume.log")
        env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS
        launcher = [sys.executable, HERE, "--launch", "--deterministic"]
        cmds = [
            launcher + self.base("fgsm_rs", full, epochs=2),
            launcher[:2]
            + ["--launch", "--interrupt-after", "1", "--deterministic"]
            + self.base("fgsm_rs", part, epochs=2),
            launcher
            + [
                os.path.join(ROOT, "fgsm_rs.py"),
                "--resume",
                "--out-dir",
                part,
                "--device",
                self.args.device,
            ],
        ]
        step = {
            "name": name,
            "commands": [shlex.join(["python", *c[1:]]) for c in cmds],
            "exit": [],
            "seconds": 0.0,
            "log": log,
        }
        expected = (0, 130, 0)
        for cmd, want in zip(cmds, expected):
            code, seconds = run_cmd(cmd, log, end - time.time(), env)
            step["exit"].append(code)
            step["seconds"] += seconds
            if code != want:
                step["status"] = (
                    f"timeout ({timeout:.0f} s)"
                    if code is None
                    else f"failed (exit {code} from `{shlex.join(['python', *cmd[1:]])}`, expected {want})"
                )
                break
            if want == 130 and (
                os.path.exists(os.path.join(part, "results.json"))
                or not os.path.exists(os.path.join(part, "checkpoint.pt"))
            ):
                step["status"] = "failed (the interrupted run left no checkpoint, or finished)"
                break
        else:
            a, b = load_results(full), load_results(part)
            if not a or not b:
                step["status"] = "failed (a results.json is missing)"
            else:
                diff = max_difference(comparable(a), comparable(b))
                step.update(
                    equal=diff == 0,
                    max_abs_difference=diff,
                    epochs=len(b["epochs"]),
                    last=(b.get("final") or {}).get("last"),
                )
                step["status"] = (
                    "ok" if diff == 0 else "mismatch (resumed run differs: see max_abs_difference)"
                )
        if step["status"] != "ok":
            step["tail"] = log_tail(log)
        self.record(step)

    def epoch_time_step(self, limit=EPOCH_TIME_LIMIT):
        name = "epoch_time fgsm_rs"
        timeout = self.skip_if_late(name, limit)
        if timeout is None:
            return
        a, out = self.args, os.path.join(self.args.out, "epoch_time.json")
        cmd = [
            sys.executable,
            os.path.join(ROOT, "bench", "epoch_time.py"),
            "--dataset",
            "folder",
            "--data-dir",
            a.data_dir,
            "--epochs",
            str(a.epoch_time_epochs),
            "--device",
            a.device,
            "--out",
            out,
        ]
        for flag in ("model", "batch_size"):
            if getattr(a, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        cmd += ["fgsm_rs.py"] + ([] if a.no_compile else ["fgsm_rs.py --compile"])
        log = os.path.join(a.out, "logs", "epoch_time.log")
        code, seconds = run_cmd(cmd, log, timeout)
        step = {
            "name": name,
            "commands": [shlex.join(["python", *cmd[1:]])],
            "exit": code,
            "seconds": seconds,
            "log": log,
        }
        try:
            with open(out) as f:
                rows = json.load(f)
        except (OSError, ValueError):
            rows = []
        keep = (
            "spec",
            "status",
            "precision",
            "seconds_per_epoch",
            "monitor_s_per_epoch",
            "images_per_s",
            "flops_per_image",
            "flops_source",
            "flops_per_s",
            "peak_flops",
            "peak_fraction",
        )
        step["rows"] = [{k: r.get(k) for k in keep} for r in rows]
        if rows and rows[0].get("images_per_s"):
            step["images_per_s"] = rows[0]["images_per_s"]
        step["status"] = (
            "ok"
            if code == 0 and rows
            else f"timeout ({timeout:.0f} s)"
            if code is None
            else f"failed (exit {code})"
        )
        if step["status"] != "ok":
            step["tail"] = log_tail(log)
        self.record(step)

    def run(self):
        a = self.args
        for script, own, limit in SCRIPTS:
            if script == "atlas":
                own = own + ["--val-size", str(max(1, min(500, count_images(a.data_dir) // 10)))]
            if script == "las_at" and a.model:
                own = own + [
                    "--strategy-model",
                    a.model,
                ]  # one network for both, as reproduce.py does
            if script == "las_at":
                # Its strategy network learns every k = 20 batches (the recipe); a smaller folder or a larger
                # batch than las_at.py's 128 gets one update per epoch at least (the script refuses fewer).
                batches = count_images(a.data_dir) // (a.batch_size or LAS_AT_BATCH)
                own = own + (["--strategy-every", str(max(1, batches))] if batches < 20 else [])
            self.script_step(script, script, own, limit)
        self.resume_step()
        for script in ("fgsm_rs", "fgsm_mep"):
            if a.no_compile:
                self.record(
                    {
                        "name": f"compile {script}",
                        "status": "skipped (--no-compile)",
                        "seconds": 0.0,
                        "commands": [],
                    }
                )
            else:
                self.script_step(f"compile {script}", script, ["--compile"], COMPILE_LIMIT)
        self.epoch_time_step()


def count_images(data_dir):
    """Files below DATA_DIR/train/CLASS/ (hidden ones aside)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(os.path.join(data_dir, "train")):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        total += sum(not f.startswith(".") for f in filenames)
    return total


def device_facts(device, steps):
    """The GPU's name and torch's version as the runs recorded them (this process does not import torch: a
    dry run's time is mostly the runs' own start-up); nvidia-smi and the installed package when no run finished."""
    ran = [s for s in steps if s.get("device")]
    gpu = next((s["device"] for s in ran if s["device"] != "cpu"), None)
    if gpu is None and device.startswith("cuda"):
        try:
            gpu = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                .stdout.strip()
                .splitlines()[0]
                or None
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            gpu = None
    version = next((s["torch"] for s in ran if s.get("torch")), None)
    if version is None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            version = None
    return {"gpu": gpu, "device": device, "torch": version}


def markdown(summary):
    lines = [
        f"GPU: {summary['gpu'] or 'none'} (--device {summary['device']}), torch {summary['torch']}; "
        f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget",
        "",
        "images/s: training images per second of the step's last epoch (a one-epoch run includes its warm-up: "
        "cuDNN autotuning, compilation); epoch_time's rows leave the first epoch out. Key numbers: the last "
        "model's accuracies in %.",
        "",
        "| step | status | seconds | images/s | key numbers |",
        "|---|---|---|---|---|",
    ]
    for s in summary["steps"]:
        if s.get("last"):
            key = " / ".join(
                f"{k} {100 * v:.1f}" for k, v in s["last"].items() if isinstance(v, (int, float))
            )
        elif s.get("rows"):
            key = "; ".join(
                f"{r['spec']}: {r['images_per_s'] or 0:.0f} img/s, "
                + (
                    f"{100 * r['peak_fraction']:.1f}% of bf16 peak"
                    if r.get("peak_fraction")
                    else "peak –"
                )
                for r in s["rows"]
                if r.get("status") == "ok"
            )
        else:
            key = ""
        if "equal" in s:
            key = f"equal: {s['equal']} (max |Δ| {s['max_abs_difference']:.3g}); " + key
        ips = f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "–"
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {ips} | {key} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "data_dir", help="an image folder DIR/{train,test}/CLASS/* (e.g. the CIFAR-10 slice)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="where the runs, logs and summary.json go (default "
        "runs/gpu-check-DATE-TIME; must not hold a check already)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--model", default=None, help="every run's network (default: the recipe's, PreActResNet18)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="every run's batch (default: each recipe's)"
    )
    p.add_argument(
        "--budget", type=float, default=480, help="seconds for the whole check (default 8 min)"
    )
    p.add_argument(
        "--epoch-time-epochs", type=int, default=3, help="epochs of each epoch_time.py run"
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the --compile steps (for a CPU dry run: compiling on a CPU is slow)",
    )
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        p.error(
            f"{args.data_dir}: no train/ folder there (an image folder DIR/{{train,test}}/CLASS/*)"
        )
    args.data_dir = os.path.abspath(args.data_dir)
    args.out = os.path.abspath(
        args.out or os.path.join("runs", time.strftime("gpu-check-%Y%m%d-%H%M%S"))
    )
    if os.path.exists(os.path.join(args.out, "summary.json")):
        p.error(f"--out {args.out} holds a check already (summary.json): choose another folder")
    check = Check(args)
    summary = {
        "gpu": None,
        "device": args.device,
        "torch": None,
        "data_dir": args.data_dir,
        "budget_s": args.budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "steps": check.steps,
    }
    try:
        check.run()
    finally:
        summary.update(
            device_facts(args.device, check.steps), seconds=time.time() - check.clock.start
        )
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(markdown(summary))
    print(f"\nwrote {os.path.join(args.out, 'summary.json')}")
    return (
        0
        if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in check.steps)
        else 1
    )


if __name__ == "__main__":
    if sys.argv[1:2] == [
        "--launch"
    ]:  # --launch [--interrupt-after N] [--deterministic] SCRIPT ARGS...
        rest, interrupt, deterministic = sys.argv[2:], 0, False
        while rest and rest[0] in ("--interrupt-after", "--deterministic"):
            if rest[0] == "--interrupt-after":
                interrupt, rest = int(rest[1]), rest[2:]
            else:
                deterministic, rest = True, rest[1:]
        launch(rest[0], rest[1:], interrupt, deterministic)
    else:
        sys.exit(main())
