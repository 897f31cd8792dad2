"""N-FGSM: FGSM from a stronger noise, without projecting back onto the ε-ball.

de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez, Dokania, "Make some noise: reliable and efficient single-step adversarial
training", NeurIPS 2022, arXiv:2202.01181. Authors' code: github.com/pdejorge/N-FGSM (train.py, experiments.sh).

    python n_fgsm.py                                   # CIFAR-10 recipe: PreActResNet18, 30 epochs, k = 2ε, α = ε
    python n_fgsm.py --dataset cifar100                # the same recipe on CIFAR-100
    python n_fgsm.py --epsilon 16                      # any ε: k = 2ε and α = ε follow it (experiments.sh: 2 … 16)
    python n_fgsm.py --dataset svhn                    # SVHN: lr 0.05 peaking at 2/5, ε, α and k ramped over 5 epochs
    python n_fgsm.py --dataset svhn --epsilon 12 --noise 36        # SVHN at ε = 12: k = 3ε (experiments.sh)
    python n_fgsm.py --model wrn-28-10 --dropout 0.3   # the authors' WRN-28-10 (at ε = 16 on CIFAR-10: --noise 64)
    python n_fgsm.py --dataset imagenet --data-dir DIR # the authors' ImageNet run: Wong et al.'s configuration, k = ε

Paper: results as curves over ε (CIFAR-10/100, SVHN; PreActResNet18 and WRN-28-10), N-FGSM matching GradAlign's
PGD-50-10 accuracy at a third of its cost; the per-ε numbers are in tables of its appendix, which could not be read
here.
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Each iteration (the paper's Algorithm 1 as the authors' train.py implements it; the paper's text past the abstract
could not be read here; DECISIONS.md, 'N-FGSM step'):
    η ~ U(−k, k)^d, clamped so that x + η ∈ [0, 1]                   the noise, k = 2ε by default
    δ = η + α·sign(∇_η CE(f(x + η), y)), clamped so that x + δ ∈ [0, 1]       α = ε; NO projection onto the ε-ball
    θ ← θ − lr·∇_θ CE(f(x + δ), y)                                   (δ detached; model in train mode for both passes)
So |δ| reaches k + α = 3ε during training, by design; the evaluation (the same for every script here) attacks
within ε. CIFAR: one cyclic lr triangle 0 → 0.2 → 0 over 30 epochs, stepped per iteration (momentum cycles
0.9 → 0.8 → 0.9 against it, PyTorch's CyclicLR as the code uses it, and Wong's FGSM-RS before it).
"""

