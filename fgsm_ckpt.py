"""FGSM-CKPT: single-step adversarial training that checks c checkpoints along the FGSM step.

Kim, Lee, Lee, "Understanding catastrophic overfitting in single-step adversarial training", AAAI 2021,
arXiv:2010.01799. Authors' code: github.com/Harry24k/catastrophic-overfitting (train.py, defenses/trainers/
co_adv_trainer.py, with torchattacks 2.12); its README shows the paper's Algorithm 1.

    python fgsm_ckpt.py                                    # the authors' recipe: PreActResNet18, 200 epochs, lr 0.01
    python fgsm_ckpt.py --lr-schedule cyclic --epochs 30 --lr 0.3   # the authors' cyclic-lr recipe (README)
    python fgsm_ckpt.py --epochs 110 --lr 0.1 --milestones 100 105  # FGSM-SDI's schedule, Jia et al.'s (see below)
    python fgsm_ckpt.py --dataset cifar100                 # CIFAR-100 (Jia et al. re-ran it: their Table VII)

Reported (the paper's own tables could not be read here): Jia et al., IEEE TIP 2022 (FGSM-SDI), Table IV, CIFAR-10,
ResNet18, their re-run: 90.29% clean, 41.96% PGD-10, 39.15% PGD-50, 41.13% C&W, 37.15% AutoAttack, 76 min (FGSM-RS
51 min in the same table); with a cyclic lr (their Table VI): 89.08 / 40.47 / 37.69 / 39.87 / 35.81, 21 min. Their
network is a CIFAR ResNet18 (not one of ours) and their schedule is not stated for this baseline; 76 min against
FGSM-RS's 51 min suggests FGSM-SDI's 110 epochs (DECISIONS.md, 'CKPT recipe').
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Algorithm 1 of the paper ("Stable single-step adversarial training"), per minibatch (x_i, y_i):
    η = Uniform(−ε, ε)
    ŷ_{i,0} = f(x_i + η)                                          prediction at the random start
    δ = η + α·∇_η ℓ(ŷ_{i,0}, y_i)                                 the FGSM step (signed, projected: see below)
    for j = 1, …, c:  ŷ_{i,j} = f(x_i + j·δ/c)                    the checkpoints, no gradient needed
    x'_i = x_i + min({k | ŷ_{i,k} ≠ y_i} ∪ {c})·δ/c              the smallest misclassified one (box: ∪ {1})
    θ ← θ − ∇_θ ℓ(f(x'_i), y_i)
So a sample misclassified at its random start (k = 0) is trained on the clean x, and one that no checkpoint
misclassifies on the full step x + δ. As in the authors' code (DECISIONS.md, 'CKPT step and checkpoints'): δ is
FGSM-RS's step, α·sign(∇), with x + δ projected onto the ε-ball and [0, 1]; the box's "∪ {1}" is read as
"∪ {c}" (the full step); the attack and the checkpoints run with the model in eval mode (BatchNorm's statistics
come from the training pass alone); the full step needs no forward pass (if no other checkpoint is wrong, it is
the answer whatever f says there): c − 1 forward passes, in one batch, without gradients.
"""

