"""README.md: its example of a method's core in a plain PyTorch loop runs, and its table of copyable functions
names functions that exist, with those signatures."""

import importlib
import inspect
import os
import re

import numpy as np
from conftest import ROOT
from PIL import Image


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_the_copy_a_method_example_trains_and_evaluates(tmp_path, capsys):
    section = _readme().split("## Copy a method into your project")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):  # a tiny image folder of 32×32 colour images
        for c in range(3):
            os.makedirs(tmp_path / split / f"c{c}")
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / split / f"c{c}" / f"{i}.png"
                )
    for old, new in (
        ("DATA_DIR", str(tmp_path)),
        ("EPOCHS = 15", "EPOCHS = 2"),
        ("batch_size=128", "batch_size=8"),
        ("num_workers=2", "num_workers=0"),
    ):
        assert old in code
        code = code.replace(old, new)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["sched"].last_epoch == 6 and np.isfinite(namespace["loss"].item())
    # one line per epoch with its mean training loss, then the PGD-10 accuracy of the 12 test images
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "PGD-10 accuracy"]
    losses = [float(line.split()[-1]) for line in lines[:2]]
    assert all(np.isfinite(losses)) and namespace["correct"] == round(
        float(lines[2].split()[-1].rstrip("%")) / 100 * 12
    )
    assert 0 <= namespace["correct"] <= len(namespace["test"]) == 12


def test_the_table_of_copyable_functions_names_real_signatures():
    section = _readme().split("## Copy a method into your project")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)\.py` \| `(\w+)\((.*?)\)` \|", section, re.M)
    assert len(rows) >= 8 and {script for script, _, _ in rows} >= {
        "fgsm_rs",
        "fgsm_sdi",
        "fgsm_mep",
        "atlas",
        "amata",
        "las_at",
        "latent_at",
        "rmcla",
    }
    for script, name, signature in rows:
        function = getattr(importlib.import_module(script), name)
        assert str(inspect.signature(function)) == f"({signature})", (script, name)
