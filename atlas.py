"""ATLAS: Adversarial Training via Local Stability.

Lu & Kumar, "Improving local effectiveness for global robust training": the anonymous ICLR 2021 submission
(OpenReview k9GoaycDeio) is the text followed here, and every equation, section and appendix number below is its
own (DECISIONS.md, 'ATLAS text followed'); a later, reworded version is arXiv:2110.14030. No code was released:
the paper is the only source.

    python atlas.py                                        # one-step ATLAS, CIFAR-10 (upper bound 100 epochs)
    python atlas.py --epochs 30 --dataset cifar100         # CIFAR-100 values: α 2e-4, β 5
    python atlas.py --attack-iters 10                      # ten-step ATLAS: PGD-10 step 0.007, α 1e-4, β 5 (C-100: 10)
    python atlas.py --dataset mnist --attack-iters 20      # MNIST's multi-step ATLAS: PGD-20 step 0.01, α 5e-6, β 0.2
    python atlas.py --jac-alpha 0                          # ATLAS-g (global term only, App. C, eq. (21))
    python atlas.py --kl-beta 0                            # ATLAS-l (local term only, App. C, eq. (20))
    python atlas.py --model wrn-28-8                       # the paper's network
    python atlas.py --dataset mnist --data-dir DIR         # MNIST: α 1e-5, β 0.3, lr 0.01, batch 128

Paper (one-step, WRN-28-8): CIFAR-10 84.52% clean / 49.01% PGD-20 / 46.55% multi-targeted / 46.16% AA,
0.73 s per batch against 0.25 s for one-step ADV (FGSM-RS): 2.9×. CIFAR-100 60.98% / 26.30% / AA 23.42%.
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Each iteration (§5 and App. B; what the paper leaves open: DECISIONS.md, 'ATLAS unstated details'):
    r = min(1, epochs done / 15), ε_t = r·v                       the ε ramp of §5.3 (15 epochs: §6), per iteration
    x′ = x + δ, δ from U(−ε_t, ε_t) and one signed-gradient CE step of 1.25·ε_t (§6; or PGD-10)
    loss = CE(x′) + r·α·‖J(x′)‖²_F (estimate)   +   r·β·KL(p(x′) ‖ p(x))                eq. (14)
           └──────── local, eq. (12) ────────┘      └──────── global, eq. (13) ───────┘
After each epoch (App. B): PGD-10 (step 0.007) accuracy on held-out training images (5,000 of CIFAR's 50,000; here
a tenth of the training split, at most 5,000); 2 epochs without a new best → lr ÷ 5; 10 epochs without one → stop.
The best-validation model is reported. Epochs without a new best are counted only once ε has reached its full value
(our choice: DECISIONS.md, 'ATLAS patience after the ramp').
"""

import math
import sys

import torch
import torch.nn.functional as F

import common
import flags
import harness

