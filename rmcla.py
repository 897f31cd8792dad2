"""R-MC-LA: bilateral adversarial training (random start, most-confusing-class attack, adversarial label).

Wang & Zhang, "Bilateral adversarial training: towards fast training of more robust models against adversarial
attacks", ICCV 2019, arXiv:1811.10716 (and its supplementary material). Authors' code (TensorFlow):
github.com/wjyouch/bilateral-adversarial-training.

    python rmcla.py                                    # CIFAR-10 recipe: PreActResNet18, 200 epochs, β = 9
    python rmcla.py --model wrn-28-10                  # the paper's net
    python rmcla.py --dataset cifar100 --top-k 9       # R-MC-LA9 (supplementary §3), β = 11
    python rmcla.py --dataset cifar100 --top-k 9 --vmc-over all    # R-MC-LA9, the other reading of v_MC
    python rmcla.py --label-rule sup                   # the supplement's label rule, eqs. (2)-(6) (its §5)
    python rmcla.py --epochs 20 --milestones 10 15     # a shorter run: its lr milestones, in epochs
    python rmcla.py --dataset mnist --data-dir DIR     # MNIST: Wong's CNN, Adam, 10 epochs (our choice)

Paper (WRN-28-10, ε 8/255, β 9): CIFAR-10 90.8% clean, 54.6% PGD-20, 52.9% PGD-100, 51.9% CW-100;
CIFAR-100 (β 11) 68.7 / 23.2 / 22.7 / 20.6; about 12 h on a V100 for 200 epochs.
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Each iteration (the paper's R-MC-LA; the authors' train.py and train.sh; DECISIONS.md, 'R-MC-LA attack and label'),
with c the true class and p the clean softmax:
    clean logits z with BN in eval mode;  y_MC = argmax_{k≠c} z_k                            (MC)
    x₀ = x + U(−ε, ε);  x_adv = Π(x₀ − ε·sign(∇x₀ CE(f(x₀), y_MC)))  (one targeted step, eval mode)  (R, MC)
    v_k = −log p_k;  y′_k = ε_y·(v_k − v_MC + γ)/D for k ≠ c,  y′_c = 1 − ε_y  with
        ε_y from y′_c = β·max_{k≠c} y′_k                                                   (LA)
    θ ← θ − lr·∇θ Σ_k −y′_k log softmax(f(x_adv))_k   (train mode; no clean term)
Two forward/backward passes and one clean forward per batch.
"""

import torch
import torch.nn.functional as F

import common
import flags
import harness

RECIPES = {
    # Authors' train.py: 200 epochs, batch 128, SGD lr 0.1 momentum 0.9, wd 2e-4, ×0.1 at epochs 100 and 150; the
    # one step is ε (α = ε here; the code's `step_size`).
    "default": dict(
        epochs=200,
        batch_size=128,
        lr=0.1,
        epsilon=8,
        alpha=8,
        weight_decay=2e-4,
        optimizer="sgd",
        milestones=[100, 150],
        beta=9.0,
    ),
    "cifar100": dict(beta=11.0),
    # β for SVHN / Tiny ImageNet is not stated: they keep 9. No MNIST recipe in the sources (DECISIONS.md, 'Our MNIST
    # recipes'; untested at full length): ε = 0.3, Wong's MNIST CNN, batch 100, 10 epochs and Adam as in fgsm_rs.py,
    # but from Adam's usual 1e-3 (this schedule has no warm-up) with ×0.1 at 1/2 and about 3/4 of training.
    "mnist": dict(
        epochs=10,
        batch_size=100,
        lr=1e-3,
        epsilon=76.5,
        alpha=76.5,
        weight_decay=0.0,
        optimizer="adam",
        milestones=[5, 8],
    ),
    # ImageNet (our choice; no ImageNet run in the paper): imagenet.IMAGENET's data, network, phases and ε, with this
    # paper's own schedule compressed to its 15 epochs (lr 0.1, ×0.1 at 50% and 75%).
    "imagenet": dict(lr=0.1, milestones=[8, 11], optimizer="sgd"),
}


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="initial learning rate",
        alpha="size of the one targeted step, /255 units (ε, as the code; keeps its ratio to "
        "ε when only --epsilon is given)",
    )
    p.add_argument(
        "--beta",
        type=flags.pos_float,
        default=None,
        help="β in y′_c = β·max_{k≠c} y′_k: the true class's mass over the largest other one",
    )
    p.add_argument(
        "--gamma",
        type=flags.pos_float,
        default=0.01,
        help="γ, the small share kept for the most confusing class in the adversarial label",
    )
    p.add_argument(
        "--top-k",
        type=flags.pos_int,
        default=None,
        help="spread ε_y over the K non-true classes with the largest v_k only (9: R-MC-LA9); "
        "at most the number of classes − 1; default: over all of them",
    )
    p.add_argument(
        "--vmc-over",
        choices=["top-k", "all"],
        default="top-k",
        help="with --top-k and --label-rule main, where v_MC of y′_k ∝ v_k − v_MC + γ is the "
        "minimum: top-k (default) over the K classes, i.e. the formula restricted to them: the "
        "K-th class gets only γ/D, so ε_y goes to K−1 classes; all: over every non-true class "
        "(the most confusing one, outside the K): all K classes share, and ε_y is larger, about "
        "twice on CIFAR-100 (it tends to 1/(1 + β/K) as the K shares even out). The supplement "
        "does not say which; the authors' code has no R-MC-LA9",
    )
    p.add_argument(
        "--label-rule",
        choices=["main", "sup"],
        default="main",
        help="main: y′_k ∝ v_k − v_MC + γ (paper); sup: y′_k ∝ v_k (supplement eq. (2))",
    )
    p.add_argument(
        "--milestones",
        type=flags.pos_int,
        nargs="*",
        default=None,
        help="epochs after which the lr is multiplied by 0.1, each below --epochs "
        "(--milestones alone: a constant lr)",
    )
    p.add_argument(
        "--optimizer", choices=["sgd", "adam"], default=None, help="sgd with momentum 0.9, or adam"
    )
    args = flags.parse_args(p, RECIPES, argv, script="rmcla", eps_relative=("alpha",))
    flags.milestones(args, p, argv, fractions=(0.5, 0.75))  # the code's drops: 100 and 150 of 200
    if args.vmc_over == "all" and (args.top_k is None or args.label_rule != "main"):
        p.error(
            "--vmc-over all: only with --top-k and --label-rule main (elsewhere the label is the "
            "same either way)"
        )
    return args


