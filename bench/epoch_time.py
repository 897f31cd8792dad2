"""Time per training epoch of several method scripts on the same data, model and device, in one run.

    python bench/epoch_time.py --dataset mnist --data-dir DIR --model mnist-cnn --epochs 3 \\
        fgsm_rs.py fgsm_sdi.py "las_at.py --strategy-every 1"
    python bench/epoch_time.py --dataset folder --data-dir DIR --device cuda --epochs 3 \\
        fgsm_rs.py "fgsm_rs.py --compile" "fgsm_rs.py --precision fp32"
    python bench/epoch_time.py --dataset folder --data-dir DIR --nproc 1 2 fgsm_rs.py    # torchrun, 1 and 2 processes

Each spec is a script plus its own flags (--compile, --precision, a method's flags: a spec's own flag wins over
the shared one given here). Every run trains for --epochs with the shared flags, evaluates on a single test image
(the evaluation is not what is timed), and is timed by the `seconds` column of its results.json: training only.
The per-epoch monitor (PGD-10 on --monitor-size images, which picks the best model) is timed apart, by the
`monitor_s` column, and shown in its own column; the checkpoint is in neither. The first epoch is left out of the
mean when there are more (warm-up: allocation, cuDNN autotuning, compilation).

The table gives per spec: the precision of training, seconds per epoch and the ratio to the first spec, the
monitor's seconds per epoch, images per second, and the achieved FLOP/s: the FLOPs of one training step (forward
and backward passes of the attack, the weight step and the method's own networks), counted on the first batch
with torch's FlopCounterMode, per image, times images per second. The count is made from outside the library:
each run goes through this file's launcher (`--child`), which wraps common.DeviceLoader.epoch so that the whole
step on the first training batch runs under the counter and writes RUN/step_flops.json. That one step is slowed
by the counting, a reason more to time with --epochs 2 or more. A step under --compile is not counted (under the
counter it would not run compiled): a compiled spec takes the count of the same spec without --compile when the
table has one, marked so. The count is of one batch: a method whose cost varies from batch to batch (LAS-AT's
sampled iterations and strategy updates every k batches, Amata's K_t by epoch) is counted as its first batch.

--nproc N... runs every spec under `torchrun --standalone --nproc_per_node N` for each N (1 without torchrun):
images/s is then of all the processes together (the global batch is --batch-size whatever N is).

On CUDA, with bf16 or fp16 training, the table also gives the fraction of the device's dense tensor-core peak
(PEAK_BF16; fp16 has the same rate on these GPUs). Other devices and precisions print the FLOP/s only.
"""

import argparse
import contextlib
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOPS_FILE = "step_flops.json"  # written into the run's folder by the launcher

# Dense (no 2:4 sparsity) bf16 tensor-core peak with fp32 accumulation (what PyTorch's bf16 convolutions and
# matmuls use), TFLOP/s, from NVIDIA's data sheets (H100/H200, A100, L40S, L40, L4: half the "with sparsity"
# figure) and architecture white papers (GeForce: the Ada and Ampere GA102 papers' "FP16 Tensor TFLOPS with
# FP32 accumulate", which bf16 shares; not the FP32 or TF32 rate). The first pattern that matches the device's
# name wins. None: a part whose figure was not verified here (no fraction of peak is printed for it).
PEAK_BF16 = [
    (
        r"laptop|max-q|\bH100 NVL\b|\bH200 NVL\b",
        None,
    ),  # other clocks and power limits than the parts below
    (r"\bH100\b.*\bPCIe\b", 756.0),  # H100 PCIe
    (r"\bH100\b|\bH200\b", 989.0),  # SXM (the H200 has the H100 SXM's compute)
    (r"\bA100\b", 312.0),  # SXM and PCIe alike
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b(?! D)", 165.2),  # Ada white paper (the 4090 D has fewer SMs)
    (r"\bRTX 3090\b(?! Ti)", 71.0),  # GA102 white paper
]


def peak_bf16(device_name):
    """FLOP/s of the device's dense bf16 tensor-core peak, or None when the table does not know it."""
    for pattern, tflops in PEAK_BF16:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops * 1e12 if tflops else None
    return None


def shared_flags(args, epochs):
    """The flags given to every spec: --dataset, --data-dir, --epochs, and --model, --batch-size, --device,
    --precision if set (also used by profile_epoch.py)."""
    shared = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--epochs", str(epochs)]
    for flag in ("model", "batch_size", "device", "precision"):
        if getattr(args, flag, None) is not None:
            shared += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shared


