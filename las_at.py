"""Adversarial training with a learnable attack strategy (LAS-AT, LAS-PGD-AT).

Jia, Zhang, Wu, Ma, Wang, Cao, "LAS-AT: adversarial training with learnable attack strategy", CVPR 2022 (oral),
arXiv:2203.06616. Authors' code: github.com/jiaxiaojunQAQ/LAS-AT (LAS_PGD_AT/LAS_AT_train_cifar10.py).

    python las_at.py                                    # CIFAR-10 recipe: PreActResNet18, 110 epochs, k = 20
    python las_at.py --model wrn-34-10                  # the paper's WRN34-10 target (strategy: still preact18)
    python las_at.py --strategy-model resnet18-authors  # the authors' strategy: CIFAR ResNet18 on raw pixels
    python las_at.py --dataset cifar100                 # iterations ∈ {3..12}, strategy SGD with momentum
    python las_at.py --dataset tiny-imagenet --data-dir DIR   # code's Tiny ImageNet script: k = 1, clip 10, 2×2 grid
    python las_at.py --strategy-every 40                # k = 40, the headline row of the paper's ablation on k
    python las_at.py --reward loss                      # the paper's L2, L3 (losses of ŵ) instead of the code's
    python las_at.py --dataset mnist --data-dir DIR     # MNIST: Wong's CNN and MNIST recipe (our choice)

Paper (arXiv:2203.06616; the paper's ablation on the update interval k, CIFAR-10, ResNet18): the default k = 20
gives 82.00% clean / 53.53% PGD-10 in 418 min, 1.60× the 261 min of PGD-10 AT (82.56 / 53.15); the headline
k = 40 (`--strategy-every 40`) gives 82.3 / 54.29 / 49.89% AutoAttack in 365 min; k = 1 gives 82.88 / 53.71 in
1378 min. The paper's WRN34-10 comparison (CIFAR-10): 86.23 clean / 57.64 PGD-10 / 56.12 PGD-50 / 55.73 C&W /
53.58 AA. The paper's Tiny ImageNet comparison (PreActResNet18): 44.86 clean / 22.16 PGD-50 / 18.54 C&W /
16.74 AA. Measured here: bench/RESULTS.md (every number next to the command that gave it).

The paper's method (arXiv:2203.06616, its method section; only its objective, eq. (7), is cited by number: the
numbers of the other formulas could not be checked here, so they are named by what they are).
A strategy network p(a|x; θ) picks, per image, an attack a = (ε, step, iterations) from discrete sets; the attack
x_adv = g(x, a, w) is PGD with those values on the target network f_w, which trains on x_adv. The two networks play
the min-max game
    min_w E_(x,y) [ max_θ E_a~p(a|x;θ) [ L1(w, θ) + α·L2(θ) + β·L3(θ) ] ]                               eq. (7)
    L1 = L(f_w(x_adv), y)                  the target's loss on the strategy's examples
    L2 = −L(f_ŵ(x_adv^â), y)               robustness of ŵ (the target after one update on x_adv) under a fixed attack â
    L3 = −L(f_ŵ(x), y)                     clean accuracy of ŵ
solved by alternating updates: the target's ('Optimization of target network')
    w ← w − η_1 · mean_n ∇_w L(f_w(x_adv_n), y_n)
and the strategy's by REINFORCE ('Optimization of strategy network': J(θ) = E_a[L1 + α·L2 + β·L3], whose
gradient E_a[L0 · ∇_θ log p(a|x; θ)] the batch estimates)
    θ ← θ + η_2 · mean_n (L0_n · ∇_θ log p(a_n|x_n; θ)),   L0 = L1 + α·L2 + β·L3.
What the authors' code (LAS_PGD_AT/LAS_AT_train_cifar10.py) does in that loop, and we follow (DECISIONS.md, 'LAS-AT
reward', 'LAS-AT attack and schedule', 'LAS-AT strategy network', 'LAS-AT under torchrun'):
    every k-th iteration, counted over the whole run: a strategy update
        a ~ p(a|x; θ) (strategy in train mode);  x_adv = g(x, a, w): per-sample PGD on f_w (eval mode)
        R1 = L(f_w(x_adv), y) clamped to [0, 10]                                         the paper's L1
        ŵ = w after one SGD step on L(f_w(x_adv), y)        (a copy: w itself is untouched)
        R2 = α·(robust accuracy of ŵ, PGD-10 â)     --reward loss: −α·L(f_ŵ(x + δ_â), y), the paper's L2
        R3 = β·(clean accuracy of ŵ)                --reward loss: −β·L(f_ŵ(x), y), the paper's L3
             (â runs on ŵ in train mode, R2 and R3 are then measured in eval mode: code)
        θ ← θ + η_2 · mean_n(R · ∇_θ log p(a_n|x_n; θ)),  one scalar R = R1 + R2 + R3 per batch (the paper's L0)
    every iteration: the target's update
        a ~ p(a|x; θ) (eval mode);  x_adv = g(x, a, w) (eval mode);  w ← w − η_1 ∇_w L(f_w(x_adv), y)
g(x, a, w) starts from U(−8/255, 8/255) for every image, whatever its sampled ε (the code), and projects onto
each image's own ε-ball after every step. --epsilon / --alpha are not the training attack's (those are sampled):
--epsilon is the radius of that random start and, with --alpha as its step, of the fixed PGD-10 â that measures ŵ.

Copyable pieces (torch only): StrategyNet, per_sample_pgd (g), compute_reward (R), reinforce_step, and the core
las_at_delta (sample a, then g), which needs per_sample_pgd.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import flags
import harness
import imagenet

RECIPES = {
    # Authors' code and README commands (jiaxiaojunQAQ/LAS-AT README.md, 'Train for LAS-PGD-AT'; DECISIONS.md,
    # 'LAS-AT attack and schedule'): SGD lr 0.1, 110 epochs, ×0.1 at epochs 100 and 105; ε ∈ {3..15}/255,
    # step ∈ {1..5}/255, iterations ∈ {3..14}; strategy SGD lr 1e-4 without momentum, k = 20 (interval_num), no
    # gradient clipping on the target step, the strategy's features pooled to 1×1. The code's strategy is a
    # ResNet18 for every target (also WRN-34-10): preact18 here, whatever --model (resnet18-authors: theirs;
    # DECISIONS.md, 'LAS-AT strategy network'). Tiny ImageNet uses these sets too (code README); SVHN gets them
    # as our default.
    "default": dict(
        epochs=110,
        batch_size=128,
        lr=0.1,
        epsilon=8,
        alpha=2,
        weight_decay=5e-4,
        optimizer="sgd",
        lr_schedule="multistep",
        eps_set=list(range(3, 16)),
        step_set=list(range(1, 6)),
        iters_set=list(range(3, 15)),
        strategy_model="preact18",
        strategy_lr=1e-4,
        strategy_momentum=0.0,
        strategy_weight_decay=0.0,
        strategy_every=20,
        clip_grad_norm=0.0,
        strategy_grid=1,
    ),
    # CIFAR-100 (code README and LAS_AT_train_cifar100.py): iterations ∈ {3..12}, strategy SGD momentum 0.9, wd 5e-4.
    "cifar100": dict(
        iters_set=list(range(3, 13)), strategy_momentum=0.9, strategy_weight_decay=5e-4
    ),
    # Tiny ImageNet (code: LAS_AT_train_TinyImageNet.py): the strategy is updated on every iteration (k = 1), the
    # target's gradient is clipped to norm 10 before each weight step, and the strategy's heads read its last
    # feature map (8×8 on 64×64 images) average-pooled to 2×2, i.e. 4 × 512 = 2048 features (CIFAR: 1×1, 512).
    # What differs from that script, and why: its label smoothing 0.8 stays off (--true-prob 0.8 gives it):
    # DECISIONS.md, 'LAS-AT attack and schedule' keeps this code-only trick off on every dataset, and soft labels
    # weaken the CE attacks of the evaluation without adding robustness. Its loader neither crops nor flips Tiny
    # ImageNet, and its target PreActResNet18 also reads a 2×2 grid; here the data and the target are common.py's,
    # as for every method.
    "tiny-imagenet": dict(strategy_every=1, clip_grad_norm=10.0, strategy_grid=2),
    # ImageNet: no recipe in the paper: imagenet.IMAGENET, Wong et al.'s, with its lr; the action sets as on CIFAR.
    "imagenet": dict(lr_schedule="imagenet", optimizer="sgd"),
    # Not in the paper (DECISIONS.md, 'Our MNIST recipes'): Wong's MNIST recipe as fgsm_rs.py uses it (CNN, Adam,
    # 10 epochs, one lr triangle), ε = 0.3. Sets: ε ∈ {0.05, 0.10, ..., 0.30}, step ∈ {0.01, ..., 0.05}, the CIFAR
    # iterations. Why not CIFAR's 3/8..15/8 of ε: PGD training from scratch on MNIST sticks at the constant
    # prediction (loss ln 10) when its attacks are that strong; with {0.10..0.40} a 10-epoch run on a small MNIST
    # subset never left it. ŵ's PGD-10 step is ε/4 (2/255 = 8/255 / 4 on CIFAR). /255 units here.
    "mnist": dict(
        epochs=10,
        batch_size=100,
        lr=5e-3,
        epsilon=76.5,
        alpha=19.125,
        weight_decay=0.0,
        optimizer="adam",
        lr_schedule="cyclic",
        eps_set=[round(12.75 * i, 4) for i in range(1, 7)],
        step_set=[round(2.55 * i, 4) for i in range(1, 6)],
        strategy_model="mnist-cnn",
    ),
}
# The fixed attack â on ŵ (code: attack_pgd(..., 10, 2)): its steps and restarts.
REWARD_PGD_ITERS = 10
REWARD_PGD_RESTARTS = 2
STRATEGY_CLIP = 1.0  # code: clip_grad_norm_(strategy, 1.0) before each step
# --strategy-model's name for the authors' strategy backbone (AuthorsResNet18).
AUTHORS_RESNET18 = "resnet18-authors"
TRUE_PROB_HELP = (
    "the authors' code's soft labels, off by default: the true class gets probability F and "
    "every other class (1 − F)/(C − 1) (PyTorch's label_smoothing is another parametrisation), in "
    "the target's and ŵ's training loss (code: 0.7 on CIFAR-10, 0.6 on CIFAR-100, 0.8 on Tiny "
    "ImageNet). 1/C < F ≤ 1 (C classes)"
)


def strategy_model_name(text):
    """argparse type for --strategy-model: a --model name (flags.model_name) or resnet18-authors."""
    if text.lower() == AUTHORS_RESNET18:
        return AUTHORS_RESNET18
    return flags.model_name(text)


def get_args(argv=None):
    p = flags.base_parser(
        __doc__,
        lr="initial learning rate (multistep) or peak (cyclic)",
        alpha="step of the fixed PGD-10 that measures ŵ in the reward, /255 units (keeps its "
        "ratio ε/4 to --epsilon; the training attacks' ε, step and iterations are drawn "
        "from the absolute sets --eps-set, --step-set, --iters-set, which do not "
        "follow --epsilon)",
        true_prob=TRUE_PROB_HELP,
        weight_decay="L2 weight decay of the target and of ŵ's step",
    )
    p.add_argument(
        "--strategy-every",
        type=flags.pos_int,
        default=None,
        metavar="K",
        help="k: the strategy network is updated on iterations k, 2k, ... counted over the whole "
        "run (the code's interval_num; the paper's ablation on k tries 1, 10, 20, 40, 60); at "
        "most the run's number of iterations",
    )
    p.add_argument(
        "--reward",
        choices=["accuracy", "loss"],
        default="accuracy",
        help="accuracy (the authors' code; default): R2, R3 = robust / clean accuracy of ŵ; loss "
        "(the paper's L2, L3): −CE of ŵ on the PGD-10 and the clean images",
    )
    p.add_argument(
        "--reward-alpha",
        type=flags.nonneg_float,
        default=None,
        help="α of eq. (7), weight of the ŵ-robustness term (default 4 for --reward accuracy, the "
        "code's R2_param; 1 for --reward loss, not stated in the paper: our choice)",
    )
    p.add_argument(
        "--reward-beta",
        type=flags.nonneg_float,
        default=None,
        help="β of eq. (7), weight of the ŵ-clean term (default 2 for --reward accuracy, the "
        "code's R3_param; 1 for --reward loss, our choice)",
    )
    p.add_argument(
        "--eps-set",
        type=flags.per255("--eps-set"),
        nargs="+",
        default=None,
        help="the ε actions, /255 units",
    )
    p.add_argument(
        "--step-set",
        type=flags.per255("--step-set"),
        nargs="+",
        default=None,
        help="the step-size actions, /255 units",
    )
    p.add_argument(
        "--iters-set",
        type=flags.pos_int,
        nargs="+",
        default=None,
        help="the iteration-count actions",
    )
    p.add_argument(
        "--strategy-model",
        type=strategy_model_name,
        default=None,
        help="backbone of the strategy network: any --model name, its last Linear layer removed, "
        "on normalised input like every network here; or resnet18-authors, the authors' CIFAR "
        "ResNet18 on raw [0, 1] pixels. It does not follow --model: the authors' code uses its "
        "ResNet18 strategy for every target (also WRN-34-10); the log says so when they differ",
    )
    p.add_argument(
        "--strategy-grid",
        type=flags.pos_int,
        default=None,
        metavar="G",
        help="the backbone's last feature map is average-pooled to G×G and flattened for the heads "
        "(code: 1 on CIFAR, 512 features; 2 on Tiny ImageNet, 2048); G > 1 needs a backbone that "
        "ends in BatchNorm (preact18, wrn-D-W) or resnet18-authors",
    )
    p.add_argument("--strategy-lr", type=flags.pos_float, default=None, help="strategy SGD lr")
    p.add_argument(
        "--strategy-momentum",
        type=flags.nonneg_float,
        default=None,
        help="strategy SGD momentum, < 1",
    )
    p.add_argument(
        "--strategy-weight-decay",
        type=flags.nonneg_float,
        default=None,
        help="strategy SGD weight decay",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["multistep", "cyclic", "imagenet"],
        default=None,
        help="multistep: ×0.1 after int(99/110) and int(104/110) of all iterations (the code's; at "
        "110 epochs, epochs 100 and 105 run at the lower rates); cyclic: one triangle 0 → lr → 0; "
        "imagenet: Wong et al.'s ImageNet schedule",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help="target optimiser: sgd (momentum 0.9) or adam; ŵ is one step of a fresh optimiser of "
        "the same kind",
    )
    p.add_argument(
        "--clip-grad-norm",
        type=flags.nonneg_float,
        default=None,
        help="clip the target's gradient to this L2 norm before each weight step, 0 = off (ŵ's "
        "step is never clipped, as in the code)",
    )
    args = flags.parse_args(p, RECIPES, argv, script="las_at")
    if args.strategy_grid > 1 and args.strategy_model in ("mnist-cnn", "lenet"):
        p.error(
            f"--strategy-grid {args.strategy_grid} needs a backbone that ends in BatchNorm "
            f"(preact18, wrn-D-W) or resnet18-authors, not --strategy-model {args.strategy_model}"
        )
    sets = (
        ("--eps-set", args.eps_set),
        ("--step-set", args.step_set),
        ("--iters-set", args.iters_set),
    )
    for flag, values in sets:
        # A repeated action would silently get twice the prior probability.
        if len(set(values)) < len(values):
            p.error(f"{flag} {' '.join(f'{v:g}' for v in values)}: each value once")
    if args.strategy_momentum >= 1:
        p.error(
            f"--strategy-momentum {args.strategy_momentum}: SGD momentum must be below 1 (code: 0 "
            f"or 0.9)"
        )
    if args.reward_alpha is None:
        args.reward_alpha = 4.0 if args.reward == "accuracy" else 1.0
    if args.reward_beta is None:
        args.reward_beta = 2.0 if args.reward == "accuracy" else 1.0
    return args


class StrategyNet(nn.Module):
    """p(a|x; θ): a classifier backbone on the clean image, then one linear head per attack parameter.

    backbone: a classifier module (images in, logits out) whose last nn.Linear (in module order) is its classifier:
        that Linear is replaced by nn.Identity in place, so the backbone returns its features (PreActResNet18: 512).
        The code's backbone is a CIFAR ResNet18 with 512-d features (AuthorsResNet18).
    eps_set, step_set: the ε and step-size actions in /255 units; iters_set: the iteration counts. They are buffers
        (eps_values, step_values, iters_values), so a checkpoint pins the action sets.
    grid: G > 1 makes the heads read the backbone's last feature map, the output of its last BatchNorm2d after a
        ReLU, average-pooled to G×G (the code's Tiny ImageNet strategy pools its 8×8 map with a 4×4 window: 2×2 ×
        512 = 2048 features). The backbone must then end in BN → ReLU → global pool → Linear (preact18, WRN);
        ValueError if it has no BatchNorm2d.
    forward(x) returns the logits of each head: {"eps": N×|eps_set|, "step": N×|step_set|, "iters": N×|iters_set|}.
    The code's fourth head (attack type, a single choice 'IFGSM') is left out: it is always the same."""

    def __init__(self, backbone, eps_set, step_set, iters_set, grid=1):
        super().__init__()
        linears = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the strategy backbone has no nn.Linear classifier to remove")
        name, classifier = linears[-1]
        parent, _, attr = name.rpartition(".")
        setattr(backbone.get_submodule(parent), attr, nn.Identity())
        self.backbone = backbone
        self.grid = grid
        self._feature_map = None
        if grid > 1:
            norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
            if not norms:
                raise ValueError(f"strategy grid {grid} needs a backbone that ends in BatchNorm")
            # Keep the last BN's output and pool it to the grid here (the backbone's own 1×1 pooling is then
            # unused).
            norms[-1].register_forward_hook(self._keep_feature_map)
        self.register_buffer("eps_values", torch.tensor(eps_set, dtype=torch.float))
        self.register_buffer("step_values", torch.tensor(step_set, dtype=torch.float))
        self.register_buffer("iters_values", torch.tensor(iters_set, dtype=torch.long))
        self.heads = nn.ModuleDict(
            {
                k: nn.Linear(classifier.in_features * grid**2, len(v))
                for k, v in (("eps", eps_set), ("step", step_set), ("iters", iters_set))
            }
        )

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
        return {k: head(features) for k, head in self.heads.items()}


