"""ATLAS: Adversarial Training via Local Stability.

Lu & Kumar, "Improving local effectiveness for global robust training": the anonymous ICLR 2021 submission
(OpenReview k9GoaycDeio) is the text followed here; a later version is arXiv:2110.14030.
No public code exists: the paper is the only source.

    python atlas.py                                        # one-step ATLAS, CIFAR-10 (upper bound 100 epochs)
    python atlas.py --epochs 30 --dataset cifar100         # CIFAR-100 values: α 2e-4, β 5
    python atlas.py --attack-iters 10                      # ten-step ATLAS: PGD-10 step 0.007, α 1e-4, β 5 (C-100: 10)
    python atlas.py --dataset mnist --attack-iters 20      # MNIST's multi-step ATLAS: PGD-20 step 0.01, α 5e-6, β 0.2
    python atlas.py --jac-alpha 0                          # ATLAS-g (global term only, eq. 21)
    python atlas.py --kl-beta 0                            # ATLAS-l (local term only, eq. 20)
    python atlas.py --model wrn-28-8                       # the paper's network
    python atlas.py --dataset mnist --data-dir DIR         # MNIST: α 1e-5, β 0.3, lr 0.01, batch 128

Paper (one-step, WRN-28-8): CIFAR-10 84.52% clean / 49.01% PGD-20 / 46.55% multi-targeted / 46.16% AA,
0.73 s per batch against 0.25 s for one-step ADV (FGSM-RS): 2.9×. CIFAR-100 60.98% / 26.30% / AA 23.42%.
Measured here: see README.md (only numbers from commands shown there).

Each iteration (SPEC §4):
    ε_t = v·r, r = min(1, epochs done / 15)                       ε ramp of §5.3, per iteration
    x′ = x + δ, δ from U(−ε_t, ε_t) and one signed-gradient CE step of 1.25·ε_t (or PGD-10)
    loss = CE(x′) + r·α·‖J(x′)‖²_F (estimate)   +   r·β·KL(p(x′) ‖ p(x))                eq. (14)
           └──────── local, eq. (12) ────────┘      └──────── global, eq. (13) ───────┘
After each epoch (App. B): PGD-10 (step 0.007) accuracy on 5000 held-out training images; 2 epochs
without a new best → lr ÷ 5; 10 epochs without one → stop. The best-validation model is reported.
Epochs without a new best are counted only once ε has reached its full value (our choice: see
ValidationScheduler).
"""
import math

import torch
import torch.nn.functional as F

import common

RECIPES = {
    # App. B, CIFAR-10 and CIFAR-100 one-step: SGD lr 0.1, momentum 0.9, wd 2e-4, batch 64, FGSM step
    # 1.25ε (§6, Wong et al.), α = 2e-4, β = 5; validation PGD-10 with step 0.007 (= 1.785/255).
    # epochs is only an upper bound: the validation scheduler stops 10 epochs after the best one (the paper's
    # models peaked around epoch 30).
    "default": dict(epochs=100, batch_size=64, lr=0.1, weight_decay=2e-4, epsilon=8, alpha=10, jac_alpha=2e-4,
                    kl_beta=5.0, val_size=5000, val_iters=10, val_step=1.785),
    # App. B, MNIST one-step: lr 0.01, batch 128, α = 1e-5, β = 0.3; ε 0.3, FGSM step 1.25ε = 0.375; validation
    # PGD-20 with step 0.01. Momentum and weight decay are not stated for MNIST: the CIFAR values are kept.
    "mnist": dict(batch_size=128, lr=0.01, epsilon=76.5, alpha=95.625, jac_alpha=1e-5, kl_beta=0.3,
                  val_iters=20, val_step=2.55),
}
# Multi-step ATLAS (--attack-iters > 1), App. B: the attack is PGD with the validation step (0.007; MNIST
# 0.01), α = 1e-4 and β = 5 on CIFAR-10, β = 10 on CIFAR-100; MNIST (twenty-step, §6: --attack-iters 20)
# α = 5e-6, β = 0.2.
MULTI_STEP = {
    "default": dict(alpha=1.785, jac_alpha=1e-4, kl_beta=5.0),
    "cifar100": dict(alpha=1.785, jac_alpha=1e-4, kl_beta=10.0),
    "mnist": dict(alpha=2.55, jac_alpha=5e-6, kl_beta=0.2),
}


