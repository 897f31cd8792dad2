"""FGSM with prior-guided adversarial initialisation: FGSM-BP, FGSM-EP, FGSM-MEP (FGSM-PGI).

Jia, Zhang, Wei, Wu, Ma, Wang, Cao, "Prior-guided adversarial initialization for fast adversarial
training", ECCV 2022, arXiv:2207.08859. Authors' code: github.com/jiaxiaojunQAQ/FGSM-PGI.

    python fgsm_mep.py                                  # FGSM-MEP, CIFAR-10 recipe: PreActResNet18, 110 epochs
    python fgsm_mep.py --prior epoch                    # FGSM-EP (--prior batch: FGSM-BP)
    python fgsm_mep.py --reset-every 40 --label-smoothing 0.6   # the authors' code's extras (CIFAR-100: 10)
    python fgsm_mep.py --dataset mnist --data-dir DIR   # MNIST: Wong's CNN and MNIST recipe (our choice)

Paper (ResNet18, CIFAR-10, best epoch, 73 min each): MEP 81.72% clean, 55.18% PGD-10, 54.17% PGD-50,
50.75% C&W, 49.00% AutoAttack; BP 83.15 / 54.59 / 53.2 / 50.24 / 47.47; EP 82.75 / 54.8 / 53.27 /
49.86 / 47.94. CIFAR-100 MEP: 58.78 / 31.88 / 31.14 / 28.06 / 25.67. Measured here: see README.md.

Algorithm 3, FGSM-MEP (slides, papers/003), per batch with sample indices i (SPEC §3):
    δ_pgi = D^δ_i                           (epoch 1: U(−ε, ε))                       lines 4, 11
    g_c = ∇_x L(f(x + δ_pgi), y)            (the slides take sign(), see momentum_direction)  line 12
    D^m_i = μ·D^m_i + g_c                                                             line 13
    δ_adv = Π_[−ε,ε](δ_pgi + α·sign(g_c))                                             line 14
    D^δ_i = Π_[−ε,ε](δ_pgi + α·sign(D^m_i))                                           line 15
    w ← w − ∇_w [L(f(x+δ_adv), y) + λ·‖f(x+δ_adv) − f(x+δ_pgi)‖²]                  line 16
FGSM-EP stores δ_adv itself as the next epoch's prior (D^δ_i = δ_adv); FGSM-BP passes δ_adv to the
next batch. All three use the regulariser of line 16 (λ = 0 switches it off). That BP and EP use it is
our assumption: the slides give the regulariser once, after the three priors, without saying which of
them it goes with, and the authors' code is MEP's only; Proposition 1 treats the three priors alike and
Table 1 gives them the same time (73 min), which fits one extra forward in each.

The memories (2 × 600 MB on CIFAR-10) are checkpointed beside checkpoint.pt, as raw files rewritten in
place (delta_memory.{0,1}.bin, momentum_memory.{0,1}.bin), and a checkpoint is skipped while saving has
cost more than 5% of the training time: an interrupted run resumes, exactly, from the last checkpoint
written, which can be a few epochs back (common.Run.track).
"""
import torch
import torch.nn.functional as F

import common

RECIPES = {
    # Authors' code: SGD lr 0.1, ×0.1 at epochs 100 and 105 of 110, α = ε = 8/255, λ = 10, μ = 0.3.
    "default": dict(epochs=110, batch_size=128, lr=0.1, epsilon=8, alpha=8, weight_decay=5e-4, optimizer="sgd",
                    lr_schedule="multistep"),
    # Not in the paper (our choice): Wong's MNIST recipe, as fgsm_rs.py uses it (ε = 0.3, α = 0.375 by
    # SPEC §0, Adam, 10 epochs), except that the lr triangle peaks at the middle (Wong: at 2/5).
    "mnist": dict(epochs=10, batch_size=100, lr=5e-3, epsilon=76.5, alpha=95.625, weight_decay=0.0,
                  optimizer="adam", lr_schedule="cyclic"),
}


