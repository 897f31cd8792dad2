"""Run a method script in this process, as `python SCRIPT ARGS...` would, with changes made from outside the library
for measuring and testing (each one undone when its with-block ends). Every instrument of bench/ and the tests'
tests/_launch.py start scripts through it:

    python bench/launch.py [PATCH...] SCRIPT ARGS...       # also under torchrun
    python bench/launch.py [PATCH...] --each PLAN.json     # PLAN: [[script, [args]], ...], one after the other;
                                                           # their exit codes go to PLAN.json.out

PATCH:
  --interrupt-after N     KeyboardInterrupt right after epoch N's end_epoch (its checkpoint written), as Ctrl-C there
  --deterministic         after Run() (which turns cuDNN autotuning on): autotuning off, deterministic kernels on,
                          so that two processes compute alike (bench/gpu_check.py's resume step)
  --keep-weights DIR      each process writes its final weights to DIR/METHOD-rank{R}.pt (are they the same?)
  --count-flops           the FLOPs of the first training step to OUT_DIR/step_flops.json (bench/epoch_time.py)
  --profile SKIP N OUT    torch.profiler over batches SKIP..SKIP+N of the first epoch (N 0: the rest of it), then
                          the run ends; the summary goes to OUT (bench/profile_epoch.py)
  --no-checksum           torchvision's md5 test of the CIFAR/SVHN files off: test-made files cannot match it
"""

import contextlib
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
FLOPS_FILE = "step_flops.json"  # written into the run's folder by --count-flops
TIMINGS = ("seconds", "cpu_s", "monitor_s")


@contextlib.contextmanager
def patched(owner, name, value):
    """owner.name = value inside the block, the real one restored after it."""
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


def _exists(path, md5=None):
    return os.path.isfile(path)


@contextlib.contextmanager
def no_checksum():
    """torchvision checks the official md5 of CIFAR/SVHN files; test-made files cannot match it: existence only."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    with patched(cifar, "check_integrity", _exists), patched(svhn, "check_integrity", _exists):
        yield


def interrupt_after(n):
    """KeyboardInterrupt right after epoch n's end_epoch (the checkpoint of epoch n is written)."""
    import harness

    real = harness.Run.end_epoch

    def end_epoch(run, epoch, *args, **kwargs):
        real(run, epoch, *args, **kwargs)
        if epoch + 1 == n:
            raise KeyboardInterrupt

    return patched(harness.Run, "end_epoch", end_epoch)


def deterministic():
    """cuDNN autotuning off and deterministic kernels on, after Run() turned autotuning on."""
    import torch

    import harness

    real = harness.Run.__init__

    def init(run, *args, **kwargs):
        real(run, *args, **kwargs)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)

    return patched(harness.Run, "__init__", init)


def keep_weights(folder):
    """Each process writes the weights it ends with to FOLDER/METHOD-rank{R}.pt before the evaluation."""
    import torch

    import common
    import harness

    real = harness.Run.finish

    def finish(run, model):
        name = f"{run.args.method}-rank{common.rank()}.pt"
        torch.save(model.state_dict(), os.path.join(folder, name))
        return real(run, model)

    return patched(harness.Run, "finish", finish)


@contextlib.contextmanager
def count_flops():
    """The next run counts the FLOPs of its first training step: flags.parse_args is wrapped to see the run's
    flags (its --out-dir, --compile), and the loaders' epoch() so that the step on the first batch of the training
    split (the shuffled loader; ATLAS's validation slice is not) runs inside FlopCounterMode: everything the loop
    does with that batch (attack, weight step, the method's own networks) happens between the batch's yield and
    the loop's request for the next one. The count goes to OUT_DIR/step_flops.json: {"flops", "batch_size"}.
    Not under --compile (the counter would run the step eagerly); the first process only under torchrun."""
    from torch.utils.flop_counter import FlopCounterMode

    import common
    import flags
    import imagenet

    seen = {"args": None, "counted": False}
    real_parse = flags.parse_args

    def parse_args(*args, **kwargs):
        seen["args"] = real_parse(*args, **kwargs)
        return seen["args"]

    def counted(real_epoch):
        def epoch(loader, e):
            args = seen["args"]
            batches = real_epoch(loader, e)
            training = getattr(
                loader, "shuffle", True
            )  # a StreamLoader is always the training split
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

        return epoch

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(flags, "parse_args", parse_args))
        for cls in (common.DeviceLoader, imagenet.StreamLoader):
            stack.enter_context(patched(cls, "epoch", counted(cls.epoch)))
        yield


