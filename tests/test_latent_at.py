"""latent_at.py (SLAT): the hooks, the copyable core (one backward, the perturbation sizes, fp32 latents under bf16),
the schedule, and the script end to end."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import check_outputs, check_resume, copy_of, load_results, small_args, write_cifar

import common
import imagenet
import latent_at

EXPECTED_LAYERS = {
    "preact18": {"conv1", "layer1"},
    "wrn-10-1": {"conv1", "block1"},
    "mnist-cnn": {"net.0", "net.2"},
    "lenet": {"net.0", "net.3"},
}


def make(name, dropout=0.0):
    shape = (1, 28, 28) if name in ("mnist-cnn", "lenet") else (3, 32, 32)
    return common.make_model(name, 10, shape, (0.5,) * shape[0], (0.25,) * shape[0], dropout)


def model_and_batch(name, n=6, seed=0):
    torch.manual_seed(seed)
    model = make(name).train()
    x = torch.rand((n,) + ((1, 28, 28) if name in ("mnist-cnn", "lenet") else (3, 32, 32)))
    x[0] = 0.0  # pixels at the ends of the range: δ₀ must keep x+δ₀ in [0, 1]
    x[1] = 1.0
    return model, x, torch.arange(n) % 10


def watch(model, layers):
    """Per pass, the input of the model and each latent layer's output before and after latent_at's hook (its
    hooks must be registered before this is called: the 'raw' hooks are prepended)."""
    seen = {"input": [], "raw": [], "out": []}
    model.register_forward_pre_hook(lambda m, i: seen["input"].append(i[0].detach()))
    modules = dict(model.named_modules())
    for k, name in enumerate(layers):
        modules[name].register_forward_hook(
            lambda m, i, out: seen["raw"].append(out.detach()), prepend=True
        )
        modules[name].register_forward_hook(lambda m, i, out: seen["out"].append(out.detach()))
    return seen


def by_hand(model, layers, x, y):
    """Pass 1 written out: the clean CE's gradient at the input and at each latent layer's output."""
    latents, handles = [], []
    modules = dict(model.named_modules())
    for name in layers:
        handles.append(modules[name].register_forward_hook(lambda m, i, out: latents.append(out)))
    d = torch.zeros_like(x, requires_grad=True)
    grads = torch.autograd.grad(F.cross_entropy(model(x + d), y), [d, *latents])
    for h in handles:
        h.remove()
    return grads


@pytest.mark.parametrize("name", list(EXPECTED_LAYERS))
def test_hooks_fire_on_exactly_the_latent_layers(name):
    model, x, _ = model_and_batch(name)
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers(name), eta=0.03)
    assert {n for n, m in model.named_modules() if m._forward_hooks} == EXPECTED_LAYERS[name]
    # what the hooks record is exactly the output of those modules, in network order
    outputs, modules = {}, dict(model.named_modules())
    for layer in EXPECTED_LAYERS[name]:
        modules[layer].register_forward_hook(
            lambda m, i, out, layer=layer: outputs.__setitem__(layer, out)
        )
    latent.recording = True
    model(x)
    assert [id(h) for h in latent.latents] == [
        id(outputs[n]) for n in latent_at.latent_layers(name)
    ]


def test_the_core_copies_and_is_the_algorithm_written_out():
    """slat_loss and LatentPerturbation defined again with torch alone: one backward in pass 1 (∇x and every ∇h_k),
    δ₀ = 0.9ε·sign(∇x) from zero, δ_k = η·sign(∇h_k) within each latent's per-sample, per-channel range, and the loss
    is pass 2's CE."""
    slat_loss, LatentPerturbation = (
        copy_of(latent_at.slat_loss),
        copy_of(latent_at.LatentPerturbation),
    )
    model, x, y = model_and_batch("wrn-10-1")
    layers, eps, alpha, eta = latent_at.latent_layers("wrn-10-1"), 8 / 255, 0.9 * 8 / 255, 0.05
    reference = copy.deepcopy(model)
    grad_x, *grad_h = by_hand(reference, layers, x, y)
    latent = LatentPerturbation(model, layers, eta)
    seen = watch(model, layers)
    backward_passes = []
    model.fc.register_full_backward_hook(lambda *a: backward_passes.append(1))
    loss, logits = slat_loss(model, latent, x, y, eps, alpha)
    assert (
        len(backward_passes) == 1
    )  # ∇x and both ∇h_k came out of a single backward through the net
    assert all(p.grad is None for p in model.parameters())  # the weights' gradients are left alone
    assert len(seen["input"]) == 2 and torch.equal(
        seen["input"][0], x
    )  # pass 1 is clean: no random start
    # δ₀: 0.9ε·sign(∇x), a valid image, the size cut only by [0, 1]
    delta = seen["input"][1] - x
    expected = (x + alpha * grad_x.sign()).clamp(0, 1) - x
    torch.testing.assert_close(delta, expected, atol=1e-7, rtol=0)
    free = ((x + alpha) <= 1) & ((x - alpha) >= 0)
    assert (
        (x + delta).min() >= 0 and (x + delta).max() <= 1 and delta.abs()[free].min() > alpha - 1e-6
    )
    assert (delta[0] >= 0).all() and (delta[1] <= 0).all()  # the images at 0 and at 1
    # δ_k in pass 2 (seen[...][2:]): η·sign(∇h_k) wherever the range does not cut it; h_k + δ_k in the range
    for k, (h, out) in enumerate(zip(seen["raw"][2:], seen["out"][2:])):
        step = eta * grad_h[k].sign()
        lo, hi = h.amin((2, 3), keepdim=True), h.amax((2, 3), keepdim=True)
        assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
        inside = (h + step <= hi) & (h + step >= lo)
        torch.testing.assert_close((out - h)[inside], step[inside], atol=1e-6, rtol=0)
        assert (
            (out - h).abs().max() <= eta + 1e-6 and (~inside).any() and inside.float().mean() > 0.5
        )
    # the loss and logits are pass 2's, and its backward is the weight step
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_with_zero_eta_the_loss_is_fgsm_of_size_point_nine_eps_without_random_start():
    model, x, y = model_and_batch("wrn-10-1")
    eps = 8 / 255
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("wrn-10-1"), eta=0.0)
    reference = copy.deepcopy(model)
    loss, _ = latent_at.slat_loss(model, latent, x, y, eps, 0.9 * eps)
    weight_grads = torch.autograd.grad(loss, list(model.parameters()))
    # FGSM written out: from δ = 0, one step 0.9ε·sign(∇), projected to the ε-ball and [0, 1]
    d = torch.zeros_like(x, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(reference(x + d), y), d)
    fgsm_loss = F.cross_entropy(
        reference((x + (0.9 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1)), y
    )
    torch.testing.assert_close(loss, fgsm_loss)
    for a, b in zip(weight_grads, torch.autograd.grad(fgsm_loss, list(reference.parameters()))):
        torch.testing.assert_close(a, b)
    # and with η > 0 the same batch gives another loss: the latent perturbations do act, and raise the loss
    latent.eta = 0.05
    model.load_state_dict(reference.state_dict())
    assert latent_at.slat_loss(model, latent, x, y, eps, 0.9 * eps)[0] > fgsm_loss + 1e-4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_core_leaves_the_mode_and_runs_both_passes_in_it(mode):
    """Both passes in the mode found (train in the authors' code: BN takes both batches in); no mode change."""
    model, x, y = model_and_batch("wrn-10-1")
    model.train(mode == "train")
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("wrn-10-1"), eta=0.03)
    before = model.bn1.num_batches_tracked.item()
    latent_at.slat_loss(model, latent, x, y, 8 / 255, 7.2 / 255)
    assert model.training == (mode == "train")
    assert model.bn1.num_batches_tracked.item() == before + (2 if mode == "train" else 0)