def get_args(argv=None):
    p = common.base_parser(__doc__, lr_flag="--lr", lr_help="initial learning rate (multistep) or peak (cyclic)")
    p.add_argument("--prior", choices=["batch", "epoch", "momentum"], default="momentum",
                   help="where δ_pgi comes from: the previous batch's δ_adv (FGSM-BP), the sample's δ_adv of the "
                        "previous epoch (FGSM-EP), or the sample's momentum prior (FGSM-MEP)")
    p.add_argument("--lam", type=common.nonneg_float, default=10.0,
                   help="λ of the regulariser λ·mean((f(x+δ_adv) − f(x+δ_pgi))²) over batch × classes, used by "
                        "every --prior (0: off). For BP and EP that is our assumption: the sources show it with "
                        "MEP only")
    p.add_argument("--mu", type=common.nonneg_float, default=0.3, help="μ, decay of the momentum memory (MEP)")
    p.add_argument("--momentum-form", choices=["norm", "sign"], default="norm",
                   help="what the momentum accumulates (MEP): norm = ∇/‖∇‖₁ with one L1 norm over the batch "
                        "(the code); sign = sign(∇) (the slides' formula, which makes MEP equal to EP for μ < 1/2)")
    p.add_argument("--reset-every", type=common.nonneg_int, default=0,
                   help="the code's trick, off (0) by default: every N epochs (from the first) restart the prior "
                        "memory at random ±ε and the momentum at zero (code: 40; CIFAR-100: 10)")
    p.add_argument("--lr-schedule", choices=["multistep", "cyclic"], default=None,
                   help="multistep: ×0.1 after 100/110 and 105/110 of the iterations (epochs 100, 105 of 110); "
                        "cyclic: one triangle 0 → lr → 0 over the run")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="sgd (momentum 0.9, CIFAR recipe) or adam (MNIST recipe)")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=None, help="default 5e-4 (MNIST 0)")
    p.add_argument("--label-smoothing", type=common.pos_float, default=None, metavar="TRUE_PROB",
                   help="authors' code-only trick, off by default: soft labels with TRUE_PROB on the true class "
                        "and the rest spread evenly, on the attack's and the training loss (code: 0.6). Between "
                        "1/C (C classes: uniform labels) and 1 (hard labels)")
    args = common.parse_args(p, RECIPES, argv, script="fgsm_mep")
    if args.label_smoothing is not None:
        # Below 1/C the true class would get less than the others: PyTorch's label_smoothing (see main) would
        # exceed 1 and fail once the data has loaded. Checked here, with the flag's own error.
        classes = common.dataset_info(args.dataset, args.data_dir)["classes"]
        if not 1 / classes <= args.label_smoothing <= 1:
            p.error(f"--label-smoothing {args.label_smoothing}: the true class's probability must lie between "
                    f"1/C = {1 / classes:.4g} ({args.dataset}: {classes} classes) and 1")
    return args


def fgsm_from_prior(model, x, y, delta_pgi, eps, alpha, autocast, smoothing=0.0, keep_graph=True):
    """Alg. 3 lines 12 and 14: one FGSM step from the prior δ_pgi (already inside [0, 1] around x).

    Returns (δ_adv detached, ∇_δ L at x+δ_pgi, f(x+δ_pgi)). The forward at x+δ_pgi is the one the
    regulariser needs, so its graph is kept (keep_graph) and the weight step backpropagates through it:
    that is the "one extra forward" of MEP's cost, instead of running f(x+δ_pgi) a second time."""
    delta_pgi = delta_pgi.clone().requires_grad_(True)
    with autocast():
        logits_pgi = model(x + delta_pgi)
        loss = F.cross_entropy(logits_pgi, y, label_smoothing=smoothing)
    grad, = torch.autograd.grad(loss, delta_pgi, retain_graph=keep_graph)
    delta_adv = (delta_pgi.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta_adv).clamp(0, 1) - x, grad, logits_pgi


def momentum_direction(grad, form):
    """What line 13 adds to the momentum memory.

    The slides write g_c = sign(∇). With that, |D^m| ≤ 1 + μ + μ² + ... = 1/(1−μ), so the history
    term μ·D^m stays below μ/(1−μ), which is < 1 for μ < 1/2 (μ = 0.3 here): sign(μ·D^m + g_c) is
    always sign(g_c), line 15 then stores exactly δ_adv of line 14, and MEP is EP. The authors' code
    accumulates ∇/‖∇‖₁ instead, one L1 norm over the whole batch, so old directions can outvote a
    weak current gradient; that is the default here (SPEC §3), and --momentum-form sign the slides'."""
    if form == "sign":
        return grad.sign()
    return grad / grad.abs().sum().clamp_min(1e-30)