RECIPES = {
    # App. B, CIFAR-10 and CIFAR-100 one-step: SGD lr 0.1, momentum 0.9, wd 2e-4, batch 64, FGSM step
    # 1.25ε (§6, Wong et al.), α = 2e-4, β = 5; validation PGD-10 with step 0.007 (= 1.785/255) on held-out training
    # images (val_size None: a tenth of the training split, at most 5,000, common.get_data; App. B: 5,000 of CIFAR's
    # 50,000). epochs is only an upper bound: the validation scheduler stops 10 epochs after the best one (the
    # paper's models peaked around epoch 30).
    "default": dict(
        epochs=100,
        batch_size=64,
        lr=0.1,
        weight_decay=2e-4,
        epsilon=8,
        alpha=10,
        jac_alpha=2e-4,
        kl_beta=5.0,
        val_size=None,
        val_iters=10,
        val_step=1.785,
        ramp_epochs=15,
    ),
    # App. B, MNIST one-step: lr 0.01, batch 128, α = 1e-5, β = 0.3; ε 0.3, FGSM step 1.25ε = 0.375; validation
    # PGD-20 with step 0.01. Momentum and weight decay are not stated for MNIST: the CIFAR values are kept
    # (DECISIONS.md, 'ATLAS unstated details').
    "mnist": dict(
        batch_size=128,
        lr=0.01,
        epsilon=76.5,
        alpha=95.625,
        jac_alpha=1e-5,
        kl_beta=0.3,
        val_iters=20,
        val_step=2.55,
    ),
    # ImageNet (our choice; no ImageNet run in the paper): imagenet.IMAGENET's data, network, phases and ε, App. B's
    # lr and validation rule, and the ε ramp over the first third of the 15 epochs (CIFAR: 15 of the ~30 to the best).
    "imagenet": dict(lr=0.1, ramp_epochs=5),
}
# Multi-step ATLAS (--attack-iters > 1), App. B: the attack is PGD with the validation step (0.007; MNIST
# 0.01), α = 1e-4 and β = 5 on CIFAR-10, β = 10 on CIFAR-100; MNIST (§6: multi-step methods take 20 steps there,
# --attack-iters 20) α = 5e-6, β = 0.2.
MULTI_STEP = {
    "default": dict(alpha=1.785, jac_alpha=1e-4, kl_beta=5.0),
    "cifar100": dict(alpha=1.785, jac_alpha=1e-4, kl_beta=10.0),
    "mnist": dict(alpha=2.55, jac_alpha=5e-6, kl_beta=0.2),
}


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="starting learning rate (lowered by the validation scheduler)",
        alpha="step of the attack, /255 units: 1.25ε one-step, the validation step (0.007) "
        "multi-step; keeps its ratio to ε when only --epsilon is given",
        val_size="training images held out for App. B's validation (None: a tenth of the "
        "training split, at most 5,000, as the paper's 5,000 of CIFAR's 50,000; 0 is "
        "refused)",
    )
    p.add_argument(
        "--attack-iters",
        type=flags.pos_int,
        default=1,
        help="signed-gradient steps of the attack: 1 = one-step ATLAS (FGSM-RS, step --alpha = "
        "1.25ε), 10 = CIFAR's ten-step ATLAS (PGD, step 0.007 = 1.785/255), 20 = MNIST's "
        "multi-step ATLAS (--dataset mnist --attack-iters 20: PGD, step 0.01 = 2.55/255). Any "
        "value > 1 takes the multi-step recipe's step and loss weights",
    )
    p.add_argument(
        "--jac-alpha",
        type=flags.nonneg_float,
        default=None,
        help="α of eq. (14), weight of the Jacobian term (0: ATLAS-g); -h --attack-iters 10 shows "
        "the multi-step recipes' values",
    )
    p.add_argument(
        "--kl-beta",
        type=flags.nonneg_float,
        default=None,
        help="β of eq. (14), weight of the KL term (0: ATLAS-l); -h --attack-iters 10 shows the "
        "multi-step recipes' values",
    )
    p.add_argument(
        "--ramp-epochs",
        type=flags.nonneg_float,
        default=None,
        help="ε, α and β grow linearly from 0 over this many epochs (0: no ramp); --epochs must "
        "be longer",
    )
    p.add_argument(
        "--val-iters", type=flags.pos_int, default=None, help="PGD steps of the validation attack"
    )
    p.add_argument(
        "--val-step",
        type=flags.per255("--val-step"),
        default=None,
        help="PGD step of the validation attack, /255 units (1.785 = 0.007; MNIST 2.55 = 0.01); "
        "follows --epsilon in proportion",
    )
    p.add_argument(
        "--plateau-epochs",
        type=flags.pos_int,
        default=2,
        help="epochs without a new best validation accuracy before the lr is divided by 5; counted "
        "only once ε has reached its full value (the end of --ramp-epochs)",
    )
    p.add_argument(
        "--stop-epochs",
        type=flags.pos_int,
        default=10,
        help="epochs without a new best validation accuracy before training stops; counted only "
        "once ε has reached its full value (the end of --ramp-epochs)",
    )
    # The multi-step variants have their own step and loss weights: pick the recipe table before filling defaults.
    # (-h is left out of this first look, so that the help shows the recipe values parse_args adds to it.)
    words = sys.argv[1:] if argv is None else argv
    first_look = p.parse_known_args([w for w in words if w not in ("-h", "--help")])[0]
    multi_step = first_look.attack_iters > 1
    # in a fixed order, for -h
    recipes = {
        k: {**RECIPES.get(k, {}), **(MULTI_STEP.get(k, {}) if multi_step else {})}
        for k in [*RECIPES, *(k for k in MULTI_STEP if k not in RECIPES)]
    }
    # The attack's step (1.25ε) and the validation PGD's step (0.007 ≈ 0.22ε) follow --epsilon unless given.
    args = flags.parse_args(p, recipes, argv, script="atlas", eps_relative=("alpha", "val_step"))
    if args.val_size == 0:
        p.error(
            "--val-size 0: App. B's learning-rate rule, its stopping rule and the best model need "
            "held-out images; leave --val-size out (a tenth of the training images, at most 5,000) "
            "or give a number"
        )
    if args.ramp_epochs and args.epochs <= args.ramp_epochs:
        p.error(
            f"--epochs {args.epochs} is not longer than --ramp-epochs {args.ramp_epochs:g}: "
            f"ε would never reach its full value; give a shorter --ramp-epochs (0: no ramp) "
            f"or more --epochs"
        )
    return args


