"""Run a method script as `python tests/_launch.py SCRIPT ARGS...` with torchvision's checksum test
switched off: torchvision verifies the md5 of the official CIFAR/SVHN files, which tiny test-made
files cannot match. Everything else (file parsing, the script itself) is the real code path."""
import os
import runpy
import sys

import torchvision.datasets.cifar
import torchvision.datasets.svhn

for module in (torchvision.datasets.cifar, torchvision.datasets.svhn):
    module.check_integrity = lambda path, md5=None: os.path.isfile(path)  # existence only

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