import torch
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # train.py's defaults and experiments.sh (PreActResNet18, CIFAR-10/100: --epsilon E --alpha E --unif 2): 30
    # epochs, batch 128, SGD momentum 0.9, wd 5e-4, CyclicLR 0 → 0.2 → 0 peaking half-way; α = ε, k = 2ε.
    "default": dict(
        epochs=30,
        batch_size=128,
        lr=0.2,
        epsilon=8,
        alpha=8,
        noise=16,
        weight_decay=5e-4,
        lr_schedule="cyclic",
        lr_peak=0.5,
        ramp_epochs=0.0,
    ),
    # train.py for SVHN: lr_max forced to 0.05, the triangle peaking at 2/5 of the run, and ε (so α and k with it)
    # scaled by min(iteration / (5 epochs' iterations), 1).
    "svhn": dict(lr=0.05, lr_peak=0.4, ramp_epochs=5.0),
    # The authors' ImageNet runs (Imagenet/experiments.sh: ε 2, α 2, --unif 1) on Wong et al.'s ImageNet
    # configuration (imagenet.IMAGENET, the phases and its lr schedule, imagenet.imagenet_lr): k = ε there.
    "imagenet": dict(alpha=2, noise=2, lr_schedule="imagenet"),
}


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="the peak lr of either --lr-schedule",
        alpha="FGSM step size α, /255 units (paper: α = ε; keeps its ratio to ε when only "
        "--epsilon is given)",
    )
    p.add_argument(
        "--noise",
        type=flags.per255("--noise", zero=True),
        default=None,
        metavar="K",
        help="k, the noise magnitude: η ~ U(−k, k) per pixel, /255 units (paper: k = 2ε, the "
        "code's --unif 2; keeps its ratio to ε when only --epsilon is given; 0: plain FGSM from x)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["cyclic", "imagenet"],
        default=None,
        help="set every iteration. cyclic: one triangle 0 → lr → 0 peaking at --lr-peak (the "
        "authors' CyclicLR; the momentum cycles 0.9 → 0.8 → 0.9 against it); imagenet: Wong et "
        "al.'s ImageNet schedule (imagenet.imagenet_lr), as the authors' ImageNet runs",
    )
    p.add_argument(
        "--lr-peak",
        type=flags.pos_float,
        default=None,
        metavar="FRACTION",
        help="cyclic: where the lr triangle peaks, as a fraction of the run (the code: 1/2; SVHN "
        "2/5)",
    )
    p.add_argument(
        "--ramp-epochs",
        type=flags.nonneg_float,
        default=None,
        help="ε, α and k grow linearly from 0 over this many epochs, set at every iteration (the "
        "code's SVHN warm-up: 5; 0: none)",
    )
    p.add_argument(
        "--dropout",
        type=flags.nonneg_float,
        default=0.0,
        help="dropout in every block of a --model wrn-DEPTH-WIDTH (the authors' WideResNet: 0.3)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="n_fgsm", eps_relative=("alpha", "noise"))
    if not args.lr_peak < 1:
        p.error(f"--lr-peak {args.lr_peak}: a fraction of the run, strictly between 0 and 1")
    if args.dropout >= 1 or (args.dropout > 0 and not args.model.startswith("wrn")):
        p.error(f"--dropout {args.dropout}: a rate in [0, 1), only for --model wrn-DEPTH-WIDTH")
    return args


def n_fgsm_delta(model, x, y, alpha, k, noise=None, autocast=None):
    """N-FGSM's perturbation (de Jorge et al., NeurIPS 2022, Algorithm 1; the authors' train.py): one signed-gradient
    step of the cross-entropy from uniform noise of magnitude k, clamped to the pixel range but NOT projected onto
    the ε-ball (the paper's point: no clipping).

    x: N×C×H×W images in [0, 1] (checked), y: N labels; alpha, k: α and k in [0, 1] units (paper: α = ε, k = 2ε);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: used in the mode it is in (train mode in the authors' code, so BatchNorm sees this pass).
    noise: the noise η, N×C×H×W with |η| ≤ k (default: uniform in [−k, k] per pixel; the authors' code draws it one
        channel at a time, which only reorders the random stream).
    Returns δ, detached, N×C×H×W: x + δ in [0, 1] and |δ| ≤ k + α (3ε by default: more than ε, by design)."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16's input gradient would underflow: the loss is scaled, which leaves its sign unchanged
    scale = 1024.0 if autocast == torch.float16 else 1.0
    eta = torch.empty_like(x).uniform_(-k, k) if noise is None else noise
    eta = ((x + eta).clamp(0, 1) - x).requires_grad_(True)  # x + η in the pixel range
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        loss = F.cross_entropy(model(x + eta), y)
    (grad,) = torch.autograd.grad(loss * scale, eta)
    delta = eta.detach() + alpha * grad.sign()  # no projection onto the ε-ball (Algorithm 1)
    return (x + delta).clamp(0, 1) - x


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data, dropout=args.dropout)
    run = harness.Run(args, data, columns=["delta_linf"])
    # two views of one network, the same parameters: the attack's (input gradients) and the weight step's
    attack_model, train_model = run.models(model)
    alpha = args.alpha / 255
    k = args.noise / 255
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    steps = data.train.steps(args.epochs)  # the batches the run yields
    if args.lr_schedule == "imagenet":
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    else:
        # The code's CyclicLR(0, lr) over all iterations; with SGD it also cycles momentum 0.9 → 0.8 → 0.9, and its
        # first step runs at lr 0.
        up = steps * args.lr_peak
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.0, max_lr=args.lr, step_size_up=up, step_size_down=steps - up
        )
    ramp_steps = args.ramp_epochs * data.train.batches(0)
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()
        total_loss = total_correct = total_n = total_linf = 0
        # the run's iterations before this epoch
        done = sum(data.train.batches(e) for e in range(epoch))
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            # SVHN's warm-up: ε, hence α and k, times min(iteration / ramp, 1), from 0 at the first iteration.
            ramp = min((done + i) / ramp_steps, 1.0) if ramp_steps else 1.0
            # η ~ U(−k, k), δ = η + α·sign(∇η): both passes in train mode, as in the authors' code.
            delta = n_fgsm_delta(attack_model, x, y, ramp * alpha, ramp * k, autocast=run.amp)
            # The weight step on CE at x + δ.
            with run.autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
            total_linf += delta.flatten(1).abs().amax(1).sum()
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            # the mean of max |δ| over each training image, /255: up to k + α, above ε by design
            delta_linf=(255 * total_linf / total_n).item(),
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
