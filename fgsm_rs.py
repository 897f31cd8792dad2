"""FGSM adversarial training with random start (FGSM-RS).

Wong, Rice, Kolter, "Fast is better than free: revisiting adversarial training", ICLR 2020,
arXiv:2001.03994. The baseline every other method in this repository compares against.

    python fgsm_rs.py                                   # CIFAR-10 recipe: PreActResNet18, 15 epochs
    python fgsm_rs.py --dataset mnist --data-dir DIR    # MNIST recipe: Wong's CNN, 10 epochs, Adam
    python fgsm_rs.py --early-stop                      # stop at catastrophic overfitting (paper: 6 min)
    python fgsm_rs.py --alpha 0 --delta-init zero       # plain (clean) training: the floor to compare with

Paper (CIFAR-10, PreActResNet18, RTX 2080 Ti): 83.81% clean, 46.06% PGD-50-10, about 12 min.
Measured here: see README.md (only numbers from commands shown there).

Each iteration (SPEC §1):
    δ ~ U(−ε, ε), clamped so that x+δ ∈ [0, 1]
    δ ← clamp(δ + α·sign(∇_δ CE(f(x+δ), y)), −ε, ε), then x+δ clamped to [0, 1]
    θ ← θ − lr·∇_θ CE(f(x+δ), y)                    (δ detached)
With CIFAR-10 settings on CIFAR-100, FGSM-RS is known to overfit catastrophically (robust accuracy
collapses within an epoch); watch the pgd_monitor column, lower --alpha, or use --early-stop.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

import common

RECIPES = {
    # Wong's CIFAR-10 train_fgsm.py: α = 1.25ε, one cyclic lr triangle 0 → 0.2 → 0, SGD.
    "default": dict(epochs=15, batch_size=128, lr_max=0.2, epsilon=8, alpha=10, weight_decay=5e-4, optimizer="sgd"),
    # Wong's MNIST train_mnist.py: ε = 0.3, α = 0.375 (×255 here), Adam, lr 0 → 5e-3 (epoch 4) → 0.
    "mnist": dict(epochs=10, batch_size=100, lr_max=5e-3, epsilon=76.5, alpha=95.625, weight_decay=0.0,
                  optimizer="adam"),
}


def get_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--delta-init", default="random", choices=["zero", "random", "previous"],
                   help="start of the FGSM step: zero, U(−ε, ε) (FGSM-RS), or the previous batch's δ")
    p.add_argument("--early-stop", action="store_true",
                   help="after each epoch, PGD-5 on that epoch's first batch; if robust accuracy drops by "
                        "more than 0.2, stop and keep the previous epoch's weights")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=None, help="default 5e-4 (MNIST 0)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="sgd with a cyclic lr (CIFAR recipe) or adam with a piecewise-linear lr (MNIST recipe)")
    return common.parse_args(p, RECIPES, argv, script="fgsm_rs")


def fgsm_rs_delta(model, x, y, delta, eps, alpha, autocast):
    """One FGSM step from `delta` (already inside the ε-ball); returns the detached δ."""
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    with autocast():
        loss = F.cross_entropy(model(x + delta), y)
    # Only ∇_δ is needed: autograd.grad skips the weight gradients that loss.backward() would compute.
    grad, = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def main():
    args = get_args()
    run = common.Run(args)
    data = common.get_data(args, run.device, args.val_size)
    model = common.get_model(args, run.device)
    train_model = run.compile(model)
    eps, alpha = args.epsilon / 255, args.alpha / 255
    steps = args.epochs * len(data.train)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_max, momentum=0.9, weight_decay=args.weight_decay)
        # Wong's schedule, and his code's CyclicLR defaults: momentum cycles 0.9 → 0.8 → 0.9 against the lr.
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=args.lr_max, step_size_up=steps / 2,
                                                  step_size_down=steps / 2)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr_max, weight_decay=args.weight_decay)
        # Wong's MNIST schedule 0 → lr_max at 2/5 of training → 0, set from epoch + (i+1)/len before each step.
        n = len(data.train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: np.interp(
            (it + 1) / n, [0, args.epochs * 2 // 5, args.epochs], [0, 1, 0]))
    run.track(model=model, opt=opt, sched=sched)
    run.state.update(delta=None, prev_robust_acc=0.0, prev_weights=None)

    for epoch in run.epochs():
        model.train()
        total_loss = total_correct = total_n = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            if i == 0:
                first_batch = (x, y)
            if args.delta_init == "previous":
                if run.state["delta"] is None:  # Wong's code starts the chain from zero
                    run.state["delta"] = torch.zeros_like(x)
                delta = run.state["delta"][:len(y)]  # the last batch of an epoch may be smaller
            elif args.delta_init == "random":
                delta = torch.empty_like(x).uniform_(-eps, eps)
            else:
                delta = torch.zeros_like(x)
            # FGSM step from that start; the model stays in train mode, as in Wong's code. With α = 0 and a
            # zero start δ stays 0, so `--alpha 0 --delta-init zero` is plain (clean) training: skip the
            # attack's pass, which would cost time and move the BN running statistics a second time.
            if alpha > 0 or args.delta_init != "zero":
                delta = fgsm_rs_delta(train_model, x, y, delta, eps, alpha, run.autocast)
            if args.delta_init == "previous":
                run.state["delta"][:len(y)] = delta
            # Weight step on the mean CE at x+δ.
            with run.autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)

        stop, extra = False, {}
        if args.early_stop:
            # Catastrophic-overfitting guard (Wong): PGD-5, step 2/255, on this epoch's first batch.
            # Wong's code ran it with the model in train mode; eval mode here leaves the BN statistics alone.
            x, y = first_batch
            robust_acc = common.pgd_accuracy(model, x, y, eps, 2 / 255, 5, batch_size=len(y))
            extra["es_acc"] = robust_acc
            if robust_acc - run.state["prev_robust_acc"] < -0.2:
                model.load_state_dict(run.state["prev_weights"])
                run.print(f"# early stop: PGD-5 accuracy fell from {100 * run.state['prev_robust_acc']:.1f}% to "
                          f"{100 * robust_acc:.1f}%; keeping the weights of epoch {epoch}")
                stop = True
            else:
                run.state["prev_robust_acc"] = robust_acc
                run.state["prev_weights"] = copy.deepcopy(model.state_dict())
        run.end_epoch(epoch, model, data, lr=opt.param_groups[0]["lr"], loss=(total_loss / total_n).item(),
                      acc=(total_correct / total_n).item(), stop=stop, **extra)
    run.finish(model, data)


if __name__ == "__main__":
    common.main_guard(main)
