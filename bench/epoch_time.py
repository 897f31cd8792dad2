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
each run goes through bench/launch.py --count-flops, which wraps the loader's epoch() so that the whole step on
the first training batch runs under the counter and writes RUN/step_flops.json. That one step is slowed
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
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import launch  # bench/, beside this script
import report

# Dense (no 2:4 sparsity) bf16 tensor-core peak with fp32 accumulation (what PyTorch's bf16 convolutions and
# matmuls use), TFLOP/s, from NVIDIA's data sheets (H100/H200, A100, L40S, L40, L4: half the "with sparsity"
# figure) and architecture white papers (GeForce: the Ada and Ampere GA102 papers' "FP16 Tensor TFLOPS with
# FP32 accumulate", which bf16 shares; not the FP32 or TF32 rate). The first pattern that matches the device's
# name wins. None: a part whose figure was not verified here (no fraction of peak is printed for it): laptop
# and NVL parts run at other clocks and power limits than the parts below.
PEAK_BF16 = [
    (r"laptop|max-q|\bH100 NVL\b|\bH200 NVL\b", None),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b|\bH200\b", 989.0),  # SXM (the H200 has the H100 SXM's compute)
    (r"\bA100\b", 312.0),  # SXM and PCIe alike
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b(?! D)", 165.2),  # Ada white paper (the 4090 D has fewer SMs)
    (r"\bRTX 3090\b(?! Ti)", 71.0),  # GA102 white paper
]
# The cheapest evaluation there is: the final evaluation is not what is timed.
NO_EVAL = "--eval-samples 1 --eval-iters 1 --eval-restarts 1 --eval-cw-iters 0".split()


def peak_bf16(device_name):
    """FLOP/s of the device's dense bf16 tensor-core peak, or None when the table does not know it."""
    for pattern, tflops in PEAK_BF16:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops * 1e12 if tflops else None
    return None


