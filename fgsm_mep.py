"""FGSM with prior-guided adversarial initialisation: FGSM-BP, FGSM-EP, FGSM-MEP (FGSM-PGI).

Jia, Zhang, Wei, Wu, Ma, Wang, Cao, "Prior-guided adversarial initialization for fast adversarial training", ECCV
2022, arXiv:2207.08859. Authors' code: github.com/jiaxiaojunQAQ/FGSM-PGI (FGSM_MEP.py).

    python fgsm_mep.py                                  # FGSM-MEP, CIFAR-10 recipe: PreActResNet18, 110 epochs
    python fgsm_mep.py --prior epoch                    # FGSM-EP (--prior batch: FGSM-BP)
    python fgsm_mep.py --reset-every 40 --true-prob 0.6 # the authors' code's extras (CIFAR-100: 10)
    python fgsm_mep.py --dataset mnist --data-dir DIR   # MNIST: Wong's CNN and MNIST recipe (our choice)

Paper (ResNet18, CIFAR-10, best epoch, 73 min each): MEP 81.72% clean, 55.18% PGD-10, 54.17% PGD-50, 50.75% C&W,
49.00% AutoAttack; BP 83.15 / 54.59 / 53.2 / 50.24 / 47.47; EP 82.75 / 54.8 / 53.27 / 49.86 / 47.94. CIFAR-100 MEP:
58.78 / 31.88 / 31.14 / 28.06 / 25.67. Measured here: bench/RESULTS.md (every number next to its command).

Algorithm 3 "FGSM-MEP" of arXiv:2207.08859 (the box with lines 1-19 as on the authors' ECCV poster, FGSM-PGI repo
Material/Potser_1780.pdf, which we follow: we could not check the box's number against the paper's PDF), per batch
with sample indices i (DECISIONS.md, 'MEP momentum form', 'MEP regulariser', 'MEP initialisation', 'SDI and PGI
input normalisation'):
    δ_pgi = D^δ_i                           (first epoch: U(−ε, ε))                          lines 4, 11
    g_c = ∇_x L(f(x + δ_pgi), y)            (the box takes sign(): see update_memory)        line 12
    D^m_i = μ·D^m_i + g_c                                                                    line 13
    δ_adv = Π_[−ε,ε](δ_pgi + α·sign(g_c))                                                    line 14
    D^δ_i = Π_[−ε,ε](δ_pgi + α·sign(D^m_i))                                                  line 15
    w ← w − ∇_w [L(f(x+δ_adv), y) + λ·‖f(x+δ_adv) − f(x+δ_pgi)‖²]                         line 16
FGSM-EP stores δ_adv itself as the next epoch's prior (D^δ_i = δ_adv); FGSM-BP passes δ_adv to the next batch. All
three use the regulariser of line 16 (λ = 0 switches it off). That BP and EP use it is our assumption (DECISIONS.md,
'MEP regulariser'): the paper's method description gives the regulariser once, after the three priors (so does the
authors' poster), and the authors' code is MEP's only; the paper treats the three priors alike and gives them the
same training time (73 min), which fits one extra forward in each.
Copyable pieces: update_memory (lines 13, 15; EP/BP), mep_loss (lines 12, 14, 16).

The memories (2 × 614 MB on CIFAR-10) are part of checkpoint.pt; a checkpoint is skipped while saving has cost more
than 5% of the training time, so an interrupted run resumes, exactly, from the last checkpoint written, which can be
a few epochs back.
"""