def test_the_core_refuses_normalised_images():
    model, x, y = model_and_batch("wrn-10-1")
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("wrn-10-1"), eta=0.03)
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        latent_at.slat_loss(model, latent, (x - 0.5) / 0.25, y, 8 / 255, 7.2 / 255)
    assert not latent.recording and latent.signs is None  # idle again after the failure


# the module that receives each latent layer's output: the first BatchNorm of the next residual block.
# wrn-10-2: block1 ends in a sum of two convs (its shortcut is a conv), so both of its latents are bf16;
# preact18: layer1 has identity shortcuts, so its output is conv1's, in fp32 once conv1's δ is added.
NEXT_LAYER = {
    "wrn-10-2": ("block1.0.bn1", "block2.0.bn1"),
    "preact18": ("layer1.0.bn1", "layer2.0.bn1"),
}


@pytest.mark.parametrize("name", list(NEXT_LAYER))
def test_latent_step_survives_bf16_autocast(name):
    model, x, y = model_and_batch(name, n=2)
    with (
        torch.no_grad()
    ):  # larger latents: |h_k| from below 8 to well past 16, every regime of bf16's grid
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight *= 16
    eta = 8 / 255
    layers = latent_at.latent_layers(name)
    latent = latent_at.LatentPerturbation(model, layers, eta)
    raw, received, signs = {}, {}, {}
    modules = dict(model.named_modules())
    for k, (layer, consumer) in enumerate(zip(layers, NEXT_LAYER[name])):
        modules[layer].register_forward_hook(
            lambda m, i, out, k=k: raw.__setitem__(k, out.detach()), prepend=True
        )
        # the signs of pass 2, as latent_at's hook reads them
        modules[layer].register_forward_hook(
            lambda m, i, out, k=k: latent.signs and signs.__setitem__(k, latent.signs[k]),
            prepend=True,
        )
        modules[consumer].register_forward_pre_hook(
            lambda m, i, k=k: received.__setitem__(k, i[0].detach())
        )
    latent_at.slat_loss(model, latent, x, y, 8 / 255, 7.2 / 255, autocast=torch.bfloat16)
    for k in range(len(layers)):
        assert raw[k].dtype == (torch.float32 if (name, k) == ("preact18", 1) else torch.bfloat16)
        h, step = raw[k].float(), eta * signs[k].float()
        lo, hi = h.amin((2, 3), keepdim=True), h.amax((2, 3), keepdim=True)
        inside = (h + step <= hi) & (h + step >= lo) & (step != 0)
        # both trouble zones are well populated: there bf16 would give 2η (8 ≤ |h| < 16) or 0 (|h| ≥ 16)
        assert (inside & (h.abs() >= 8) & (h.abs() < 16)).sum() > 100 and (
            inside & (h.abs() >= 16)
        ).sum() > 100
        # what the next layer receives is h_k + η·sign(∇h_k), to fp32 precision, at every size of h_k
        torch.testing.assert_close(
            (received[k].float() - h)[inside], step[inside], atol=1e-5, rtol=0
        )


