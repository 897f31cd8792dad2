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
     (bench/launch.py --interrupt-after 1 raises KeyboardInterrupt there, as Ctrl-C would), then
     `--resume --out-dir RUN`; the two results.json must be equal in every figure but the timings. These three
     runs use deterministic kernels (launch.py --deterministic: cuDNN autotuning off,
     torch.use_deterministic_algorithms, warn only), so that a difference is the resume's, not the GPU's rounding;
  3. --compile: fgsm_rs and fgsm_mep one epoch each (they must finish; the compile time is inside their epoch);
  4. bench/epoch_time.py on fgsm_rs, eager and compiled, 3 epochs: training images/s, TFLOP/s and the fraction
     of the GPU's dense bf16 peak (the first epoch, the warm-up, is left out).

A failed or timed-out step is recorded and the next one runs; steps that no longer fit in the budget are recorded
as skipped. Everything goes to --out (default runs/gpu-check-DATE-TIME): one folder per run, logs/STEP.log with
each step's output, and ONE summary file, summary.json: the GPU's name, torch's version (with its CUDA build),
and per step its command(s), status (ok, failed, timeout, mismatch, skipped), exit code, seconds, training
images/s and the key numbers (accuracies, the monitor's seconds, the resume comparison, epoch_time's rows). The
summary is also printed as a table. --device, --model and --batch-size override the defaults so that the same
steps can be dry-run on a CPU with a tiny network and folder (tests/test_bench.py does, with --no-compile:
compiling on a CPU is slow). bench/gpu_check.sh runs this file with $PYTHON (default: python).
The exit code is 0 when every step that ran is ok, else 1.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import launch  # bench/, beside this script
import report

ROOT = launch.ROOT
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
    ("free_at", [], 90),
    ("grad_align", [], 120),
    ("fgsm_ckpt", ["--milestones"], 90),
    ("n_fgsm", [], 90),
]
LAS_AT_BATCH = 128  # las_at.py's recipe batch size
RESUME_LIMIT = 180
COMPILE_LIMIT = 180
EPOCH_TIME_LIMIT = 240
EVAL = "--eval-iters 10 --eval-restarts 1 --eval-cw-iters 10 --eval-samples 500".split()
SUMMARY_RESERVE = 5  # seconds kept for writing the summary


def run_cmd(cmd, log, timeout, env=None):
    """Run cmd (its output appended to `log`), killed with its children after `timeout` seconds.
    Returns (exit code or None on timeout, seconds)."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        out = {"stdout": f, "stderr": subprocess.STDOUT}
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, env=env, **out)
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
            kept = [line.rstrip() for line in f if line.strip() and not line.startswith("# exit")]
        return kept[-lines:]
    except OSError:
        return []


def shown(cmd):
    return shlex.join(["python", *cmd[1:]])


def run_numbers(res):
    """The key numbers of a finished run: per-epoch training seconds, images/s, the monitor's seconds, the
    last model's accuracies, precision and device."""
    rows = res["epochs"]
    seconds = [r["seconds"] for r in rows]
    return {
        "epochs": len(rows),
        "train_images": res.get("train_images"),
        "seconds_per_epoch": seconds,
        "images_per_s": res["train_images"] / seconds[-1] if seconds and seconds[-1] > 0 else None,
        **{k: [r.get(k) for r in rows] for k in ("monitor_s", "loss", "pgd_monitor")},
        "last": (res.get("final") or {}).get("last"),
        **{k: res.get(k) for k in ("precision", "device", "torch")},
    }


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


def status_of(code, timeout, ok):
    """A step's status from its exit code (None: timed out) and whether its outputs are right."""
    if code is None:
        return f"timeout ({timeout:.0f} s)"
    return f"failed (exit {code})" if code != 0 else ok


