"""Where an epoch's time goes: torch.profiler over training steps of each method script.

    python bench/profile_epoch.py --dataset folder --data-dir DIR --model wrn-16-2 --batches 10 \
        fgsm_rs.py fgsm_sdi.py "las_at.py --strategy-model wrn-16-2"

Each spec (a script plus its own flags) runs in its own process, with the shared flags given here. The first
--skip batches of its first epoch are a warm-up; the next --batches (all the remaining ones with --batches 0)
are profiled, then the process ends (no monitor, no evaluation).
Every network's forward is marked (a profiler range around each outermost module call: the classifier, SDI's
generator, LAS-AT's strategy network), and the autograd engine's own ranges mark each backward function.
The share of the profiled steps spent outside those ranges is what the method's loop costs beyond the passes of
the model: the attack's arithmetic, the weight step, data augmentation, bookkeeping and Python. The table splits
it into the optimiser step, other tensor operations (top-level operators) and the rest (Python between
operators, the interpreter's overhead), names the operators that take most of the outside time, and counts the
operators per batch that would make the host wait for a CUDA GPU (a scalar read, a boolean mask: SYNCS).

Times are host-side (the profiler's CPU clock): on the CPU they are the work itself. On CUDA the host runs ahead
of the GPU, so a host-side share measures launch overhead, not the GPU's time; use `--device cuda` with care.
On CUDA the profiler also records the GPU's kernels, and a range marked on the host (a forward) gets a GPU-side
copy of the same name: the timeline summarised here keeps host events only (the events' device type is CPU),
so that no GPU time is mixed into the host's shares.
"""

import argparse
import json
import os
import runpy
import shlex
import subprocess
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARD = "fastat::forward"
BACKWARD = "autograd::engine::evaluate_function"
OPTIMIZER = "Optimizer.step"
# Operators that, on CUDA, make the host wait for the GPU: a scalar read (.item(), float(t), `if t:`), a boolean
# mask (its size is data-dependent), unique. On the CPU they cost nothing, so a CPU profile counts them instead.
SYNCS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::is_nonzero",
)
# Checks that read a scalar on the CPU only: one_hot checks its classes' range except on CUDA (where scatter's
# device assert does it), and multinomial's argument check is an _assert_async, asynchronous on CUDA.
CPU_ONLY_CHECKS = ("aten::one_hot", "aten::_assert_async")


def _under(event, names):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


class _Done(Exception):
    pass


def host_events(events):
    """The host (CPU) side of a profile: on CUDA, kernels, memory copies and the GPU-side copies of the marked
    ranges are events too, on the GPU's own clock; they are not part of the host's timeline."""
    from torch.autograd import DeviceType

    return [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]


def _union(intervals):
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _clip(intervals, lo, hi):
    return [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]


def summarize(events, window):
    """Shares of the profiled window: inside a model's forward or backward, the optimiser step, other
    operators, the rest. events: the profiler's FunctionEvents (host events only are used); window: (start, end)
    in microseconds."""
    events = host_events(events)
    lo, hi = window
    span = hi - lo
    fwd = _clip(
        [(e.time_range.start, e.time_range.end) for e in events if e.name == FORWARD], lo, hi
    )
    bwd = _clip(
        [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith(BACKWARD)],
        lo,
        hi,
    )
    model = fwd + bwd
    inside = _union(model)
    opt = _clip(
        [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith(OPTIMIZER)],
        lo,
        hi,
    )
    # Top-level operators (no parent range) that lie outside the model's passes and the optimiser step.
    model_and_opt = sorted(model + opt)
    outside_ops, by_name = [], defaultdict(float)
    for e in events:
        if (
            e.cpu_parent is not None
            or e.name == FORWARD
            or e.name.startswith((BACKWARD, OPTIMIZER))
        ):
            continue
        s, t = max(e.time_range.start, lo), min(e.time_range.end, hi)
        if t <= s:
            continue
        covered = _union(_clip(model_and_opt, s, t))
        if covered < t - s:
            outside_ops.append((s, t))
            by_name[e.name] += (t - s) - covered
    opt_time = (
        _union(model_and_opt) - inside
    )  # the optimiser step, less any part inside the model's ranges
    ops = _union(outside_ops + model_and_opt) - _union(
        model_and_opt
    )  # outside operators, less the same
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    syncs = defaultdict(int)
    for e in events:
        # one per sync: not again inside another (is_nonzero reads its scalar through _local_scalar_dense)
        if (
            e.name in SYNCS
            and lo <= e.time_range.start < hi
            and not _under(e, CPU_ONLY_CHECKS + SYNCS)
        ):
            syncs[e.name] += 1
    return {
        "window_s": span / 1e6,
        "forward": _union(fwd) / span,
        "backward": _union(bwd) / span,
        "inside": inside / span,
        "outside": 1 - inside / span,
        "optimizer": opt_time / span,
        "other_ops": ops / span,
        "python": 1 - (inside + opt_time + ops) / span,
        "forward_calls": len(fwd),
        "syncs": dict(syncs),
        "top_outside": [(name, t / span) for name, t in top],
    }