def get_args(argv=None):
    p = common.base_parser(__doc__, lr_flag="--lr", lr_help="starting learning rate (lowered by the validation "
                                                             "scheduler)")
    p.add_argument("--attack-iters", type=common.pos_int, default=1,
                   help="signed-gradient steps of the attack: 1 = one-step ATLAS (FGSM-RS, step --alpha = 1.25ε), "
                        "10 = CIFAR's ten-step ATLAS (PGD, step 0.007 = 1.785/255), 20 = MNIST's multi-step "
                        "ATLAS (--dataset mnist --attack-iters 20: PGD, step 0.01 = 2.55/255). Any value > 1 "
                        "takes the multi-step recipe's step and loss weights")
    p.add_argument("--jac-alpha", type=common.nonneg_float, default=None,
                   help="α of eq. (14), weight of the Jacobian term (0: ATLAS-g). Default 2e-4 one-step, 1e-4 ten-step "
                        "(MNIST 1e-5 / 5e-6)")
    p.add_argument("--kl-beta", type=common.nonneg_float, default=None,
                   help="β of eq. (14), weight of the KL term (0: ATLAS-l). Default 5 (ten-step CIFAR-100: 10; "
                        "MNIST 0.3 / 0.2)")
    p.add_argument("--ramp-epochs", type=common.nonneg_float, default=15,
                   help="ε, α and β grow linearly from 0 over this many epochs (0: no ramp)")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=None, help="default 2e-4")
    p.add_argument("--val-iters", type=common.pos_int, default=None,
                   help="PGD steps of the validation attack (default 10; MNIST 20)")
    p.add_argument("--val-step", type=common.pos_float, default=None,
                   help="PGD step of the validation attack, /255 units (default 1.785 = 0.007; MNIST 2.55 = 0.01; "
                        "follows --epsilon in proportion)")
    p.add_argument("--plateau-epochs", type=common.pos_int, default=2,
                   help="epochs without a new best validation accuracy before the lr is divided by 5; counted "
                        "only once ε has reached its full value (the end of --ramp-epochs)")
    p.add_argument("--stop-epochs", type=common.pos_int, default=10,
                   help="epochs without a new best validation accuracy before training stops; counted only once "
                        "ε has reached its full value (the end of --ramp-epochs)")
    # The ten-step variant has its own step and loss weights: pick the recipe table before filling defaults.
    multi_step = p.parse_known_args(argv)[0].attack_iters > 1
    recipes = {k: {**RECIPES.get(k, {}), **(MULTI_STEP.get(k, {}) if multi_step else {})}
               for k in RECIPES.keys() | MULTI_STEP.keys()}
    # The FGSM step (1.25ε) and the validation PGD's step (0.007 ≈ 0.22ε) follow --epsilon unless given.
    # An image folder of any size: hold out the paper's share of CIFAR (5,000 of 50,000), at most 5,000.
    recipes["folder"] = {**recipes.get("folder", {}), "val_size": None}
    args = common.parse_args(p, recipes, argv, script="atlas", eps_relative=("alpha", "val_step"))
    if args.val_size is None:
        args.val_size = min(5000, len(common.load_split("folder", args.data_dir, train=True)[1]) // 10)
    if args.val_size == 0:
        p.error("--val-size 0: the learning-rate scheduler and the stopping rule of App. B need a validation set")
    return args


def ramp(epoch, batch, batches, ramp_epochs):
    """ε_t / v at iteration `batch` of `epoch` (§5.3): 0 at the start, 1 after `ramp_epochs` epochs, linear in
    between. The paper ramps "over epochs" without giving the shape; we ramp per iteration."""
    if ramp_epochs == 0:
        return 1.0
    return min(1.0, (epoch + batch / batches) / ramp_epochs)


def attack(model, x, y, eps, step, iters, autocast):
    """x′ − x: random start in the ε-ball, then `iters` signed-gradient steps on CE, projected onto the ε-ball
    and [0, 1]. iters = 1 is Wong et al.'s FGSM-RS step (§6: "random initialization and a step size of 1.25ε")."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(iters):
        delta.requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(model(x + delta), y)
        grad, = torch.autograd.grad(loss, delta)  # ∇δ only: the weight gradients are not needed here
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def jacobian_estimate(logits, x_adv):
    """‖J(x′)‖²_F^approx of eq. (12), J = ∂logits/∂x′ (input in [0, 1] units): Hoffman et al. (2019) with one
    projection. v is uniform on the unit sphere of R^C (a normalised Gaussian), so E[v vᵀ] = I/C and
    C·‖vᵀJ‖² is an unbiased estimate of ‖J‖²_F; vᵀJ costs one backward pass whatever C is. Batch mean.
    Hoffman's regulariser carries a factor ½; whether ATLAS kept it is not stated: we don't.

    create_graph=True: the estimate is a term of the loss, so θ gets its gradient through a double backward.
    vᵀJ is the gradient of the batch sum Σ_i v_iᵀ f(x′_i); in train mode BatchNorm couples the samples of a
    batch slightly, which Hoffman's estimator (and code) ignores as well."""
    n, num_classes = logits.shape
    v = torch.randn(n, num_classes, device=logits.device)
    v = v / v.norm(dim=1, keepdim=True)
    vJ, = torch.autograd.grad(logits, x_adv, grad_outputs=v.to(logits.dtype), create_graph=True)
    return num_classes * vJ.flatten(1).pow(2).sum(1).mean()


def atlas_terms(model, x, x_adv, y, use_jacobian=True, use_kl=True):
    """The three terms of eq. (14), each a batch mean, unweighted: CE(x′), ‖J(x′)‖²_F^approx and
    KL(p(x′) ‖ p(x)) = Σ_k p_k(x′)(log p_k(x′) − log p_k(x)). p(x′) is the base distribution (§5.2: the local
    term lives at x′ too) and gradients flow through both p(x′) and p(x). A term that the run does not use
    (weight 0: ATLAS-g / ATLAS-l) is not computed and returned as 0. Also returns the logits at x′."""
    x_adv = x_adv.detach().requires_grad_(use_jacobian)
    logits_adv = model(x_adv)
    ce = F.cross_entropy(logits_adv, y)                                          # eq. (12), first local term
    zero = torch.zeros((), device=x.device)
    jac = jacobian_estimate(logits_adv, x_adv) if use_jacobian else zero        # eq. (12), Jacobian term
    kl = zero
    if use_kl:                                                                   # eq. (13), the global term
        # x goes through its own forward pass (not concatenated with x′): BatchNorm normalises each on its own.
        log_p_adv = F.log_softmax(logits_adv.float(), 1)
        log_p_clean = F.log_softmax(model(x).float(), 1)
        kl = (log_p_adv.exp() * (log_p_adv - log_p_clean)).sum(1).mean()
    return logits_adv, ce, jac, kl


class ValidationScheduler:
    """App. B: after each epoch, the robust accuracy on the validation set. Every `plateau` consecutive epochs
    without a new best (strictly higher) accuracy, lr ÷ `factor`; after `stop` such epochs, stop training.

    Epochs that end before ε has reached its full value are not counted (a new best still counts as one).
    The paper does not say how the scheduler meets the ε ramp of §5.3; the validation attack always uses the
    full ε, so while the model trains at a smaller ε its validation accuracy can stay flat (on MNIST at 0%
    for the first epochs), and counting those epochs would cut the lr at epoch 3 and stop training at
    epoch 11, before the 15-epoch ramp is over. Our choice: start counting when the ramp has ended."""

    def __init__(self, opt, plateau=2, stop=10, factor=5.0):
        self.opt, self.plateau, self.stop, self.factor = opt, plateau, stop, factor
        self.best, self.epochs_since_best = -math.inf, 0

    def step(self, val_acc, count=True):
        """Feed one epoch's validation accuracy; returns True when training should stop. count=False
        (an epoch of the ε ramp): a new best is kept, but an epoch without one is not counted."""
        if val_acc > self.best:
            self.best, self.epochs_since_best = val_acc, 0
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
        self.best, self.epochs_since_best = state["best"], state["epochs_since_best"]


def main(argv=None):
    args = get_args(argv)
    run = common.Run(args)
    # App. B: the validation images are held out of training before it starts (data.val, never in data.train).
    data = common.get_data(args, run.device, args.val_size)
    model = common.get_model(args, run.device)
    train_model = run.compile(model)
    # torch.compile does not support double backward: with the Jacobian term the loss pass runs eagerly and
    # --compile only speeds up the attack.
    loss_model = model if args.jac_alpha > 0 else train_model
    eps, step, val_step = args.epsilon / 255, args.alpha / 255, args.val_step / 255
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    sched = ValidationScheduler(opt, args.plateau_epochs, args.stop_epochs)
    run.track(model=model, opt=opt, sched=sched)
    batches = len(data.train)

    for epoch in run.epochs():
        model.train()
        totals = {name: 0.0 for name in ("loss", "correct", "ce", "jac", "kl")}
        total_n = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            # §5.3: ε ramps up from 0; α and β are scaled by ε_t / v, and so is the attack step (1.25·ε_t).
            r = ramp(epoch, i, batches, args.ramp_epochs)
            # x′: a weak adversary; the model stays in train mode for the attack, as in Wong et al.'s code.
            delta = attack(train_model, x, y, r * eps, r * step, args.attack_iters, run.autocast)
            with run.autocast():
                logits, ce, jac, kl = atlas_terms(loss_model, x, x + delta, y, args.jac_alpha > 0, args.kl_beta > 0)
                loss = ce + r * args.jac_alpha * jac + r * args.kl_beta * kl          # eq. (14)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for name, value in (("loss", loss), ("ce", ce), ("jac", jac), ("kl", kl)):
                totals[name] += value.detach() * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum()
            total_n += len(y)

        # App. B: PGD on the held-out images (full ε, fp32, eval mode) drives the lr, the stop and "best".
        val_acc = common.pgd_accuracy(model, data.val.images, data.val.labels, eps, val_step, args.val_iters,
                                      batch_size=500)
        lr = opt.param_groups[0]["lr"]  # the lr this epoch trained with, before the scheduler changes it
        # Epochs without a new best count once ε has reached v by the end of the epoch (see ValidationScheduler).
        full_eps = ramp(epoch + 1, 0, batches, args.ramp_epochs) == 1.0
        stop = sched.step(val_acc, count=full_eps)
        if stop:
            run.print(f"# stop: no better validation accuracy than {100 * sched.best:.2f}% for "
                      f"{args.stop_epochs} epochs at full ε")
        terms = {name: (totals[name] / total_n).item() for name, used in
                 (("ce", True), ("jac", args.jac_alpha > 0), ("kl", args.kl_beta > 0)) if used}
        run.end_epoch(epoch, model, data, lr=lr, loss=(totals["loss"] / total_n).item(),
                      acc=(totals["correct"] / total_n).item(), score=val_acc, stop=stop,
                      eps=r * args.epsilon, val_acc=val_acc, **terms)
    run.finish(model, data)


if __name__ == "__main__":
    common.main_guard(main)
