"""Time per training epoch of several method scripts on the same data, model and device, in one run.

    python bench/epoch_time.py --dataset mnist --data-dir DIR --model mnist-cnn --epochs 3 \
        fgsm_rs.py fgsm_sdi.py "las_at.py --strategy-every 1"

Each spec is a script plus its own flags. Every run trains for --epochs with the shared flags given here,
evaluates on a single test image (the evaluation is not what is timed), and is timed by the `seconds`
column of its results.json (training only: the per-epoch monitor and checkpoint are outside it). The first
epoch is left out of the mean when there are more (warm-up: allocation, cuDNN autotuning, compilation).
The table gives seconds per epoch and the ratio to the first spec, images per second, and the achieved FLOP/s:
the FLOPs of one training step (forward and backward passes of the attack, the weight step and the method's own
networks, counted on the first batch by torch's FlopCounterMode: FASTAT_COUNT_FLOPS=1) per image, times images
per second. On CUDA it also gives the fraction of the device's dense bf16 peak, for the GPUs in PEAK_BF16;
others print the FLOP/s only. The count is of one batch: a method whose cost varies from batch to batch (LAS-AT's
sampled iterations and strategy updates every k batches, Amata's K_t by epoch) is counted as its first batch.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (the SXM parts where there are two).
# GeForce cards: the rate with fp32 accumulation, which PyTorch's bf16 matmuls use.
PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
             "L40": 181.0, "RTX 4090": 82.6, "A10G": 70.0, "L4": 121.0, "RTX 3090": 35.6}


def peak_bf16(device_name):
    for key, tflops in PEAK_BF16.items():  # the more specific names first
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def shared_flags(args, epochs):
    """The flags given to every spec: --dataset, --data-dir, --epochs, and --model, --batch-size, --device if set
    (also used by profile_epoch.py)."""
    shared = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--epochs", str(epochs)]
    for flag in ("model", "batch_size", "device"):
        if getattr(args, flag) is not None:
            shared += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shared


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", help='a script and its flags, e.g. fgsm_rs.py or "amata.py --k-max 4"')
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="also write the table as JSON here")
    args = p.parse_args()
    shared = shared_flags(args, args.epochs) + ["--eval-samples", "1", "--eval-iters", "1", "--eval-restarts", "1"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, spec in enumerate(args.specs):
            script, *own = shlex.split(spec)
            out = os.path.join(tmp, str(k))
            cmd = [sys.executable, os.path.join(ROOT, script), *shared, *own, "--out-dir", out]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "FASTAT_COUNT_FLOPS": "1"})
            if proc.returncode != 0:
                sys.exit(f"{spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            with open(os.path.join(out, "results.json")) as f:
                res = json.load(f)
            seconds = [r["seconds"] for r in res["epochs"]]
            timed = seconds[1:] or seconds
            per_epoch = sum(timed) / len(timed)
            row = {"spec": spec, "seconds_per_epoch": per_epoch, "epochs_timed": len(timed),
                   "device": res["device"], "torch": res["torch"], "precision": res.get("precision")}
            row["images_per_s"] = res["train_images"] / per_epoch
            step = res.get("step_flops")
            row["flops_per_s"] = step["flops"] / step["batch_size"] * row["images_per_s"] if step else None
            peak = peak_bf16(res["device"]) if res["device"] != "cpu" else None
            row["peak_fraction"] = row["flops_per_s"] / peak if peak and row["flops_per_s"] else None
            rows.append(row)
            print(f"  {spec}: {rows[-1]['seconds_per_epoch']:.2f} s/epoch", file=sys.stderr, flush=True)
    base = rows[0]["seconds_per_epoch"]
    print(f"{args.dataset}, model {args.model or 'recipe default'}, {args.epochs} epochs, device {rows[0]['device']}, "
          f"torch {rows[0]['torch']}")
    print(f"{'spec':<44} {'s/epoch':>9} {'ratio':>7} {'images/s':>9} {'TFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        r["ratio"] = r["seconds_per_epoch"] / base
        tflops = f"{r['flops_per_s'] / 1e12:8.3f}" if r["flops_per_s"] else f"{'–':>8}"
        peak = f"{100 * r['peak_fraction']:7.1f}%" if r["peak_fraction"] else f"{'–':>8}"
        print(f"{r['spec']:<44} {r['seconds_per_epoch']:>9.2f} {r['ratio']:>6.2f}x {r['images_per_s']:>9.1f} "
              f"{tflops} {peak}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
