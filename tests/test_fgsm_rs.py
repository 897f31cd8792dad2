"""fgsm_rs.py end to end (subprocess, tiny CIFAR-10, small WRN) and its FGSM step."""
import os

import torch

import common
import fgsm_rs
from conftest import check_outputs, check_resume, run_script, small_args


def test_end_to_end_writes_every_output(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("fgsm_rs.py", small_args(cifar_dir, out))
    res = check_outputs(out, epochs=2)
    assert res["method"] == "fgsm_rs" and res["args"]["epsilon"] == 8 and res["args"]["alpha"] == 10
    # the log line of each epoch reaches stdout too
    assert sum(line.split()[0] in ("1", "2") for line in proc.stdout.splitlines() if line.strip()) == 2
    # weights load into a fresh model with load_state_dict
    model = common.make_model("wrn-10-1", "cifar10")
    model.load_state_dict(torch.load(os.path.join(out, "model_last.pt")))


def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path):
    check_resume("fgsm_rs.py", cifar_dir, tmp_path)


def test_resume_with_previous_init_and_early_stop(cifar_dir, tmp_path):
    # the previous-batch δ and the early-stop weights live in the checkpoint too
    a, _ = check_resume("fgsm_rs.py", cifar_dir, tmp_path, delta_init="previous", early_stop=True)
    assert all("es_acc" in r for r in a["epochs"])
