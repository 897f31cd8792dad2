"""Where an epoch's time goes: torch.profiler over training steps of each method script.

    python bench/profile_epoch.py --dataset folder --data-dir DIR --model wrn-16-2 --batches 10 \
        fgsm_rs.py fgsm_sdi.py "las_at.py --strategy-model wrn-16-2"

Each spec (a script plus its own flags) runs in its own process (bench/launch.py --profile), with the shared
flags given here (as bench/epoch_time.py's). The first --skip batches of its first epoch are a warm-up; the next
--batches (all the remaining ones with --batches 0) are profiled, then the process ends (no monitor, no evaluation).
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

import json
import os
import sys
import tempfile
from collections import defaultdict

FORWARD = "fastat::forward"
BACKWARD = "autograd::engine::evaluate_function"
OPTIMIZER = "Optimizer.step"
# Operators that, on CUDA, make the host wait for the GPU: a scalar read (.item(), float(t), `if t:`), a boolean
# mask (its size is data-dependent), unique. On the CPU they cost nothing, so a CPU profile counts them instead.
SYNCS = tuple(
    "aten::" + op
    for op in "_local_scalar_dense nonzero masked_select unique _unique _unique2 is_nonzero".split()
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


def host_events(events):
    """The host (CPU) side of a profile: on CUDA, kernels, memory copies and the GPU-side copies of the marked
    ranges are events too, on the GPU's own clock; they are not part of the host's timeline."""
    from torch.autograd import DeviceType

    return [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]


def _union(intervals):
    """Total length of the union of (start, end) intervals."""
    total = 0.0
    end = -float("inf")
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

    def ranges(match):
        return _clip(
            [(e.time_range.start, e.time_range.end) for e in events if match(e.name)], lo, hi
        )

    fwd = ranges(lambda name: name == FORWARD)
    bwd = ranges(lambda name: name.startswith(BACKWARD))
    opt = ranges(lambda name: name.startswith(OPTIMIZER))
    inside = _union(fwd + bwd)
    # Top-level operators (no parent range) that lie outside the model's passes and the optimiser step.
    model_and_opt = sorted(fwd + bwd + opt)
    outside_ops = []
    by_name = defaultdict(float)
    for e in events:
        marked = e.name == FORWARD or e.name.startswith((BACKWARD, OPTIMIZER))
        s, t = max(e.time_range.start, lo), min(e.time_range.end, hi)
        if e.cpu_parent is not None or marked or t <= s:
            continue
        covered = _union(_clip(model_and_opt, s, t))
        if covered < t - s:
            outside_ops.append((s, t))
            by_name[e.name] += (t - s) - covered
    # the optimiser step, less any part inside the model's ranges; the outside operators, less the same
    opt_time = _union(model_and_opt) - inside
    ops = _union(outside_ops + model_and_opt) - _union(model_and_opt)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    syncs = defaultdict(int)
    for e in events:
        # one per sync: not again inside another (is_nonzero reads its scalar through _local_scalar_dense)
        in_window = lo <= e.time_range.start < hi
        if e.name in SYNCS and in_window and not _under(e, CPU_ONLY_CHECKS + SYNCS):
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


def print_table(rows):
    """ms/batch out: the host time per batch outside the networks' passes (a GPU cannot hide more than that
    behind its kernels); syncs: scalar reads and boolean masks per batch (each makes the host wait for a GPU)."""
    width = max(len(r["spec"]) for r in rows)
    head = (
        "s/batch",
        "forward",
        "backward",
        "outside",
        "ms/b out",
        "optim",
        "ops",
        "python",
        "syncs",
    )
    print(f"{'spec':<{width}} " + " ".join(f"{h:>8}" for h in head) + "  largest outside")
    for r in rows:
        n = r["batches"]
        shares = [f"{100 * r[k]:.1f}%" for k in ("forward", "backward", "outside")]
        shares += [f"{1e3 * r['outside'] * r['window_s'] / n:.1f}"]
        shares += [f"{100 * r[k]:.1f}%" for k in ("optimizer", "other_ops", "python")]
        cells = [f"{r['window_s'] / n:.3f}", *shares, f"{sum(r['syncs'].values()) / n:.1f}"]
        top = ", ".join(f"{name} {100 * share:.1f}%" for name, share in r["top_outside"][:3])
        print(f"{r['spec']:<{width}} " + " ".join(f"{c:>8}" for c in cells) + f"  {top}")


def main(argv=None):
    from epoch_time import run_spec, shared_flags, spec_parser  # bench/, beside this script

    p = spec_parser(__doc__)
    p.add_argument("--skip", type=int, default=3, help="warm-up batches before the profiled ones")
    p.add_argument(
        "--batches", type=int, default=10, help="batches profiled (0: the rest of the epoch)"
    )
    p.add_argument(
        "--table", metavar="JSON", help="print the table of an earlier --out file, run nothing"
    )
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            return print_table(json.load(f))
    if not args.specs:
        p.error("give at least one script to profile (or --table JSON)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, spec in enumerate(args.specs):
            out = os.path.join(tmp, f"{k}.json")
            patch = ["--profile", str(args.skip), str(args.batches), out]
            ok, why = run_spec(spec, shared_flags(args, 1), os.path.join(tmp, str(k)), patch)
            if not ok:
                sys.exit(f"{spec} {why}")
            with open(out) as f:
                rows.append({"spec": spec, **json.load(f)})
            print(
                f"  {spec}: {100 * rows[-1]['outside']:.1f}% outside", file=sys.stderr, flush=True
            )
    print(
        f"{args.dataset}, model {args.model or 'recipe default'}, {args.batches or 'all'} batches "
        f"after {args.skip}; shares of the profiled steps' host time"
    )
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
