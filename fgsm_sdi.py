"""FGSM with a sample-dependent learnable initialisation (FGSM-SDI).

Jia, Zhang, Wu, Wang, Cao, "Boosting fast adversarial training with learnable adversarial
initialization", IEEE TIP 2022, arXiv:2110.05007. Authors' code: github.com/jiaxiaojunQAQ/FGSM-SDI.

    python fgsm_sdi.py                                  # CIFAR-10 recipe: PreActResNet18, 110 epochs
    python fgsm_sdi.py --lr-schedule cyclic --epochs 30 # the cyclic-lr variant of Table VI (epochs: our choice)
    python fgsm_sdi.py --dataset mnist --data-dir DIR   # MNIST: Wong's CNN and MNIST recipe (our choice)

Paper (ResNet18, CIFAR-10, best epoch): 84.86% clean, 53.73% PGD-10, 52.18% PGD-50, 51.00% C&W,
48.50% AutoAttack, 83 min (FGSM-RS: 51 min in the same table). CIFAR-100: 60.67 / 31.5 / 30.6 /
27.15 / 25.23 (AA), 99 min. Measured here: see README.md (only numbers from commands shown there).

Algorithm 3 (slides, papers/003), per iteration i of an epoch (SPEC §2):
    s_x = sign(∇_x L(f(x), y))                                    line 3, eq. (5)
    if i mod k == 0: θ ← θ + ∇_θ L(f(x + δ_g(θ)), y)             lines 4-8 (generator maximises)
    η_g = ε·g(x, s_x; θ)                                          line 9, eq. (6)
    δ_g = Π_[−ε,ε](η_g + α·sign(∇_x L(f(x + η_g), y)))            line 10, eq. (7)
          (the code caps the step at ε first: Π_[−ε,ε](α·sign(...)); we follow it, see fgsm_from)
    w ← w − ∇_w L(f(x + δ_g), y)                                  line 11
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

RECIPES = {
    # Authors' code: SGD lr 0.1, ×0.1 at epochs 100 and 105 of 110, α = ε = 8/255; generator Adam 1e-3, k = 20,
    # with the target's weight decay.
    "default": dict(epochs=110, batch_size=128, lr=0.1, epsilon=8, alpha=8, weight_decay=5e-4, optimizer="sgd",
                    lr_schedule="multistep"),
    # Not in the paper (our choice): Wong's MNIST recipe, as fgsm_rs.py uses it (ε = 0.3, α = 0.375 by
    # SPEC §0, Adam, 10 epochs), except that the lr triangle peaks at the middle (Wong: at 2/5).
    "mnist": dict(epochs=10, batch_size=100, lr=5e-3, epsilon=76.5, alpha=95.625, weight_decay=0.0,
                  optimizer="adam", lr_schedule="cyclic"),
}


def get_args(argv=None):
    p = common.base_parser(__doc__, lr_flag="--lr", lr_help="initial learning rate (multistep) or peak (cyclic)")
    p.add_argument("--gen-interval", type=common.pos_int, default=20,
                   help="k of Alg. 3: the generator is updated on iterations 0, k, 2k, ... of every epoch")
    p.add_argument("--gen-lr", type=common.pos_float, default=1e-3, help="generator Adam learning rate")
    p.add_argument("--lr-schedule", choices=["multistep", "cyclic"], default=None,
                   help="multistep: ×0.1 after 100/110 and 105/110 of the iterations (epochs 100, 105 of 110); "
                        "cyclic: one triangle 0 → lr → 0 over the run (Table VI)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="target model optimiser: sgd (momentum 0.9, CIFAR recipe) or adam (MNIST recipe)")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=None,
                   help="L2 weight decay of the target's and the generator's optimiser (one value for both, as in "
                        "the code); default 5e-4 (MNIST 0)")
    p.add_argument("--label-smoothing", type=common.pos_float, default=None, metavar="TRUE_PROB",
                   help="authors' code-only trick, off by default: soft labels with TRUE_PROB on the true class "
                        "and the rest spread evenly, on the generator's and the target's loss. The code's default "
                        "was 0.9 when the paper appeared (first release, July 2022) and is 0.5 today (since August "
                        "2023). Between 1/C (C classes: uniform labels) and 1 (hard labels)")
    args = common.parse_args(p, RECIPES, argv, script="fgsm_sdi")
    if args.label_smoothing is not None:
        # Below 1/C the true class would get less than the others: PyTorch's label_smoothing (see main) would
        # exceed 1 and fail once the data has loaded. Checked here, with the flag's own error.
        classes = common.dataset_info(args.dataset, args.data_dir)["classes"]
        if not 1 / classes <= args.label_smoothing <= 1:
            p.error(f"--label-smoothing {args.label_smoothing}: the true class's probability must lie between "
                    f"1/C = {1 / classes:.4g} ({args.dataset}: {classes} classes) and 1")
    return args


class Generator(nn.Module):
    """The lightweight initialisation generator g(x, s_x; θ) of Fig. 3, as in the authors' attacker.py:
    conv3×3 (no bias) → BN → ReLU → one pre-activation residual block → BN → conv3×3 → tanh.
    Returns values in [−1, 1]; the caller scales by ε (eq. 6). Fully convolutional, so any image size fits.
    (The code's unused `scale_last` parameter is left out: it never reaches the output.)"""

    def __init__(self, channels):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2 * channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64, eps=1e-3),
                                  nn.ReLU())
        # The code's GenBlock: BN without affine parameters, PReLU, xavier-initialised convs.
        self.block = nn.Sequential(nn.BatchNorm2d(64, affine=False), nn.PReLU(), nn.Conv2d(64, 64, 3, 1, 1),
                                   nn.BatchNorm2d(64, affine=False), nn.PReLU(), nn.Conv2d(64, 64, 3, 1, 1))
        for conv in (self.block[2], self.block[5]):
            nn.init.xavier_uniform_(conv.weight, gain=2 ** 0.5)
        self.head = nn.Sequential(nn.BatchNorm2d(64, affine=False), nn.Conv2d(64, channels, 3, 1, 1))

    def forward(self, x, signed_grad):
        h = self.stem(torch.cat([x, signed_grad], 1))
        return torch.tanh(self.head(h + self.block(h)))


