"""Amata: annealed PGD adversarial training.

Ye, Li, Zhou, Zhu, "Amata: an annealing mechanism for adversarial training acceleration", AAAI 2021,
arXiv:2012.08112.

    python amata.py                                         # CIFAR-10 recipe: K 2 → 10, τ = 20/255, 100 epochs
    python amata.py --k-min 10 --k-max 10 --tau 20 --random-start   # PGD-10 AT, the baseline (Madry et al.)
    python amata.py --dataset mnist --data-dir DIR          # MNIST: LeNet, K 5 → 40, τ = 0.4, 56 epochs
    python amata.py --dataset mnist --data-dir DIR --eval-iters 40 --eval-restarts 1   # + Table 1's PGD-40

`--k-min K --k-max K --tau 2K` (τ in /255 units) is plain PGD-K adversarial training with step 2/255: with
K_min = K_max every epoch runs K steps of τ/K. The repository's PGD-AT (PGD-10) baseline, the method Amata is
compared against, is `--k-min 10 --k-max 10 --tau 20 --random-start`: Madry et al.'s PGD-AT (arXiv:1706.06083)
starts each attack from x⁰ + U(−ε, ε) (so does the PGD-10 of YOPO's code, the setting Amata follows); Algorithm 1
itself starts from x⁰. In every run here the attack sees the model in train mode: BN normalises with the statistics
of the batch being attacked, and each of the K_t attack passes also updates BN's running statistics (the paper does
not say; YOPO's code attacks in eval mode). Both: DECISIONS.md, 'Amata unstated details'.

Paper (CIFAR-10, PreActResNet18, GTX 1080 Ti, 100 epochs): Amata 85.52% clean / 47.62% PGD-20 / 52.94% CW in
14309 s, against PGD-10 85.27% / 47.31% / 51.73% in 23108 s (61.9% of the time). MNIST (LeNet, Table 1,
PGD-40 step 0.01): Amata(5, 40) 91.47% robust in 698 s vs PGD-40 training 90.56% in 1086 s. The default final
evaluation here (PGD-50 with 10 restarts) is stronger than Table 1's PGD-40. Measured here: see bench/RESULTS.md.

Algorithm 1 (Amata for PGD), for epoch t = 0 … T; App. B.2 (around eq. (16)) fixes the end points, K_0 = K_min and
K_T = K_max "in the last epoch", so --epochs E runs T = E − 1 (DECISIONS.md, 'Amata K_t end points'):
    K_t = K_min + (K_max − K_min)·t/T, rounded,  α_t = τ/K_t                   (the K_t and α_t assignments)
    for each batch: x^k = clip(x^{k−1} + α_t·sign(∇_x ℓ(x^{k−1})), x⁰ ± ε) ∩ [0, 1], k = 1 … K_t
                                                                                (the inner PGD loop)
                    θ ← θ − η·∇_θ ℓ(x^{K_t})                                    (the weight update)
"Amata+Fast" is not specified precisely enough in the paper to implement and is left out.
"""

import torch
import torch.nn.functional as F

import common
import flags
import harness

RECIPES = {
    # §3.1 and App. A.2, CIFAR-10: τ = 20/255, K 2 → 10, ε = 8/255; SGD lr 0.05, momentum 0.9, wd 5e-4, lr ×0.1
    # at epochs 75 and 90, 100 epochs. The batch size is not in the paper; App. A follows Zhang et al.'s YOPO,
    # whose PGD-10 config with exactly this lr, wd and these milestones (experiments/CIFAR10/pre-res18.pgd10)
    # uses batch 256.
    "default": dict(
        epochs=100,
        batch_size=256,
        lr=0.05,
        weight_decay=5e-4,
        milestones=[75, 90],
        epsilon=8,
        tau=20,
        k_min=2,
        k_max=10,
    ),
    # App. A.1 and §2.5, MNIST: LeNet (pytorch/examples' mnist net, --model lenet), ε 0.3, PGD step 0.01, SGD lr
    # 0.1, momentum 0.9, wd 5e-4; Table 1's Amata(5, 40) against PGD-40, so τ = 40·0.01 = 0.4 (= 102/255) and
    # the last epoch runs PGD-40 with step 0.01. Epochs, batch and milestones are not in the paper; they come
    # from the setting it cites (YOPO's experiments/MNIST/pgd40/config.py): 56 epochs, batch 256, lr ×0.1 at
    # epochs 50 and 55. Table 1 evaluates with PGD-40, step 0.01 (--eval-iters 40 --eval-restarts 1).
    "mnist": dict(
        model="lenet",
        epochs=56,
        batch_size=256,
        lr=0.1,
        milestones=[50, 55],
        epsilon=76.5,
        tau=102,
        k_min=5,
        k_max=40,
    ),
    # ImageNet (our choice: the paper reports an ImageNet run without its settings): imagenet.IMAGENET's data, network,
    # phases and ε, with this paper's own schedule compressed to its 15 epochs (lr 0.05, ×0.1 at 75% and 90%).
    "imagenet": dict(lr=0.05, milestones=[11, 14]),
}


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="initial learning rate (×0.1 at each milestone)",
        alpha="refused: Amata's step is α_t = τ/K_t (set --tau, --k-min, --k-max)",
    )
    p.add_argument(
        "--k-min", type=flags.pos_int, default=None, help="K_min: PGD steps in the first epoch"
    )
    p.add_argument(
        "--k-max", type=flags.pos_int, default=None, help="K_max: PGD steps of the last epoch"
    )
    p.add_argument(
        "--tau",
        type=flags.per255("--tau"),
        default=None,
        help="τ = K_t·α_t, the total step length, /255 units (CIFAR-10: 20 = 2.5ε; MNIST: "
        "102 = 0.4 = 1.33ε); follows --epsilon in proportion",
    )
    p.add_argument(
        "--random-start",
        action="store_true",
        help="start the attack from x⁰ + U(−ε, ε) (Algorithm 1 starts from x⁰; Madry et al.'s "
        "PGD-AT baseline, --k-min 10 --k-max 10 --tau 20, starts randomly)",
    )
    p.add_argument(
        "--milestones",
        type=flags.pos_int,
        nargs="*",
        default=None,
        help="epochs after which the lr is multiplied by 0.1, each below --epochs "
        "(--milestones alone: none)",
    )
    # τ is ε-relative (2.5ε on CIFAR-10): `--epsilon 16` keeps the ratio unless --tau is given.
    args = flags.parse_args(p, RECIPES, argv, script="amata", eps_relative=("tau",))
    if args.k_min > args.k_max:
        p.error(f"--k-min {args.k_min} is larger than --k-max {args.k_max}")
    if args.alpha is not None:
        p.error(
            "--alpha: Amata's step size is α_t = τ/K_t; set --tau (and --k-min/--k-max) instead"
        )
    flags.milestones(args, p, argv, fractions=(0.75, 0.9))  # the recipe's drops: 75% and 90%
    return args


