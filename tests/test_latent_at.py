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