def adversarial_label(logits, y, beta, gamma, top_k=None, rule="main", vmc_over="top-k"):
    """R-MC-LA's adversarial label y′ (the paper's LA): N×C soft labels, rows summing to 1, from clean logits N×C
    and labels y (N, int64); computed in fp32. Copyable: needs torch and F only.

    v_k = −log p_k is ∇_{y_k} CE, how much the loss rises per unit of label mass moved to class k.
    main (paper): y′_k = ε_y·w_k/Σw with w_k = v_k − v_MC + γ, so Σw = D = Σ_{k≠c} v_k − (n−1)(v_MC − γ) and the MC
    class keeps only the share γ/D. sup (supplement eq. (2)): w_k = v_k.
    Both: y′_c = 1 − ε_y, and ε_y is the largest budget with y′_c ≥ β·max_{k≠c} y′_k (supplement eq. (3)), taken with
    equality: ε_y = 1/(1 + β·max w/Σw) (main paper; supplement eq. (4)).
    top_k: only the K non-true classes with the largest v_k share ε_y (R-MC-LA9, supplementary §3); K ≤ C − 1.
    vmc_over (DECISIONS.md, 'R-MC-LA9 and v_MC'): the supplement does not say which v_MC the main rule then
    subtracts. "top-k": the formula restricted to the K classes (v_MC, v_LL and n−1 → K taken over that set); the
    smallest v_k of the set is then v_MC, so its class keeps only γ/D and ε_y effectively goes to K−1 classes. "all":
    v_MC of the most confusing class over all non-true classes (the supplement calls the subtracted minimum the MC
    class's), which lies outside the set, so all K classes get a share, w is flatter and ε_y larger (about twice on
    CIFAR-100). Same v_LL, and D = Σ_set v_k − K(v_MC − γ), in both."""
    # exact −log p (the code adds 1e-8 inside the log instead)
    v = -F.log_softmax(logits.float(), 1)
    true = F.one_hot(y, logits.shape[1]).bool()
    share = ~true
    if top_k is not None:
        top = v.masked_fill(true, float("-inf")).topk(top_k, 1).indices
        share = torch.zeros_like(true).scatter_(1, top, True)
    if rule == "main":
        # where v_MC is the minimum (see vmc_over above)
        pool = share if vmc_over == "top-k" else ~true
        v_mc = v.masked_fill(~pool, float("inf")).amin(1, keepdim=True)
        w = (v - v_mc + gamma) * share
    else:
        w = v * share
    w_sum = w.sum(1, keepdim=True)
    eps_y = 1 / (1 + beta * w.amax(1, keepdim=True) / w_sum)
    return eps_y * w / w_sum + (1 - eps_y) * true


