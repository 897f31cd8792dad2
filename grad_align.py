"""FGSM training with the GradAlign regulariser (FGSM-GA, FGSM + GradAlign).

Andriushchenko, Flammarion, "Understanding and improving fast adversarial training", NeurIPS 2020, arXiv:2007.02617.
Authors' code: github.com/tml-epfl/understanding-fast-adv-training (train.py, utils.py; λ per ε in
sh/exps_diff_eps_cifar10.sh and sh/exps_diff_eps_svhn.sh). A baseline the later fast methods compare against.

    python grad_align.py                                   # CIFAR-10 recipe: PreActResNet18, 30 epochs, λ 0.2
    python grad_align.py --epsilon 16                      # λ follows ε: 0.02·10^(ε/8) = 2.0 at 16/255
    python grad_align.py --dataset svhn --data-dir DIR     # SVHN: 15 epochs, lr 0.05, λ 2.5, FGSM step ramped
    python grad_align.py --both-grads                      # Ω differentiated through both gradients (slower)
    python grad_align.py --no-eta-clamp                    # x+η left outside [0, 1] as the authors' code leaves it
    python grad_align.py --epochs 110 --lr 0.1 --lr-schedule multistep   # Jia et al.'s Table IV setting, as we read it
    python grad_align.py --ga-lambda 0                     # plain FGSM training from a zero start (no regulariser)

Paper (the figure in the authors' README, captioned Figure 8; CIFAR-10, their PreActResNet-18, last model, 1,000
test images, mean of 5 seeds): at ε = 8/255 about 81% clean and 47-48% PGD-50-10, at 16/255 about 59% / 29% (read
off the plot; the README names the paper's Tables 4 and 5 for the exact numbers, not read here).
Jia et al. (FGSM-SDI, IEEE TIP 2022, arXiv:2110.05007) re-ran it as "FGSM-GA" with ResNet18 on CIFAR-10 (Table IV,
best checkpoint): 83.96% clean, 49.23% PGD-10, 46.89% PGD-50, 47.46% C&W, 43.45% AutoAttack, 178 min (their
FGSM-RS: 51 min); last checkpoint 84.43 / 48.67 / 46.08 / 46.75 / 42.63. With a cyclic lr (Table VI): 80.83 /
48.76 / 47.54 / 47.14 / 44.06, 49 min. CIFAR-100 (Table VII): 54.35 / 22.93 / 22.2 / 21.2 / 18.88, 187 min.
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Each iteration (FGSM training from a zero start plus GradAlign's regulariser Ω, whose formula the authors' README
shows; their train.py):
    g₁ = ∇_x CE(f(x), y)                          FGSM's gradient, at the clean x (zero start)
    δ = Π_[−ε,ε](α·sign(g₁)), x+δ in [0, 1]       α = 1.25ε: the projection makes it ε·sign(g₁)
    η ~ U([−ε, ε]^d),  g₂ = ∇_x CE(f(x+η), y)     x+η clamped to [0, 1] (code: not)
    Ω = 1 − mean_i cos(g₁ᵢ, g₂ᵢ)                  samples with a zero g₁ᵢ or g₂ᵢ left out of the mean (code)
    θ ← θ − lr·∇_θ [CE(f(x+δ), y) + λ·Ω]          double backpropagation through g₂; g₁ is held constant, as
                                                  in the authors' code (--both-grads: through g₁ too)
λ grows with ε as in the authors' scripts; the model stays in train mode for all three passes (x, x+δ, x+η), as in
their code. Where the paper and the code differ or are silent: DECISIONS.md, 'GradAlign gradients' and 'GradAlign
recipe'; the reading of Jia et al.'s setting: 'GradAlign in Jia et al.'s tables'.
"""

