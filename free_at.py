"""Free adversarial training (Free-AT): every minibatch replayed m times, one backward for both gradients.

Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor, Goldstein, "Adversarial training for free!", NeurIPS
2019, arXiv:1904.12843. Authors' code: github.com/mahyarnajibi/FreeAdversarialTraining (PyTorch, ImageNet:
main_free.py, configs.yml) and github.com/ashafahi/free_adv_train (TensorFlow, CIFAR). A baseline of Wong et al.'s,
Jia et al.'s and Amata's comparisons.

    python free_at.py                                   # CIFAR-10, m = 8: Wong et al.'s train_free.py, 10 epochs
    python free_at.py --dataset imagenet --data-dir DIR # the authors' ImageNet: ResNet-50, m = 4, 23 epochs, ε 4/255
    python free_at.py --dataset imagenet --data-dir DIR --epsilon 2     # their ε = 2/255 model (also 8)
    torchrun --nproc_per_node 8 free_at.py --dataset imagenet --data-dir DIR   # the same on 8 GPUs
    python free_at.py --dataset imagenet --data-dir DIR --replays-min 2        # Amata+Free: m from 2 to 4
    python free_at.py --model wrn-34-10 --epochs 26 --lr 0.1 --lr-schedule step --milestones 13 19 \\
        --weight-decay 2e-4                 # close to the Free paper's CIFAR-10 run (DECISIONS.md, 'Free-AT recipes')

`--epochs` counts passes over the data: Algorithm 1's N_ep/m (the authors' ImageNet code: ⌈90/4⌉ = 23; Wong's CIFAR
script: 10 passes, 80 replays of every batch in all). `--replays-min M0` is Amata+Free (Ye et al., "Amata", AAAI
2021, arXiv:2012.08112, §3.2): m_t rises from M0 to --replays over the run while the step shrinks as
α_t = α·M0/m_t (the paper: "increase m from 2 to 4 and decrease the PGD step size also by two times"); replays_at()
and DECISIONS.md, 'Amata+Free'.

Paper (CIFAR-10, WRN-32-10, ε 8/255, the TensorFlow code's README): Free-8 85.96% clean / 46.19% PGD-100 / 46.33%
PGD-20 with 10 restarts in 785 min (Madry's 7-PGD model: 87.25% / 45.29% / 45.53%, 5418 min). Jia et al. (FGSM-SDI,
TIP 2022), CIFAR-10 ResNet18, Table IV: Free-AT (m = 8) 80.38% clean / 47.10% PGD-10 / 45.62% PGD-50 / 42.17% AA in
215 min; ImageNet ResNet-50, Table IX, Free-AT (m = 4): ε 2: 68.37% / 48.31% PGD-10 / 48.28% PGD-50; ε 4: 63.42% /
33.22% / 33.08%; ε 8: 52.09% / 19.46% / 12.92%. Amata, Table 3 (ImageNet, ResNet-50, 4 V100s, 22 epochs): Free
60.57% clean / 32.1% PGD-10 / 31.3% PGD-50; Amata+Free 59.7% / 31.8% / 31.0%, 30% PGD accuracy reached in 948 min
against Free's 1318. Measured here: see bench/RESULTS.md.

Algorithm 1 (Free-m), as the authors' main_free.py runs it; δ ← 0 once, before training, never reset:
    for epoch = 1 … N_ep/m, for each minibatch (x, y) of n ≤ B images, for i = 1 … m:   (the replays)
        ℓ = CE(f(clamp(x + δ[:n], 0, 1)), y)          (the code's pixel clamp, in the forward only)
        one backward: g_θ = ∇_θ ℓ and g_adv = ∇_δ ℓ
        δ[:n] ← clip(δ[:n] + ε·sign(g_adv), −ε, ε)     (the ascent step α = ε; rows n: kept for the next batch)
        θ ← θ − lr·g_θ                                  (SGD with momentum 0.9)
δ's rows are tied to positions in the batch, not to images: row i of the next batch starts from the δ of this
batch's row i (a different image after the shuffle), and a smaller last batch uses rows 0:n (DECISIONS.md, 'Free-AT
delta buffer'; the clamp: 'Free-AT pixel range').
"""

import math

import torch
import torch.nn.functional as F

import common
import flags
import harness