def signed_input_grad(model, x, y, autocast):
    """eq. (5): s_x = sign(∇_x L(f(x), y)) on the clean image (plain CE, as in the code)."""
    x = x.clone().requires_grad_(True)
    with autocast():
        loss = F.cross_entropy(model(x), y)
    grad, = torch.autograd.grad(loss, x)
    return grad.sign()


def sdi_init(generator, x, signed_grad, eps):
    """eq. (6): η_g = ε·g(x, s_x; θ), then x+η_g clamped to [0, 1] (the code does not clamp; SPEC §0)."""
    eta = eps * generator(x, signed_grad)
    return (x + eta).clamp(0, 1) - x


def fgsm_from(model, x, y, eta, eps, alpha, autocast):
    """eq. (7): δ_g = Π_[−ε,ε](η_g + Π_[−ε,ε](α·sign(∇_x L(f(x+η_g), y)))), x+δ_g clamped to [0, 1].

    The inner Π is the authors' code (it clamps the FGSM step to ±ε before adding it to η_g); eq. (7) has
    no such cap. Both agree for α ≤ ε (the CIFAR recipe, α = ε); for α > ε (the MNIST recipe, α = 1.25ε)
    the cap keeps the step at ε, so from η_g < 0 a positive step stops at η_g + ε instead of reaching ε.
    We follow the code (SPEC §0: the code decides where the paper is silent on such details).

    The FGSM direction is computed at a detached copy of x+η_g, so it is a constant for θ: δ_g
    depends on θ only through η_g (sign() has no useful gradient anyway). δ_g keeps η_g's graph."""
    x_init = (x + eta).detach().requires_grad_(True)
    with autocast():
        loss = F.cross_entropy(model(x_init), y)
    grad, = torch.autograd.grad(loss, x_init)
    step = (alpha * grad.sign()).clamp(-eps, eps)  # the code's cap: a step of min(α, ε)
    delta = (eta + step).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def generator_step(model, generator, gen_opt, x, y, signed_grad, eps, alpha, autocast, smoothing=0.0):
    """Alg. 3 lines 5-7: one gradient-ascent step of θ on L(f(x + δ_g(θ)), y). Returns that loss.

    backward(inputs=θ) computes gradients for the generator only: the target's gradients from this
    pass are never formed, so nothing of it can leak into the target's next step. The target stays
    in whatever mode the caller set (train in main(), as in the code: its BN statistics see this pass)."""
    generator.train()
    with autocast():
        eta = sdi_init(generator, x, signed_grad, eps)
    delta = fgsm_from(model, x, y, eta, eps, alpha, autocast)
    with autocast():
        loss = F.cross_entropy(model(x + delta), y, label_smoothing=smoothing)
    gen_opt.zero_grad(set_to_none=True)
    (-loss).backward(inputs=list(generator.parameters()))  # maximise: line 7 has θ ← θ + ∇_θ L
    gen_opt.step()
    generator.eval()
    return loss.detach()