# ---- The launcher: one spec's run, with its first training step counted


@contextlib.contextmanager
def count_first_step():
    """While open, the next run in this process counts the FLOPs of its first training step: flags.parse_args is
    wrapped to see the run's flags (its --out-dir, --compile), and common.DeviceLoader.epoch so that the step on the
    first batch of the training split (the shuffled loader; ATLAS's validation slice is not) runs inside
    FlopCounterMode. Everything the loop does with that batch (attack, weight step, the method's own networks)
    happens between the batch's yield and the loop's request for the next one. The count goes to
    OUT_DIR/step_flops.json: {"flops", "batch_size"}. Not under --compile. The library is restored on exit."""
    from torch.utils.flop_counter import FlopCounterMode

    import common
    import flags
    import imagenet

    real_parse = flags.parse_args
    real_epochs = {cls: cls.epoch for cls in (common.DeviceLoader, imagenet.StreamLoader)}
    seen = {"args": None, "counted": False}

    def parse_args(*a, **kw):
        seen["args"] = real_parse(*a, **kw)
        return seen["args"]

    def epoch(loader, e):
        args = seen["args"]
        batches = real_epochs[type(loader)](loader, e)
        training = getattr(loader, "shuffle", True)  # a StreamLoader is always the training split
        if seen["counted"] or not training or args is None or args.compile or common.rank():
            yield from batches
            return
        first = next(batches, None)
        if first is None:
            return
        seen["counted"] = True
        with FlopCounterMode(display=False) as counter:
            yield first
        with open(os.path.join(args.out_dir, FLOPS_FILE), "w") as f:
            json.dump({"flops": counter.get_total_flops(), "batch_size": len(first[1])}, f)
        yield from batches

    flags.parse_args = parse_args
    for cls in real_epochs:
        cls.epoch = epoch
    try:
        yield
    finally:
        flags.parse_args = real_parse
        for cls, real in real_epochs.items():
            cls.epoch = real


def child(script, argv):
    """Run SCRIPT ARGV in this process, as `python SCRIPT ARGV` would, with its first step counted."""
    sys.path.insert(0, ROOT)
    sys.argv = [script, *argv]
    with count_first_step():
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


# ---- The table


def spec_row(spec, res, flops):
    """One spec's row from its results.json and its step_flops.json (None: not counted). Under torchrun a process
    counts its part of the batch: the FLOPs per image are the same."""
    rows = res["epochs"]
    timed = rows[1:] or rows
    per_epoch = sum(r["seconds"] for r in timed) / len(timed)
    monitor = [r["monitor_s"] for r in rows if isinstance(r.get("monitor_s"), (int, float))]
    row = {
        "spec": spec,
        "status": "ok",
        "seconds_per_epoch": per_epoch,
        "epochs_timed": len(timed),
        "monitor_s_per_epoch": sum(monitor) / len(monitor) if monitor else None,
        "train_images": res["train_images"],
        "images_per_s": res["train_images"] / per_epoch,
        "processes": res.get("processes", 1),
        "device": res["device"],
        "torch": res["torch"],
        "precision": res.get("precision"),
        "compile": bool(res["args"].get("compile")),
        "step_flops": flops,
        "flops_per_image": flops["flops"] / flops["batch_size"] if flops else None,
        "flops_source": "counted" if flops else None,
    }
    return row


def without_compile(spec):
    return shlex.join([w for w in shlex.split(spec) if w != "--compile"])


def finish_rows(rows):
    """Fill in what needs the other rows: the ratio to the first spec, a compiled spec's FLOPs from its eager twin
    (the same spec without --compile), and FLOP/s and the fraction of peak."""
    done = [r for r in rows if r["status"] == "ok"]
    for r in done:
        if r["flops_per_image"] is None and r["compile"]:
            twin = next(
                (
                    t
                    for t in done
                    if t["flops_source"] == "counted"
                    and t.get("base", t["spec"]) == without_compile(r.get("base", r["spec"]))
                    and t["processes"] == r["processes"]
                ),
                None,
            )
            if twin:
                r["flops_per_image"], r["flops_source"] = (
                    twin["flops_per_image"],
                    f"from '{twin['spec']}'",
                )
    base = done[0]["seconds_per_epoch"] if done and rows[0]["status"] == "ok" else None
    for r in done:
        r["ratio"] = r["seconds_per_epoch"] / base if base else None
        r["flops_per_s"] = (
            r["flops_per_image"] * r["images_per_s"] if r["flops_per_image"] else None
        )
        # The peak is a bf16/fp16 tensor-core rate: an fp32 run is not compared with it.
        peak = (
            peak_bf16(r["device"])
            if r["device"] != "cpu" and r["precision"] in ("bfloat16", "float16")
            else None
        )
        r["peak_flops"] = peak
        r["peak_fraction"] = r["flops_per_s"] / peak if peak and r["flops_per_s"] else None
    return rows


