"""The GPU path on the CPU: every script trains one epoch under `--precision bf16` (bf16 autocast, channels_last
tensors), so that dtype and layout errors of the mixed-precision path (ATLAS's double backward, SLAT's hooks, MEP's
memories, LAS-AT's per-sample PGD) fail here and not first on a GPU; FGSM-RS also under fp16 with loss scaling."""

import importlib
import math

import pytest
import torch
from conftest import load_results, small_args

import common
import harness

SCRIPTS = ["fgsm_rs", "fgsm_sdi", "fgsm_mep", "atlas", "amata", "las_at", "latent_at", "rmcla"]
SCRIPTS += ["free_at", "grad_align", "fgsm_ckpt", "n_fgsm"]
# Small attacks: bf16 runs slowly on a CPU without bf16 units, and what is tested is the path, not the method.
OWN_FLAGS = {
    "atlas": ["--val-size", "32", "--val-iters", "2", "--ramp-epochs", "0"],
    "amata": ["--k-min", "2", "--k-max", "2", "--milestones"],
    "rmcla": ["--milestones"],
    "fgsm_ckpt": ["--milestones"],
    "las_at": ["--strategy-model", "wrn-10-1", "--iters-set", "1", "2", "--strategy-every", "8"],
}


@pytest.mark.parametrize("script,precision", [(s, "bf16") for s in SCRIPTS] + [("fgsm_rs", "fp16")])
def test_one_epoch_in_reduced_precision_and_channels_last(
    cifar_dir, tmp_path, no_checksum, script, precision
):
    out = str(tmp_path / "run")
    args = small_args(cifar_dir, out, epochs=1, eval_samples=8, monitor_size=8, precision=precision)
    importlib.import_module(script).main(args + OWN_FLAGS.get(script, []))
    res = load_results(out)
    assert res["precision"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert math.isfinite(res["epochs"][0]["loss"]) and 0 <= res["final"]["last"]["clean"] <= 1


def test_the_flag_sets_the_autocast_dtype_and_the_layout(tmp_path, cifar_dir, no_checksum):
    import fgsm_rs

    for precision, dtype, layout in (
        ("auto", None, False),
        ("fp32", None, False),
        ("bf16", torch.bfloat16, True),
        ("fp16", torch.float16, True),
    ):
        args = fgsm_rs.get_args(
            small_args(cifar_dir, str(tmp_path / precision), precision=precision)
        )
        data = common.get_data(args)
        run = harness.Run(args, data)
        assert run.amp == dtype and run.scaler.is_enabled() == (
            dtype == torch.float16
        )  # auto on a CPU: fp32
        x, _, _ = next(data.train.epoch(0))
        model = common.get_model(args, data)
        assert x.is_contiguous(memory_format=torch.channels_last) == layout
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == layout
        with run.autocast():
            assert model(x).dtype == (dtype or torch.float32)
        harness._end_previous_run()
