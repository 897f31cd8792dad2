"""`python tests/_launch.py SCRIPT ARGS...` or `... --each PLAN.json` (also under torchrun): bench/launch.py with
torchvision's checksum test off (test-made CIFAR/SVHN files cannot match the official md5) and two test-only changes
asked for by environment variables, so that a test's command line stays the script's own:
- FASTAT_TEST_INTERRUPT_AFTER_EPOCH=N: the run behaves as if Ctrl-C arrived right after epoch N's checkpoint;
- FASTAT_TEST_WEIGHTS_DIR=DIR: each process writes its final weights to DIR/METHOD-rank{R}.pt."""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)
import launch  # noqa: E402

patches = ["--no-checksum"]
if os.environ.get("FASTAT_TEST_INTERRUPT_AFTER_EPOCH"):
    patches += ["--interrupt-after", os.environ["FASTAT_TEST_INTERRUPT_AFTER_EPOCH"]]
if os.environ.get("FASTAT_TEST_WEIGHTS_DIR"):
    patches += ["--keep-weights", os.environ["FASTAT_TEST_WEIGHTS_DIR"]]
sys.exit(launch.main(patches + sys.argv[1:]))
