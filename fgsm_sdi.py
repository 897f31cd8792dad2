"""FGSM with a sample-dependent learnable initialisation (FGSM-SDI).

Jia, Zhang, Wu, Wang, Cao, "Boosting fast adversarial training with learnable adversarial initialization", IEEE TIP
2022, arXiv:2110.05007. Authors' code: github.com/jiaxiaojunQAQ/FGSM-SDI (FGSM_SDI.py, FGSM_SDI_loss.py,
attacker.py).

    python fgsm_sdi.py                                   # CIFAR-10 recipe: PreActResNet18, 110 epochs
    python fgsm_sdi.py --lr-schedule cyclic --epochs 30  # the paper's cyclic-lr variant (epochs: our choice)
    python fgsm_sdi.py --true-prob 0.5                   # the authors' code's soft labels (off by default)
    python fgsm_sdi.py --dataset mnist --data-dir DIR    # MNIST: Wong's CNN and MNIST recipe (our choice)

Paper (ResNet18, CIFAR-10, best epoch): 84.86% clean, 53.73% PGD-10, 52.18% PGD-50, 51.00% C&W, 48.50% AutoAttack,
83 min (FGSM-RS: 51 min in the same table). CIFAR-100: 60.67 / 31.5 / 30.6 / 27.15 / 25.23 (AA), 99 min.
Measured here: bench/RESULTS.md (every number next to the command that gave it).

The FGSM-SDI algorithm (arXiv:2110.05007, its eqs. (5)-(7) as the authors present them, not checked against the
paper's PDF; code: FGSM_SDI.py and FGSM_SDI_loss.py), per iteration i of an epoch (DECISIONS.md, 'SDI step cap',
'SDI generator', 'SDI and PGI input normalisation'):
    s_x = sign(∇_x L(f(x), y))                                   signed clean gradient, eq. (5)
    if i mod k == 0: θ ← θ + ∇_θ L(f(x + δ_g(θ)), y)            the generator update (it maximises the loss)
    η_g = ε·g(x, s_x; θ)                                         generated initialisation, eq. (6)
    δ_g = Π_[−ε,ε](η_g + α·sign(∇_x L(f(x + η_g), y)))           perturbation, eq. (7)
          (the code caps the step at ε first: Π_[−ε,ε](α·sign(...)); we follow it)
    w ← w − ∇_w L(f(x + δ_g), y)                                 the target's weight step
Copyable pieces: Generator (g), generator_step (the generator update), fgsm_sdi_delta (s_x, η_g, δ_g).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # Authors' code: SGD lr 0.1, ×0.1 at epochs 100 and 105 of 110, α = ε = 8/255; generator Adam 1e-3, k = 20,
    # with the target's weight decay.
    "default": dict(
        epochs=110,
        batch_size=128,
        lr=0.1,
        epsilon=8,
        alpha=8,
        weight_decay=5e-4,
        optimizer="sgd",
        lr_schedule="multistep",
    ),
    # Not in the paper (our choice): Wong et al.'s MNIST recipe as fgsm_rs.py uses it (ε = 0.3, α = 0.375 as in
    # Wong's MNIST/train_mnist.py, Adam, 10 epochs; DECISIONS.md, 'Our MNIST recipes'), except that the lr
    # triangle peaks at the middle (Wong: at 2/5).
    "mnist": dict(
        epochs=10,
        batch_size=100,
        lr=5e-3,
        epsilon=76.5,
        alpha=95.625,
        weight_decay=0.0,
        optimizer="adam",
        lr_schedule="cyclic",
    ),
    # ImageNet: the paper reports ResNet-50 results but gives no recipe: imagenet.IMAGENET, Wong et al.'s, with its lr.
    "imagenet": dict(lr_schedule="imagenet", optimizer="sgd"),
}

TRUE_PROB_HELP = (
    "the authors' code's soft labels, off by default: the true class gets probability F and "
    "every other class (1 − F)/(C − 1) (PyTorch's label_smoothing is another parametrisation), "
    "in the final loss of the generator's and of the target's update. The code's default was 0.9 "
    "when the paper appeared (first release, July 2022) and is 0.5 since August 2023. 1/C < F ≤ 1 "
    "(C classes)"
)


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="initial learning rate (multistep) or peak (cyclic)",
        weight_decay="L2 weight decay of the target's and the generator's optimiser (one value for "
        "both, as in the code)",
        true_prob=TRUE_PROB_HELP,
    )
    p.add_argument(
        "--gen-every",
        type=flags.pos_int,
        default=20,
        metavar="K",
        help="k of FGSM-SDI (the code's --att_num): the generator is updated on iterations 0, k, "
        "2k, ... of every epoch",
    )
    p.add_argument(
        "--gen-lr", type=flags.pos_float, default=1e-3, help="the generator's Adam learning rate"
    )
    p.add_argument(
        "--lr-schedule",
        choices=["multistep", "cyclic", "imagenet"],
        default=None,
        help="multistep: ×0.1 after 100/110 and 105/110 of the iterations (epochs 100, 105 of "
        "110); cyclic: one triangle 0 → lr → 0 over the run (the paper's cyclic-lr variant); "
        "imagenet: Wong et al.'s ImageNet schedule (imagenet.imagenet_lr)",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help="target model optimiser: sgd (momentum 0.9, CIFAR recipe) or adam (MNIST recipe)",
    )
    return flags.parse_args(p, RECIPES, argv, script="fgsm_sdi")


class Generator(nn.Module):
    """The lightweight initialisation generator g(x, s_x; θ), as in the authors' attacker.py (One_Layer_Attacker):
    conv3×3 (no bias) → BN → ReLU → one pre-activation residual block → BN → conv3×3 → tanh.

    Takes images N×C×H×W in [0, 1] and the signed gradient s_x (same shape); returns N×C×H×W in [−1, 1], which the
    caller scales by ε (eq. (6)). Fully convolutional: any image size fits. The code's unused `scale_last`
    parameter is left out (it never reaches the output). Copyable: torch and nn only."""

    def __init__(self, channels):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(2 * channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64, eps=1e-3),
            nn.ReLU(),
        )
        # The code's GenBlock: BN without affine parameters, PReLU, xavier-initialised convs.
        self.block = nn.Sequential(
            nn.BatchNorm2d(64, affine=False),
            nn.PReLU(),
            nn.Conv2d(64, 64, 3, 1, 1),
            nn.BatchNorm2d(64, affine=False),
            nn.PReLU(),
            nn.Conv2d(64, 64, 3, 1, 1),
        )
        for conv in (self.block[2], self.block[5]):
            nn.init.xavier_uniform_(conv.weight, gain=2**0.5)
        self.head = nn.Sequential(
            nn.BatchNorm2d(64, affine=False), nn.Conv2d(64, channels, 3, 1, 1)
        )

    def forward(self, x, signed_grad):
        h = self.stem(torch.cat([x, signed_grad], 1))
        return torch.tanh(self.head(h + self.block(h)))


def generator_step(model, generator, gen_opt, x, y, eps, alpha, autocast=None, smoothing=0.0):
    """FGSM-SDI's generator update (arXiv:2110.05007; the code's adv_FGSM_loss with for_attacker=1): one step of
    gen_opt that *ascends* L(f(x + δ_g(θ)), y) in the generator's parameters θ, with δ_g built as in
    fgsm_sdi_delta (eqs. (5)-(7)). θ gets its gradient through η_g only: the FGSM direction of eq. (7) is taken at a
    detached copy of x + η_g, a constant for θ (sign() has no useful gradient anyway).

    x: N×C×H×W images in [0, 1] (checked), y: N labels; eps, alpha: ε and α in [0, 1] units (8/255);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: the target, run in the mode it is in (train in main(), as in the code: its BN statistics see these
        passes); its weights get no gradient (backward(inputs=θ) never forms them).
    generator: a Generator, put in train mode for the update (the code's attacker.train()) and handed back in the
        mode it was found in. gen_opt: its optimiser (Adam, lr 1e-3 in the code).
    smoothing: PyTorch's label_smoothing of the final loss (the code's soft labels; 0: hard labels).
    Returns (L, s_x): the loss before the step (detached scalar) and s_x = sign(∇_x L(f(x), y)) (N×C×H×W), which
    fgsm_sdi_delta can reuse in the same iteration (the code computes it once per iteration)."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16: losses × 2^10 before each backward, so that no gradient underflows; θ's divided back below.
    scale = 1024.0 if autocast == torch.float16 else 1.0
    was_training = generator.training
    generator.train()
    try:
        # s_x, eq. (5): plain CE on the clean image (as the code; smoothing is for the final loss only).
        x_clean = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss_clean = F.cross_entropy(model(x_clean), y)
        (grad,) = torch.autograd.grad(loss_clean * scale, x_clean)
        signed_grad = grad.sign()
        # η_g, eq. (6), keeping its graph to θ; x + η_g clamped to [0, 1] (the code does not;
        # DECISIONS.md, 'Pixel range' and 'SDI and PGI pixel-range clamps').
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            eta = eps * generator(x, signed_grad)
        eta = (x + eta).clamp(0, 1) - x
        # δ_g, eq. (7), the FGSM step capped at ε as in the code (DECISIONS.md, 'SDI step cap'); its
        # direction is a constant for θ.
        x_init = (x + eta).detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss_init = F.cross_entropy(model(x_init), y)
        (grad,) = torch.autograd.grad(loss_init * scale, x_init)
        delta = (eta + (alpha * grad.sign()).clamp(-eps, eps)).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x + delta), y, label_smoothing=smoothing)
        params = [p for p in generator.parameters() if p.requires_grad]
        gen_opt.zero_grad(set_to_none=True)
        (-loss * scale).backward(inputs=params)  # ascent: θ ← θ + ∇_θ L
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(scale)
        gen_opt.step()
    finally:
        generator.train(was_training)
    return loss.detach(), signed_grad


