"""latent_at.py (SLAT): the hooks, the single backward, the perturbation sizes, and the script end to end."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
import latent_at
from conftest import check_outputs, check_resume, load_results, run_script, small_args

SPEC_LAYERS = {"preact18": {"conv1", "layer1"}, "wrn-10-1": {"conv1", "block1"}, "mnist-cnn": {"net.0", "net.2"}}


def model_and_batch(name, n=6, seed=0):
    torch.manual_seed(seed)
    dataset = "mnist" if name == "mnist-cnn" else "cifar10"
    model = common.make_model(name, dataset).train()
    x = torch.rand((n,) + common.DATASETS[dataset]["shape"])
    x[0] = 0.0  # pixels at the ends of the range: δ₀ must keep x+δ₀ in [0, 1]
    x[1] = 1.0
    return model, x, torch.arange(n) % 10


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)  # what Run.autocast does on CUDA, on the CPU


@pytest.mark.parametrize("name", list(SPEC_LAYERS))
def test_hooks_fire_on_exactly_the_spec_layers(name):
    model, x, _ = model_and_batch(name)
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers(name), eta=0.03)
    hooked = {n for n, m in model.named_modules() if m._forward_hooks}
    assert hooked == SPEC_LAYERS[name]
    # what the hooks record in pass 1 is exactly the output of those modules, in network order
    outputs = {}
    modules = dict(model.named_modules())
    for layer in SPEC_LAYERS[name]:
        modules[layer].register_forward_hook(lambda m, i, out, layer=layer: outputs.__setitem__(layer, out))
    with latent.record():
        model(x)
    assert [id(h) for h in latent.latents] == [id(outputs[n]) for n in latent_at.latent_layers(name)]


def test_one_backward_fills_every_gradient():
    model, x, y = model_and_batch("wrn-10-1")
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("wrn-10-1"), eta=0.03)
    backward_passes = []
    model.fc.register_full_backward_hook(lambda *a: backward_passes.append(1))
    delta, signs = latent_at.slat_perturbations(model, latent, x, y, 8 / 255, 7.2 / 255, no_autocast)
    assert len(backward_passes) == 1  # ∇x and both ∇h_k came out of a single backward through the net
    assert delta.abs().sum() > 0 and len(signs) == 2 and all(s.abs().sum() > 0 for s in signs)
    assert signs[0].shape == (6, 16, 32, 32) and signs[1].shape == (6, 16, 32, 32)  # conv1, block1 outputs
    assert all(p.grad is None for p in model.parameters())  # the weights' gradients are left alone


def test_each_delta_has_the_spec_size_and_stays_in_range():
    model, x, y = model_and_batch("wrn-10-1")
    eps, alpha, eta = 8 / 255, 0.9 * 8 / 255, 0.05
    layers = latent_at.latent_layers("wrn-10-1")
    latent = latent_at.LatentPerturbation(model, layers, eta)
    raw, perturbed = {}, {}
    modules = dict(model.named_modules())
    for k, name in enumerate(layers):  # outputs before and after latent_at's hook, in the perturbed pass
        modules[name].register_forward_hook(lambda m, i, out, k=k: raw.__setitem__(k, out.detach()), prepend=True)
        modules[name].register_forward_hook(lambda m, i, out, k=k: perturbed.__setitem__(k, out.detach()))
    delta, signs = latent_at.slat_perturbations(model, latent, x, y, eps, alpha, no_autocast)
    # δ₀: 0.9ε·sign(∇x) wherever [0, 1] does not cut it, never more, and x+δ₀ a valid image
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1 and delta.abs().max() <= alpha + 1e-7
    free = ((x + alpha) <= 1) & ((x - alpha) >= 0)
    torch.testing.assert_close(delta.abs()[free], torch.full_like(delta[free], alpha))
    assert (delta[0] >= 0).all() and (delta[1] <= 0).all()  # the images at 0 and at 1
    with latent.perturb(signs):
        model(x + delta)
    for k in range(len(layers)):
        h, d = raw[k], perturbed[k] - raw[k]
        lo, hi = h.amin((2, 3), keepdim=True), h.amax((2, 3), keepdim=True)
        # h_k + δ_k within each sample's per-channel range of h_k
        assert (perturbed[k] >= lo - 1e-6).all() and (perturbed[k] <= hi + 1e-6).all()
        # |δ_k| = η along sign(∇h_k) wherever the range does not cut it, and the cut happens somewhere
        inside = (h + eta * signs[k] <= hi) & (h + eta * signs[k] >= lo)
        torch.testing.assert_close(d[inside], (eta * signs[k])[inside], atol=1e-6, rtol=0)
        assert d.abs().max() <= eta + 1e-6 and (~inside).any()


def test_with_zero_eta_the_step_is_fgsm_of_size_point_nine_eps_without_random_start():
    model, x, y = model_and_batch("wrn-10-1")
    eps = 8 / 255
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("wrn-10-1"), eta=0.0)
    delta, signs = latent_at.slat_perturbations(model, latent, x, y, eps, 0.9 * eps, no_autocast)
    with latent.perturb(signs):
        loss = F.cross_entropy(model(x + delta), y)
    weight_grads = torch.autograd.grad(loss, list(model.parameters()))
    # FGSM written out: from δ = 0, one step 0.9ε·sign(∇), projected to the ε-ball and [0, 1]
    d = torch.zeros_like(x, requires_grad=True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
    fgsm = (x + (0.9 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    torch.testing.assert_close(delta, fgsm, atol=0, rtol=0)
    fgsm_loss = F.cross_entropy(model(x + fgsm), y)
    torch.testing.assert_close(loss, fgsm_loss)
    for a, b in zip(weight_grads, torch.autograd.grad(fgsm_loss, list(model.parameters()))):
        torch.testing.assert_close(a, b)
    # and with η > 0 the same batch gives another loss: the latent perturbations do act
    latent.eta = 0.05
    with latent.perturb(signs):
        assert not torch.allclose(F.cross_entropy(model(x + delta), y), loss)


# the module that receives each latent layer's output: the first BatchNorm of the next residual block.
# wrn-10-2: block1 ends in a sum of two convs (its shortcut is a conv), so both of its latents are bf16;
# preact18: layer1 has identity shortcuts, so its output is conv1's, in fp32 once conv1's δ is added.
NEXT_LAYER = {"wrn-10-2": ("block1.0.bn1", "block2.0.bn1"), "preact18": ("layer1.0.bn1", "layer2.0.bn1")}


@pytest.mark.parametrize("name", list(NEXT_LAYER))
def test_latent_step_survives_bf16_autocast(name):
    model, x, y = model_and_batch(name, n=4)
    with torch.no_grad():  # larger latents: |h_k| from below 8 to well past 16, every regime of bf16's grid
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight *= 16
    eta = 8 / 255
    layers = latent_at.latent_layers(name)
    latent = latent_at.LatentPerturbation(model, layers, eta)
    raw, received = {}, {}
    modules = dict(model.named_modules())
    for k, (layer, consumer) in enumerate(zip(layers, NEXT_LAYER[name])):
        modules[layer].register_forward_hook(lambda m, i, out, k=k: raw.__setitem__(k, out.detach()), prepend=True)
        modules[consumer].register_forward_pre_hook(lambda m, i, k=k: received.__setitem__(k, i[0].detach()))
    delta, signs = latent_at.slat_perturbations(model, latent, x, y, 8 / 255, 7.2 / 255, bf16_autocast)
    with latent.perturb(signs), bf16_autocast():
        model(x + delta)
    for k in range(len(layers)):
        assert raw[k].dtype == (torch.float32 if (name, k) == ("preact18", 1) else torch.bfloat16)
        h, step = raw[k].float(), eta * signs[k].float()
        lo, hi = h.amin((2, 3), keepdim=True), h.amax((2, 3), keepdim=True)
        inside = (h + step <= hi) & (h + step >= lo) & (step != 0)
        # both trouble zones are well populated: there bf16 would give 2η (8 ≤ |h| < 16) or 0 (|h| ≥ 16)
        assert (inside & (h.abs() >= 8) & (h.abs() < 16)).sum() > 100 and (inside & (h.abs() >= 16)).sum() > 100
        # what the next layer receives is h_k + η·sign(∇h_k), to fp32 precision, at every size of h_k
        torch.testing.assert_close((received[k].float() - h)[inside], step[inside], atol=1e-5, rtol=0)


def test_mnist_cnn_trains_in_fp32_the_residual_nets_in_bf16():
    # The MNIST CNN's latents go (through a ReLU) straight into a conv/linear, whose bf16 cast would round
    # h_k + δ_k back onto h_k's grid: its training passes run without autocast. The residual nets keep bf16.
    class Run:
        autocast = staticmethod(bf16_autocast)
    for name, bf16 in (("mnist-cnn", False), ("wrn-10-1", True), ("preact18", True)):
        with latent_at.training_autocast(Run, name)():
            assert torch.is_autocast_enabled("cpu") == bf16


def test_wrn_gets_the_authors_dropout():
    assert latent_at.get_args(["--model", "wrn-10-1"]).dropout == 0.3
    assert latent_at.get_args(["--model", "wrn-10-1", "--dropout", "0"]).dropout == 0
    assert latent_at.get_args([]).dropout == 0 and latent_at.get_args(["--dataset", "mnist"]).dropout == 0
    for bad in (["--dropout", "0.3"], ["--model", "wrn-10-1", "--dropout", "1"]):  # preact18 has no dropout
        with pytest.raises(SystemExit) as e:
            latent_at.get_args(bad)
        assert e.value.code == 2
    torch.manual_seed(0)
    model = common.make_model("wrn-16-1", "cifar10")
    plain = copy.deepcopy(model)
    latent_at.set_dropout(model, 0.3)
    x = torch.rand(8, 3, 32, 32)
    seen = {}  # what the first block's second conv receives, with and without dropout (same input before it)
    for tag, net in (("drop", model), ("plain", plain)):
        net.block1[0].conv2.register_forward_pre_hook(lambda m, i, tag=tag: seen.__setitem__(tag, i[0].detach()))
    model.train()
    plain.train()
    out = model(x)
    plain(x)
    # between the two convs: 30% of the activations dropped, the others scaled by 1/0.7
    kept, active = seen["drop"] != 0, seen["plain"] != 0
    torch.testing.assert_close(seen["drop"][kept], seen["plain"][kept] / 0.7)
    assert abs(1 - kept.sum() / active.sum() - 0.3) < 0.02
    assert all(block.dropout == 0.3 for block in model.modules() if isinstance(block, common.WideBasic))
    assert not torch.equal(out, model(x))  # a fresh mask in every pass
    plain.load_state_dict(model.state_dict())  # the same weights and BN statistics; dropout has no state
    with torch.no_grad():  # evaluation: no dropout, the same function as the WRN without it
        assert torch.equal(model.eval()(x), plain.eval()(x))


def test_eval_output_is_unchanged_by_the_hooks():
    model, x, y = model_and_batch("preact18", n=4)
    plain = copy.deepcopy(model)
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("preact18"), eta=0.05)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
    # after a training step (both passes), the hooks are idle again: eval equals the same weights unhooked
    model.train()
    delta, signs = latent_at.slat_perturbations(model, latent, x, y, 8 / 255, 7.2 / 255, no_autocast)
    with latent.perturb(signs):
        F.cross_entropy(model(x + delta), y).backward()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
        assert torch.equal(model.train()(x), plain.train()(x))


def test_end_to_end_and_resume(cifar_dir, tmp_path):
    a, _ = check_resume("latent_at.py", cifar_dir, tmp_path)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert a["method"] == "latent_at" and a["args"]["alpha"] == pytest.approx(7.2) and a["args"]["eta"] == 8
    assert a["args"]["dropout"] == 0.3  # small_args' wrn-10-1: the authors' WRN dropout, resumed exactly
    # the triangle 0 → 0.2 over the first 2/5 of the 16 iterations (12 of 30 epochs), then → 0 over 3/5:
    # after iteration 8 it has come down (8 − 6.4)/9.6 of the way, and the run ends at 0
    assert a["epochs"][0]["lr"] == pytest.approx(0.2 * (1 - (8 - 6.4) / 9.6))
    assert a["epochs"][1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_mnist_recipe_runs(mnist_dir, tmp_path):
    # Adam without momentum cycling, Wong's MNIST CNN with its two convs perturbed
    out = str(tmp_path / "run")
    run_script("latent_at.py", small_args(mnist_dir, out, epochs=1, dataset="mnist", model="mnist-cnn",
                                          batch_size=50))
    res = load_results(out)
    assert res["args"]["optimizer"] == "adam" and res["args"]["eta"] == 76.5 and res["args"]["lr_max"] == 5e-3
    assert res["args"]["alpha"] == pytest.approx(0.9 * 76.5) and math.isfinite(res["epochs"][0]["loss"])