class _BasicBlock(nn.Module):
    """The post-activation residual block of the authors' ResNet18: conv-BN-ReLU-conv-BN, plus the input (a 1×1
    conv and BN where the shape changes), then ReLU."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class AuthorsResNet18(nn.Module):
    """The authors' strategy backbone (LAS_PGD_AT/StrategyNet.py, ResNet18_Strategy; pytorch-cifar's ResNet18): a
    3×3 stride-1 stem conv-BN-ReLU without max-pool, four stages of two _BasicBlocks (64, 128, 256, 512 channels,
    stride 1, 2, 2, 2), the last feature map average-pooled to G×G, and a Linear classifier that StrategyNet removes.
    It takes raw [0, 1] pixels, as the authors' loaders give it (no normalisation: DECISIONS.md, 'LAS-AT strategy
    network').

    in_channels: C of the images N×C×H×W. grid: G; the code pools with avg_pool2d(out, 4), which is G = 1 on
        32×32 images (a 4×4 map) and G = 2 on 64×64 ones (its Tiny ImageNet script): adaptive pooling to G×G is the
        same there and fits any size. Its features are 512·G² (give StrategyNet grid=1: the pooling is done here).
    forward(x) returns N×num_classes logits."""

    def __init__(self, num_classes=10, in_channels=3, grid=1):
        super().__init__()
        self.grid = grid
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes))
            )
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(512 * grid**2, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, self.grid).flatten(1))


def per_sample_pgd(model, x, y, start, eps, step, iters, autocast=None):
    """g(x, a, w) of the paper: batched L∞ PGD on the cross-entropy in which image i has its own ε_i, step_i and
    iteration count n_i (the authors' Attack_policy_batch, LAS_PGD_AT/LAS_AT_train_cifar10.py).

    x: N×C×H×W images in [0, 1] (checked), y: N labels; model: used in the mode it is in (las_at_delta: eval mode).
    start: the random start N×C×H×W (the code: U(−8/255, 8/255) for every image, whatever its ε_i): it is clamped to
        the pixel range only, not onto the ε_i-ball, so the first gradient is taken there, as in the code.
    eps, step: N, in [0, 1] units; iters: N, int64 ≥ 1. Every image runs max(n) steps; after its n_i steps an image's
        step is masked to 0, but every step still projects every image onto its own ε_i-ball and the pixel range
        (as the code), so each δ_i ends inside its ball.
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    Returns δ, detached, N×C×H×W: |δ_i| ≤ ε_i and x + δ in [0, 1]. One host sync: the number of steps."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    # fp16: the loss × 2^10 before each input gradient, so that it does not underflow (its sign is used).
    scale = 1024.0 if autocast == torch.float16 else 1.0
    eps = eps.to(x.dtype).view(-1, 1, 1, 1)
    step = step.to(x.dtype).view(-1, 1, 1, 1)
    delta = (x + start).clamp(0, 1) - x
    for t in range(int(iters.max())):
        delta.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            # The code's batch mean: the same sign per image as its own loss.
            loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss * scale, delta)
        active = (iters > t).view(-1, 1, 1, 1)
        delta = (delta.detach() + active * step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def compute_reward(
    model,
    x,
    y,
    x_adv,
    lr,
    eps,
    step,
    optimizer="sgd",
    weight_decay=5e-4,
    reward="accuracy",
    reward_alpha=4.0,
    reward_beta=2.0,
    smoothing=0.0,
    iters=10,
    restarts=2,
    autocast=None,
):
    """The strategy's reward R for one batch of its attacks: the paper's L0 = L1 + α·L2 + β·L3 of eq. (7) in the form
    of the authors' code (its Get_reward; DECISIONS.md, 'LAS-AT reward'). Under torchrun each process computes it on
    its own part of the batch (DECISIONS.md, 'LAS-AT under torchrun').

    x, y: the clean batch (N×C×H×W images in [0, 1], checked; labels); x_adv: the strategy's examples x + δ.
    autocast: None (fp32) or a torch.autocast dtype. The shared contract: README.md, 'Copy a method into your project'.
    model: the target f_w. It is only read: one eval-mode forward and a deepcopy ŵ; its weights, gradients, BN
        statistics and optimiser are untouched, and it comes back in the mode it was in.
    lr: the target's current lr (ŵ's step); eps, step: ε and step of the fixed PGD â on ŵ, in [0, 1] units (code:
        8/255, 2/255); iters, restarts: its steps and restarts (code: 10, 2).
    optimizer: "sgd" (momentum 0.9, the code) or "adam", a fresh one for ŵ's single step; weight_decay: its decay.
    reward: "accuracy" (code: R2 = reward_alpha × ŵ's robust accuracy, R3 = reward_beta × its clean accuracy) or
        "loss" (the paper: R2 = −reward_alpha × CE of ŵ under â, R3 = −reward_beta × its clean CE).
    smoothing: PyTorch label_smoothing of ŵ's training loss (0: none).
    Returns (R, (R1, R2, R3)), 0-dim fp32 tensors without gradient, R = R1 + R2 + R3."""
    import copy  # the standard library's: ŵ is a deepcopy of the target

    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )

    def autocast_on():
        return torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None)

    # fp16: ŵ's loss × 2^10 before its backward (gradients divided back), â's before each input gradient.
    scale = 1024.0 if autocast == torch.float16 else 1.0
    was_training = model.training
    # L1 / R1: the target's loss on the strategy's examples, eval mode, clamped to [0, 10] as in the code.
    model.eval()
    with torch.no_grad(), autocast_on():
        r1 = F.cross_entropy(model(x_adv).float(), y).clamp(0, 10)
    # ŵ (the paper's L2, L3): a copy of the target after one step of a fresh optimiser (code: SGD, current lr,
    # momentum 0.9, wd 5e-4) on the same examples, in train mode. Only the copy moves.
    shadow = copy.deepcopy(model).train()
    model.train(was_training)
    if optimizer == "sgd":
        shadow_opt = torch.optim.SGD(
            shadow.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay
        )
    else:
        shadow_opt = torch.optim.Adam(shadow.parameters(), lr=lr, weight_decay=weight_decay)
    shadow_opt.zero_grad(set_to_none=True)
    with autocast_on():
        loss = F.cross_entropy(shadow(x_adv).float(), y, label_smoothing=smoothing)
    (loss * scale).backward()
    for p in shadow.parameters():
        if p.grad is not None:
            p.grad.div_(scale)
    shadow_opt.step()
    # The fixed attack â on ŵ (the paper's x_adv^â; the code's attack_pgd): PGD, random start U(−ε, ε), with ŵ
    # still in train mode, as the code does (the paper is silent: DECISIONS.md, 'Recipe defaults'): BN normalises
    # with each batch's own statistics, and every forward pass, the attack's and the restart's final one, moves
    # ŵ's running statistics. As in the code, an image stops moving once ŵ misclassifies it, and per image the
    # restart with the higher loss is kept. The code also ends the attack early once no image is classified
    # correctly; that check would make the host wait for the GPU at every step, and skipping it only moves ŵ's
    # BN statistics further in such a batch.
    best_delta = torch.zeros_like(x)
    best_loss = torch.zeros(len(y), device=x.device)
    for _ in range(restarts):
        delta = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x
        for _ in range(iters):
            delta.requires_grad_(True)
            with autocast_on():
                logits = shadow(x + delta).float()
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y) * scale, delta)
            correct = (logits.argmax(1) == y).view(-1, 1, 1, 1)
            moved = (x + (delta.detach() + step * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
            delta = torch.where(correct, moved, delta.detach())
        with torch.no_grad(), autocast_on():
            final = F.cross_entropy(shadow(x + delta).float(), y, reduction="none")
        better = final >= best_loss
        best_delta = torch.where(better.view(-1, 1, 1, 1), delta, best_delta)
        best_loss = torch.maximum(best_loss, final)
    # Only now is ŵ switched to eval mode: R2 and R3 are measured with the statistics the attack moved (code).
    shadow.eval()
    with torch.no_grad(), autocast_on():
        clean_logits = shadow(x).float()
        adv_logits = shadow(x + best_delta).float()
    # R2, R3: the code's accuracies, or the paper's L2, L3 (negative losses of ŵ).
    if reward == "accuracy":
        r2 = reward_alpha * (adv_logits.argmax(1) == y).float().mean()
        r3 = reward_beta * (clean_logits.argmax(1) == y).float().mean()
    else:
        r2 = -reward_alpha * F.cross_entropy(adv_logits, y)
        r3 = -reward_beta * F.cross_entropy(clean_logits, y)
    # Clamped as in the code (a no-op for accuracies).
    r2 = r2.clamp(-10, 10)
    r3 = r3.clamp(-10, 10)
    return r1 + r2 + r3, (r1, r2, r3)


def reinforce_step(strategy, strategy_opt, log_prob, reward, clip_norm=1.0, scaler=None):
    """The paper's strategy update θ ← θ + η_2 ∇_θ J(θ) with its REINFORCE estimate ∇_θ J ≈ mean_n L0·∇_θ log
    p(a_n|x_n; θ) ('Optimization of strategy network'): one step of strategy_opt on −mean_n(R · log p(a_n|x_n;
    θ)), which is the code's Σ_heads mean(−log p_head·R). One scalar reward per batch and no baseline, as in the
    code; the strategy's gradient is clipped to L2 norm clip_norm (code: 1.0) before the step. Under torchrun a
    DistributedDataParallel strategy averages the processes' gradients, each from its own R.

    log_prob: N, Σ over the heads of log p(a_n|x_n; θ), with its graph (las_at_delta with update=True).
    reward: 0-dim tensor R (treated as a constant). scaler: a torch.amp.GradScaler for float16 (None: no scaling).
    No forward pass: the strategy's mode is not touched."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    policy_loss = -(log_prob * reward.detach()).mean()
    strategy_opt.zero_grad(set_to_none=True)
    scaler.scale(policy_loss).backward()
    scaler.unscale_(strategy_opt)
    nn.utils.clip_grad_norm_(strategy.parameters(), clip_norm)
    scaler.step(strategy_opt)
    scaler.update()


def las_at_delta(model, strategy, x, y, start_eps, update=False, autocast=None):
    """LAS-AT's attack: sample a strategy a = (ε, step, iterations) per image from p(a|x; θ), then run that attack
    x_adv = g(x, a, w) on the target (the paper's a ~ p(a|x; θ) and g; the code's select_action, then
    Attack_policy_batch). Needs per_sample_pgd.

    model: the target f_w (images in [0, 1], logits out), attacked in eval mode (code), then handed back in the mode
        it was in; its BN statistics are untouched.
    strategy: a StrategyNet (logits per head, action values as buffers eps_values, step_values, iters_values).
        update=False (the target step): sampled in eval mode without a graph. update=True (a strategy update): in
        train mode, as the code, so its BN normalises with the batch and moves its running statistics, and the
        returned log-probability keeps its graph for reinforce_step. The strategy is handed back in its mode.
    x: N×C×H×W images in [0, 1] (checked), y: N labels; autocast: None (fp32) or a torch.autocast dtype, of the
    strategy's and the attack's passes. The shared contract: README.md, 'Copy a method into your project'.
    start_eps: radius of the random start U(−start_eps, start_eps) of every image (code: 8/255, whatever its ε).
    Returns (δ, log_prob, (eps, step, iters)): δ detached N×C×H×W with |δ_i| ≤ ε_i and x + δ in [0, 1]; log_prob N,
    Σ over the heads of log p(a_n|x_n; θ); the sampled attack per image: ε and step in [0, 1] units, iteration
    counts (int64)."""
    torch._assert_async(
        (x.min() >= 0) & (x.max() <= 1), "images must be in [0, 1]: normalise inside the model"
    )
    strategy_was_training = strategy.training
    model_was_training = model.training
    # a ~ p(a|x; θ): one categorical draw per head and image (sampled in both modes, never the argmax).
    strategy.train(update)
    try:
        with (
            torch.set_grad_enabled(update),
            torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None),
        ):
            logits = strategy(x)
    finally:
        strategy.train(strategy_was_training)
    dists = {
        k: torch.distributions.Categorical(logits=v.float(), validate_args=False)
        for k, v in logits.items()
    }
    actions = {k: d.sample() for k, d in dists.items()}
    log_prob = sum(d.log_prob(actions[k]) for k, d in dists.items())
    # A DistributedDataParallel wrapper keeps the action values on .module.
    values = getattr(strategy, "module", strategy)
    eps = values.eps_values[actions["eps"]] / 255
    step = values.step_values[actions["step"]] / 255
    iters = values.iters_values[actions["iters"]]
    # x_adv = g(x, a, w): the target in eval mode, every image from U(−start_eps, start_eps) (code).
    model.eval()
    try:
        start = torch.empty_like(x).uniform_(-start_eps, start_eps)
        delta = per_sample_pgd(model, x, y, start, eps, step, iters, autocast)
    finally:
        model.train(model_was_training)
    return delta, log_prob, (eps, step, iters)


def strategy_backbone(args, data):
    """(backbone, grid) for StrategyNet: --strategy-model, and the grid StrategyNet pools to."""
    if args.strategy_model == AUTHORS_RESNET18:
        # The authors' backbone on raw [0, 1] pixels (their loaders do not normalise); it pools to the grid
        # itself.
        return AuthorsResNet18(data.num_classes, data.shape[0], args.strategy_grid), 1
    # Any of our networks normalises its input with the dataset's mean/std (DECISIONS.md, 'Model I/O
    # contract'): a fixed per-channel affine map of the input, which only reparametrises the first
    # convolution (DECISIONS.md, 'LAS-AT strategy network').
    backbone = common.make_model(
        args.strategy_model, data.num_classes, data.shape, data.mean, data.std
    )
    return backbone, args.strategy_grid


def main(argv=None):
    args = get_args(argv)
    harness.setup(args)  # torchrun's process group, the seeds
    data = common.get_data(args)
    smoothing = flags.smoothing_of(args.true_prob, data.num_classes)
    size = min(data.shape[1:])
    mnist_cnn_misfit = args.strategy_model == "mnist-cnn" and data.shape[1:] != (28, 28)
    if mnist_cnn_misfit or (args.strategy_model == "lenet" and size < 16):
        raise common.FastatError(
            f"--strategy-model {args.strategy_model} does not fit {data.shape[2]}x{data.shape[1]} "
            f"images"
        )
    steps = data.train.steps(args.epochs)  # the batches the run yields
    if args.strategy_every > steps:
        raise common.FastatError(
            f"--strategy-every {args.strategy_every}: this run has {steps} iterations "
            f"({args.epochs} epochs), so the strategy would never be updated and its attacks would "
            f"stay the random initial network's; use --strategy-every {steps} or less"
        )
    model = common.get_model(args, data)
    backbone, grid = strategy_backbone(args, data)
    strategy = StrategyNet(backbone, args.eps_set, args.step_set, args.iters_set, grid)
    strategy = strategy.to(args.device)
    if common.uses_channels_last(args):
        strategy = strategy.to(memory_format=torch.channels_last)
    run = harness.Run(
        args, data, columns=["eps_mean", "step_mean", "iters_mean", "reward", "updates"]
    )
    if args.strategy_model != args.model:
        common.log(
            f"# strategy network: {args.strategy_model}, target: {args.model} (the authors' code "
            f"uses its ResNet18 strategy, {AUTHORS_RESNET18}, for every target; --strategy-model "
            f"{args.model} gives a matching one)"
        )
    attack_model, train_model = run.models(model)
    train_strategy = run.wrap_for_training(strategy)
    # Code: every attack starts from U(−8/255, 8/255), whatever its sampled ε.
    start_eps = args.epsilon / 255
    # The fixed PGD-10 â on ŵ.
    eps = args.epsilon / 255
    alpha = args.alpha / 255

    if args.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    milestones = [int(steps * 99 / 110), int(steps * 104 / 110)]
    if args.lr_schedule == "imagenet":
        # No ImageNet recipe in the paper: Wong et al.'s (imagenet.imagenet_lr).
        sched = imagenet.imagenet_lr(opt, data.train, args.epochs)
    elif args.lr_schedule == "multistep":
        # Stepped per iteration at int(99/110) and int(104/110) of all iterations, as the code does; a
        # shorter --epochs scales the milestones with it.
        if note := flags.collapsed_milestones(milestones, steps, args.lr):
            common.log(note)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    else:
        # With SGD it also cycles momentum 0.9 → 0.8 → 0.9 against the lr (PyTorch's default, Wong's code).
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=0.0,
            max_lr=args.lr,
            step_size_up=steps / 2,
            step_size_down=steps / 2,
            cycle_momentum=args.optimizer == "sgd",
        )
    strategy_opt = torch.optim.SGD(
        strategy.parameters(),
        lr=args.strategy_lr,
        momentum=args.strategy_momentum,
        weight_decay=args.strategy_weight_decay,
    )
    # As in the code: the strategy's lr has the target's milestones (counted in target iterations) but is
    # stepped once per strategy update, so for k ≥ 2 they are never reached (a constant lr), while with k = 1
    # (the Tiny ImageNet recipe) the strategy's lr drops ×0.1 together with the target's.
    strategy_sched = torch.optim.lr_scheduler.MultiStepLR(strategy_opt, milestones, 0.1)
    checkpoint = dict(
        model=model,
        opt=opt,
        sched=sched,
        strategy=strategy,
        strategy_opt=strategy_opt,
        strategy_sched=strategy_sched,
    )
    start = run.resume(checkpoint) if args.resume else 0

    for epoch in range(start, args.epochs):
        run.start_epoch()
        model.train()
        total_loss = total_correct = total_n = 0
        eps_sum = step_sum = iters_sum = reward_sum = 0
        updates = 0
        for i, (x, y, _) in enumerate(data.train.epoch(epoch)):
            # 1-based over the whole run (the code's curr_step).
            iteration = data.train.steps(epoch) + i + 1
            if iteration % args.strategy_every == 0:
                # The strategy's update ('Optimization of strategy network'): a ~ p(a|x; θ) in train
                # mode, x_adv = g(x, a, w), the reward L0 of eq. (7) (in the code's form), the REINFORCE
                # step on θ. The examples made here are not trained on (code). Under torchrun each process
                # rewards its own part of the batch (DECISIONS.md, 'LAS-AT under torchrun').
                delta, log_prob, _ = las_at_delta(
                    attack_model, train_strategy, x, y, start_eps, update=True, autocast=run.amp
                )
                reward, _ = compute_reward(
                    model,
                    x,
                    y,
                    x + delta,
                    opt.param_groups[0]["lr"],
                    eps,
                    alpha,
                    args.optimizer,
                    args.weight_decay,
                    args.reward,
                    args.reward_alpha,
                    args.reward_beta,
                    smoothing,
                    REWARD_PGD_ITERS,
                    REWARD_PGD_RESTARTS,
                    autocast=run.amp,
                )
                reinforce_step(strategy, strategy_opt, log_prob, reward, STRATEGY_CLIP, run.scaler)
                strategy_sched.step()
                reward_sum += reward
                updates += 1
            # The target's update ('Optimization of target network', w ← w − η_1 ∇_w L1): a fresh
            # a ~ p(a|x; θ) (strategy in eval mode, still sampled, code), its attack on the target in
            # eval mode, then one weight step on x_adv in train mode.
            delta, _, (eps_i, step_i, iters_i) = las_at_delta(
                attack_model, train_strategy, x, y, start_eps, autocast=run.amp
            )
            with run.autocast():
                out = train_model(x + delta)
                loss = F.cross_entropy(out, y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            # Only the code's Tiny ImageNet script clips (at norm 10).
            if args.clip_grad_norm:
                run.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()  # per iteration
            total_loss += loss.detach() * len(y)
            total_correct += (out.argmax(1) == y).sum()
            total_n += len(y)
            # The strategy's choices on the examples trained on: how the attacks it picks change over training.
            eps_sum += eps_i.sum() * 255
            step_sum += step_i.sum() * 255
            iters_sum += iters_i.sum()
        run.end_epoch(
            epoch,
            model,
            checkpoint,
            lr=opt.param_groups[0]["lr"],
            loss=(total_loss / total_n).item(),
            acc=(total_correct / total_n).item(),
            eps_mean=(eps_sum / total_n).item(),
            step_mean=(step_sum / total_n).item(),
            iters_mean=(iters_sum / total_n).item(),
            reward=(reward_sum / updates).item() if updates else None,
            updates=updates,
        )
    run.finish(model)


if __name__ == "__main__":
    harness.main_guard(main)
