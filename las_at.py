"""Adversarial training with a learnable attack strategy (LAS-AT, LAS-PGD-AT).

Jia, Zhang, Wu, Ma, Wang, Cao, "LAS-AT: adversarial training with learnable attack strategy", CVPR 2022
(oral), arXiv:2203.06616. Authors' code: github.com/jiaxiaojunQAQ/LAS-AT (LAS_PGD_AT/).

    python las_at.py                                    # CIFAR-10 recipe: PreActResNet18, 110 epochs, k = 20
    python las_at.py --model wrn-34-10                  # the paper's WRN34-10 target (Table 2)
    python las_at.py --dataset cifar100                 # iterations ∈ {3..12}, strategy SGD with momentum
    python las_at.py --dataset tiny-imagenet --data-dir DIR   # code's Tiny ImageNet script: k = 1, clip 10, 2×2 grid
    python las_at.py --strategy-every 40                # k = 40, the slides' headline row
    python las_at.py --reward loss                      # the slides' L1 + α·L2 + β·L3 instead of the code's
    python las_at.py --dataset mnist --data-dir DIR     # MNIST: Wong's CNN and MNIST recipe (our choice)

Paper (slides' Table 1, CIFAR-10, ResNet18), by k: the default k = 20 gives 82.00% clean / 53.53% PGD-10 in
418 min, 1.60× the 261 min of PGD-10 AT (82.56 / 53.15); the headline k = 40 (`--strategy-every 40`) gives
82.3 / 54.29 / 49.89% AutoAttack in 365 min; k = 1 gives 82.88 / 53.71 in 1378 min. WRN34-10: 86.23
clean / 57.64 PGD-10 / 56.12 PGD-50 / 55.73 C&W / 53.58 AA. Tiny ImageNet (PreActResNet18, Table 4): 44.86
clean / 22.16 PGD-50 / 18.54 C&W / 16.74 AA. Measured here: see README.md (only numbers from commands shown
there).

A strategy network p(a|x; θ) picks, per image, a PGD attack a = (ε, step, iterations) from discrete sets;
the target network f_w trains on the examples those attacks make (SPEC §6, slides in papers/003):
    every k-th iteration (REINFORCE, θ ascends J = E_a[L1 + α·L2 + β·L3]):
        a ~ p(a|x; θ) (strategy in train mode);  x_adv = PGD_a(x) on f_w
        R1 = CE(f_w(x_adv), y) clamped to [0, 10]                               L1
        ŵ = w after one SGD step on CE(f_w(x_adv), y)       (a copy: w itself is untouched)
        R2 = α·(robust accuracy of ŵ, PGD-10)     --reward loss: −α·CE(f_ŵ(x_adv^â), y)   L2
        R3 = β·(clean accuracy of ŵ)              --reward loss: −β·CE(f_ŵ(x), y)         L3
             (the PGD-10 â runs on ŵ in train mode, R2 and R3 are then measured in eval mode: code)
        θ ← θ + η_2 · mean(R · ∇_θ log p(a|x; θ)),  one scalar R = R1 + R2 + R3 per batch
    every iteration:
        a ~ p(a|x; θ) (eval mode);  x_adv = PGD_a(x) on f_w (eval mode);  w ← w − η_1 ∇_w CE(f_w(x_adv), y)
--epsilon / --alpha are not the training attack's (those are sampled): --epsilon is the radius of the
random start of every sampled attack and, with --alpha as its step, of the fixed PGD-10 â that measures ŵ.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical

import common

RECIPES = {
    # Authors' code and README commands (SPEC §6): SGD lr 0.1, 110 epochs, ×0.1 at epochs 100 and 105;
    # ε ∈ {3..15}/255, step ∈ {1..5}/255, iterations ∈ {3..14}; strategy SGD lr 1e-4 without momentum.
    # k = 20 (interval_num), no gradient clipping on the target step, the strategy's features pooled to 1×1.
    # Tiny ImageNet uses these sets too (code README); SVHN gets them as our documented default.
    "default": dict(epochs=110, batch_size=128, lr=0.1, epsilon=8, alpha=2, weight_decay=5e-4, optimizer="sgd",
                    lr_schedule="multistep", eps_set=list(range(3, 16)), step_set=list(range(1, 6)),
                    iters_set=list(range(3, 15)), strategy_model="preact18", strategy_lr=1e-4,
                    strategy_momentum=0.0, strategy_weight_decay=0.0, strategy_every=20, clip_grad_norm=0.0,
                    strategy_grid=1),
    # CIFAR-100 (code README and train script): iterations ∈ {3..12}, strategy SGD momentum 0.9, wd 5e-4.
    "cifar100": dict(iters_set=list(range(3, 13)), strategy_momentum=0.9, strategy_weight_decay=5e-4),
    # Tiny ImageNet (code: LAS_AT_train_TinyImageNet.py): the strategy is updated on every iteration (k = 1), the
    # target's gradient is clipped to norm 10 before each weight step, and the strategy's heads read its last
    # feature map (8×8 on 64×64 images) average-pooled to 2×2, i.e. 4 × 512 = 2048 features (CIFAR: 1×1, 512).
    # What differs from that script, and why: its label smoothing 0.8 stays off (--label-smoothing 0.8 gives it):
    # SPEC §6 keeps this code-only trick off on every dataset, and soft labels weaken the CE attacks of the
    # evaluation without adding robustness. Its loader neither crops nor flips Tiny ImageNet, and its target
    # PreActResNet18 also reads a 2×2 grid; here the data and the target are common.py's, as for every method.
    "tiny-imagenet": dict(strategy_every=1, clip_grad_norm=10.0, strategy_grid=2),
    # Not in the paper (our choice): Wong's MNIST recipe as fgsm_rs.py / fgsm_sdi.py use it (CNN, Adam, 10
    # epochs, one lr triangle), ε = 0.3. Sets: ε ∈ {0.05, 0.10, ..., 0.30}, step ∈ {0.01, ..., 0.05}, the CIFAR
    # iterations. Why not CIFAR's 3/8..15/8 of ε: PGD training from scratch on MNIST sticks at the constant
    # prediction (loss ln 10) when its attacks are that strong; with {0.10..0.40} a 10-epoch run on a small
    # MNIST subset never left it. ŵ's PGD-10 step is ε/4 (2/255 = 8/255 / 4 on CIFAR). /255 units here.
    "mnist": dict(epochs=10, batch_size=100, lr=5e-3, epsilon=76.5, alpha=19.125, weight_decay=0.0,
                  optimizer="adam", lr_schedule="cyclic", eps_set=[12.75 * i for i in range(1, 7)],
                  step_set=[2.55 * i for i in range(1, 6)], strategy_model="mnist-cnn"),
}
REWARD_PGD_ITERS, REWARD_PGD_RESTARTS = 10, 2  # the fixed attack â on ŵ (code: attack_pgd(..., 10, 2))
STRATEGY_CLIP = 1.0                             # code: clip_grad_norm_(strategy, 1.0) before each step


def get_args(argv=None):
    p = common.base_parser(__doc__, lr_flag="--lr", lr_help="initial learning rate (multistep) or peak (cyclic)",
                           alpha_help="step of the fixed PGD-10 that measures ŵ in the reward, /255 units (default "
                                      "2 = ε/4, following --epsilon; the training attacks' ε, step and iterations "
                                      "are drawn from the absolute sets --eps-set, --step-set, --iters-set, which "
                                      "do not follow --epsilon)")
    p.add_argument("--strategy-every", type=common.pos_int, default=None,
                   help="k: the strategy network is updated on iterations k, 2k, ... counted over the whole run "
                        "(code: interval_num 20, Tiny ImageNet 1; the slides' Table 1 tries 1, 10, 20, 40, 60)")
    p.add_argument("--reward", choices=["accuracy", "loss"], default="accuracy",
                   help="accuracy (code, SPEC default): R2, R3 = robust / clean accuracy of ŵ; loss (slides): "
                        "L2, L3 = −CE of ŵ on the PGD-10 and the clean images")
    p.add_argument("--reward-alpha", type=common.nonneg_float, default=None,
                   help="α, weight of the ŵ-robustness term (default 4 for --reward accuracy, the code's R2_param; "
                        "1 for --reward loss, not stated in the slides: our choice)")
    p.add_argument("--reward-beta", type=common.nonneg_float, default=None,
                   help="β, weight of the ŵ-clean term (default 2 for --reward accuracy, the code's R3_param; "
                        "1 for --reward loss)")
    p.add_argument("--eps-set", type=common.pos_float, nargs="+", default=None,
                   help="the ε actions, /255 units (CIFAR: 3 4 ... 15)")
    p.add_argument("--step-set", type=common.pos_float, nargs="+", default=None,
                   help="the step-size actions, /255 units (CIFAR: 1 2 3 4 5)")
    p.add_argument("--iters-set", type=common.pos_int, nargs="+", default=None,
                   help="the iteration-count actions (CIFAR-10: 3 ... 14; CIFAR-100: 3 ... 12)")
    p.add_argument("--strategy-model", type=common.model_name, default=None,
                   help="backbone of the strategy network, any --model name with its classifier removed "
                        "(default preact18, 512-d features; MNIST mnist-cnn)")
    p.add_argument("--strategy-grid", type=common.pos_int, default=None,
                   help="G: the backbone's last feature map is average-pooled to G×G and flattened for the heads "
                        "(code: 1 on CIFAR, 512 features; 2 on Tiny ImageNet, 2048); G > 1 needs a backbone "
                        "that ends in BatchNorm (preact18, wrn-D-W)")
    p.add_argument("--strategy-lr", type=common.pos_float, default=None, help="strategy SGD lr (code: 1e-4)")
    p.add_argument("--strategy-momentum", type=common.nonneg_float, default=None,
                   help="strategy SGD momentum (code: 0 on CIFAR-10, 0.9 on CIFAR-100)")
    p.add_argument("--strategy-weight-decay", type=common.nonneg_float, default=None,
                   help="strategy SGD weight decay (code: 0 on CIFAR-10, 5e-4 on CIFAR-100)")
    p.add_argument("--lr-schedule", choices=["multistep", "cyclic"], default=None,
                   help="multistep: ×0.1 after 99/110 and 104/110 of the iterations (epochs 100, 105 of 110 run "
                        "at the lower rates, as in the code); cyclic: one triangle 0 → lr → 0 (MNIST recipe)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="target optimiser: sgd (momentum 0.9, CIFAR recipe) or adam (MNIST recipe); ŵ is one "
                        "step of a fresh optimiser of the same kind")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=None, help="default 5e-4 (MNIST 0)")
    p.add_argument("--clip-grad-norm", type=common.nonneg_float, default=None,
                   help="clip the target's gradient to this L2 norm before each weight step, 0 = off (code: off on "
                        "CIFAR, 10 on Tiny ImageNet; ŵ's step is never clipped, as in the code)")
    p.add_argument("--label-smoothing", type=common.pos_float, default=None, metavar="TRUE_PROB",
                   help="authors' code-only trick, off by default: soft labels with TRUE_PROB on the true class "
                        "and the rest spread evenly, in the target's and ŵ's training loss (code: 0.7 on "
                        "CIFAR-10, 0.6 on CIFAR-100, 0.8 on Tiny ImageNet); between 1/C and 1 for C classes")
    args = common.parse_args(p, RECIPES, argv, script="las_at")
    if args.label_smoothing is not None:
        # Below 1/C another class would get more mass than the true one (and PyTorch's label_smoothing would
        # exceed 1 and fail at the first step): refuse it here, before any data is loaded.
        classes = common.dataset_info(args.dataset, args.data_dir)["classes"]
        if not 1 / classes <= args.label_smoothing <= 1:
            p.error(f"--label-smoothing is the true class's probability: between 1/C = {1 / classes:.4g} and 1 "
                    f"for the {classes} classes of {args.dataset}, got {args.label_smoothing}")
    if args.strategy_model == "mnist-cnn" and args.dataset != "mnist":
        p.error("--strategy-model mnist-cnn only fits --dataset mnist")
    if args.strategy_grid > 1 and args.strategy_model in ("mnist-cnn", "lenet"):
        p.error(f"--strategy-grid {args.strategy_grid} needs a backbone that ends in BatchNorm (preact18, wrn-D-W)")
    if args.reward_alpha is None:
        args.reward_alpha = 4.0 if args.reward == "accuracy" else 1.0
    if args.reward_beta is None:
        args.reward_beta = 2.0 if args.reward == "accuracy" else 1.0
    return args


class StrategyNet(nn.Module):
    """p(a|x; θ): a classifier backbone on the clean image, then one linear head per attack parameter.

    The code's backbone is a standard (post-activation) ResNet18 with 512-d features; here it is any of
    common.py's networks with its last Linear layer removed (default PreActResNet18: the same 512-d
    features), so that a CPU run can use a small WRN. With grid G > 1 the heads read the backbone's last
    feature map (after its final BN-ReLU) average-pooled to G×G instead of 1×1: the code's Tiny ImageNet
    strategy pools its 8×8 map with a 4×4 window, 2×2 × 512 = 2048 features. Heads: softmax over the sets
    in /255 units (ε, step) and counts (iterations); the values are buffers, so the checkpoint pins the
    action sets. The code's fourth head (attack type, a single choice 'IFGSM') is left out: it is always
    the same."""

    def __init__(self, backbone, dataset, eps_set, step_set, iters_set, grid=1, data_dir="data"):
        super().__init__()
        # The backbone normalises its input with the dataset's mean/std, as every network here does (SPEC §0).
        # The code's loaders do not normalise (mean 0, std 1): its strategy sees raw [0, 1] pixels. A fixed
        # per-channel affine map of the input only reparametrises the first convolution.
        self.backbone = common.make_model(backbone, dataset, data_dir)
        name, classifier = [(n, m) for n, m in self.backbone.named_modules() if isinstance(m, nn.Linear)][-1]
        parent, _, attr = name.rpartition(".")
        setattr(self.backbone.get_submodule(parent), attr, nn.Identity())
        self.grid, self._feature_map = grid, None
        if grid > 1:
            # preact18 and wrn-D-W end in BN → ReLU → global pool → Linear: keep the last BN's output and pool
            # it to the grid ourselves (the backbone's own 1×1 pooled output is then unused).
            norms = [m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
            if not norms:
                raise ValueError(f"strategy grid {grid} needs a backbone that ends in BatchNorm, not {backbone}")
            norms[-1].register_forward_hook(self._keep_feature_map)
        self.register_buffer("eps_values", torch.tensor(eps_set, dtype=torch.float))
        self.register_buffer("step_values", torch.tensor(step_set, dtype=torch.float))
        self.register_buffer("iters_values", torch.tensor(iters_set, dtype=torch.long))
        self.heads = nn.ModuleDict({k: nn.Linear(classifier.in_features * grid ** 2, len(v))
                                    for k, v in (("eps", eps_set), ("step", step_set), ("iters", iters_set))})

    def _keep_feature_map(self, module, inputs, output):
        self._feature_map = output

    def features(self, x):
        features = self.backbone(x)
        if self.grid > 1:
            features = F.adaptive_avg_pool2d(F.relu(self._feature_map), self.grid).flatten(1)
            self._feature_map = None
        return features

    def forward(self, x):
        features = self.features(x)
        return {k: head(features) for k, head in self.heads.items()}  # logits, one tensor per head


def sample_strategy(strategy, x):
    """a ~ p(a|x; θ), each head independently. Returns the distributions, the sampled indices, and the
    attack as per-sample tensors: ε and step in [0, 1] units, iterations as counts."""
    dists = {k: Categorical(logits=logits.float(), validate_args=False) for k, logits in strategy(x).items()}
    actions = {k: d.sample() for k, d in dists.items()}
    eps = strategy.eps_values[actions["eps"]] / 255
    step = strategy.step_values[actions["step"]] / 255
    iters = strategy.iters_values[actions["iters"]]
    return dists, actions, (eps, step, iters)


def per_sample_pgd(model, x, y, start, eps, step, iters, autocast):
    """g(x, a, w): batched L∞ PGD in which sample i has its own ε_i, step_i and iteration count n_i
    (the code's Attack_policy_batch). All samples run max(n) steps; a sample whose n_i steps are done
    gets a zero step (mask), so its δ stays where it ended. The start is projected onto each sample's
    own ball and [0, 1] first (the code projects only at the first step: same result after ≥ 1 step
    except that the first gradient is taken at the projected start). The caller sets the model's mode
    (eval in the code). Returns the detached δ."""
    eps, step = eps.view(-1, 1, 1, 1), step.view(-1, 1, 1, 1)
    delta = start.clamp(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for t in range(int(iters.max())):  # the one host sync of the attack: its number of steps
        delta.requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")  # sum: each sample its own gradient
        grad, = torch.autograd.grad(loss, delta)
        active = (iters > t).view(-1, 1, 1, 1)
        delta = (delta.detach() + active * step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def compute_reward(model, x, y, x_adv, lr, args, autocast, smoothing=0.0):
    """The strategy's reward for one batch of its attacks (SPEC §6). `model` is the target f_w: it is
    only read (eval-mode forward, deepcopy); its weights, BN statistics and optimiser are untouched.
    Returns the scalar reward and its three terms."""
    eps, alpha = args.epsilon / 255, args.alpha / 255
    # L1 / R1: the target's loss on the strategy's examples, clamped to [0, 10] as in the code.
    model.eval()
    with torch.no_grad(), autocast():
        r1 = F.cross_entropy(model(x_adv), y).float().clamp(0, 10)
    # ŵ: a copy of the target after one step of a fresh optimiser (code: SGD, current lr, momentum 0.9,
    # wd 5e-4) on the same examples, in train mode. Only the copy moves.
    shadow = copy.deepcopy(model).train()
    if args.optimizer == "sgd":
        shadow_opt = torch.optim.SGD(shadow.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        shadow_opt = torch.optim.Adam(shadow.parameters(), lr=lr, weight_decay=args.weight_decay)
    with autocast():
        loss = F.cross_entropy(shadow(x_adv), y, label_smoothing=smoothing)
    shadow_opt.zero_grad(set_to_none=True)
    loss.backward()
    shadow_opt.step()
    # The fixed attack â on ŵ: PGD-10, 2 restarts, at --epsilon / --alpha, with ŵ still in train mode, as the
    # code does (the paper is silent, SPEC §0): BN normalises with each batch's own statistics while attacking,
    # and every one of the attack's forward passes moves ŵ's running statistics towards the adversarial
    # batches. Only then is ŵ switched to eval mode, and R2, R3 are measured with those moved statistics.
    # The code's PGD also stops moving a sample once it is misclassified; common.attack_pgd keeps stepping.
    # bf16 is fine: this is training.
    with autocast():
        adv_delta, _ = common.attack_pgd(shadow, x, y, eps, alpha, REWARD_PGD_ITERS, REWARD_PGD_RESTARTS)
    shadow.eval()
    with torch.no_grad(), autocast():
        clean_logits, adv_logits = shadow(x).float(), shadow(x + adv_delta).float()
    if args.reward == "accuracy":
        # Code: R2 = 4·(robust accuracy of ŵ), R3 = 2·(clean accuracy of ŵ), both in eval mode; robust =
        # correct on the restart with the higher loss (attack_pgd's "robust" flag was taken in train mode).
        r2 = args.reward_alpha * (adv_logits.argmax(1) == y).float().mean()
        r3 = args.reward_beta * (clean_logits.argmax(1) == y).float().mean()
    else:
        # Slides: L2 = −L(f(x_adv^â, ŵ), y), L3 = −L(f(x, ŵ), y).
        r2 = -args.reward_alpha * F.cross_entropy(adv_logits, y)
        r3 = -args.reward_beta * F.cross_entropy(clean_logits, y)
    r2, r3 = r2.clamp(-10, 10), r3.clamp(-10, 10)  # as the code (a no-op for accuracies)
    return r1 + r2 + r3, (r1, r2, r3)


def reinforce_step(strategy, strategy_opt, dists, actions, reward):
    """θ ← θ + η_2 ∇_θ J with ∇_θ J ≈ mean_n R·∇_θ log p(a_n|x_n; θ) (slides, REINFORCE): minimise
    Σ_heads mean(−log p(a|x)·R). One scalar reward per batch and no baseline, as in the code."""
    policy_loss = sum((-dists[k].log_prob(actions[k]) * reward).mean() for k in dists)
    strategy_opt.zero_grad(set_to_none=True)
    policy_loss.backward()
    nn.utils.clip_grad_norm_(strategy.parameters(), STRATEGY_CLIP)
    strategy_opt.step()


def main(argv=None):
    args = get_args(argv)
    run = common.Run(args)
    data = common.get_data(args, run.device, args.val_size)
    model = common.get_model(args, run.device)
    train_model = run.compile(model)
    strategy = StrategyNet(args.strategy_model, args.dataset, args.eps_set, args.step_set, args.iters_set,
                           args.strategy_grid, args.data_dir)
    strategy = strategy.to(run.device, memory_format=torch.channels_last if common.gpu_path(run.device)
                           else torch.preserve_format)
    train_strategy = run.compile(strategy)
    start_eps = args.epsilon / 255  # code: every attack starts from U(−8/255, 8/255), whatever its sampled ε
    # The code's LabelSmoothLoss (true class f, others (1−f)/(C−1)) is PyTorch's label_smoothing s with
    # 1 − s + s/C = f, i.e. s = (1−f)·C/(C−1).
    c = data.num_classes
    smoothing = 0.0 if args.label_smoothing is None else (1 - args.label_smoothing) * c / (c - 1)

    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(data.train)
    milestones = [int(steps * 99 / 110), int(steps * 104 / 110)]
    if args.lr_schedule == "multistep":
        # Stepped per iteration at int(99/110) and int(104/110) of all iterations, as the code does; a
        # shorter --epochs scales the milestones with it.
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    else:
        # With SGD it also cycles momentum 0.9 → 0.8 → 0.9 against the lr (PyTorch's default, Wong's code).
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=args.lr, step_size_up=steps / 2,
                                                  step_size_down=steps / 2, cycle_momentum=args.optimizer == "sgd")
    strategy_opt = torch.optim.SGD(strategy.parameters(), lr=args.strategy_lr, momentum=args.strategy_momentum,
                                   weight_decay=args.strategy_weight_decay)
    # As in the code: the strategy's lr has the target's milestones (counted in target iterations) but is
    # stepped once per strategy update, so for k ≥ 2 they are never reached (a constant lr), while with
    # k = 1 (the Tiny ImageNet recipe) the strategy's lr drops ×0.1 together with the target's.
    strategy_sched = torch.optim.lr_scheduler.MultiStepLR(strategy_opt, milestones, 0.1)
    run.track(model=model, opt=opt, sched=sched, strategy=strategy, strategy_opt=strategy_opt,
              strategy_sched=strategy_sched)

    for epoch in run.epochs():
        total_loss = total_correct = total_n = 0
        eps_sum = step_sum = iters_sum = reward_sum = 0
        updates = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            iteration = epoch * len(data.train) + i + 1  # 1-based over the whole run (the code's curr_step)
            if iteration % args.strategy_every == 0:
                # Strategy update: sample a in train mode (BN batch statistics, as the code), attack the
                # target in eval mode, reward, REINFORCE. The examples made here are not trained on.
                strategy.train()
                with run.autocast():
                    dists, actions, attack = sample_strategy(train_strategy, x)
                train_model.eval()
                start = torch.empty_like(x).uniform_(-start_eps, start_eps)
                delta = per_sample_pgd(train_model, x, y, start, *attack, run.autocast)
                reward, _ = compute_reward(model, x, y, x + delta, opt.param_groups[0]["lr"], args, run.autocast,
                                           smoothing)
                reinforce_step(strategy, strategy_opt, dists, actions, reward)
                strategy_sched.step()
                reward_sum += reward.detach()
                updates += 1
            # Target step: a fresh strategy sample (strategy in eval mode, still sampled, not argmax),
            # the per-sample PGD on the target in eval mode, then one weight step on x_adv in train mode.
            strategy.eval()
            with torch.no_grad(), run.autocast():
                _, _, (eps, step, iters) = sample_strategy(train_strategy, x)
            train_model.eval()
            start = torch.empty_like(x).uniform_(-start_eps, start_eps)
            delta = per_sample_pgd(train_model, x, y, start, eps, step, iters, run.autocast)
            train_model.train()
            with run.autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)  # code: Tiny ImageNet, 10
            opt.step()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
            # The strategy's choices on the examples trained on (Fig. 4/5 of the paper follow these).
            eps_sum += eps.sum() * 255
            step_sum += step.sum() * 255
            iters_sum += iters.sum()
        run.end_epoch(epoch, model, data, lr=opt.param_groups[0]["lr"], loss=(total_loss / total_n).item(),
                      acc=(total_correct / total_n).item(), eps_mean=(eps_sum / total_n).item(),
                      step_mean=(step_sum / total_n).item(), iters_mean=(iters_sum / total_n).item(),
                      reward=(reward_sum / updates).item() if updates else None, updates=updates)
    run.finish(model, data)


if __name__ == "__main__":
    common.main_guard(main)
