"""FGSM adversarial training with random start (FGSM-RS).

Wong, Rice, Kolter, "Fast is better than free: revisiting adversarial training", ICLR 2020, arXiv:2001.03994.
Authors' code: github.com/locuslab/fast_adversarial. The baseline every other method in this repository compares
against.

    python fgsm_rs.py                                   # CIFAR-10 recipe: PreActResNet18, 15 epochs
    python fgsm_rs.py --dataset mnist --data-dir DIR    # MNIST recipe: Wong's CNN, 10 epochs, Adam
    python fgsm_rs.py --early-stop                      # stop at catastrophic overfitting (paper: 6 min)
    python fgsm_rs.py --alpha 0 --delta-init zero       # plain (clean) training: the floor to compare with
    python fgsm_rs.py --dataset imagenet --data-dir DIR # Wong's ImageNet configuration: ResNet-50, ε 2/255, 15 epochs
    torchrun --nproc_per_node 8 fgsm_rs.py --dataset imagenet --data-dir DIR   # the same on 8 GPUs

Paper (CIFAR-10, PreActResNet18, RTX 2080 Ti): 83.81% clean, 46.06% PGD-50-10, about 12 min; ImageNet (ResNet-50,
ε 2/255): 43% PGD accuracy in 12 hours (abstract).
Measured here: see bench/RESULTS.md (only numbers from commands shown there).

Each iteration (the paper's FGSM-RS; the authors' CIFAR10/train_fgsm.py):
    δ ~ U(−ε, ε), clamped so that x+δ ∈ [0, 1]
    δ ← clamp(δ + α·sign(∇_δ CE(f(x+δ), y)), −ε, ε), then x+δ clamped to [0, 1]
    θ ← θ − lr·∇_θ CE(f(x+δ), y)                    (δ detached)
With CIFAR-10 settings on CIFAR-100, FGSM-RS is known to overfit catastrophically (robust accuracy collapses within
an epoch): watch the pgd_monitor column, lower --alpha, or use --early-stop.
"""

import numpy as np
import torch
import torch.nn.functional as F

import common
import evaluation
import flags
import harness
import imagenet

RECIPES = {
    # Wong's CIFAR-10 train_fgsm.py: α = 1.25ε, one cyclic lr triangle 0 → 0.2 → 0, SGD.
    "default": dict(
        epochs=15,
        batch_size=128,
        lr=0.2,
        epsilon=8,
        alpha=10,
        weight_decay=5e-4,
        optimizer="sgd",
        lr_schedule="cyclic",
    ),
    # Wong's MNIST train_mnist.py: ε = 0.3, α = 0.375 (×255 here), Adam, lr 0 → 5e-3 (epoch 4) → 0.
    "mnist": dict(
        epochs=10,
        batch_size=100,
        lr=5e-3,
        epsilon=76.5,
        alpha=95.625,
        weight_decay=0.0,
        optimizer="adam",
        lr_schedule="piecewise",
    ),
    # ImageNet: imagenet.IMAGENET, the configuration released with the paper (α = 1.25ε = 2.5/255 at ε = 2/255;
    # their 4/255 runs: --epsilon 4, α 5/255), with the lr of imagenet.imagenet_lr.
    "imagenet": dict(lr_schedule="imagenet", optimizer="sgd"),
}


def get_args(argv=None):
    p = flags.base_parser(__doc__, lr="peak learning rate of the lr schedule")
    p.add_argument(
        "--delta-init",
        default="random",
        choices=["zero", "random", "previous"],
        help="start of the FGSM step: zero, U(−ε, ε) (FGSM-RS), or the previous batch's δ",
    )
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="Wong's catastrophic-overfitting guard: after each epoch, PGD-5 (step ε/4) on that "
        "epoch's first batch; if its accuracy drops by more than 0.2, stop and keep the previous "
        "epoch's weights",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help="sgd (momentum 0.9; CIFAR and ImageNet recipes) or adam (MNIST recipe)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["cyclic", "piecewise", "imagenet"],
        default=None,
        help="set every iteration. cyclic: one triangle 0 → lr → 0 peaking half-way (Wong's "
        "CIFAR-10; with sgd the momentum cycles 0.9 → 0.8 → 0.9 against it); piecewise: 0 → lr "
        "at 2/5 of the epochs → 0 (Wong's MNIST); imagenet: Wong et al.'s ImageNet schedule "
        "(imagenet.imagenet_lr), with no weight decay on BatchNorm's parameters, as his "
        "ImageNet code",
    )
    args = flags.parse_args(p, RECIPES, argv, script="fgsm_rs")
    if args.delta_init == "previous" and args.dataset == "imagenet":
        p.error("--delta-init previous needs one image size; ImageNet's phases change the crop")
    return args


def guard_accuracy(model, x, y, eps):
    """Wong's guard: PGD-5 accuracy (step ε/4, eval mode, fp32) on x, y, this process's part of a batch. Under
    torchrun: one model (the first process's BatchNorm statistics), the correct count and the size summed over the
    processes, so that the accuracy is the whole batch's, the same in every process."""
    harness.sync_buffers(model)
    correct = evaluation.pgd_correct(model, x, y, eps, eps / 4, 5)
    counts = torch.stack([correct.sum(), torch.tensor(len(y), device=y.device)]).double()
    total_correct, total_n = harness.global_sum(counts).tolist()
    return total_correct / total_n