import numpy as np
import torch
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # The authors' CIFAR-10 commands (sh/exps_diff_eps_cifar10.sh; README): --attack fgsm --attack_init zero
    # --epochs 30 --lr_max 0.30, batch 128 and fgsm_alpha 1.25 (train.py's defaults), SGD momentum 0.9, weight decay
    # 5e-4 on every parameter (train.py), the piecewise-linear lr 0 → lr_max at epoch ⌊2·30/5⌋ = 12 → 0 set every
    # iteration (utils.get_lr_schedule 'cyclic'). λ comes from ε (ga_lambda below).
    "default": dict(
        epochs=30,
        batch_size=128,
        lr=0.3,
        epsilon=8,
        alpha=10,
        weight_decay=5e-4,
        optimizer="sgd",
        lr_schedule="cyclic",
        alpha_ramp_epochs=0.0,
    ),
    # sh/exps_diff_eps_svhn.sh: 15 epochs, lr_max 0.05 (the commands give --lr_max twice; argparse keeps the last),
    # no flip (common's SVHN), and train.py's SVHN-only ramp of the FGSM step from 0 over 5 epochs' iterations.
    "svhn": dict(epochs=15, lr=0.05, alpha_ramp_epochs=5.0),
    # Not in the sources (our choice, DECISIONS.md, 'GradAlign recipe'): Wong et al.'s MNIST recipe as fgsm_rs.py
    # uses it (CNN, Adam, 10 epochs, batch 100, ε 0.3, step 1.25ε), whose lr shape is the one above; λ 0.2.
    "mnist": dict(
        epochs=10,
        batch_size=100,
        lr=5e-3,
        epsilon=76.5,
        alpha=95.625,
        weight_decay=0.0,
        optimizer="adam",
        ga_lambda=0.2,
    ),
    # ImageNet (our choice: no ImageNet run in the sources): imagenet.IMAGENET's data, network, phases and ε, with
    # its lr (imagenet.imagenet_lr); λ from the CIFAR-10 rule at ε = 2/255 (0.036).
    "imagenet": dict(lr_schedule="imagenet"),
}


# λ of the authors' commands per integer ε (/255): sh/exps_diff_eps_cifar10.sh (ε 1-16) and sh/exps_diff_eps_svhn.sh
# (ε 1-12). Each is its script's rule rounded to 3 decimals, except CIFAR-10's ε 14 (1.1247 written 1.124).
CIFAR10_LAMBDAS = dict(enumerate([
    0.027, 0.036, 0.047, 0.063, 0.084, 0.112, 0.15, 0.2,
    0.267, 0.356, 0.474, 0.632, 0.843, 1.124, 1.5, 2.0,
], start=1))  # fmt: skip
SVHN_LAMBDAS = dict(enumerate([
    1.657, 1.757, 1.864, 1.976, 2.096, 2.223, 2.357, 2.5, 2.651, 2.812, 2.982, 3.162,
], start=1))  # fmt: skip


