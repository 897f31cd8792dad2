"""Single-step latent adversarial training (SLAT).

Park & Lee, "Reliably fast adversarial training via latent adversarial perturbation", ICCV 2021,
arXiv:2104.01575. Authors' code: github.com/geonyeong-park/SLAT (method name `advGNI`).

    python latent_at.py                                   # CIFAR-10 recipe: PreActResNet18, 30 epochs
    python latent_at.py --model wrn-28-10                 # the authors' wide net: WRN-28-10, dropout 0.3
    python latent_at.py --dataset mnist --data-dir DIR    # MNIST: Wong's CNN and optimiser, 10 epochs

Paper: reported numbers were not retrievable (SPEC §7); the abstract claims FGSM cost and better
robustness than other single-step methods. Measured here: see README.md.

Each iteration (SPEC §7), with h_k the output of latent layer k (PreActResNet18: conv1 and layer1;
WRN: conv1 and block1), added through forward hooks so that the model classes stay unchanged:
    pass 1 (clean, train mode):  L = CE(f(x), y); ONE backward gives ∇x L and every ∇h_k L
    δ₀  = 0.9ε·sign(∇x L), clamped so that x+δ₀ ∈ [0, 1]           (no random start)
    δ_k = η·sign(∇h_k L),  clamped so that h_k+δ_k stays in the per-sample, per-channel range of h_k
    pass 2 (perturbed, train mode): θ ← θ − lr·∇θ CE(f(x+δ₀; h_k+δ_k), y)
Two forward/backward passes per batch, like FGSM-RS (SPEC §9). h_k + δ_k is formed in fp32 even under
bf16 autocast: on h_k's bf16 grid a step of 8/255 would double for 8 ≤ |h_k| < 16 and vanish from 16 up.

The authors' code trains WRN-28-10 with dropout 0.3 in every block (their WideResNet); with
`--model wrn-*` this script does the same (`--dropout`, default 0.3; `--dropout 0` is the WRN of the other
scripts). Dropout draws a fresh mask in each of the two passes, as in the code (both in train mode).
"""
import contextlib

import torch
import torch.nn.functional as F

import common

RECIPES = {
    # Appendix §2 and the authors' config: SGD momentum 0.9, wd 5e-4, lr 0 → 0.2 over 12 epochs, → 0 over 18.
    "default": dict(epochs=30, batch_size=128, lr_max=0.2, epsilon=8, weight_decay=5e-4, optimizer="sgd"),
    "tiny-imagenet": dict(batch_size=64),  # appendix §2: 64 "to reduce the memory consumption"
    # No MNIST recipe in the paper (our choice): Wong's MNIST optimiser as in fgsm_rs.py (Adam, peak 5e-3,
    # 10 epochs, batch 100, ε = 0.3). Its lr peaks at 2/5 of training, the same triangle as 12/30 here.
    # η = ε = 0.3 at the latents too. No source gives a latent size for MNIST; the authors' code derives η
    # from ε (its one `--eta` sets both: there is no separate latent size), and SPEC §0 lets the code decide
    # where the paper is silent. Relative to the latents it is a far larger step than on CIFAR-10: about one
    # standard deviation of the CNN's first-conv outputs (trained on the MNIST subset; 1.3 at initialisation)
    # and a quarter of their per-sample, per-channel range, where 8/255 is 0.06 of PreActResNet18's conv1
    # std at initialisation. The clamp to that range keeps h_k + δ_k inside it; `--eta` sets another size.
    "mnist": dict(epochs=10, batch_size=100, lr_max=5e-3, epsilon=76.5, weight_decay=0.0, optimizer="adam"),
}

# The latent layers whose outputs are perturbed (SPEC §7: the first conv and the first residual stage;
# the input is layer 0). For Wong's MNIST CNN, which has no residual stage, we take its two convs.
LATENT_LAYERS = {"preact18": ("conv1", "layer1"), "wrn": ("conv1", "block1"), "mnist-cnn": ("net.0", "net.2"),
                 "lenet": ("net.0", "net.3")}  # LeNet (Amata's MNIST net): its two convs, like the MNIST CNN