import torch
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # The authors' train.py and README: 200 epochs ("Stepwise", their pretrained models), SGD lr 0.01 momentum 0.9
    # wd 5e-4, ×0.1 after epochs 60, 120 and 160; ε 8/255, α 10/255 (1.25ε), c = 3; batch 128 (base_loader.py).
    "default": dict(
        epochs=200,
        batch_size=128,
        lr=0.01,
        epsilon=8,
        alpha=10,
        weight_decay=5e-4,
        lr_schedule="multistep",
        milestones=[60, 120, 160],
        checkpoints=3,
    ),
    # ImageNet (our choice; no ImageNet run in the paper): imagenet.IMAGENET's data, network, phases and ε, with its
    # lr schedule (imagenet.imagenet_lr).
    "imagenet": dict(lr_schedule="imagenet"),
}


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="initial learning rate (multistep) or the peak of the lr triangle (cyclic)",
        alpha="FGSM step size α, /255 units (keeps its ratio to ε when only --epsilon is given)",
    )
    p.add_argument(
        "--checkpoints",
        type=flags.pos_int,
        default=None,
        metavar="C",
        help="c, the number of checkpoints x + k·δ/c (k = 1 … c) along the FGSM step (the code's "
        "--c); 1: plain FGSM-RS, except that a sample misclassified at its random start trains on "
        "the clean image",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["multistep", "cyclic", "imagenet"],
        default=None,
        help="multistep: ×0.1 after each of --milestones (the code's 'Stepwise'); cyclic: one lr "
        "triangle 0 → lr → 0 peaking half-way, stepped per iteration (the code's 'Cyclic', with "
        "--lr 0.3 --epochs 30); imagenet: Wong et al.'s ImageNet schedule (imagenet.imagenet_lr)",
    )
    p.add_argument(
        "--milestones",
        type=flags.pos_int,
        nargs="*",
        default=None,
        help="multistep: epochs after which the lr is multiplied by 0.1, each under --epochs "
        "(--milestones alone: a constant lr)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="fgsm_ckpt")
    if args.lr_schedule == "multistep":
        # the recipe's drops: after epochs 60, 120 and 160 of 200
        flags.milestones(args, p, argv, fractions=(0.3, 0.6, 0.8))
    return args


def fgsm_ckpt_input(model, x, y, eps, alpha, c=3, delta=None, autocast=None):
    """FGSM-CKPT's training input (Kim, Lee, Lee, AAAI 2021, Algorithm 1; the authors' co_adv_trainer.py): the FGSM
    step from a random start, then per sample the smallest of c checkpoints x + k·p/c that the model misclassifies.

    x: N×C×H×W images in [0, 1] (checked), y: N labels; eps, alpha: ε and α in [0, 1] units (8/255, 10/255);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: every pass here runs in eval mode (BatchNorm's running statistics and dropout are left alone, as
        torchattacks does for the authors' attack); the model is handed back in the mode it was found in.
    c: the number of checkpoints (paper: 3); the full step is checkpoint c and needs no forward pass.
    delta: the random start, N×C×H×W with |δ| ≤ ε (default: uniform in [−ε, ε]; the authors' code draws
        randn_like(x) first and throws it away, which only shifts the random stream).
    Returns (x', k), detached: x' N×C×H×W, the input of the weight step, and k (N, int64) in 0 … c: x' = x where the
    prediction at the random start x + η is wrong (k = 0), else x + k·p/c for the smallest k < c whose checkpoint is
    misclassified, else x + p (k = c), the FGSM point: p = clamp(x + clamp(x₀ + α·sign(∇) − x, −ε, ε), 0, 1) − x with
    x₀ = clamp(x + η, 0, 1) and ∇ the CE's gradient there. Every x' lies between x and x + p: inside the ε-ball and
    [0, 1]."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16's input gradient would underflow: the loss is scaled, which leaves its sign unchanged
    scale = 1024.0 if autocast == torch.float16 else 1.0
    delta = torch.empty_like(x).uniform_(-eps, eps) if delta is None else delta
    was_training = model.training
    model.eval()
    try:
        # η and ŷ_{i,0}: the random start, clamped to the pixel range, and the prediction there.
        start = (x + delta).clamp(0, 1).requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(start)
            loss = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(loss * scale, start)
        # δ: one signed step from the start, x + δ projected onto the ε-ball and [0, 1]; p = δ after both.
        x_fgsm = (x + (start.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        p = x_fgsm - x
        # k = 0: misclassified at the random start, trained on the clean image.
        k = torch.where(logits.argmax(1) != y, 0, c)
        if c > 1:
            # ŷ_{i,j} for j = 1 … c − 1 in one batch (the full step, j = c, is the answer if none of them is wrong).
            inner = torch.cat([x + j * (p / c) for j in range(1, c)])
            with (
                torch.no_grad(),
                torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None),
            ):
                wrong = model(inner).argmax(1).view(c - 1, -1) != y
            j = torch.arange(1, c, device=x.device).view(-1, 1)
            first = torch.where(wrong, j, c).amin(0)  # min({j | ŷ_{i,j} ≠ y_i} ∪ {c})
            k = torch.where(k == 0, 0, first)
    finally:
        model.train(was_training)
    # x' = x + k·p/c, with the clean image for k = 0 and the FGSM point itself for k = c.
    x_train = torch.where((k == 0).view(-1, 1, 1, 1), x, x_fgsm)
    for j in range(1, c):
        x_train = torch.where((k == j).view(-1, 1, 1, 1), x + j * (p / c), x_train)
    return x_train.detach(), k


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data)
    run = harness.Run(args, data, columns=["at_clean", "at_full"])
    # two views of one network, the same parameters: the attack's (input gradients) and the weight step's
    attack_model, train_model = run.models(model)
    if args.lr_schedule == "multistep" and (note := flags.milestones(args)):
        common.log(note)
    eps = args.epsilon / 255
    alpha = args.alpha / 255
    c = args.checkpoints
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    steps = data.train.steps(args.epochs)  # the batches the run yields
    if args.lr_schedule == "imagenet":
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    elif args.lr_schedule == "cyclic":
        # The code's CyclicLR(0, 0.3) over all iterations; with SGD it also cycles momentum 0.9 → 0.8 → 0.9.
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.0, max_lr=args.lr, step_size_up=steps / 2, step_size_down=steps / 2
        )
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, 0.1)  # per epoch
    per_iteration = args.lr_schedule != "multistep"
    checkpoint = dict(model=model, opt=opt, sched=sched)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()
        total_loss = total_correct = total_n = at_clean = at_full = 0
        for x, y, _ in data.train.epoch(epoch):
            # Algorithm 1: the random start, the FGSM step and the checkpoints ŷ_{i,0} … ŷ_{i,c−1}, all in eval mode
            # (the authors' attack); x' is each sample's smallest misclassified checkpoint.
            x_train, k = fgsm_ckpt_input(attack_model, x, y, eps, alpha, c, autocast=run.amp)
            # θ ← θ − ∇θ ℓ(f(x'), y): the only train-mode pass, so BatchNorm's statistics see x' alone.
            with run.autocast():
                out = train_model(x_train)
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            if per_iteration:
                sched.step()
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
            at_clean += (k == 0).sum()
            at_full += (k == c).sum()
        # multistep: the epoch's lr; cyclic: the lr after its last step
        lr = opt.param_groups[0]["lr"]
        if not per_iteration:
            sched.step()
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=lr,
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            # the shares of samples trained on the clean image and on the full FGSM step
            at_clean=(at_clean / total_n).item(),
            at_full=(at_full / total_n).item(),
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
