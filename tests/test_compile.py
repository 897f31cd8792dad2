"""--compile, the GPU speed path, in every method script: a compiled run computes the eager run's gradients.

Each script trains one epoch of 48 images in batches of 32 and 16, so that the compiled graphs are compiled again
for the smaller last batch, and every optimiser step of the run (the target's, FGSM-SDI's generator's, LAS-AT's
strategy's and ŵ's) must see the eager run's gradients. Most cases compile with the aot_eager backend: dynamo and
AOTAutograd, where graph breaks, functionalised in-place updates (BatchNorm's running statistics) and saved-tensor
versions are decided, without inductor's code generation, which takes minutes per script on a CPU; one case
(FGSM-MEP, whose regulariser backpropagates one compiled pass twice) runs inductor itself.
"""

import functools
import importlib

import pytest
import torch
from conftest import small_args, write_cifar
from torch.optim.optimizer import register_optimizer_step_pre_hook

# Each script's flags for a one-epoch run: every generator and strategy update inside the epoch, and the
# schedules' own checks satisfied.
SCRIPTS = {
    "fgsm_rs": {},
    "fgsm_sdi": {"gen_every": 1},
    "fgsm_mep": {},
    "atlas": {"ramp_epochs": 0},
    "amata": {"milestones": True},
    "las_at": {"strategy_every": 1, "strategy_model": "wrn-10-1", "iters_set": 2},
    "latent_at": {},
    "rmcla": {"milestones": True},
    "free_at": {"replays": 2},
    "grad_align": {},
    "fgsm_ckpt": {"milestones": True},
    "n_fgsm": {},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """48 training images: batches of 32 and 16."""
    root = str(tmp_path_factory.mktemp("cifar48"))
    write_cifar(root, n_train=48, n_test=8)
    return root


def gradients_of_a_run(script, argv):
    """Every optimiser step's gradients, in order, over one run of SCRIPT.main(argv)."""
    steps = []

    def record(opt, *_):
        grads = [p.grad for group in opt.param_groups for p in group["params"]]
        steps.append([g.clone() for g in grads if g is not None])

    handle = register_optimizer_step_pre_hook(record)
    try:
        importlib.import_module(script).main(argv)
    finally:
        handle.remove()
    return steps


def compare_compiled_to_eager(script, data_dir, tmp_path, backend):
    """Runs SCRIPT eagerly and with --compile on `backend`; returns the batch sizes the compiled graphs saw."""
    batches = []
    backend_fn = torch._dynamo.lookup_backend(backend)

    def counting(gm, example_inputs):
        images = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4]
        batches.extend(str(t.shape[0]) for t in images if tuple(t.shape[1:]) == (3, 32, 32))
        return backend_fn(gm, example_inputs)

    real_compile = torch.compile
    extra = dict(
        epochs=1,
        batch_size=32,
        monitor_size=8,
        eval_samples=8,
        eval_iters=1,
        eval_restarts=1,
        eval_cw_iters=0,
        **SCRIPTS[script],
    )
    eager = gradients_of_a_run(script, small_args(data_dir, str(tmp_path / "eager"), **extra))
    # A fresh dynamo: no graph or recompilation count is carried over from another script's run.
    torch._dynamo.reset()
    torch.compile = functools.partial(real_compile, backend=counting)
    try:
        argv = small_args(data_dir, str(tmp_path / "compiled"), compile=True, **extra)
        compiled = gradients_of_a_run(script, argv)
    finally:
        torch.compile = real_compile
        torch._dynamo.reset()
    assert len(eager) == len(compiled) >= 2
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert len(a) == len(b), step
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6, msg=f"optimiser step {step}")
    return batches


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_compiled_run_has_the_eager_gradients(script, data_dir, tmp_path, no_checksum):
    batches = compare_compiled_to_eager(script, data_dir, tmp_path, "aot_eager")
    # compiled for the first batch, then again for the smaller last one (16, or a symbolic batch size)
    assert "32" in batches and len(set(batches)) >= 2


def test_inductor_compiles_fgsm_mep_like_eager(data_dir, tmp_path, no_checksum):
    """FGSM-MEP's forward at x + δ_pgi is backpropagated twice (line 12's input gradient, then line 16's weight
    step) and sits between two BatchNorm updates; inductor's generated code must give eager's gradients too."""
    batches = compare_compiled_to_eager("fgsm_mep", data_dir, tmp_path, "inductor")
    assert "32" in batches and len(set(batches)) >= 2
