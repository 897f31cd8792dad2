"""Single-step latent adversarial training (SLAT).

Park & Lee, "Reliably fast adversarial training via latent adversarial perturbation", ICCV 2021, arXiv:2104.01575
(and its supplementary material). Authors' code: github.com/geonyeong-park/SLAT (the method is named `advGNI`).

    python latent_at.py                                   # CIFAR-10 recipe: PreActResNet18, 30 epochs
    python latent_at.py --model wrn-28-10                 # the authors' wide net: WRN-28-10, dropout 0.3
    python latent_at.py --dataset mnist --data-dir DIR    # MNIST: Wong's CNN and optimiser, 10 epochs (our choice)

Paper: the main text was not available to us, so no number of it is quoted (DECISIONS.md, 'SLAT perturbations');
the abstract claims FGSM cost and better robustness than other single-step methods.
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Each iteration (the authors' model/hidden_module.py and solver.py, advGNI; DECISIONS.md, 'SLAT perturbations'),
with h_k the output of latent layer k (PreActResNet18: conv1 and layer1; WRN: conv1 and block1), reached through
forward hooks so that the networks stay unchanged:
    pass 1 (clean, train mode):  L = CE(f(x), y); ONE backward gives ∇x L and every ∇h_k L
    δ₀  = 0.9ε·sign(∇x L), clamped so that x+δ₀ ∈ [0, 1]                      (no random start)
    δ_k = η·sign(∇h_k L), clamped so that h_k+δ_k stays in the per-sample, per-channel range of h_k  (η = ε)
    pass 2 (perturbed, train mode):  θ ← θ − lr·∇θ CE(f(x+δ₀; h_k+δ_k), y)
Two forward/backward passes per batch, as FGSM-RS. h_k + δ_k is formed in fp32 under bf16 or fp16 autocast: on
h_k's bf16 grid a step of 8/255 would double for 8 ≤ |h_k| < 16 and vanish from 16 up.

The authors' code trains WRN-28-10 with dropout 0.3 in every block (their WideResNet); with `--model wrn-*` this
script does the same (`--dropout`, default 0.3; `--dropout 0` is the WRN of the other scripts). Dropout draws a
fresh mask in each of the two passes, as in the code (both in train mode).
"""

import torch
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # Supplementary §2 and the authors' config.yaml: SGD momentum 0.9, wd 5e-4, lr 0 → 0.2 over 12 epochs, → 0 over
    # 18; δ₀ = 0.9ε (advGNI alpha 0.9: α = 7.2/255), η = ε (one `eta` sets both).
    "default": dict(
        epochs=30,
        batch_size=128,
        lr=0.2,
        epsilon=8,
        alpha=7.2,
        eta=8,
        weight_decay=5e-4,
        optimizer="sgd",
        lr_schedule="cyclic",
    ),
    "tiny-imagenet": dict(batch_size=64),  # supplementary §2: 64 "to reduce the memory consumption"
    # No MNIST recipe in the sources (DECISIONS.md, 'Our MNIST recipes'): Wong's MNIST optimiser as in fgsm_rs.py
    # (Adam, peak 5e-3, 10 epochs, batch 100, ε = 0.3), α = 0.9ε. Its lr peaks at 2/5 of training, the same triangle
    # as 12/30 here. η = ε = 0.3 at the latents too (DECISIONS.md, 'SLAT eta on MNIST'): relative to the latents a far
    # larger step than on CIFAR-10, about one standard deviation of the CNN's first-conv outputs (trained on the MNIST
    # subset; 1.3 at initialisation) and a quarter of their per-sample, per-channel range, where 8/255 is 0.06 of
    # PreActResNet18's conv1 std at initialisation. The clamp to that range keeps h_k + δ_k inside it; `--eta` sets
    # another size.
    "mnist": dict(
        epochs=10,
        batch_size=100,
        lr=5e-3,
        epsilon=76.5,
        alpha=68.85,
        eta=76.5,
        weight_decay=0.0,
        optimizer="adam",
    ),
    # ImageNet: no recipe in the supplement: imagenet.IMAGENET, Wong et al.'s, with its lr (imagenet.imagenet_lr).
    "imagenet": dict(optimizer="sgd", lr_schedule="imagenet"),
}