class Check:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.deadline = self.start + args.budget
        self.steps = []
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    def shared(self, out_dir, epochs=1):
        """The flags of every run: the folder, --epochs, --device, --out-dir, the evaluation, --model and
        --batch-size when given."""
        a = self.args
        words = ["--dataset", "folder", "--data-dir", a.data_dir, "--epochs", str(epochs)]
        words += ["--device", a.device, "--out-dir", out_dir, *EVAL]
        for flag in ("model", "batch_size"):
            if getattr(a, flag) is not None:
                words += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        return words

    def record(self, step):
        self.steps.append(step)
        extra = f", {step['images_per_s']:.0f} images/s" if step.get("images_per_s") else ""
        print(f"# {step['name']}: {step['status']} ({step['seconds']:.0f} s{extra})", flush=True)

    def begin(self, name, limit):
        """A new step and its time limit: min(limit, what is left of --budget); None (recorded as skipped)
        when less than 10 s is left."""
        timeout = min(limit, self.deadline - time.time() - SUMMARY_RESERVE)
        if timeout < 10:
            skipped = "skipped: out of time (--budget)"
            self.record({"name": name, "status": skipped, "seconds": 0.0, "commands": []})
            return None, None
        log = os.path.join(self.args.out, "logs", f"{name.replace(' ', '-')}.log")
        return {"name": name, "commands": [], "exit": None, "seconds": 0.0, "log": log}, timeout

    def end(self, step):
        if step["status"] != "ok":
            step["tail"] = log_tail(step["log"])
        self.record(step)

    def script_step(self, name, script, own, limit):
        """One run of SCRIPT for one epoch; ok when it exits 0 with its final numbers."""
        step, timeout = self.begin(name, limit)
        if step is None:
            return
        out_dir = os.path.join(self.args.out, name.replace(" ", "-"))
        cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), *self.shared(out_dir), *own]
        step["exit"], step["seconds"] = run_cmd(cmd, step["log"], timeout)
        step["commands"] = [shown(cmd)]
        res, _ = report.read_results(out_dir)
        evaluated = res is not None and res["final"] is not None
        step["status"] = status_of(
            step["exit"], timeout, "ok" if evaluated else "failed (no final numbers)"
        )
        if res and res["epochs"]:
            step.update(run_numbers(res))
        self.end(step)

    def resume_step(self):
        """fgsm_rs for 2 epochs, uninterrupted and interrupted + resumed; the results must be equal."""
        step, timeout = self.begin("resume fgsm_rs", RESUME_LIMIT)
        if step is None:
            return
        end = time.time() + timeout
        full, part = (os.path.join(self.args.out, f"resume-{k}") for k in ("full", "part"))
        det = "--deterministic"
        cmds = [
            launch.command("fgsm_rs.py", self.shared(full, epochs=2), det),
            launch.command(
                "fgsm_rs.py", self.shared(part, epochs=2), det, "--interrupt-after", "1"
            ),
            launch.command(
                "fgsm_rs.py", ["--resume", "--out-dir", part, "--device", self.args.device], det
            ),
        ]
        step.update(commands=[shown(c) for c in cmds], exit=[])
        env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS
        for cmd, want in zip(cmds, (0, 130, 0)):
            code, seconds = run_cmd(cmd, step["log"], end - time.time(), env)
            step["exit"].append(code)
            step["seconds"] += seconds
            if code != want:
                failed = f"failed (exit {code} from `{shown(cmd)}`, expected {want})"
                step["status"] = f"timeout ({timeout:.0f} s)" if code is None else failed
                break
            left = os.path.exists(os.path.join(part, "checkpoint.pt"))
            if want == 130 and (os.path.exists(os.path.join(part, "results.json")) or not left):
                step["status"] = "failed (the interrupted run left no checkpoint, or finished)"
                break
        else:
            (a, _), (b, _) = report.read_results(full), report.read_results(part)
            if not a or not b:
                step["status"] = "failed (a results.json is missing)"
            else:
                diff = max_difference(launch.comparable(a), launch.comparable(b))
                last = (b["final"] or {}).get("last")
                step.update(
                    equal=diff == 0, max_abs_difference=diff, epochs=len(b["epochs"]), last=last
                )
                mismatch = "mismatch (resumed run differs: see max_abs_difference)"
                step["status"] = "ok" if diff == 0 else mismatch
        self.end(step)

    def epoch_time_step(self):
        step, timeout = self.begin("epoch_time fgsm_rs", EPOCH_TIME_LIMIT)
        if step is None:
            return
        a = self.args
        out = os.path.join(a.out, "epoch_time.json")
        cmd = [sys.executable, os.path.join(ROOT, "bench", "epoch_time.py"), "--dataset", "folder"]
        cmd += [
            "--data-dir",
            a.data_dir,
            "--epochs",
            str(a.epoch_time_epochs),
            "--device",
            a.device,
        ]
        for flag in ("model", "batch_size"):
            if getattr(a, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        cmd += ["--out", out, "fgsm_rs.py"] + ([] if a.no_compile else ["fgsm_rs.py --compile"])
        step["exit"], step["seconds"] = run_cmd(cmd, step["log"], timeout)
        step["commands"] = [shown(cmd)]
        try:
            with open(out) as f:
                rows = json.load(f)
        except (OSError, ValueError):
            rows = []
        keep = "spec status precision seconds_per_epoch monitor_s_per_epoch images_per_s "
        keep += "flops_per_image flops_source flops_per_s peak_flops peak_fraction"
        step["rows"] = [{k: r.get(k) for k in keep.split()} for r in rows]
        if rows and rows[0].get("images_per_s"):
            step["images_per_s"] = rows[0]["images_per_s"]
        step["status"] = status_of(step["exit"], timeout, "ok" if rows else "failed (no rows)")
        self.end(step)

    def run(self):
        a = self.args
        images = count_images(a.data_dir)
        for script, own, limit in SCRIPTS:
            if script == "atlas":
                own = own + ["--val-size", str(max(1, min(500, images // 10)))]
            if script == "las_at" and a.model:  # one network for both, as reproduce.py does
                own = own + ["--strategy-model", a.model]
            if script == "las_at":
                # Its strategy network learns every k = 20 batches (the recipe); a smaller folder or a larger
                # batch than las_at.py's 128 gets one update per epoch at least (the script refuses fewer).
                batches = images // (a.batch_size or LAS_AT_BATCH)
                own = own + (["--strategy-every", str(max(1, batches))] if batches < 20 else [])
            self.script_step(script, script, own, limit)
        self.resume_step()
        for script in ("fgsm_rs", "fgsm_mep"):
            if a.no_compile:
                skipped = "skipped (--no-compile)"
                self.record(
                    {"name": f"compile {script}", "status": skipped, "seconds": 0.0, "commands": []}
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
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        try:
            names = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split(
                "\n"
            )
            gpu = names[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    version = next((s["torch"] for s in ran if s.get("torch")), None)
    if version is None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            version = None
    return {"gpu": gpu, "device": device, "torch": version}


def key_numbers(s):
    """A step's key numbers in one cell: the last model's accuracies, or epoch_time's rows."""
    if s.get("last"):
        key = " / ".join(
            f"{k} {100 * v:.1f}" for k, v in s["last"].items() if isinstance(v, (int, float))
        )
    else:
        ok = [r for r in s.get("rows", []) if r.get("status") == "ok"]
        peak = ["peak –" if not r.get("peak_fraction") else "" for r in ok]
        peak = [p or f"{100 * r['peak_fraction']:.1f}% of bf16 peak" for p, r in zip(peak, ok)]
        key = "; ".join(
            f"{r['spec']}: {r['images_per_s'] or 0:.0f} img/s, {p}" for r, p in zip(ok, peak)
        )
    if "equal" in s:
        key = f"equal: {s['equal']} (max |Δ| {s['max_abs_difference']:.3g}); " + key
    return key


def markdown(summary):
    gpu = f"GPU: {summary['gpu'] or 'none'} (--device {summary['device']})"
    took = f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget"
    lines = [
        f"{gpu}, torch {summary['torch']}; {took}",
        "",
        "images/s: training images per second of the step's last epoch (a one-epoch run includes "
        "its warm-up: cuDNN autotuning, compilation); epoch_time's rows leave the first epoch out. "
        "Key numbers: the last model's accuracies in %.",
        "",
        "| step | status | seconds | images/s | key numbers |",
        "|---|---|---|---|---|",
    ]
    for s in summary["steps"]:
        ips = f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "–"
        lines.append(
            f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {ips} | {key_numbers(s)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "data_dir", help="an image folder DIR/{train,test}/CLASS/* (e.g. the CIFAR-10 slice)"
    )
    p.add_argument(
        "--out", help="where the runs, logs and summary.json go (default runs/gpu-check-DATE-TIME)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", help="every run's network (default: the recipe's, PreActResNet18)")
    p.add_argument("--batch-size", type=int, help="every run's batch (default: each recipe's)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check (8 min)")
    p.add_argument(
        "--epoch-time-epochs", type=int, default=3, help="epochs of each epoch_time.py run"
    )
    p.add_argument(
        "--no-compile", action="store_true", help="skip the --compile steps (a CPU dry run)"
    )
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        p.error(
            f"{args.data_dir}: no train/ folder there (an image folder DIR/{{train,test}}/CLASS/*)"
        )
    args.data_dir = os.path.abspath(args.data_dir)
    args.out = os.path.abspath(args.out or time.strftime("runs/gpu-check-%Y%m%d-%H%M%S"))
    if os.path.exists(os.path.join(args.out, "summary.json")):
        p.error(f"--out {args.out} holds a check already (summary.json): choose another folder")
    check = Check(args)
    summary = {"gpu": None, "device": args.device, "torch": None, "data_dir": args.data_dir}
    summary.update(
        budget_s=args.budget, started=time.strftime("%Y-%m-%d %H:%M:%S"), steps=check.steps
    )
    try:
        check.run()
    finally:
        summary.update(device_facts(args.device, check.steps), seconds=time.time() - check.start)
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
    sys.exit(main())
