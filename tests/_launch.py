"""Run a method script as `python tests/_launch.py SCRIPT ARGS...` (also under torchrun), with test-only changes made
from outside the library:
- torchvision's checksum test is switched off (it verifies the md5 of the official CIFAR/SVHN files, which tiny
  test-made files cannot match);
- FASTAT_TEST_INTERRUPT_AFTER_EPOCH=N: the run behaves as if Ctrl-C arrived right after epoch N's checkpoint;
- FASTAT_TEST_WEIGHTS_DIR=DIR: each process writes its final weights to DIR/SCRIPT-rank{R}.pt (the same?);
- `python tests/_launch.py --each FILE.json`: runs the scripts listed in FILE.json ([[script, [args]], ...]) one
  after the other in this process (one torchrun start for all of them) and writes each exit code to FILE.json.out.
Everything else (file parsing, the scripts) is the real code path."""

import json
import os
import runpy
import sys

import torchvision.datasets.cifar
import torchvision.datasets.svhn

for module in (torchvision.datasets.cifar, torchvision.datasets.svhn):
    module.check_integrity = lambda path, md5=None: os.path.isfile(path)  # existence only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import harness  # noqa: E402

interrupt, weights_dir = (
    os.environ.get("FASTAT_TEST_INTERRUPT_AFTER_EPOCH"),
    os.environ.get("FASTAT_TEST_WEIGHTS_DIR"),
)
end_epoch, finish = harness.Run.end_epoch, harness.Run.finish


def end_epoch_then_interrupt(run, epoch, *args, **kwargs):
    end_epoch(run, epoch, *args, **kwargs)
    if interrupt and epoch + 1 == int(interrupt):
        raise KeyboardInterrupt


def finish_and_keep_weights(run, model):
    if weights_dir:
        import torch

        torch.save(
            model.state_dict(),
            os.path.join(weights_dir, f"{run.args.method}-rank{common.rank()}.pt"),
        )
    return finish(run, model)


harness.Run.end_epoch, harness.Run.finish = end_epoch_then_interrupt, finish_and_keep_weights


def run(script, args):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 1
    return 0


if sys.argv[1] == "--each":
    plan = sys.argv[2]
    with open(plan) as f:
        codes = [run(os.path.join(ROOT, script), args) for script, args in json.load(f)]
    if common.rank() == 0:
        with open(plan + ".out", "w") as f:
            json.dump(codes, f)
else:
    sys.exit(run(sys.argv[1], sys.argv[2:]))