def ramp(epoch, batch, batches, ramp_epochs):
    """r = ε_t / v at iteration `batch` of `epoch` (0-based; `batches` per epoch), §5.3: 0 at the start, 1 after
    `ramp_epochs` epochs, linear in between; ramp_epochs 0: 1 throughout. The paper ramps "over epochs" without
    giving the shape; we ramp per iteration (DECISIONS.md, 'ATLAS unstated details')."""
    if ramp_epochs == 0:
        return 1.0
    return min(1.0, (epoch + batch / batches) / ramp_epochs)


def jacobian_estimate(logits, x_adv, scale=1.0):
    """‖J(x′)‖²_F^approx of eq. (12), J = ∂logits/∂x′ (input in [0, 1] units), batch mean: Hoffman et al.'s
    estimate (arXiv:1908.02729) with one projection. v is uniform on the unit sphere of R^C (a normalised
    Gaussian per sample), so E[v vᵀ] = I/C and C·‖vᵀJ‖² is an unbiased estimate of ‖J‖²_F; vᵀJ costs one
    backward pass whatever C is. Hoffman's regulariser carries a factor ½; whether ATLAS kept it is not stated: we
    don't (DECISIONS.md, 'ATLAS unstated details').

    logits: N×C, from x_adv through a graph that supports double backward (an eager module; torch.compile has none);
    x_adv: N×C×H×W with requires_grad. scale: v is multiplied by it before the backward pass and vᵀJ divided back
    (2^10 under float16 autocast, so that the backward does not underflow). Returns a scalar with create_graph=True:
    it is a term of the loss, so θ gets its gradient through a double backward. vᵀJ is the gradient of the batch sum
    Σ_i v_iᵀ f(x′_i); in train mode BatchNorm couples the samples of a batch slightly, which Hoffman's estimator (and
    code) ignores as well."""
    n, num_classes = logits.shape
    v = torch.randn(n, num_classes, device=logits.device)
    v = v / v.norm(dim=1, keepdim=True)
    (vJ,) = torch.autograd.grad(
        logits, x_adv, grad_outputs=(scale * v).to(logits.dtype), create_graph=True
    )
    return num_classes * (vJ.float() / scale).flatten(1).pow(2).sum(1).mean()


class ValidationScheduler:
    """App. B: after each epoch, the robust accuracy on the validation set. Every `plateau` consecutive epochs
    without a new best (strictly higher) accuracy, lr ÷ `factor`; after `stop` such epochs, stop training.

    Epochs that end before ε has reached its full value are not counted (a new best still counts as one).
    The paper does not say how the scheduler meets the ε ramp of §5.3; the validation attack always uses the
    full ε, so while the model trains at a smaller ε its validation accuracy can stay flat (on MNIST at 0%
    for the first epochs), and counting those epochs would cut the lr at epoch 3 and stop training at
    epoch 11, before the 15-epoch ramp is over. Our choice (DECISIONS.md, 'ATLAS patience after the ramp'):
    start counting when the ramp has ended."""

    def __init__(self, opt, plateau=2, stop=10, factor=5.0):
        self.opt = opt
        self.plateau = plateau
        self.stop = stop
        self.factor = factor
        self.best = -math.inf
        self.epochs_since_best = 0

    def step(self, val_acc, count=True):
        """Feed one epoch's validation accuracy; returns True when training should stop. count=False
        (an epoch of the ε ramp): a new best is kept, but an epoch without one is not counted."""
        if val_acc > self.best:
            self.best = val_acc
            self.epochs_since_best = 0
            return False
        if not count:
            return False
        self.epochs_since_best += 1
        if self.epochs_since_best >= self.stop:
            return True
        if self.epochs_since_best % self.plateau == 0:
            for group in self.opt.param_groups:
                group["lr"] /= self.factor
        return False

    def state_dict(self):
        return {"best": self.best, "epochs_since_best": self.epochs_since_best}

    def load_state_dict(self, state):
        self.best = state["best"]
        self.epochs_since_best = state["epochs_since_best"]