def spec_parser(doc):
    """The command line of epoch_time.py and profile_epoch.py: specs and the flags shared by every spec."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("specs", nargs="*", help='a script and its flags, e.g. "fgsm_rs.py --compile"')
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--precision", help="given to every spec (a spec's own --precision wins)")
    p.add_argument("--out", help="also write the rows as JSON here")
    return p


def shared_flags(args, epochs):
    """The flags given to every spec: --dataset, --data-dir, --epochs, and --model, --batch-size, --device,
    --precision if set."""
    shared = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--epochs", str(epochs)]
    for flag in ("model", "batch_size", "device", "precision"):
        if getattr(args, flag, None) is not None:
            shared += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shared


def run_spec(spec, shared, out_dir, patches, nproc=1):
    """One spec through bench/launch.py with `patches`, in its own process; (True, "") or (False, why)."""
    script, *own = shlex.split(spec)
    cmd = launch.command(script, [*shared, *own, "--out-dir", out_dir], *patches, nproc=nproc)
    proc = subprocess.run(cmd, cwd=launch.ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        return True, ""
    print(
        f"{spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
        file=sys.stderr,
        flush=True,
    )
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return False, f"failed: exit {proc.returncode}: {tail[:200]}"


def spec_row(spec, res, flops):
    """One spec's row from its results.json and its step_flops.json (None: not counted). Under torchrun a process
    counts its part of the batch: the FLOPs per image are the same."""
    rows = res["epochs"]
    timed = rows[1:] or rows
    per_epoch = sum(r["seconds"] for r in timed) / len(timed)
    monitor = [r["monitor_s"] for r in rows if isinstance(r.get("monitor_s"), (int, float))]
    return {
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


def without_compile(spec):
    return shlex.join([w for w in shlex.split(spec) if w != "--compile"])


def finish_rows(rows):
    """Fill in what needs the other rows: the ratio to the first spec, a compiled spec's FLOPs from its eager twin
    (the same spec without --compile), and FLOP/s and the fraction of peak."""
    done = [r for r in rows if r["status"] == "ok"]
    for r in done:
        if r["flops_per_image"] is None and r["compile"]:
            eager = without_compile(r.get("base", r["spec"]))
            twins = [
                t
                for t in done
                if t["flops_source"] == "counted" and t["processes"] == r["processes"]
            ]
            twin = next((t for t in twins if t.get("base", t["spec"]) == eager), None)
            if twin:
                r["flops_per_image"] = twin["flops_per_image"]
                r["flops_source"] = f"from '{twin['spec']}'"
    base = done[0]["seconds_per_epoch"] if done and rows[0]["status"] == "ok" else None
    for r in done:
        r["ratio"] = r["seconds_per_epoch"] / base if base else None
        r["flops_per_s"] = (
            r["flops_per_image"] * r["images_per_s"] if r["flops_per_image"] else None
        )
        # The peak is a bf16/fp16 tensor-core rate: an fp32 run is not compared with it.
        half = r["device"] != "cpu" and r["precision"] in ("bfloat16", "float16")
        r["peak_flops"] = peak_bf16(r["device"]) if half else None
        r["peak_fraction"] = r["flops_per_s"] / r["peak_flops"] if r["peak_flops"] else None
    return rows


def table(rows):
    width = max([len(r["spec"]) for r in rows] + [4])
    head = (
        "precision",
        "s/epoch",
        "ratio",
        "monitor s",
        "images/s",
        "GFLOP/img",
        "TFLOP/s",
        "of peak",
    )
    lines = [f"{'spec':<{width}} " + " ".join(f"{h:>9}" for h in head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['spec']:<{width}} {r['status']}")
            continue
        cells = [
            str(r["precision"]),
            f"{r['seconds_per_epoch']:.2f}",
            f"{r['ratio']:.2f}x" if r["ratio"] else "–",
            f"{r['monitor_s_per_epoch']:.2f}" if r["monitor_s_per_epoch"] is not None else "–",
            f"{r['images_per_s']:.1f}",
            f"{r['flops_per_image'] / 1e9:.3f}" if r["flops_per_image"] else "–",
            f"{r['flops_per_s'] / 1e12:.3f}" if r["flops_per_s"] else "–",
            f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] else "–",
        ]
        lines.append(f"{r['spec']:<{width}} " + " ".join(f"{c:>9}" for c in cells))
    notes = [
        "s/epoch: training only; monitor s: the per-epoch PGD-10 monitor, apart (not training)."
    ]
    borrowed = [r for r in rows if str(r.get("flops_source", "")).startswith("from")]
    notes += [
        f"{r['spec']}: FLOPs {r['flops_source']} (a compiled step is not counted)" for r in borrowed
    ]
    return "\n".join(lines + [""] + notes)


def measure(spec, shared, out_dir, nproc=1):
    """One spec's row: its run through the launcher with its first step counted (status "failed: ..." when the
    run failed)."""
    ok, why = run_spec(spec, shared, out_dir, ["--count-flops"], nproc)
    if not ok:
        return {"spec": spec, "status": why}
    res, problem = report.read_results(out_dir)
    if res is None:
        return {"spec": spec, "status": f"failed: {problem}"}
    flops_file = os.path.join(out_dir, launch.FLOPS_FILE)
    flops = None
    if os.path.exists(flops_file):
        with open(flops_file) as f:
            flops = json.load(f)
    return spec_row(spec, res, flops)


def main(argv=None):
    p = spec_parser(__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--nproc",
        type=int,
        nargs="+",
        default=[1],
        help="processes (torchrun): each spec with each",
    )
    args = p.parse_args(argv)
    if not args.specs:
        p.error("give at least one script to time")
    shared = shared_flags(args, args.epochs) + NO_EVAL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (spec, n) in enumerate((s, n) for s in args.specs for n in args.nproc):
            processes = f"{n} processes" if n > 1 else "1 process"
            label = spec if args.nproc == [1] else f"{spec} [{processes}]"
            rows.append({**measure(spec, shared, os.path.join(tmp, str(k)), n), "spec": label})
            rows[-1]["base"] = spec
            done = rows[-1]["status"] == "ok"
            shown = f"{rows[-1]['seconds_per_epoch']:.2f} s/epoch" if done else rows[-1]["status"]
            print(f"  {label}: {shown}", file=sys.stderr, flush=True)
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
    sys.exit(main())