def store_prior(prior, delta_memory, momentum_memory, rows, x, delta_pgi, delta_adv, grad, eps, alpha, mu, form):
    """Write the next prior of these samples (rows of the memories): lines 13 and 15 for MEP; δ_adv itself
    for EP (per sample) and BP (rows = the batch slot, read again by the next batch). In place, because
    the memories are the tensors the checkpoint tracks."""
    if prior != "momentum":
        delta_memory[rows] = delta_adv
        return
    momentum = mu * momentum_memory[rows] + momentum_direction(grad, form)    # line 13
    momentum_memory[rows] = momentum
    delta_next = (delta_pgi + alpha * momentum.sign()).clamp(-eps, eps)     # line 15
    delta_memory[rows] = (x + delta_next).clamp(0, 1) - x  # pixel range of this view of the image, as the code


def pgi_regulariser(logits_adv, logits_pgi, lam):
    """Line 16's λ·‖f(x+δ_adv) − f(x+δ_pgi)‖²: as in the code, the mean over batch × classes of the squared
    logit differences (MSELoss), in fp32, with gradients through both forward passes."""
    return lam * F.mse_loss(logits_adv.float(), logits_pgi.float())


def main(argv=None):
    args = get_args(argv)
    run = common.Run(args)
    data = common.get_data(args, run.device, args.val_size)
    model = common.get_model(args, run.device)
    train_model = run.compile(model)
    eps, alpha = args.epsilon / 255, args.alpha / 255
    # The code's soft labels (true class f, others (1−f)/(C−1)) are PyTorch's label_smoothing s with
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

    # Per-sample memories D^δ and D^m, one row per image of the full training split (indexed by the
    # loader's sample indices), or a single batch slot for BP. Alg. 3 line 4: the first prior is U(−ε, ε).
    # Random crops and flips change a sample's pixels between epochs, so a stored δ no longer sits on
    # the pixels it was computed for; the authors' code has the same property and we keep it.
    image_shape = tuple(data.train.images.shape[1:])
    slots = args.batch_size if args.prior == "batch" else data.train_size
    delta_memory = torch.empty((slots,) + image_shape, device=run.device).uniform_(-eps, eps)
    run.track(model=model, opt=opt, sched=sched, delta_memory=delta_memory)
    momentum_memory = None
    if args.prior == "momentum":
        # Zero momentum makes the first epoch's branch of Alg. 3 (lines 3-9) the general one (lines 11-16).
        momentum_memory = torch.zeros_like(delta_memory)
        run.track(momentum_memory=momentum_memory)

    for epoch in run.epochs():
        if args.reset_every and epoch % args.reset_every == 0:
            # The code: clamp(α·sign(U(−ε, ε)), −ε, ε), i.e. random signs times min(α, ε); momentum zero.
            delta_memory.uniform_(-eps, eps).sign_().mul_(min(alpha, eps))
            if momentum_memory is not None:
                momentum_memory.zero_()
        model.train()
        total_loss = total_correct = total_n = total_reg = 0
        for x, y, idx in data.train.epoch(epoch):
            rows = slice(0, len(y)) if args.prior == "batch" else idx  # the last batch may be smaller
            # Line 11; x+δ_pgi is clamped to [0, 1] (SPEC §0; the code feeds it unclamped).
            delta_pgi = (x + delta_memory[rows]).clamp(0, 1) - x
            delta_adv, grad, logits_pgi = fgsm_from_prior(train_model, x, y, delta_pgi, eps, alpha, run.autocast,
                                                          smoothing, keep_graph=args.lam > 0)
            store_prior(args.prior, delta_memory, momentum_memory, rows, x, delta_pgi, delta_adv, grad, eps,
                        alpha, args.mu, args.momentum_form)
            # Line 16: CE at x+δ_adv plus the regulariser, backpropagated through both forward passes.
            with run.autocast():
                out = train_model(x + delta_adv)
                ce = F.cross_entropy(out, y, label_smoothing=smoothing)
            reg = pgi_regulariser(out, logits_pgi, args.lam) if args.lam > 0 else torch.zeros((), device=x.device)
            loss = ce + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_reg += reg.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)

        run.end_epoch(epoch, model, data, lr=opt.param_groups[0]["lr"], loss=(total_loss / total_n).item(),
                      acc=(total_correct / total_n).item(), reg=(total_reg / total_n).item())
    run.finish(model, data)


if __name__ == "__main__":
    common.main_guard(main)