def fgsm_sdi_delta(model, generator, x, y, eps, alpha, autocast=None, signed_grad=None):
    """FGSM-SDI's perturbation δ_g (arXiv:2110.05007, eqs. (5)-(7); code: FGSM_SDI_loss.py): the FGSM step from the
    generated, sample-dependent initialisation η_g = ε·g(x, s_x), with the step capped at ε before it is added to η_g
    as in the authors' code (the paper's formula has no cap; both agree for α ≤ ε: DECISIONS.md, 'SDI step cap').

    x: N×C×H×W images in [0, 1] (checked), y: N labels; eps, alpha: ε and α in [0, 1] units (8/255);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: run in the mode it is in (train mode in the code, so BatchNorm sees these passes); input gradients only.
    generator: a module (x, s_x) → N×C×H×W in [−1, 1] (Generator); run without gradients, in the mode it is in
        (eval mode for the target's step, as in the code).
    signed_grad: s_x of eq. (5) if it was computed already this iteration (generator_step returns it); None
        computes it here.
    Returns δ_g, detached, N×C×H×W: |δ_g| ≤ ε and x + δ_g in [0, 1]."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16: losses × 2^10 before each input gradient, so that it does not underflow (its sign is used).
    scale = 1024.0 if autocast == torch.float16 else 1.0
    if signed_grad is None:
        # s_x, eq. (5): the signed gradient of the plain CE at the clean image.
        x_clean = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss_clean = F.cross_entropy(model(x_clean), y)
        (grad,) = torch.autograd.grad(loss_clean * scale, x_clean)
        signed_grad = grad.sign()
    # η_g, eq. (6): no graph to θ is needed for the target's step. x + η_g clamped to [0, 1] (the code does
    # not; DECISIONS.md, 'Pixel range' and 'SDI and PGI pixel-range clamps').
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None),
    ):
        eta = eps * generator(x, signed_grad)
    eta = (x + eta).clamp(0, 1) - x
    # δ_g, eq. (7): one FGSM step from x + η_g, capped at ε before it is added (the code), projected.
    x_init = (x + eta).requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        loss_init = F.cross_entropy(model(x_init), y)
    (grad,) = torch.autograd.grad(loss_init * scale, x_init)
    delta = (eta + (alpha * grad.sign()).clamp(-eps, eps)).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    # The code's soft labels (true class F, the others (1 − F)/(C − 1)) as PyTorch's label_smoothing.
    smoothing = flags.smoothing_of(args.true_prob, data.num_classes)
    model = common.get_model(args, data)
    run = harness.Run(args, data, columns=["gen_loss"])
    attack_model, train_model = run.models(model)
    # Eval mode except while it is updated (generator_step).
    generator = Generator(data.shape[0]).to(args.device).eval()
    if common.uses_channels_last(args):
        generator = generator.to(memory_format=torch.channels_last)
    gen_net = run.wrap_for_training(generator)
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
        # No ImageNet recipe in the paper (Jia et al.'s tables give none): Wong et al.'s (imagenet.imagenet_lr).
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    elif args.lr_schedule == "multistep":
        # Stepped per iteration at 100/110 and 105/110 of training, as the code does; a shorter --epochs
        # scales the milestones with it. Rounded: MultiStepLR only fires on a milestone equal to the step
        # count, so the code's float milestones fire only when they happen to be whole numbers.
        milestones = [round(steps * 100 / 110), round(steps * 105 / 110)]
        if note := flags.collapsed_milestones(milestones, steps, args.lr):
            common.log(note)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    else:
        # The code's CyclicLR; with SGD it also cycles momentum 0.9 → 0.8 → 0.9 against the lr (its default).
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=0.0,
            max_lr=args.lr,
            step_size_up=steps / 2,
            step_size_down=steps / 2,
            cycle_momentum=args.optimizer == "sgd",
        )
    # The code also builds a MultiStepLR for the generator, but steps it only on generator updates, so its
    # milestones (counted in target iterations) are never reached: a constant lr is the same thing. The
    # generator's Adam gets the target's --weight-decay (5e-4 in the CIFAR recipe), as in the code.
    gen_opt = torch.optim.Adam(
        generator.parameters(), lr=args.gen_lr, weight_decay=args.weight_decay
    )
    checkpoint = dict(model=model, opt=opt, sched=sched, generator=generator, gen_opt=gen_opt)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()
        total_loss = total_correct = total_n = gen_loss = 0
        gen_steps = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            signed_grad = None
            if i % args.gen_every == 0:
                # The generator update on iterations 0, k, 2k, ... of the epoch (the code's batch_idx %
                # att_num), before this iteration's δ_g. Its passes need input gradients only
                # (attack_model); it hands back s_x, which δ_g reuses: one clean pass per iteration.
                loss_g, signed_grad = generator_step(
                    attack_model, gen_net, gen_opt, x, y, eps, alpha, run.amp, smoothing
                )
                gen_loss += loss_g
                gen_steps += 1
            # s_x, η_g, δ_g (eqs. (5)-(7)); the generator in eval mode, the target in train mode (code).
            delta = fgsm_sdi_delta(attack_model, gen_net, x, y, eps, alpha, run.amp, signed_grad)
            # The target's weight step on the loss at x + δ_g.
            with run.autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)

        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            gen_loss=(gen_loss / gen_steps).item(),
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