def test_fp16_scales_pass_one_so_its_signs_do_not_underflow():
    """Under float16 the clean loss is scaled by 2^10 before its backward: the signs of ∇x are fp32's. Unscaled, a
    loss of 0.003 (a confident net) leaves 40% of the fp16 input gradient at zero, and δ₀ there at zero."""
    torch.manual_seed(0)
    model = make("wrn-10-1").eval()
    with torch.no_grad():
        model.fc.bias.copy_(torch.full((10,), -4.0).scatter(0, torch.tensor(0), 4.0))
    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("wrn-10-1"), eta=0.0)
    seen, deltas = watch(model, []), {}
    for dtype in (None, torch.float16):
        seen["input"].clear()
        latent_at.slat_loss(model, latent, x, y, 8 / 255, 7.2 / 255, autocast=dtype)
        deltas[dtype] = seen["input"][1] - x
    moved = deltas[None] != 0
    assert moved.float().mean() > 0.95
    assert (deltas[torch.float16] != 0).float().mean() > 0.95  # not underflowed to a zero gradient
    assert (torch.sign(deltas[torch.float16]) == torch.sign(deltas[None])).float().mean() > 0.95


def test_wrn_gets_the_authors_dropout():
    assert latent_at.get_args(["--model", "wrn-10-1"]).dropout == 0.3
    assert latent_at.get_args(["--model", "wrn-10-1", "--dropout", "0"]).dropout == 0
    assert (
        latent_at.get_args([]).dropout == 0
        and latent_at.get_args(["--dataset", "mnist"]).dropout == 0
    )
    for bad in (
        ["--dropout", "0.3"],
        ["--model", "wrn-10-1", "--dropout", "1"],
    ):  # preact18 has no dropout
        with pytest.raises(SystemExit) as e:
            latent_at.get_args(bad)
        assert e.value.code == 2


def test_eval_output_is_unchanged_by_the_hooks():
    model, x, y = model_and_batch("preact18", n=4)
    plain = copy.deepcopy(model)
    latent = latent_at.LatentPerturbation(model, latent_at.latent_layers("preact18"), eta=0.05)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
    # after a training step (both passes), the hooks are idle again: eval equals the same weights unhooked
    model.train()
    latent_at.slat_loss(model, latent, x, y, 8 / 255, 7.2 / 255)[0].backward()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
        assert torch.equal(model.train()(x), plain.train()(x))


def test_end_to_end_and_resume(cifar_dir, tmp_path):
    a, _ = check_resume("latent_at.py", cifar_dir, tmp_path)
    check_outputs(str(tmp_path / "full"), epochs=2)
    assert (
        a["method"] == "latent_at"
        and a["args"]["alpha"] == pytest.approx(7.2)
        and a["args"]["eta"] == 8
    )
    assert (
        a["args"]["dropout"] == 0.3
    )  # small_args' wrn-10-1: the authors' WRN dropout, resumed exactly
    # the triangle 0 → 0.2 over the first 2/5 of the 16 iterations (8 batches of 32 per epoch), then → 0 over 3/5:
    # after iteration 8 it has come down (8 − 6.4)/9.6 of the way, and the run ends at 0
    assert a["train_images"] == 256
    assert a["epochs"][0]["lr"] == pytest.approx(0.2 * (1 - (8 - 6.4) / 9.6))
    assert a["epochs"][1]["lr"] == 0