def main(argv=None):
    args = get_args(argv)
    run = common.Run(args)
    data = common.get_data(args, run.device, args.val_size)
    model = common.get_model(args, run.device)
    train_model = run.compile(model)
    generator = Generator(common.dataset_info(args.dataset, args.data_dir)["shape"][0]).to(run.device).eval()
    eps, alpha = args.epsilon / 255, args.alpha / 255
    # The code's LabelSmoothLoss (true class f, others (1−f)/(C−1)) is PyTorch's label_smoothing s with
    # 1 − s + s/C = f, i.e. s = (1−f)·C/(C−1).
    c = data.num_classes
    smoothing = 0.0 if args.label_smoothing is None else (1 - args.label_smoothing) * c / (c - 1)

    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(data.train)
    if args.lr_schedule == "multistep":
        # Stepped per iteration at 100/110 and 105/110 of training, as the code does; a shorter --epochs
        # scales the milestones with it. Rounded: MultiStepLR only fires on a milestone equal to the step
        # count, so the code's float milestones never fire unless they happen to be whole numbers.
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [round(steps * 100 / 110), round(steps * 105 / 110)], 0.1)
    else:
        # The code's CyclicLR; with SGD it also cycles momentum 0.9 → 0.8 → 0.9 against the lr (its default).
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=args.lr, step_size_up=steps / 2,
                                                  step_size_down=steps / 2, cycle_momentum=args.optimizer == "sgd")
    # The code also builds a MultiStepLR for the generator, but steps it only on generator updates, so its
    # milestones (counted in target iterations) are never reached: a constant lr is the same thing.
    # The code gives the generator's Adam the target's --weight-decay (5e-4 in the CIFAR recipe), not a constant.
    gen_opt = torch.optim.Adam(generator.parameters(), lr=args.gen_lr, weight_decay=args.weight_decay)
    run.track(model=model, opt=opt, sched=sched, generator=generator, gen_opt=gen_opt)

    for epoch in run.epochs():
        model.train()
        total_loss = total_correct = total_n = gen_loss = 0
        gen_steps = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            signed_grad = signed_input_grad(train_model, x, y, run.autocast)  # line 3: extra clean fwd/bwd
            if i % args.gen_interval == 0:  # lines 4-8: i counts batches within the epoch, as in the code
                gen_loss += generator_step(train_model, generator, gen_opt, x, y, signed_grad, eps, alpha,
                                           run.autocast, smoothing)
                gen_steps += 1
            # Lines 9-10 with the generator in eval mode; no graph to θ is needed for the target's step.
            with torch.no_grad(), run.autocast():
                eta = sdi_init(generator, x, signed_grad, eps)
            delta = fgsm_from(train_model, x, y, eta, eps, alpha, run.autocast)
            # Line 11: weight step on the loss at x+δ_g (δ_g holds no graph: η_g came from no_grad).
            with run.autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)

        run.end_epoch(epoch, model, data, lr=opt.param_groups[0]["lr"], loss=(total_loss / total_n).item(),
                      acc=(total_correct / total_n).item(), gen_loss=(gen_loss / gen_steps).item())
    run.finish(model, data)


if __name__ == "__main__":
    common.main_guard(main)
