"""The GPU path on the CPU: every script trains one epoch in bf16 autocast with channels_last tensors
(FASTAT_CPU_BF16=1), so that dtype and layout errors of the mixed-precision path (ATLAS's double backward,
SLAT's hooks, MEP's memories, LAS-AT's per-sample PGD) fail here and not first on a GPU."""
import math

import pytest
import torch

import common
from conftest import load_results, run_script, small_args

SCRIPTS = ["fgsm_rs.py", "fgsm_sdi.py", "fgsm_mep.py", "atlas.py", "amata.py", "las_at.py", "latent_at.py",
           "rmcla.py"]
# Small attacks: bf16 runs slowly on a CPU without bf16 units, and what is tested is the path, not the method.
OWN_FLAGS = {"atlas.py": ["--val-size", "32", "--val-iters", "2"], "amata.py": ["--k-min", "2", "--k-max", "2"],
             "las_at.py": ["--strategy-model", "wrn-10-1", "--iters-set", "1", "2", "--strategy-every", "4"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_epoch_in_bf16_autocast_and_channels_last(cifar_dir, tmp_path, script):
    out = str(tmp_path / "run")
    run_script(script, small_args(cifar_dir, out, epochs=1, eval_samples=8, monitor_size=8) + OWN_FLAGS.get(script, []),
               env={"FASTAT_CPU_BF16": "1"})
    res = load_results(out)
    assert res["precision"] == "bf16 autocast, channels_last"
    assert math.isfinite(res["epochs"][0]["loss"]) and 0 <= res["final"]["last"]["clean"] <= 1


def test_the_switch_changes_dtype_and_layout(monkeypatch):
    model = common.make_model("wrn-10-1", "cifar10")
    x = torch.rand(2, 3, 32, 32)
    monkeypatch.delenv("FASTAT_CPU_BF16", raising=False)
    assert not common.gpu_path("cpu") and common.gpu_path("cuda")
    monkeypatch.setenv("FASTAT_CPU_BF16", "1")
    assert common.gpu_path("cpu")
    run = common.Run.__new__(common.Run)  # only autocast() is used: no run directory needed
    run.device = torch.device("cpu")
    with run.autocast():
        assert model(x).dtype == torch.bfloat16