def test_the_lr_triangle_completes_when_the_loader_drops_a_lone_sample(
    tmp_path, no_checksum, monkeypatch
):
    """129 images in batches of 128: the lone 129th is dropped, an epoch is one step, and the triangle (0 → lr over
    2/5 of the steps, → 0) must end at 0. Also: the WRN is built with the authors' dropout, in every block."""
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    built, real = [], common.get_model
    monkeypatch.setattr(
        common, "get_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    out = str(tmp_path / "run")
    latent_at.main(
        small_args(
            str(tmp_path / "d"),
            out,
            epochs=4,
            batch_size=128,
            monitor_size=8,
            eval_samples=8,
            eval_cw_iters=0,
            eval_iters=1,
        )
    )
    lrs = [r["lr"] for r in load_results(out)["epochs"]]
    assert (
        lrs == pytest.approx([0.2 / 1.6, 0.2 * (1 - 0.4 / 2.4), 0.2 * (1 - 1.4 / 2.4), 0.0])
        and lrs[-1] == 0
    )
    blocks = [m for m in built[0].modules() if isinstance(m, common.PreActBlock)]
    assert blocks and all(b.dropout == 0.3 for b in blocks)


def test_mnist_recipe_trains_its_cnn_in_fp32(mnist_dir, tmp_path, monkeypatch):
    """Adam without momentum cycling, Wong's MNIST CNN with its two convs perturbed; under --precision bf16 (the GPU
    path) the CNN's passes still run in fp32: its latents feed a conv, whose bf16 input would round δ_k away."""
    seen, real = [], latent_at.slat_loss
    monkeypatch.setattr(latent_at, "slat_loss", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    out = str(tmp_path / "run")
    latent_at.main(
        small_args(
            mnist_dir,
            out,
            epochs=1,
            dataset="mnist",
            model="mnist-cnn",
            batch_size=50,
            precision="bf16",
        )
    )
    res = load_results(out)
    assert (
        res["args"]["optimizer"] == "adam"
        and res["args"]["eta"] == 76.5
        and res["args"]["lr"] == 5e-3
    )
    assert res["args"]["alpha"] == pytest.approx(0.9 * 76.5) and math.isfinite(
        res["epochs"][0]["loss"]
    )
    assert seen and set(seen) == {None}
    # --epsilon alone keeps α = 0.9ε and η = ε
    args = latent_at.get_args(["--dataset", "mnist", "--epsilon", "51"])
    assert args.alpha == pytest.approx(0.9 * 51) and args.eta == pytest.approx(51)


def test_lr_schedule_imagenet_is_the_imagenet_recipes_and_works_on_any_data(tmp_path, no_checksum):
    """ImageNet's schedule is chosen by --lr-schedule imagenet (its recipe sets it), as in the other scripts."""
    assert latent_at.get_args([]).lr_schedule == "cyclic"
    assert latent_at.get_args(["--dataset", "mnist"]).lr_schedule == "cyclic"
    assert latent_at.get_args(["--dataset", "imagenet"]).lr_schedule == "imagenet"
    write_cifar(str(tmp_path / "d"), n_train=129, n_test=8)
    out = str(tmp_path / "run")
    small = dict(batch_size=128, monitor_size=8, eval_samples=8, eval_cw_iters=0, eval_iters=1)
    latent_at.main(small_args(str(tmp_path / "d"), out, lr_schedule="imagenet", **small))
    # one step per epoch; imagenet.imagenet_lr's lr after each
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = imagenet.imagenet_lr(probe, type("Loader", (), {"batches": lambda self, e: 1})(), 2)
    lrs = []
    for _ in range(2):
        probe.step()
        sched.step()
        lrs.append(probe.param_groups[0]["lr"])
    assert [r["lr"] for r in load_results(out)["epochs"]] == pytest.approx(lrs) and lrs[0] > 0


def test_eta_is_checked_as_a_255_unit(capsys):
    """--eta is in /255 units like ε: a [0, 1] value is refused with the value to write; 0 (no latent step) is not."""
    assert latent_at.get_args(["--eta", "0"]).eta == 0
    with pytest.raises(SystemExit) as err:
        latent_at.get_args(["--eta", "0.5"])
    assert err.value.code == 2 and "write --eta 127.5" in capsys.readouterr().err