def atlas_loss(
    model, x, y, eps, step, jac_alpha, kl_beta, iters=1, ramp=1.0, autocast=None, attack_model=None
):
    """ATLAS's loss for one batch (Lu & Kumar, ICLR 2021 submission, OpenReview k9GoaycDeio): a weak attack gives
    x′ (§6: random start, then signed-gradient CE steps), then eq. (14) at x′:
        CE(f(x′), y) + r·α·‖J(x′)‖²_F + r·β·KL(p(x′) ‖ p(x))
    the local term of eq. (12) (CE and Hoffman et al.'s one-projection estimate of the Jacobian's squared Frobenius
    norm: jacobian_estimate, beside this function, which it needs when jac_alpha > 0) and the global term of
    eq. (13), whose base distribution is p(x′) (§5.2); gradients flow through both p(x′) and p(x).

    x: images N×C×H×W in [0, 1] (normalise inside the model: a range check raises otherwise); y: labels N, int64;
    ε and steps in [0, 1] units; autocast: None (fp32) or torch.autocast's dtype (fp16: the loss is scaled by 2^10).
    model: the loss passes (x′, and x for the KL term) run through it, so it must support double backward when
        jac_alpha > 0 (an eager module: torch.compile has no double backward).
    attack_model: the network the attack's passes run through (default: model): the same parameters, e.g. a view
        that computes input gradients only. Both are used in the mode they are in and left in it; in train mode (as
        in training here, and in Wong et al.'s code for the FGSM step) BatchNorm normalises with each pass's own
        batch statistics and its running statistics take the `iters` attack passes and the loss passes, as the
        method's training passes do; in eval mode nothing changes them.
    eps, step: the full ε (v of §5.3) and the attack's step (CIFAR-10 one-step: 8/255 and 1.25ε = 10/255;
        multi-step: 0.007).
    jac_alpha, kl_beta: α and β of eq. (14); 0 skips that term (ATLAS-g: α = 0, ATLAS-l: β = 0, App. C).
    iters: signed-gradient steps of the attack (1: Wong et al.'s FGSM-RS step; more: PGD with step `step`).
    ramp: r in [0, 1], the ε ramp of §5.3: ε, the attack step (DECISIONS.md, 'ATLAS unstated details'), α and β
        are multiplied by it.
    autocast applies to every forward pass; under float16 the Jacobian estimate's v is scaled by 2^10 too, its vᵀJ
        divided back. The KL term is computed in fp32.
    Returns (loss, logits, terms): loss, a scalar with its graph to θ (backpropagate it); logits at x′, N×C, with
    graph; terms: the unweighted batch means, detached: 'ce', and 'jac' and 'kl' when their weight is not 0."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    attack_model = model if attack_model is None else attack_model
    # fp16 only: the loss ×2^10 keeps its input gradient from underflowing (its sign is unchanged).
    scale = 1024.0 if autocast == torch.float16 else 1.0
    # §5.3: ε_t = r·v; the step keeps its ratio to ε_t
    eps = ramp * eps
    step = ramp * step
    # The weak attack (§6: "random initialization and a step size of 1.25ε"), projected onto the ε-ball and [0, 1].
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(iters):
        delta.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            attack_ce = F.cross_entropy(attack_model(x + delta), y)
        # ∇δ only: x′ is a constant of the loss below
        (grad,) = torch.autograd.grad(attack_ce * scale, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    # eq. (14) at x′. x′ needs a gradient only for the Jacobian term (its vᵀJ is a gradient w.r.t. x′).
    x_adv = (x + delta).detach().requires_grad_(jac_alpha > 0)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y)  # eq. (12), first local term
        loss = ce
        terms = {"ce": ce.detach()}
        if jac_alpha > 0:  # eq. (12), Jacobian term
            jac = jacobian_estimate(logits, x_adv, scale)
            loss = loss + ramp * jac_alpha * jac
            terms["jac"] = jac.detach()
        if kl_beta > 0:  # eq. (13), the global term
            # x goes through its own forward pass (not concatenated with x′): BatchNorm normalises each on its own.
            log_p_adv = F.log_softmax(logits.float(), 1)
            log_p_clean = F.log_softmax(model(x).float(), 1)
            kl = (log_p_adv.exp() * (log_p_adv - log_p_clean)).sum(1).mean()
            loss = loss + ramp * kl_beta * kl
            terms["kl"] = kl.detach()
    return loss, logits, terms


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    # App. B: the validation images are held out of training before it starts (data.val, never in data.train).
    data = common.get_data(args)
    # the batches of the last epoch (ImageNet's phases change them)
    last = data.train.batches(args.epochs - 1)
    if ramp(args.epochs - 1, last - 1, last, args.ramp_epochs) < 1:
        raise common.FastatError(
            f"--ramp-epochs {args.ramp_epochs:g} ends after the last of the "
            f"{data.train.steps(args.epochs)} iterations ({last} in the last epoch): ε would never "
            f"reach its full value; give a shorter --ramp-epochs or more --epochs"
        )
    model = common.get_model(args, data)
    used = [name for name, weight in (("jac", args.jac_alpha), ("kl", args.kl_beta)) if weight > 0]
    run = harness.Run(args, data, columns=["eps", "val_acc", "ce", *used])
    # two views of one network, the same parameters: the attack's and the weight step's.
    # torch.compile has no double backward: with the Jacobian term the loss passes run eagerly (through DDP under
    # torchrun) and --compile only speeds up the attack.
    attack_model, train_model = run.models(model, double_backward=args.jac_alpha > 0)
    eps = args.epsilon / 255
    step = args.alpha / 255
    val_step = args.val_step / 255
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    sched = ValidationScheduler(opt, args.plateau_epochs, args.stop_epochs)
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()  # the attack too sees train mode, as in Wong et al.'s code
        totals = {name: 0.0 for name in ("loss", "correct", "ce", *used)}
        total_n = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            r = ramp(epoch, i, data.train.batches(epoch), args.ramp_epochs)  # §5.3, per iteration
            loss, logits, terms = atlas_loss(
                train_model,
                x,
                y,
                eps,
                step,
                args.jac_alpha,
                args.kl_beta,
                args.attack_iters,
                r,
                run.amp,
                attack_model=attack_model,
            )
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            for name, value in (("loss", loss.detach()), *terms.items()):
                totals[name] += value * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum()
            total_n += len(y)

        # App. B: PGD on the held-out images (full ε, fp32, eval mode: BN statistics untouched) drives the lr, the
        # stop and "best". Under torchrun: one model (the first process's BN statistics), each process attacks
        # its share of the images, one accuracy.
        val_x, val_y = data.val.images, data.val.labels
        val_acc = run.robust_accuracy(model, val_x, val_y, eps, val_step, args.val_iters)
        # the lr this epoch trained with, before the scheduler changes it
        lr = opt.param_groups[0]["lr"]
        # Epochs without a new best count once ε has reached v by the end of the epoch (DECISIONS.md, 'ATLAS
        # patience after the ramp').
        stop = sched.step(val_acc, count=ramp(epoch + 1, 0, 1, args.ramp_epochs) == 1.0)
        if stop:
            common.log(
                f"# stop: no better validation accuracy than {100 * sched.best:.2f}% for "
                f"{args.stop_epochs} epochs at full ε"
            )
        means = {name: (totals[name] / total_n).item() for name in totals}
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=lr,
            loss=means.pop("loss"),
            acc=means.pop("correct"),
            score=val_acc,
            stop=stop,
            eps=r * args.epsilon,
            val_acc=val_acc,
            **means,
        )
        if stop:
            break
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