def fgsm_rs_delta(model, x, y, eps, alpha, delta=None, autocast=None):
    """FGSM-RS's perturbation (Wong et al., ICLR 2020): one signed-gradient step of the cross-entropy from a random
    start in the ε-ball (or from `delta`), projected back onto the ball and the pixel range.

    x: images N×C×H×W in [0, 1] (normalise inside the model: a range check raises otherwise); y: labels N, int64;
    ε and steps in [0, 1] units; autocast: None (fp32) or torch.autocast's dtype (fp16: the loss is scaled by 2^10).
    model: used in the mode it is in (train mode in Wong's code, so BatchNorm sees this pass).
    eps, alpha: ε and the step size α (CIFAR-10: 8/255 and 10/255 = 1.25ε).
    delta: the start, N×C×H×W with |δ| ≤ ε (default: uniform in [−ε, ε], FGSM-RS; zeros: plain FGSM); x + δ is
        clamped to [0, 1] before the gradient (DECISIONS.md, 'FGSM-RS random start').
    Returns δ, detached, N×C×H×W: |δ| ≤ ε and x + δ in [0, 1]."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16 only: the loss ×2^10 keeps its input gradient from underflowing (its sign is unchanged).
    scale = 1024.0 if autocast == torch.float16 else 1.0
    delta = torch.empty_like(x).uniform_(-eps, eps) if delta is None else delta
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss * scale, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data)
    run = harness.Run(args, data, columns=["es_acc"] if args.early_stop else [])
    # two views of one network, the same parameters: the attack's (input gradients) and the weight step's
    attack_model, train_model = run.models(model)
    eps = args.epsilon / 255
    alpha = args.alpha / 255
    steps = data.train.steps(args.epochs)  # the batches the run yields
    params = model.parameters()
    if args.lr_schedule == "imagenet":
        # Wong's ImageNet code (main_fast.py): no weight decay on BatchNorm's parameters. The groups keep the
        # model's order, which a checkpoint relies on.
        bn = {
            id(p)
            for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for p in m.parameters()
        }
        params = [
            {"params": [p for p in model.parameters() if id(p) not in bn]},
            {"params": [p for p in model.parameters() if id(p) in bn], "weight_decay": 0.0},
        ]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.lr_schedule == "imagenet":
        # Wong's ImageNet schedule, piecewise linear, set at every iteration
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    elif args.lr_schedule == "cyclic":
        # Wong's schedule, and his code's CyclicLR defaults: with SGD the momentum cycles 0.9 → 0.8 → 0.9.
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=0.0,
            max_lr=args.lr,
            step_size_up=steps / 2,
            step_size_down=steps / 2,
            cycle_momentum=args.optimizer == "sgd",
        )
    else:
        # Wong's MNIST schedule 0 → lr at 2/5 of training → 0, set from epoch + (i+1)/len before each step.
        peak = [0, args.epochs * 2 // 5, args.epochs]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: np.interp((it + 1) / len(data.train), peak, [0, 1, 0])
        )
    checkpoint = dict(model=model, opt=opt, sched=sched)
    if args.delta_init == "previous":
        # The last batch's δ starts the next batch's step (from zero, as Wong's code); each process keeps its own.
        previous = torch.zeros((args.batch_size, *data.shape), device=args.device)
        checkpoint["previous"] = harness.PerProcess(previous)
    if args.early_stop:  # the previous epoch's accuracy and weights
        checkpoint["guard"] = guard = {"robust_acc": 0.0, "weights": None}
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()
        total_loss = total_correct = total_n = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            if i == 0:
                first_batch = (x, y)
            if args.delta_init == "random":
                start_delta = None
            elif args.delta_init == "zero":
                start_delta = torch.zeros_like(x)
            else:
                start_delta = previous[: len(y)]
            # The FGSM step; the model stays in train mode, as in Wong's code. With α = 0 from a zero start δ stays
            # 0: `--alpha 0 --delta-init zero` is plain training, and the attack's pass is skipped.
            if alpha == 0 and args.delta_init == "zero":
                delta = torch.zeros_like(x)
            else:
                delta = fgsm_rs_delta(attack_model, x, y, eps, alpha, start_delta, run.amp)
            if args.delta_init == "previous":
                previous[: len(y)] = delta
            # The weight step on the mean CE at x+δ.
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

        stop = False
        extra = {}
        if args.early_stop:
            # Wong's guard: PGD-5 on this epoch's first batch, step ε/4 (his 2/255 at ε = 8/255: a fixed step would
            # not reach the ball's surface at a larger ε, and the guard would miss the overfitting). Eval mode, so
            # that BN's statistics are left alone (Wong's code ran it in train mode).
            robust_acc = guard_accuracy(model, *first_batch, eps)
            extra["es_acc"] = robust_acc
            if robust_acc - guard["robust_acc"] < -0.2:
                model.load_state_dict(guard["weights"])
                common.log(
                    f"# early stop: PGD-5 accuracy fell from {100 * guard['robust_acc']:.1f}% to "
                    f"{100 * robust_acc:.1f}%; keeping the weights of epoch {epoch}"
                )
                stop = True
            else:
                guard.update(
                    robust_acc=robust_acc,
                    weights={k: v.clone() for k, v in model.state_dict().items()},
                )
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            stop=stop,
            **extra,
        )
        if stop:
            break
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