def table(rows):
    width = max([len(r["spec"]) for r in rows] + [4])
    lines = [
        f"{'spec':<{width}} {'precision':>9} {'s/epoch':>9} {'ratio':>7} {'monitor s':>9} {'images/s':>9} "
        f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'of peak':>8}"
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['spec']:<{width}} {r['status']}")
            continue
        gflop = f"{r['flops_per_image'] / 1e9:>9.3f}" if r["flops_per_image"] else f"{'–':>9}"
        tflops = f"{r['flops_per_s'] / 1e12:>8.3f}" if r["flops_per_s"] else f"{'–':>8}"
        peak = f"{100 * r['peak_fraction']:>7.1f}%" if r["peak_fraction"] else f"{'–':>8}"
        ratio = f"{r['ratio']:>6.2f}x" if r["ratio"] else f"{'–':>7}"
        monitor = (
            f"{r['monitor_s_per_epoch']:>9.2f}"
            if r["monitor_s_per_epoch"] is not None
            else f"{'–':>9}"
        )
        lines.append(
            f"{r['spec']:<{width}} {str(r['precision']):>9} {r['seconds_per_epoch']:>9.2f} {ratio} "
            f"{monitor} {r['images_per_s']:>9.1f} {gflop} {tflops} {peak}"
        )
    borrowed = [r for r in rows if str(r.get("flops_source", "")).startswith("from")]
    notes = [
        "s/epoch: training only; monitor s: the per-epoch PGD-10 monitor, apart (not training)."
    ]
    notes += [
        f"{r['spec']}: FLOPs {r['flops_source']} (a compiled step is not counted)" for r in borrowed
    ]
    return "\n".join(lines + [""] + notes)


def run_spec(spec, shared, out, nproc=1):
    """Run one spec through the launcher (under torchrun with nproc > 1); its row (status "failed: ..." when the run
    failed)."""
    script, *own = shlex.split(spec)
    launch = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [*launch, os.path.abspath(__file__), "--child", script, *shared, *own, "--out-dir", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        print(
            f"{spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
            file=sys.stderr,
            flush=True,
        )
        return {"spec": spec, "status": f"failed: exit {proc.returncode}: {tail[:200]}"}
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    flops = None
    with contextlib.suppress(OSError):
        with open(os.path.join(out, FLOPS_FILE)) as f:
            flops = json.load(f)
    return spec_row(spec, res, flops)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "specs", nargs="+", help='a script and its flags, e.g. fgsm_rs.py or "fgsm_rs.py --compile"'
    )
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--precision", default=None, help="given to every spec (a spec's own --precision wins)"
    )
    p.add_argument(
        "--nproc",
        type=int,
        nargs="+",
        default=[1],
        help="processes (torchrun --nproc_per_node); several: each spec with each count",
    )
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    shared = shared_flags(args, args.epochs) + [
        "--eval-samples",
        "1",
        "--eval-iters",
        "1",
        "--eval-restarts",
        "1",
        "--eval-cw-iters",
        "0",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (spec, n) in enumerate((s, n) for s in args.specs for n in args.nproc):
            label = spec if args.nproc == [1] else f"{spec} [{n} process{'es' if n > 1 else ''}]"
            rows.append(run_spec(spec, shared, os.path.join(tmp, str(k)), n))
            rows[-1].update(spec=label, base=spec)
            spec = label
            shown = (
                f"{rows[-1]['seconds_per_epoch']:.2f} s/epoch"
                if rows[-1]["status"] == "ok"
                else rows[-1]["status"]
            )
            print(f"  {spec}: {shown}", file=sys.stderr, flush=True)
    finish_rows(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    where = f"device {ok[0]['device']}, torch {ok[0]['torch']}" if ok else "no run finished"
    print(f"{args.dataset}, model {args.model or 'recipe default'}, {args.epochs} epochs, {where}")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one spec, in its own process: --child SCRIPT ARGS...
        child(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