def rmcla_loss(
    model,
    x,
    y,
    eps,
    alpha,
    beta,
    gamma,
    top_k=None,
    rule="main",
    vmc_over="top-k",
    autocast=None,
    attack_model=None,
):
    """R-MC-LA's training loss for one batch (Wang & Zhang, ICCV 2019; the authors' train.py): the clean pass in
    eval mode gives the most confusing class y_MC and the adversarial label y′ (adversarial_label, above: copy it
    along); a random start and one step towards y_MC give x_adv; the loss is the soft-label CE of f(x_adv) against y′.

    x: images N×C×H×W in [0, 1] (normalise inside the model: a range check raises otherwise); y: labels N, int64;
    ε and steps in [0, 1] units; autocast: None (fp32) or torch.autocast's dtype (fp16: the loss is scaled by 2^10).
    model: the clean pass and the attack run it in eval mode (its BatchNorm statistics are not moved by them, as
        the code's is_train False), the loss pass in train mode (BatchNorm normalises with, and its running
        statistics take in, x_adv's batch: the method's one training pass); it is handed back in the mode it was
        found in.
    attack_model: the same network as the clean pass and the attack run it (default: model); they need input
        gradients only (the script passes a view whose parameters do not require gradients during its forward).
    eps, alpha: ε and the size of the targeted step (ε in the code).
    beta, gamma, top_k, rule, vmc_over: the label's parameters (adversarial_label); top_k at most C − 1.
    autocast applies to the three passes; the label and the loss are computed in fp32.
    Returns (loss, logits): the scalar soft-label CE at x_adv in the autograd graph of the weights (its backward is
    the weight step), and f(x_adv), N×C."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    attack_model = model if attack_model is None else attack_model
    was_training = model.training
    try:
        model.eval()
        # MC: the clean logits with BN in eval mode; y_MC = argmax_{k≠c} z_k, the wrong class x is closest to.
        with (
            torch.no_grad(),
            torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None),
        ):
            clean = attack_model(x).float()
        y_mc = clean.masked_fill(F.one_hot(y, clean.shape[1]).bool(), float("-inf")).argmax(1)
        # LA: the soft label, from the same clean logits.
        label = adversarial_label(clean, y, beta, gamma, top_k, rule, vmc_over)
        # R: a random start in the ε-ball, clamped to the pixel range (the code does not clamp it before the
        # gradient; DECISIONS.md, 'Pixel range').
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        # MC: one targeted step, *down* the CE of y_MC, then projected onto the ε-ball and [0, 1].
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(attack_model(x + delta), y_mc)
        # fp16 only: the loss ×2^10 keeps its input gradient from underflowing (its sign is unchanged).
        scale = 1024.0 if autocast == torch.float16 else 1.0
        (grad,) = torch.autograd.grad(loss * scale, delta)
        delta = (delta.detach() - alpha * grad.sign()).clamp(-eps, eps)
        x_adv = (x + delta).clamp(0, 1)
        # The weight step's loss: soft-label CE at x_adv only (no clean term), BN in train mode.
        model.train()
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(x_adv)
        loss = -(label * F.log_softmax(logits.float(), 1)).sum(1).mean()
    finally:
        model.train(was_training)
    return loss, logits


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    if args.top_k is not None and args.top_k > data.num_classes - 1:
        raise common.FastatError(
            f"--top-k {args.top_k}: {args.dataset} has {data.num_classes} classes, so at most "
            f"{data.num_classes - 1} non-true ones"
        )
    model = common.get_model(args, data)
    run = harness.Run(args, data)
    # two views of one network, the same parameters: the attack's (input gradients) and the weight step's
    attack_model, train_model = run.models(model)
    if note := flags.milestones(args):
        common.log(note)
    eps = args.epsilon / 255
    alpha = args.alpha / 255
    if args.optimizer == "sgd":
        # The code's wd is a loss term on conv/fc weights only; SGD's weight_decay also reaches BN and biases.
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # milestones in epochs, as the code's
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, 0.1)
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()
        total_loss = total_correct = total_n = 0
        for x, y, _ in data.train.epoch(epoch):
            loss, out = rmcla_loss(
                train_model,
                x,
                y,
                eps,
                alpha,
                args.beta,
                args.gamma,
                args.top_k,
                args.label_rule,
                args.vmc_over,
                run.amp,
                attack_model,
            )
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
        lr = opt.param_groups[0]["lr"]  # the lr this epoch ran with
        sched.step()  # per epoch
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=lr,
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