# The latent layers whose outputs are perturbed (the input is layer 0): the authors' model/preresnet.py perturbs
# 'input', 'conv1', 'layer1', model/wide_resnet.py 'input', 'conv1', 'block1'. Wong's MNIST CNN and LeNet (Amata's
# MNIST net) have no residual stage: their two convs (our choice; DECISIONS.md, 'SLAT perturbations').
LATENT_LAYERS = {
    "preact18": ("conv1", "layer1"),
    "wrn": ("conv1", "block1"),
    "mnist-cnn": ("net.0", "net.2"),
    "lenet": ("net.0", "net.3"),
    # torchvision's (ImageNet)
    **{f"resnet{d}": ("net.conv1", "net.layer1") for d in (18, 34, 50, 101)},
}
# Nets whose perturbed latents go (through a ReLU) straight into a conv or linear layer: under autocast its
# half-precision input cast would round h_k + δ_k back onto h_k's grid. They train in fp32: the MNIST nets (tiny),
# and torchvision's post-activation ResNets, whose layer1 output feeds layer2's first conv and its shortcut's.
FP32_MODELS = ("mnist-cnn", "lenet", "resnet18", "resnet34", "resnet50", "resnet101")


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="peak learning rate of the lr triangle",
        alpha="input step of δ₀, /255 units (0.9ε; keeps its ratio to ε when only --epsilon "
        "is given)",
    )
    p.add_argument(
        "--eta",
        type=flags.per255("--eta", zero=True),
        default=None,
        help="η, the size of every latent δ_k: a plain number in the latent's own units, written "
        "in /255 like ε (= ε, MNIST included: the authors' code sets both from one value; keeps "
        "its ratio to ε when only --epsilon is given; 0: no latent perturbation)",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help="sgd (momentum 0.9) or adam",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["cyclic", "imagenet"],
        default=None,
        help="set every iteration. cyclic: 0 → lr over the first 2/5 of the run, then → 0 (the "
        "authors' CyclicLR; with sgd the momentum cycles 0.9 → 0.8 → 0.9 against it); imagenet: "
        "Wong et al.'s ImageNet schedule (imagenet.imagenet_lr)",
    )
    p.add_argument(
        "--dropout",
        type=flags.nonneg_float,
        default=None,
        help="WRN only: fraction of activations dropped between the two convs of every block, in "
        "training (default 0.3 with --model wrn-*, the authors' WideResNet; 0: no dropout, the "
        "WRN of the other scripts)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="latent_at", eps_relative=("alpha", "eta"))
    wrn = args.model.startswith("wrn")
    if args.dropout is None:
        args.dropout = 0.3 if wrn else 0.0
    if args.dropout >= 1 or (args.dropout > 0 and not wrn):
        p.error(f"--dropout {args.dropout}: a rate in [0, 1), and only for --model wrn-DEPTH-WIDTH")
    return args


def latent_layers(model_name):
    return LATENT_LAYERS["wrn" if model_name.startswith("wrn") else model_name]


class LatentPerturbation:
    """SLAT's latent perturbations, as forward hooks on the named modules of `model` (their outputs are the h_k).

    Idle (the default) the hooks return None: every other forward (the monitor, the evaluation, a saved model) sees
    the plain network. With `recording` True they keep each h_k in `latents` (in the autograd graph, so that one
    backward also gives ∇h_k); with `signs` set to one sign tensor per layer (shaped as h_k) they replace h_k by
    h_k + δ_k, δ_k = η·sign, clamped to the per-sample, per-channel range of h_k in that pass, formed in fp32.
    eta: η in h_k's own units. Copyable: needs torch only."""

    def __init__(self, model, layer_names, eta):
        self.eta = eta
        self.latents = [None] * len(layer_names)  # h_k of the recording pass
        self.signs = None  # sign(∇h_k L) while perturbing
        self.recording = False
        modules = dict(model.named_modules())
        for k, name in enumerate(layer_names):
            modules[name].register_forward_hook(self._hook(k))

    def _hook(self, k):
        # Kept out of torch.compile's graphs (--compile): the graph breaks at each h_k, so that h_k is a real tensor
        # between two compiled pieces and ∇h_k can be asked for. Inside one fused graph it would be a side output
        # that the loss does not depend on.
        @torch.compiler.disable
        def hook(module, inputs, h):
            if self.recording:
                self.latents[k] = h
            elif self.signs is not None:
                # In fp32: under bf16 autocast h comes out of its conv in bf16, whose 8 significant bits put the
                # values next to h 2^(⌊log2|h|⌋−7) apart, so h + η rounded to bf16 is about h + 2η for 8 ≤ |h| < 16
                # and h itself for |h| ≥ 16 (η = 8/255). The fp32 sum is what the next layer gets: a BatchNorm, which
                # then runs in fp32, or a residual sum, which stays fp32 (the other nets: FP32_MODELS).
                h = h.float()
                # The latent analogue of the [0, 1] pixel range: per sample and channel, the range of h_k in this
                # pass (the authors' HiddenPerturb: amin/amax over the spatial dimensions). Their step of 1.8η is
                # cut to ±η by their own clamp, so η·sign is the same step.
                lo, hi = h.amin((2, 3), keepdim=True), h.amax((2, 3), keepdim=True)
                delta = ((h + self.eta * self.signs[k].float()).clamp(lo, hi) - h).detach()
                # Proposition 1 of the supplementary material: each δ_k travels through the layers above it, and
                # the perturbation reaching the last hidden layer is Σ_k J_k δ_k + O(γ), J_k = ∂h_{L−1}/∂h_k. δ_k is
                # a constant (detached), so ∂(h_k + δ_k)/∂h_k = I in the weight step.
                return h + delta
            return None

        return hook


def slat_loss(model, latent, x, y, eps, alpha, autocast=None, attack_model=None):
    """SLAT's training loss for one batch (Park & Lee, ICCV 2021; the authors' advGNI): one clean pass whose single
    backward gives ∇x and every ∇h_k, then the pass with δ₀ at the input and δ_k at every latent layer (added by the
    hooks of LatentPerturbation, above: copy it along).

    x: images N×C×H×W in [0, 1] (normalise inside the model: a range check raises otherwise); y: labels N, int64;
    ε and steps in [0, 1] units; autocast: None (fp32) or torch.autocast's dtype (fp16: the loss is scaled by 2^10).
    model: the network, with `latent` (a LatentPerturbation) hooked on its latent layers. Both passes run in the
        mode it is in, which is left as found (train mode in the authors' code: BatchNorm and dropout see both).
    attack_model: the same network as pass 1 runs it (default: model); it needs input and latent gradients only
        (the script passes a view whose parameters do not require gradients during its forward).
    eps, alpha: ε and the input step (0.9ε); η is latent.eta.
    autocast applies to both passes; h_k + δ_k is formed in fp32 either way.
    Returns (loss, logits) of pass 2: the mean CE at the perturbed pass, in the autograd graph of the weights (its
    backward is the weight step); logits N×classes. No weight gradient is accumulated by pass 1."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    attack_model = model if attack_model is None else attack_model
    # Pass 1, clean (δ₀ starts at zero: no random start; the authors' HiddenPerturb starts adv_noise at zero).
    delta = torch.zeros_like(x, requires_grad=True)
    latent.recording = True
    try:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(attack_model(x + delta), y)
    finally:
        latent.recording = False
    # fp16 only: the loss ×2^10 keeps the gradients from underflowing (their signs, all that is used, unchanged).
    scale = 1024.0 if autocast == torch.float16 else 1.0
    # One backward gives ∇x and every ∇h_k at once (FGSM cost); autograd.grad leaves the weights' .grad alone.
    grad_x, *grad_latents = torch.autograd.grad(loss * scale, [delta, *latent.latents])
    latent.latents = [None] * len(latent.latents)  # drop the clean graph's tensors
    # δ₀ = 0.9ε·sign(∇x); the ε clamp binds only when alpha > ε (the code has it), then the pixel range.
    delta = (alpha * grad_x.sign()).clamp(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    # Pass 2: the hooks add every δ_k = η·sign(∇h_k); the weight step differentiates this pass only.
    latent.signs = [g.sign() for g in grad_latents]
    try:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(x + delta)
            loss = F.cross_entropy(logits, y)
    finally:
        latent.signs = None
    return loss, logits


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data, dropout=args.dropout)
    latent = LatentPerturbation(model, latent_layers(args.model), args.eta / 255)
    run = harness.Run(args, data)
    # two views of one network, the same parameters: the attack's (input gradients) and the weight step's
    attack_model, train_model = run.models(model)
    amp = None if args.model in FP32_MODELS else run.amp
    if run.amp is not None and amp is None:
        common.log(
            f"# {args.model} trains in fp32: its latents feed a conv or linear layer, whose "
            f"half-precision input would round the latent step away"
        )
    eps = args.epsilon / 255
    alpha = args.alpha / 255
    steps = data.train.steps(args.epochs)  # the batches the run yields
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.lr_schedule == "imagenet":
        # No ImageNet recipe in the supplement: Wong et al.'s (imagenet.imagenet_lr).
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    else:
        # Supplementary §2 and the authors' solver.py: lr 0 → lr over the first 2/5 of the iterations (12 of 30
        # epochs), then → 0, stepped every iteration. Their CyclicLR also cycles SGD's momentum 0.9 → 0.8 → 0.9; kept.
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=0.0,
            max_lr=args.lr,
            step_size_up=0.4 * steps,
            step_size_down=0.6 * steps,
            cycle_momentum=args.optimizer == "sgd",
        )
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()  # both passes in train mode, as in the authors' code
        total_loss = total_correct = total_n = 0
        for x, y, _ in data.train.epoch(epoch):
            loss, out = slat_loss(train_model, latent, x, y, eps, alpha, amp, attack_model)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