import contextlib
import functools
import os

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # Authors' code: SGD lr 0.1, ×0.1 at epochs 100 and 105 of 110, α = ε = 8/255, λ = 10, μ = 0.3.
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
    # ImageNet: the paper runs FGSM-BP there (per-sample memories of 1.28 M images cannot exist) but gives no recipe:
    # imagenet.IMAGENET, Wong et al.'s, with its lr.
    "imagenet": dict(lr_schedule="imagenet", optimizer="sgd"),
}
MOMENTUM_DEFAULTS = dict(mu=0.3, momentum_form="norm")  # --prior momentum only


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="initial learning rate (multistep) or peak (cyclic)",
        true_prob="the authors' code's soft labels, off by default: the true class gets "
        "probability F and every other class (1 − F)/(C − 1) (PyTorch's label_smoothing is another "
        "parametrisation), in the attack's and the training loss (code: 0.6). 1/C < F ≤ 1 (C "
        "classes)",
    )
    p.add_argument(
        "--prior",
        choices=["batch", "epoch", "momentum"],
        default="momentum",
        help="where δ_pgi comes from: the previous batch's δ_adv (FGSM-BP), the sample's δ_adv of "
        "the previous epoch (FGSM-EP), or the sample's momentum prior (FGSM-MEP)",
    )
    p.add_argument(
        "--lam",
        type=flags.nonneg_float,
        default=10.0,
        help="λ of the regulariser λ·mean((f(x+δ_adv) − f(x+δ_pgi))²) over batch × classes, used "
        "by every --prior (0: off). For BP and EP that is our assumption: the sources show it "
        "with MEP only",
    )
    p.add_argument(
        "--mu",
        type=flags.nonneg_float,
        default=None,
        help="μ, decay of the momentum memory (--prior momentum only; default "
        f"{MOMENTUM_DEFAULTS['mu']})",
    )
    p.add_argument(
        "--momentum-form",
        choices=["norm", "sign"],
        default=None,
        help="what the momentum accumulates (--prior momentum only): norm = ∇/‖∇‖₁ with one L1 "
        "norm over the batch (the code; default); sign = sign(∇) (the algorithm box's formula, "
        "which makes MEP equal to EP for μ < 1/2)",
    )
    p.add_argument(
        "--reset-every",
        type=flags.nonneg_int,
        default=0,
        metavar="N",
        help="the code's trick, off (0) by default: every N epochs (from the first) restart the "
        "prior memory at random ±min(α, ε) and the momentum at zero (code: 40; CIFAR-100: 10)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["multistep", "cyclic", "imagenet"],
        default=None,
        help="multistep: ×0.1 after 100/110 and 105/110 of the iterations (epochs 100, 105 of "
        "110); cyclic: one triangle 0 → lr → 0 over the run; imagenet: Wong et al.'s ImageNet "
        "schedule",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help="sgd (momentum 0.9, CIFAR recipe) or adam (MNIST recipe)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="fgsm_mep")
    # WORLD_SIZE: started by torchrun.
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error(
            "fgsm_mep.py runs in one process: its per-sample memories (and BP's batch slot) would "
            "have to follow each sample to the process that gets it next; start it without torchrun"
        )
    if args.dataset == "imagenet" and args.prior != "batch":
        p.error(
            f"--prior {args.prior} keeps two memories of the training set's size (2 × 770 GB on "
            f"ImageNet); --prior batch (FGSM-BP, what the paper ran on ImageNet) keeps one batch"
        )
    given = [f"--{k.replace('_', '-')}" for k in MOMENTUM_DEFAULTS if getattr(args, k) is not None]
    if args.prior != "momentum" and given:
        p.error(
            f"{' and '.join(given)}: only --prior momentum (FGSM-MEP) has a momentum memory, not "
            f"--prior {args.prior}"
        )
    if args.prior == "momentum":
        for key, value in MOMENTUM_DEFAULTS.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    return args


def update_memory(
    delta_memory, momentum_memory, rows, x, delta_pgi, delta_adv, grad, eps, alpha, mu, form="norm"
):
    """The next prior of a batch's samples, written in place into their rows of the memories: Alg. 3 lines 13 and 15
    (FGSM-MEP), or δ_adv itself (FGSM-EP, FGSM-BP) when momentum_memory is None.

    delta_memory: D^δ, R×C×H×W (R: the training images for MEP/EP, indexed by sample; a batch slot for BP).
    momentum_memory: D^m, the same shape (MEP), or None (EP/BP). rows: the batch's rows (an index tensor, or a
        slice for BP's slot). x: the batch's images N×C×H×W in [0, 1]; delta_pgi, delta_adv: the prior and the FGSM
        perturbation of mep_loss, N×C×H×W; grad: ∇_δ L at x+δ_pgi (mep_loss's; any positive multiple of it gives the
        same result, as under float16 autocast); eps, alpha: ε and α in [0, 1] units; mu: μ, the momentum decay.
    form: what line 13 adds to the momentum. The box writes g_c = sign(∇) ("sign"). With that, |D^m| ≤ 1 + μ + μ²
        + ... = 1/(1−μ), so the history term μ·D^m stays below μ/(1−μ), which is < 1 for μ < 1/2 (μ = 0.3):
        sign(μ·D^m + g_c) is always sign(g_c), line 15 then stores exactly δ_adv of line 14, and MEP is EP. The
        authors' code accumulates ∇/‖∇‖₁ instead, one L1 norm over the whole batch ("norm", the default here:
        DECISIONS.md, 'MEP momentum form'), so old directions can outvote a weak current gradient.
    The stored prior is clamped so that x + D^δ_i is in [0, 1] for this view of the image (as the code; DECISIONS.md,
    'SDI and PGI pixel-range clamps'). Returns None."""
    if momentum_memory is None:
        delta_memory[rows] = delta_adv  # EP: the next epoch's prior; BP: the next batch's
        return
    direction = grad.sign() if form == "sign" else grad / grad.abs().sum().clamp_min(1e-30)
    momentum = mu * momentum_memory[rows] + direction  # line 13
    momentum_memory[rows] = momentum
    delta_next = (delta_pgi + alpha * momentum.sign()).clamp(-eps, eps)  # line 15
    delta_memory[rows] = (x + delta_next).clamp(0, 1) - x


def mep_loss(model, x, y, delta_pgi, eps, alpha, lam, autocast=None, smoothing=0.0, adv_model=None):
    """FGSM-PGI's training loss from a prior δ_pgi: Alg. 3 lines 12, 14 and 16 (arXiv:2207.08859; the FGSM-MEP box
    as on the authors' poster; code: FGSM_MEP.py). One forward at x + δ_pgi gives the attack gradient g_c (line
    12) and, kept, the logits of the regulariser (line 16): that is the "one extra forward" of the method's cost.

    x: N×C×H×W images in [0, 1] (checked), y: N labels; eps, alpha: ε and α in [0, 1] units (8/255);
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: run in the mode it is in (train mode in the code). With lam > 0 the graph of its forward at x + δ_pgi is
        backpropagated twice (the input gradient now, the weight step later): a torch.compile'd model must then be
        compiled without donated buffers (torch._functorch.config.donated_buffer = False, as main() does).
    adv_model: the module for the forward at x + δ_adv, the same network (default: model), e.g. its
        torch.compile'd view when model is an input-gradient view (lam = 0); that pass is backpropagated once.
    delta_pgi: the prior, N×C×H×W with |δ| ≤ ε and x + δ in [0, 1] (no gradient of it is kept).
    lam: λ of the regulariser (code: 10; 0: none, and the forward at x + δ_pgi keeps no graph). smoothing: PyTorch's
        label_smoothing of both cross entropies (the code's soft labels; 0: hard labels).
    Under float16 the returned grad is 2^10 times ∇ (the scaling below), which leaves its sign and ∇/‖∇‖₁, all
    update_memory uses, unchanged.
    Returns (loss, logits, delta_adv, grad): the scalar loss of line 16, CE(f(x + δ_adv), y) + λ·mean over batch ×
    classes of (f(x + δ_adv) − f(x + δ_pgi))² (the code's MSELoss, in fp32), with its graph through both forward
    passes (call loss.backward() for the weight step); the logits f(x + δ_adv), N×classes; δ_adv of line 14,
    detached, |δ_adv| ≤ ε and x + δ_adv in [0, 1]; grad = ∇_δ L(f(x + δ_pgi), y) (line 12), N×C×H×W, detached."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16: the loss × 2^10 before the input gradient, so that it does not underflow.
    scale = 1024.0 if autocast == torch.float16 else 1.0
    delta_pgi = delta_pgi.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        logits_pgi = model(x + delta_pgi)
        loss_pgi = F.cross_entropy(logits_pgi, y, label_smoothing=smoothing)
    # Line 12: g_c. The graph stays for line 16's regulariser, which backpropagates through f(x + δ_pgi) too.
    (grad,) = torch.autograd.grad(loss_pgi * scale, delta_pgi, retain_graph=lam > 0)
    # Line 14: one FGSM step from the prior, projected onto the ε-ball and the pixel range.
    delta_adv = (delta_pgi.detach() + alpha * grad.sign()).clamp(-eps, eps)
    delta_adv = (x + delta_adv).clamp(0, 1) - x
    # Line 16: CE at x + δ_adv plus λ times the squared logit distance to the prior's (gradients through both).
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        logits = (model if adv_model is None else adv_model)(x + delta_adv)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    if lam > 0:
        loss = loss + lam * F.mse_loss(logits.float(), logits_pgi.float())
    return loss, logits, delta_adv, grad


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    # The code's soft labels (true class F, the others (1 − F)/(C − 1)) as PyTorch's label_smoothing.
    smoothing = flags.smoothing_of(args.true_prob, data.num_classes)
    model = common.get_model(args, data)
    run = harness.Run(args, data, columns=["reg"])
    attack_model, train_model = run.models(model)
    # With the regulariser the forward at x + δ_pgi keeps its graph for line 16's weight step: it runs on the
    # weight step's network (compiled with --compile). Not on the eager model: the compiled forward at x + δ_adv
    # writes BatchNorm's running statistics in place with a version bump, and the eager pass's backward, which
    # saved them, would refuse to run. Without the regulariser it is an input-gradient pass like any attack's.
    prior_model = train_model if args.lam > 0 else attack_model
    # A compiled backward runs twice (retain_graph for line 12) only if its graph was compiled without donated
    # buffers (PyTorch's own advice in the error it raises); graphs compile at their first call, under this.
    # Compiled, line 12's backward also computes the weight gradients (then dropped): a compiled backward
    # computes every gradient its graph was traced with.
    keep_buffers = contextlib.nullcontext
    if args.compile and args.lam > 0 and hasattr(functorch_config, "donated_buffer"):
        keep_buffers = functools.partial(functorch_config.patch, donated_buffer=False)
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

    # The memories: D^δ and D^m, one row per image of the training split (indexed by the loader's sample indices;
    # 2 × 614 MB in fp32 on CIFAR-10), or, for BP, one batch slot. Alg. 3 line 4: the first prior is U(−ε, ε); zero
    # momentum makes the first epoch's branch of the box (lines 3-9) the general one (lines 11-16). Random crops and
    # flips change a sample's pixels between epochs, so a stored δ no longer sits on the pixels it was computed for;
    # the authors' code has the same property and we keep it (DECISIONS.md, 'MEP initialisation').
    # A dict in the checkpoint: BP's slot is made anew when ImageNet's next phase changes the crop.
    rows_kept = args.batch_size if args.prior == "batch" else data.train_size
    delta_memory = torch.empty((rows_kept, *data.shape), device=args.device).uniform_(-eps, eps)
    memory = {
        "delta": delta_memory,
        "momentum": torch.zeros_like(delta_memory) if args.prior == "momentum" else None,
    }
    checkpoint = dict(model=model, opt=opt, sched=sched, memory=memory)
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        if args.reset_every and epoch % args.reset_every == 0:
            # The code's reset: clamp(α·sign(U(−ε, ε)), −ε, ε), i.e. random signs times min(α, ε); momentum zero.
            memory["delta"].uniform_(-eps, eps).sign_().mul_(min(alpha, eps))
            if memory["momentum"] is not None:
                memory["momentum"].zero_()
        model.train()
        total_loss = total_correct = total_n = total_reg = 0
        for x, y, idx in data.train.epoch(epoch):
            # BP's slot holds one batch; the last batch may be smaller.
            rows = idx
            if args.prior == "batch":
                rows = slice(0, len(y))
            # BP at a new ImageNet phase: the crop changed, so line 4 again.
            if memory["delta"].shape[2:] != x.shape[2:]:
                memory["delta"] = torch.empty_like(x).uniform_(-eps, eps)
            # Line 11; x + δ_pgi is clamped to [0, 1] (DECISIONS.md, 'Pixel range'; the code feeds it
            # unclamped).
            delta_pgi = (x + memory["delta"][rows]).clamp(0, 1) - x
            # Lines 12, 14, 16.
            with keep_buffers():
                loss, out, delta_adv, grad = mep_loss(
                    prior_model,
                    x,
                    y,
                    delta_pgi,
                    eps,
                    alpha,
                    args.lam,
                    run.amp,
                    smoothing,
                    adv_model=train_model,
                )
            # Lines 13, 15 (EP, BP: δ_adv).
            update_memory(
                memory["delta"],
                memory["momentum"],
                rows,
                x,
                delta_pgi,
                delta_adv,
                grad,
                eps,
                alpha,
                args.mu,
                args.momentum_form,
            )
            # Line 16's weight step, through both forward passes.
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()  # per iteration
            with torch.no_grad():
                ce = F.cross_entropy(out.float(), y, label_smoothing=smoothing)
            total_loss += loss.detach() * len(y)
            total_reg += (loss.detach() - ce) * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)

        # A checkpoint holds the memories (2 × 614 MB on CIFAR-10), whose save can cost more than a fast
        # GPU's epoch: it is skipped while the saves have cost more than 5% of the training time. The last
        # epoch and a stop are always saved; an interrupted run resumes exactly from the last checkpoint.
        save = run.save_seconds <= 0.05 * run.train_time
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            save=save,
            reg=(total_reg / total_n).item(),
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