def child(script, argv, skip, batches, out):
    """Run `script` with argv in this process, profile batches skip .. skip+batches of its first epoch."""
    sys.path.insert(0, ROOT)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import common

    # A range around every outermost module call: the classifier's forward, and the method's own networks
    # (SDI's generator, LAS-AT's strategy network), but not their submodules again.
    depth, ranges = [0], []

    def pre(module, inputs):
        depth[0] += 1
        if depth[0] == 1:
            ranges.append(record_function(FORWARD))
            ranges[-1].__enter__()

    def post(module, inputs, output):
        depth[0] -= 1
        if depth[0] == 0:
            ranges.pop().__exit__(None, None, None)

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)

    prof = profile(
        activities=[ProfilerActivity.CPU]
        + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    )
    epoch_fn = common.DeviceLoader.epoch
    profiled = [0]

    def epoch(loader, e):
        if not loader.shuffle:  # the validation slice (ATLAS) is not the training loop
            yield from epoch_fn(loader, e)
            return
        stop = skip + batches if batches else len(loader)
        for i, item in enumerate(epoch_fn(loader, e)):
            if i == stop:
                break
            if i == skip:
                prof.start()
                with record_function("fastat::window_start"):
                    pass
            if i >= skip:
                profiled[0] += 1
            yield item
        if not profiled[0]:
            raise SystemExit(
                f"fastat: --skip {skip} leaves no batch to profile ({len(loader)} in an epoch)"
            )
        # the consumer has finished the last step: it asked for the next batch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        with record_function("fastat::window_end"):
            pass
        prof.stop()
        raise _Done

    common.DeviceLoader.epoch = epoch
    sys.argv = [script, *argv]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except _Done:
        pass
    else:
        raise SystemExit(
            f"{script}: the profiled window was never reached (fewer than --skip batches?)"
        )
    events = host_events(prof.events())
    start = min(e.time_range.start for e in events if e.name == "fastat::window_start")
    end = max(e.time_range.end for e in events if e.name == "fastat::window_end")
    result = summarize(events, (start, end))
    result["batches"] = profiled[0]
    with open(out, "w") as f:
        json.dump(result, f)


def print_table(rows):
    """ms/batch out: the host time per batch outside the networks' passes (a GPU cannot hide more than that
    behind its kernels); syncs: scalar reads and boolean masks per batch (each makes the host wait for a GPU)."""
    width = max(len(r["spec"]) for r in rows)
    print(
        f"{'spec':<{width}} {'s/batch':>8} {'forward':>8} {'backward':>8} {'outside':>8} {'ms/batch out':>12} "
        f"{'optim':>7} {'ops':>7} {'python':>7} {'syncs':>6}  largest outside"
    )
    for r in rows:
        n = r["batches"]
        top = ", ".join(f"{name} {100 * share:.1f}%" for name, share in r["top_outside"][:3])
        print(
            f"{r['spec']:<{width}} {r['window_s'] / n:>8.3f} {100 * r['forward']:>7.1f}% "
            f"{100 * r['backward']:>7.1f}% {100 * r['outside']:>7.1f}% {1e3 * r['outside'] * r['window_s'] / n:>12.1f} "
            f"{100 * r['optimizer']:>6.1f}% {100 * r['other_ops']:>6.1f}% {100 * r['python']:>6.1f}% "
            f"{sum(r['syncs'].values()) / n:>6.1f}  {top}"
        )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "specs", nargs="*", help='a script and its flags, e.g. fgsm_rs.py or "amata.py --k-max 4"'
    )
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--precision", default=None, help="given to every spec (a spec's own --precision wins)"
    )
    p.add_argument("--skip", type=int, default=3, help="warm-up batches before the profiled ones")
    p.add_argument(
        "--batches", type=int, default=10, help="batches profiled (0: the rest of the first epoch)"
    )
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument(
        "--table", metavar="JSON", help="print the table of an earlier --out file, run nothing"
    )
    args = p.parse_args()
    if args.table:
        with open(args.table) as f:
            return print_table(json.load(f))
    if not args.specs:
        p.error("give at least one script to profile (or --table JSON)")
    from epoch_time import shared_flags  # bench/, beside this script

    shared = shared_flags(args, 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, spec in enumerate(args.specs):
            script, *own = shlex.split(spec)
            out = os.path.join(tmp, f"{k}.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                str(args.skip),
                str(args.batches),
                out,
                script,
                *shared,
                *own,
                "--out-dir",
                os.path.join(tmp, str(k)),
            ]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            with open(out) as f:
                rows.append({"spec": spec, **json.load(f)})
            print(
                f"  {spec}: {100 * rows[-1]['outside']:.1f}% outside", file=sys.stderr, flush=True
            )
    print(
        f"{args.dataset}, model {args.model or 'recipe default'}, {args.batches or 'all'} batches after "
        f"{args.skip}; shares of the profiled steps' host time"
    )
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == [
        "--child"
    ]:  # one spec, in its own process: --child SKIP BATCHES OUT SCRIPT ARGS...
        skip, batches, out, script, *argv = sys.argv[2:]
        child(script, argv, int(skip), int(batches), out)
    else:
        main()