RECIPES = {
    # Wong et al.'s CIFAR-10 train_free.py (github.com/locuslab/fast_adversarial), the setting of their and Jia et al.'s
    # comparisons: m = 8 (--minibatch-replays), 10 passes, batch 128, one cyclic lr triangle 0 → 0.04 → 0 over all
    # epochs·batches·m replays (stepped every replay, CyclicLR's momentum cycling kept), SGD momentum 0.9, wd 5e-4,
    # ε 8/255, step ε.
    "default": dict(
        epochs=10,
        batch_size=128,
        lr=0.04,
        lr_schedule="cyclic",
        milestones=[],  # none: the triangle has no drops (a list, as --milestones alone gives)
        weight_decay=5e-4,
        epsilon=8,
        alpha=8,
        replays=8,
    ),
    # The authors' ImageNet code (main_free.py, configs.yml), over imagenet.IMAGENET: m = 4 (n_repeats), ⌈90/m⌉ = 23
    # epochs, one phase of RandomResizedCrop(224) and a flip in batches of 256 (their transform; no progressive
    # resizing), SGD lr 0.1 ×0.1 every ⌈30/m⌉ = 8 epochs (lib/utils.py adjust_learning_rate), momentum 0.9, wd 1e-4
    # on every parameter, ε = step = 4/255 (clip_eps, fgsm_step; they also trained ε 2 and 8). Evaluated at 224 px
    # after a resize to 256 (their validation transform).
    "imagenet": dict(
        epochs=math.ceil(90 / 4),
        batch_size=256,
        phases=[[math.ceil(90 / 4), 224, 256]],
        lr=0.1,
        lr_schedule="step",
        milestones=[8, 16],
        weight_decay=1e-4,
        epsilon=4,
        replays=4,
    ),
}


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="cyclic: the peak of the lr triangle over all replays; step: the initial lr",
        alpha="δ's ascent step, /255 units (Free: ε); with --replays-min, the step of the first "
        "epoch, α·replays_min/m_t after",
    )
    p.add_argument(
        "--replays",
        type=flags.pos_int,
        default=None,
        help="m: how many times each minibatch is replayed (Wong: --minibatch-replays; Free's "
        "code: n_repeats); with --replays-min, the m of the last epoch",
    )
    p.add_argument(
        "--replays-min",
        type=flags.pos_int,
        default=None,
        help="Amata+Free: m rises from this in the first epoch to --replays in the last (Amata's "
        "K_min and K_max), the step shrinking as α·replays_min/m_t",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["cyclic", "step"],
        default=None,
        help="cyclic: 0 → lr → 0 over all replays, set every replay (Wong's train_free.py); step: "
        "lr ×0.1 after each of --milestones, set every epoch (Free's ImageNet code)",
    )
    p.add_argument(
        "--milestones",
        type=flags.pos_int,
        nargs="*",
        default=None,
        help="--lr-schedule step: epochs after which the lr is multiplied by 0.1, each below "
        "--epochs (--milestones alone: none)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="free_at")
    if args.replays_min is not None and args.replays_min > args.replays:
        p.error(f"--replays-min {args.replays_min} is larger than --replays {args.replays}")
    if args.lr_schedule == "cyclic" and p.parse_known_args(argv)[0].milestones:
        p.error("--milestones are the drops of --lr-schedule step; add --lr-schedule step")
    if args.lr_schedule == "step":
        # the ImageNet recipe's drops: after epochs 8 and 16 of 23
        flags.milestones(args, p, argv, fractions=(8 / 23, 16 / 23))
    return args


def replays_at(t, epochs, m_min, m_max):
    """Amata+Free's replay count m_t for epoch t = 0 … `epochs` − 1: Amata's K_t (Ye et al., AAAI 2021, Algorithm 1,
    applied to Free's m as in §3.2) = m_min + (m_max − m_min)·t/T, rounded to the nearest integer, halves up, with
    T = epochs − 1, so that the first epoch replays m_min times and the last m_max times (App. B.2; DECISIONS.md,
    'Amata K_t end points'; a single epoch runs m_max). m_min = m_max is plain Free. Integers; returns m_t."""
    span = epochs - 1
    return m_max if span == 0 else m_min + (2 * (m_max - m_min) * t + span) // (2 * span)


def free_replay(model, opt, x, y, delta, eps, step, autocast=None, scaler=None):
    """One replay of Free-AT (Shafahi et al., NeurIPS 2019, arXiv:1904.12843, Algorithm 1's inner loop): one
    forward pass at clamp(x + δ, 0, 1) and ONE backward that gives both the weight gradient (then `opt` steps) and
    δ's gradient (then δ ← clip(δ + step·sign(∇_δ), −ε, ε), in place). Call it m times per minibatch.

    x: N×C×H×W images in [0, 1] (checked), y: N labels; eps, step: ε and δ's ascent step in [0, 1] units (8/255);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: used in the mode it is in (train mode in the authors' code: BatchNorm sees every replay); opt: the
        optimiser of its parameters (their gradients are zeroed here, before the backward).
    delta: the perturbation carried across replays and minibatches, B×C×H×W with B ≥ N (the batch size; zeros
        before the first batch), in [−ε, ε]: rows 0:N are this batch's, by position, and are updated in place;
        rows N: (a smaller last batch) are left for the next batch, as the authors' buffer does.
    scaler: under torch.float16, the torch.amp.GradScaler that steps `opt`, in place of the 2^10 factor (one backward
        gives both gradients): its loss scale keeps δ's gradient from underflowing, and where an overflow makes the
        gradient NaN δ keeps its value (the scaler skips that weight step).
    Returns (loss, logits), detached: the batch's mean cross-entropy and logits at clamp(x + δ, 0, 1) before
    this replay's updates."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    n = len(y)
    d = delta[:n].detach().requires_grad_(True)  # this batch's rows of δ, as a leaf of its own
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        # the pixel clamp of the authors' code: x + δ in [0, 1], δ itself not projected
        logits = model((x + d).clamp(0, 1))
        loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()  # g_θ and g_adv, one backward
    # an fp16 overflow's NaN (the scaler skips that weight step) leaves δ where it was
    grad = torch.nan_to_num(d.grad, nan=0.0)
    delta[:n] = (d.detach() + step * grad.sign()).clamp(-eps, eps)  # δ's ascent, in the ε-ball
    if scaler is None:
        opt.step()  # θ's descent with the gradient of the same backward
    else:
        scaler.step(opt)
        scaler.update()
    return loss.detach(), logits.detach()


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    model = common.get_model(args, data)
    run = harness.Run(args, data, columns=["m", "step"])
    # the weight step's view of the network (the same parameters; through DDP, compiled): every replay is
    # one, its backward also giving δ's gradient
    _, train_model = run.models(model)
    if args.lr_schedule == "step" and (note := flags.milestones(args)):
        common.log(note)
    eps = args.epsilon / 255
    alpha = args.alpha / 255
    m_min = args.replays_min or args.replays
    replays = [replays_at(t, args.epochs, m_min, args.replays) for t in range(args.epochs)]
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    if args.lr_schedule == "cyclic":
        # Wong's train_free.py: one triangle over every replay of the run, CyclicLR's defaults (momentum 0.9 ↔ 0.8)
        steps = sum(data.train.batches(e) * replays[e] for e in range(args.epochs))
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.0, max_lr=args.lr, step_size_up=steps / 2, step_size_down=steps / 2
        )
    else:  # Free's code: lr·0.1^(epoch // ⌈30/m⌉), set before each epoch
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=0.1)
    # δ: one row per position of this process's batch, zero once (main_free.py's global_noise_data), carried through
    # every replay, batch and epoch, and through a resume (each process its own under torchrun).
    delta = torch.zeros((args.batch_size // common.world(), *data.shape), device=args.device)
    if common.uses_channels_last(args):
        delta = delta.contiguous(memory_format=torch.channels_last)  # the layout of the batches
    checkpoint = dict(model=model, opt=opt, sched=sched, delta=harness.PerProcess(delta))
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        # Amata+Free: m_t replays with step α_t = τ/m_t, τ = m_min·α (plain Free: m and α throughout)
        m = replays[epoch]
        step = alpha * m_min / m
        model.train()
        total_loss = total_correct = total_n = 0
        for x, y, _ in data.train.epoch(epoch):
            for _ in range(m):  # Algorithm 1: the minibatch replayed m times
                loss, out = free_replay(
                    train_model, opt, x, y, delta, eps, step, run.amp, run.scaler
                )
                if args.lr_schedule == "cyclic":
                    sched.step()
                total_loss += loss * len(y)
                total_correct += (out.argmax(1) == y).sum()
                total_n += len(y)
        lr = opt.param_groups[0]["lr"]  # step: the epoch's lr; cyclic: where the epoch ended
        if args.lr_schedule == "step":
            sched.step()
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=lr,
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            m=m,
            # in /255 units, as --alpha
            step=step * 255,
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