class _WindowDone(Exception):
    """Raised by --profile's loader after the profiled batches: the run has nothing more to show."""


@contextlib.contextmanager
def profile(skip, batches, out):
    """torch.profiler over batches skip .. skip + batches of the first epoch's training loop (batches 0: the rest
    of the epoch), with a range (profile_epoch.FORWARD) around every outermost module call: the classifier's
    forward and the method's own networks (SDI's generator, LAS-AT's strategy network), not their submodules
    again. The run ends after the window; profile_epoch.summarize's shares go to OUT as JSON."""
    import torch
    from profile_epoch import FORWARD, host_events, summarize
    from torch.profiler import ProfilerActivity, record_function

    import common

    depth = [0]
    ranges = []
    profiled = [0]

    def pre(module, inputs):
        depth[0] += 1
        if depth[0] == 1:
            ranges.append(record_function(FORWARD))
            ranges[-1].__enter__()

    def post(module, inputs, output):
        depth[0] -= 1
        if depth[0] == 0:
            ranges.pop().__exit__(None, None, None)

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities)
    real_epoch = common.DeviceLoader.epoch

    def epoch(loader, e):
        if not loader.shuffle:  # the validation slice (ATLAS) is not the training loop
            yield from real_epoch(loader, e)
            return
        stop = skip + batches if batches else len(loader)
        for i, item in enumerate(real_epoch(loader, e)):
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
        # the loop has finished the last step: it asked for the next batch
        if cuda:
            torch.cuda.synchronize()
        with record_function("fastat::window_end"):
            pass
        prof.stop()
        raise _WindowDone

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre),
        torch.nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        with patched(common.DeviceLoader, "epoch", epoch):
            yield
    except _WindowDone:
        pass
    else:
        return  # the run ended before the window (its exit code and message say why): no summary
    finally:
        for hook in hooks:
            hook.remove()
    events = host_events(prof.events())
    start = min(e.time_range.start for e in events if e.name == "fastat::window_start")
    end = max(e.time_range.end for e in events if e.name == "fastat::window_end")
    with open(out, "w") as f:
        json.dump({**summarize(events, (start, end)), "batches": profiled[0]}, f)


PATCHES = {  # flag: (its number of values, the patch)
    "--interrupt-after": (1, lambda n: interrupt_after(int(n))),
    "--deterministic": (0, deterministic),
    "--keep-weights": (1, keep_weights),
    "--count-flops": (0, count_flops),
    "--profile": (3, lambda skip, n, out: profile(int(skip), int(n), out)),
    "--no-checksum": (0, no_checksum),
}


def command(script, argv, *patches, nproc=1):
    """The command line that runs SCRIPT ARGV through this launcher with `patches` (words), under torchrun with
    nproc processes when nproc > 1."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    head = [sys.executable, *(torchrun if nproc > 1 else [])]
    return [*head, os.path.abspath(__file__), *patches, script, *argv]


def run(script, argv):
    """SCRIPT (a path, or a name in the repository's root) with ARGV in this process; its exit code."""
    sys.argv = [script, *argv]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr, flush=True)
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def comparable(res):
    """What an interrupted and resumed run must share with an uninterrupted one (results.json): every per-epoch
    figure but the timings, the best epoch, the final numbers."""
    rows = [{k: v for k, v in r.items() if k not in TIMINGS} for r in res["epochs"]]
    return {"epochs": rows, "best_epoch": res.get("best_epoch"), "final": res.get("final")}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    code = 0  # also when --profile ends the run after its window
    with contextlib.ExitStack() as stack:
        while argv and argv[0] in PATCHES:
            n, patch = PATCHES[argv[0]]
            if len(argv) < n + 2:
                raise SystemExit(f"launch.py: {argv[0]} needs {n} value(s) and a script after it")
            stack.enter_context(patch(*argv[1 : n + 1]))
            argv = argv[n + 1 :]
        if argv[:1] != ["--each"]:
            code = run(argv[0], argv[1:])
        else:
            with open(argv[1]) as f:
                codes = [run(script, args) for script, args in json.load(f)]
            import common

            if common.rank() == 0:
                with open(argv[1] + ".out", "w") as f:
                    json.dump(codes, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