def ga_lambda(dataset, epsilon):
    """λ of the GradAlign term for ε in /255 units, as in the authors' commands: their value at the ε they ran
    (CIFAR10_LAMBDAS, SVHN_LAMBDAS), elsewhere the log-linear rule their scripts state, rounded to 3 decimals:
    SVHN 1.5625·1.6^(ε/8) (2.5 at 8/255); every other dataset the CIFAR-10 rule 0.02·10^(ε/8) (0.2 at 8/255, 2.0 at
    16/255; our choice beyond CIFAR-10)."""
    if dataset == "svhn":
        return SVHN_LAMBDAS.get(epsilon, round(1.5625 * 1.6 ** (epsilon / 8), 3))
    return CIFAR10_LAMBDAS.get(epsilon, round(0.02 * 10 ** (epsilon / 8), 3))


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="peak learning rate (cyclic), or the initial one (multistep)",
        alpha="FGSM step size, /255 units (1.25ε as in the authors' code: from the zero "
        "start the projection onto the ε-ball makes any step ≥ ε exactly ε·sign(∇))",
    )
    p.add_argument(
        "--ga-lambda",
        type=flags.nonneg_float,
        default=None,
        help="λ, the weight of the GradAlign term; 0: plain FGSM training (default: from "
        "ε as in the authors' commands, 0.02·10^(ε/8): 0.2 at ε 8, 2.0 at 16; SVHN "
        "1.5625·1.6^(ε/8): 2.5 at 8; MNIST 0.2, our choice)",
    )
    p.add_argument(
        "--both-grads",
        action="store_true",
        help="differentiate Ω through both input gradients, ∇CE(x) too (the exact "
        "gradient of Ω; their README: no substantial difference, and more computation). "
        "Default: through the one at x+η only, as the authors' train.py",
    )
    p.add_argument(
        "--no-eta-clamp",
        action="store_true",
        help="the authors' code: x+η is not clamped to [0, 1] (default: clamped, "
        "DECISIONS.md, 'Pixel range')",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["cyclic", "multistep", "imagenet"],
        default=None,
        help="cyclic: the authors' piecewise-linear 0 → lr at ⌊2·epochs/5⌋ → 0, per "
        "iteration; multistep: ×0.1 at 100/110 and 105/110 of the iterations (Jia et "
        "al.'s 110-epoch setting); imagenet: imagenet.imagenet_lr",
    )
    p.add_argument(
        "--alpha-ramp-epochs",
        type=flags.nonneg_float,
        default=None,
        help="the FGSM step grows linearly from 0 over this many epochs, per iteration "
        "(0: no ramp; the authors' SVHN runs: 5)",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help="sgd with momentum 0.9 (the authors' ResNet) or adam (their small CNNs; "
        "our MNIST recipe)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="grad_align")
    if args.ga_lambda is None:  # a resumed run has its own
        args.ga_lambda = ga_lambda(args.dataset, args.epsilon)
    return args


def cyclic_lr(opt, loader, epochs):
    """The authors' 'cyclic' schedule (utils.get_lr_schedule; train.py sets it before every iteration), a LambdaLR
    stepped every iteration: iteration i of epoch e (0-based) trains with lr·interp(e + (i + 1)/batches(e)) through
    (0, 0), (⌊2·epochs/5⌋, 1), (epochs, 0). Momentum is left alone (0.9 throughout, as theirs)."""
    counts = np.cumsum([0] + [loader.batches(e) for e in range(epochs)])
    peak = epochs * 2 // 5

    def factor(step):
        e = min(int(np.searchsorted(counts, step, side="right")) - 1, epochs - 1)
        position = e + (step - counts[e] + 1) / (counts[e + 1] - counts[e])
        return float(np.interp(position, [0, peak, epochs], [0, 1, 0]))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def grad_align_loss(
    model,
    x,
    y,
    eps,
    alpha,
    lam,
    autocast=None,
    both_grads=False,
    clamp_eta=True,
    attack_model=None,
):
    """FGSM-GA's loss for one batch (Andriushchenko & Flammarion, NeurIPS 2020): FGSM from a zero start gives
    x+δ, and GradAlign's Ω = 1 − cos(∇_x CE(x), ∇_x CE(x+η)), η ~ U([−ε, ε]^d), is added with weight λ:
        CE(f(x+δ), y) + λ·(1 − mean_i cos(g₁ᵢ, g₂ᵢ))
    The cosine is per sample over C×H×W, averaged over the samples whose two gradients are both non-zero (the
    authors' code; a zero gradient has no direction); none such: Ω = 0.

    x: N×C×H×W images in [0, 1] (checked), y: N labels; eps, alpha: ε and the FGSM step in [0, 1] units (8/255);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: the passes at x+δ and x+η (and at x with both_grads) run through it, so it must support double backward
        (an eager module: torch.compile has none).
    alpha: CIFAR-10's 10/255 = 1.25ε, which the projection onto the ε-ball makes ε.
    lam: λ ≥ 0; 0 is plain FGSM training: no η is drawn and no pass at x+η is made.
    both_grads: Ω reaches θ through both gradients, the exact gradient of Ω. Default False: g₁ = ∇_x CE(x) is a
        constant and Ω reaches θ through g₂ only, as the authors' train.py (their README: no substantial difference).
    clamp_eta: x+η is clamped to [0, 1] (default); False: not, as the authors' code.
    attack_model: the network the FGSM pass at x runs through when its gradient is a constant of the loss
        (both_grads False, or λ = 0); default: model. The same parameters, e.g. a view that computes input
        gradients only. Both are used in the mode they are in: in train mode (training here, and the authors' code)
        BatchNorm's running statistics take the three passes, x, x+δ and x+η, in that order.
    Returns (loss, logits, terms): loss, a scalar with its graph to θ (backpropagate it); logits at x+δ, N×C, with
    graph; terms: the batch means, detached: 'ce' (at x+δ), and 'cos' (the mean cosine) when λ > 0."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    attack_model = model if attack_model is None else attack_model
    # fp16: the gradients' CE scaled by 2^10 so that they do not underflow; signs and cosines ignore the scale
    scale = 1024.0 if autocast == torch.float16 else 1.0
    differentiate = lam > 0 and both_grads
    # g₁ at the clean x (FGSM's zero start): a leaf of its own, so that the gradient is ∇_x of the CE alone.
    x_clean = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        clean_ce = F.cross_entropy((model if differentiate else attack_model)(x_clean), y)
    (g1,) = torch.autograd.grad(clean_ce * scale, x_clean, create_graph=differentiate)
    # The FGSM step from zero, projected onto the ε-ball and [0, 1]; a constant of the loss.
    delta = (alpha * g1.detach().sign()).clamp(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(x + delta)
        ce = F.cross_entropy(logits, y)
    if lam == 0:
        return ce, logits, {"ce": ce.detach()}
    # Ω: the gradient at a uniform point of the ε-ball, differentiable in θ (create_graph).
    x_eta = x + torch.empty_like(x).uniform_(-eps, eps)
    x_eta = (x_eta.clamp(0, 1) if clamp_eta else x_eta).detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        eta_ce = F.cross_entropy(model(x_eta), y)
    (g2,) = torch.autograd.grad(eta_ce * scale, x_eta, create_graph=True)
    g1 = g1.flatten(1)
    g2 = g2.flatten(1)
    sq1 = g1.pow(2).sum(1)
    sq2 = g2.pow(2).sum(1)
    keep = (sq1 != 0) & (sq2 != 0)
    # A left-out sample divides by 1: its zero vector gives cos 0 and a zero (not NaN) gradient.
    n1 = torch.where(keep, sq1, 1) ** 0.5
    n2 = torch.where(keep, sq2, 1) ** 0.5
    cos = ((g1 / n1[:, None]) * (g2 / n2[:, None])).sum(1)
    kept = keep.sum().clamp(min=1)
    mean_cos = cos.sum() / kept
    reg = lam * (keep.any().float() - mean_cos)  # λ·(1 − mean cos); 0 when no sample is left
    return ce + reg, logits, {"ce": ce.detach(), "cos": mean_cos.detach()}


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data)
    used = ["ce", "cos"] if args.ga_lambda > 0 else []
    run = harness.Run(args, data, columns=used)
    # two views of one network, the same parameters: the attack's and the weight step's.
    # torch.compile has no double backward: with λ > 0 the loss passes run eagerly (through DDP under torchrun), and
    # --compile only speeds up the FGSM pass at x when its gradient is a constant (not with --both-grads).
    attack_model, train_model = run.models(model, double_backward=args.ga_lambda > 0)
    eps = args.epsilon / 255
    alpha = args.alpha / 255
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = data.train.steps(args.epochs)  # the batches the run yields
    if args.lr_schedule == "imagenet":
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    elif args.lr_schedule == "multistep":
        # Jia et al.'s 110-epoch schedule (their FGSM_SDI.py, as fgsm_sdi.py): ×0.1 after 100/110 and 105/110 of the
        # iterations, stepped per iteration; a shorter --epochs scales the milestones with it.
        milestones = [round(steps * 100 / 110), round(steps * 105 / 110)]
        if note := flags.collapsed_milestones(milestones, steps, args.lr):
            common.log(note)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    else:
        sched = cyclic_lr(opt, data.train, args.epochs)
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()  # all three passes in train mode, as in the authors' code
        totals = {name: 0.0 for name in ("loss", "correct", *used)}
        total_n = 0
        batches = data.train.batches(epoch)
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            step = alpha
            # the authors' SVHN runs: the step grows from 0, per iteration
            if args.alpha_ramp_epochs:
                step = alpha * min(1.0, (epoch + i / batches) / args.alpha_ramp_epochs)
            loss, logits, terms = grad_align_loss(
                train_model,
                x,
                y,
                eps,
                step,
                args.ga_lambda,
                run.amp,
                both_grads=args.both_grads,
                clamp_eta=not args.no_eta_clamp,
                attack_model=attack_model,
            )
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()  # through g₁ and g₂: the double backward
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()  # per iteration
            for name, value in (("loss", loss.detach()), *terms.items()):
                if name in totals:  # λ = 0: the loss is the CE, and there is no cosine
                    totals[name] += value * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum()
            total_n += len(y)
        means = {name: (totals[name] / total_n).item() for name in totals}
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=means.pop("loss"),
            acc=means.pop("correct"),
            **means,
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