def get_args(argv=None):
    p = common.base_parser(__doc__, alpha_help="input step of δ₀, /255 units (default 0.9·ε)")
    p.add_argument("--eta", type=common.nonneg_float, default=None,
                   help="η, magnitude of every latent δ_k, a plain number in the latent's own units written "
                        "in /255 like ε (default: = --epsilon, MNIST included; the authors' code sets both "
                        "from one value)")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=None, help="default 5e-4 (MNIST 0)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="sgd (CIFAR recipe, cycles momentum 0.9 ↔ 0.8 against the lr) or adam (MNIST recipe)")
    p.add_argument("--dropout", type=common.nonneg_float, default=None,
                   help="WRN only: fraction of activations dropped between the two convs of every block, in "
                        "training (default 0.3 with --model wrn-*, the authors' WideResNet; 0: no dropout, "
                        "the WRN of the other scripts)")
    args = common.parse_args(p, RECIPES, argv, script="latent_at")
    wrn = args.model.startswith("wrn")
    if args.dropout is None:
        args.dropout = 0.3 if wrn else 0.0
    if args.dropout >= 1 or (args.dropout > 0 and not wrn):
        p.error(f"--dropout {args.dropout}: a rate in [0, 1), and only for --model wrn-DEPTH-WIDTH")
    # Defaults tied to ε (SPEC §7), resolved here so that results.json records the values used.
    if args.alpha is None:
        args.alpha = 0.9 * args.epsilon  # δ₀ = 0.9ε·sign(∇x): --alpha is the input step, /255
    if args.eta is None:
        args.eta = args.epsilon
    return args


def latent_layers(model_name):
    return LATENT_LAYERS["wrn" if model_name.startswith("wrn") else model_name]


def set_dropout(model, rate):
    """The authors' WRN (their WideResNet, built with dropRate 0.3) drops activations between the two
    convs of every block; common.get_model builds WRNs without, so the rate is set on the blocks here."""
    for block in model.modules():
        if isinstance(block, common.WideBasic):
            block.dropout = rate


def training_autocast(run, model_name):
    """The autocast of both training passes. bf16 (on CUDA) for the residual nets, whose perturbed
    latents flow on in fp32 (see the hook). The MNIST CNN feeds each h_k + δ_k, through a ReLU, straight
    into a conv or linear layer, whose bf16 input cast would round it back onto h_k's bf16 grid; the net is
    tiny, so it trains in fp32 (LeNet likewise)."""
    return contextlib.nullcontext if model_name in ("mnist-cnn", "lenet") else run.autocast


class LatentPerturbation:
    """Forward hooks on the latent layers. Outside `record()` and `perturb()` they return None, so
    every other forward (the monitor, the evaluation, a saved model) sees the plain model."""

    def __init__(self, model, layer_names, eta):
        self.eta = eta
        self.latents = [None] * len(layer_names)  # h_k of the clean pass, in the autograd graph
        self.signs = None                         # sign(∇h_k L) while perturbing
        self.recording = False
        modules = dict(model.named_modules())
        for k, name in enumerate(layer_names):
            modules[name].register_forward_hook(self._hook(k))

    def _hook(self, k):
        # Kept out of torch.compile's graphs (--compile): the graph then breaks at each h_k, so h_k is a
        # real tensor between two compiled pieces and ∇h_k can be asked for. Inside one fused graph it
        # would be a side output that the loss does not depend on.
        @torch.compiler.disable
        def hook(module, inputs, h):
            if self.recording:
                self.latents[k] = h  # kept so that the one backward of pass 1 also yields ∇h_k
            elif self.signs is not None:
                # In fp32: under bf16 autocast h comes out of its conv in bf16, whose 8 significant bits put
                # the values next to h 2^(⌊log2|h|⌋−7) apart, so h + η rounded to bf16 is about h + 2η for
                # 8 ≤ |h| < 16 and h itself for |h| ≥ 16 (η = 8/255). The fp32 sum is what the next layer
                # gets: a BatchNorm, which then runs in fp32 and whose output is off h's grid, or a residual
                # sum, which stays fp32 (PreActResNet18, WRN; the MNIST CNN: see training_autocast).
                h = h.float()
                # Per-sample, per-channel range of h_k in this (perturbed) pass: the latent analogue of the
                # [0, 1] pixel range (authors' code: amin/amax over the spatial dimensions).
                lo, hi = h.amin((2, 3), keepdim=True), h.amax((2, 3), keepdim=True)
                delta = ((h + self.eta * self.signs[k].float()).clamp(lo, hi) - h).detach()
                # Prop. 1 (appendix): each δ_k added here travels through the layers above it, and the
                # perturbation reaching the last hidden layer is Σ_k J_k δ_k + O(γ), J_k = ∂h_{L−1}/∂h_k.
                # δ_k is a constant (detached), so ∂(h_k+δ_k)/∂h_k = I in the weight step.
                return h + delta
            return None
        return hook

    @contextlib.contextmanager
    def record(self):
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    @contextlib.contextmanager
    def perturb(self, signs):
        self.signs = signs
        try:
            yield
        finally:
            self.signs = None