def annealing(t, epochs, k_min, k_max, tau):
    """Algorithm 1's K_t and α_t for epoch t = 0 … `epochs` − 1. App. B.2 fixes both ends, K_0 = K_min and
    K_T = K_max "in the last epoch", so the t/T of Algorithm 1's K_t counts T = epochs − 1 (with T = epochs, as
    Algorithm 1's loop over t reads, the last epoch would stop at K_max − (K_max − K_min)/T: K = 39, step 0.01026 on
    MNIST instead of PGD-40 with step 0.01; DECISIONS.md, 'Amata K_t end points'). The paper does not say how a
    fractional K_t is rounded; we round to the nearest integer, halves up (K_t = ⌊K_min + (K_max − K_min)·t/T + ½⌋,
    in integer arithmetic). A single epoch runs K_max. α_t = τ/K_t uses the rounded K_t, which keeps K_t·α_t = τ
    exactly, the constraint the paper's analysis (§2.3) is built on. Integers k_min ≤ k_max; tau in any unit (α_t
    comes back in it). Returns (K_t, α_t)."""
    span = epochs - 1
    k_t = k_max if span == 0 else k_min + (2 * (k_max - k_min) * t + span) // (2 * span)
    return k_t, tau / k_t


def amata_delta(model, x, y, eps, alpha_t, k_t, random_start=False, autocast=None):
    """Amata's perturbation for one batch: Algorithm 1's inner PGD loop (Ye et al., AAAI 2021, arXiv:2012.08112),
    k_t = K_t signed-gradient steps of size alpha_t = α_t on the cross-entropy, each projected onto the ε-ball
    around x⁰ and onto [0, 1].

    x: images N×C×H×W in [0, 1] (normalise inside the model: a range check raises otherwise); y: labels N, int64;
    ε and steps in [0, 1] units; autocast: None (fp32) or torch.autocast's dtype (fp16: the loss is scaled by 2^10).
    model: used in the mode it is in and left in it; in training here it is in train mode, so BatchNorm normalises
        with the attacked batch's statistics and each of the K_t passes updates its running statistics, as our other
        scripts' attacks do (the paper is silent; DECISIONS.md, 'Amata unstated details').
    eps, alpha_t, k_t: ε, α_t and K_t ≥ 0 (annealing() gives the last two; CIFAR-10: 8/255, (20/255)/K_t).
    random_start: start from x⁰ + U(−ε, ε) clamped to [0, 1] (Madry et al.'s PGD-AT) instead of x⁰ (Algorithm 1).
    Returns δ = x^{K_t} − x⁰, detached, N×C×H×W: |δ| ≤ ε and x + δ in [0, 1]."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16 only: the loss ×2^10 keeps its input gradient from underflowing (its sign is unchanged).
    scale = 1024.0 if autocast == torch.float16 else 1.0
    delta = torch.zeros_like(x)
    if random_start:
        delta = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x
    for _ in range(k_t):  # k = 1 … K_t
        delta.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss * scale, delta)  # ∇δ only
        # the step, clipped to x⁰ ± ε and to the pixel range
        delta = (delta.detach() + alpha_t * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data)
    run = harness.Run(args, data, columns=["K_t", "alpha_t"])
    # two views of one network, the same parameters: the attack's (input gradients) and the weight step's
    attack_model, train_model = run.models(model)
    if note := flags.milestones(args):
        common.log(note)
    eps = args.epsilon / 255
    tau = args.tau / 255
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    # stepped per epoch
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=0.1)
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for t in range(start, args.epochs):
        run.start_epoch()
        # Algorithm 1: K_t and α_t
        k_t, alpha_t = annealing(t, args.epochs, args.k_min, args.k_max, tau)
        model.train()
        total_loss = total_correct = total_n = 0
        for x, y, _ in data.train.epoch(t):
            # The inner PGD loop; the model stays in train mode while attacking (BN batch statistics), as in the
            # other scripts here; the paper does not say (YOPO's PGD code switches to eval mode).
            delta = amata_delta(attack_model, x, y, eps, alpha_t, k_t, args.random_start, run.amp)
            with run.autocast():  # the weight update at x^{K_t}
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
        lr = opt.param_groups[0]["lr"]  # the lr this epoch trained with
        sched.step()
        run.end_epoch(
            t,
            model,
            checkpoint,
            lr=lr,
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            K_t=k_t,
            alpha_t=alpha_t * 255,  # /255 units
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