def slat_perturbations(model, latent, x, y, eps, alpha, autocast):
    """Pass 1 and its single backward: returns δ₀ (detached) and sign(∇h_k L) for every latent layer."""
    delta = torch.zeros_like(x, requires_grad=True)  # no random start (SPEC §7)
    with latent.record(), autocast():
        loss = F.cross_entropy(model(x + delta), y)
    # One backward pass gives ∇x and every ∇h_k at once (FGSM cost); autograd.grad leaves the weights'
    # .grad alone, so the weight step below sees the perturbed pass only.
    grad_x, *grad_latents = torch.autograd.grad(loss, [delta, *latent.latents])
    latent.latents = [None] * len(latent.latents)  # drop the clean graph's tensors
    delta = (alpha * grad_x.sign()).clamp(-eps, eps)  # the ε clamp only binds when --alpha > ε (code has it)
    return (x + delta).clamp(0, 1) - x, [g.sign() for g in grad_latents]


def main():
    args = get_args()
    run = common.Run(args)
    data = common.get_data(args, run.device, args.val_size)
    model = common.get_model(args, run.device)
    set_dropout(model, args.dropout)
    latent = LatentPerturbation(model, latent_layers(args.model), args.eta / 255)
    autocast = training_autocast(run, args.model)
    train_model = run.compile(model)
    eps, alpha = args.epsilon / 255, args.alpha / 255
    steps = args.epochs * len(data.train)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_max, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr_max, weight_decay=args.weight_decay)
    # Appendix §2: lr 0 → lr_max over the first 12/30 of the iterations, then → 0, stepped every iteration.
    # The authors' CyclicLR also cycles SGD's momentum 0.9 → 0.8 → 0.9 by default; kept (not for Adam).
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=args.lr_max, step_size_up=0.4 * steps,
                                              step_size_down=0.6 * steps, cycle_momentum=args.optimizer == "sgd")
    run.track(model=model, opt=opt, sched=sched)

    for epoch in run.epochs():
        model.train()  # both passes in train mode, as in the authors' code
        total_loss = total_correct = total_n = 0
        for x, y, _ in data.train.epoch(epoch):
            # Pass 1 + one backward: δ₀ at the input and the gradient signs at every latent layer.
            delta, latent_signs = slat_perturbations(train_model, latent, x, y, eps, alpha, autocast)
            # Pass 2: the hooks add every δ_k; the weight step uses this perturbed pass only.
            with latent.perturb(latent_signs), autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
        run.end_epoch(epoch, model, data, lr=opt.param_groups[0]["lr"], loss=(total_loss / total_n).item(),
                      acc=(total_correct / total_n).item())
    run.finish(model, data)


if __name__ == "__main__":
    common.main_guard(main)
