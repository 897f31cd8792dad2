"""The evaluation protocol of every fastat run and of evaluate.py: PGD on the cross-entropy with random
restarts, PGD on the Carlini-Wagner margin, AutoAttack (the official package), and the worst case over them,
per image; each process of torchrun attacks its share and the counts are summed. Also the estimate of how long
it takes, said before it starts.

Images are uint8 or [0, 1] float, N×C×H×W, and the networks normalise inside (common.py); ε and the steps are
[0, 1] units here (/255 on the command line). The evaluation runs in fp32 with the model in eval mode: its
BatchNorm statistics are left alone, and the model comes back in the mode it was in.
"""

import contextlib
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import Progress, eval_share, log, world


def cw_margin(logits, y):
    """Carlini-Wagner margin: max_{k≠y} z_k − z_y, per sample (> 0 ⇔ misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(1) - true


def attack_pgd(model, x, y, eps, step, iters, restarts=1, loss="ce", rand_init=True, progress=None,
               generator=None):  # fmt: skip
    """L∞ PGD on the cross-entropy (loss="ce") or the CW margin ("cw"); x N×C×H×W in [0, 1], eps and step
    in [0, 1] units. Returns (δ, robust): per sample the restart whose final δ has the highest loss, and
    whether the sample was classified correctly after *every* restart. Gradients flow to δ only; the model
    stays in its mode. progress: called with (restart, iteration) after each step. generator: where the
    random starts come from (None: the global generator)."""

    def value(logits):
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return cw_margin(logits, y)

    best_delta = torch.zeros_like(x)
    best_loss = torch.full((len(y),), -math.inf, device=x.device)
    robust = torch.ones(len(y), dtype=torch.bool, device=x.device)
    for restart in range(restarts):
        delta = torch.zeros_like(x)
        if rand_init:
            delta = delta.uniform_(-eps, eps, generator=generator)
        delta = (x + delta).clamp(0, 1) - x
        for i in range(iters):
            delta.requires_grad_(True)
            grad, = torch.autograd.grad(value(model(x + delta)).sum(), delta)  # fmt: skip
            delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
            if progress:
                progress(restart, i)
        with torch.no_grad():
            logits = model(x + delta)
            final = value(logits)
            robust = robust & (logits.argmax(1) == y)
            # torch.where, not boolean-mask indexing, whose data-dependent size makes the host wait for
            # the GPU
            better = final > best_loss
            best_delta = torch.where(better.view(-1, *[1] * (x.dim() - 1)), delta, best_delta)
            best_loss = torch.where(better, final, best_loss)
    return best_delta, robust


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside, and back in the mode it was found in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pgd_correct(model, x, y, eps, step, iters, restarts=1, loss="ce", batch_size=500, label=None,
                progress=0.0, seed=None, first_batch=0):  # fmt: skip
    """Per sample, whether it is classified correctly under PGD-iters-restarts (iters 0: clean), in
    batches, in eval mode: the BN statistics are left alone and the model comes back in its mode. x: uint8
    or [0, 1] float. label: the name of the progress lines, printed every `progress` seconds, also inside a
    batch's attack (its restart and step; the host's clock only, no GPU sync). seed: batch b's random
    starts come from a generator seeded by (seed, first_batch + b, loss), the same in whichever process
    attacks the batch (None: from the global generator)."""
    out = []
    meter = Progress(label, len(y), progress if label else 0)
    generator = None if seed is None else torch.Generator(device=y.device)
    batches = -(-len(y) // batch_size)
    with eval_mode(model):
        for b in range(batches):
            xb = x[b * batch_size : (b + 1) * batch_size]
            yb = y[b * batch_size : (b + 1) * batch_size]
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
            if iters == 0:
                with torch.no_grad():
                    out.append(model(xb).argmax(1) == yb)
                meter.update(len(yb))
                continue
            if generator is not None:
                generator.manual_seed((seed * 1_000_003 + first_batch + b) * 2 + (loss == "cw"))

            def inside(restart, i, n=len(yb), where=f" (batch {b + 1}/{batches}"):
                done = (restart * iters + i + 1) / (restarts * iters)
                at = f"{where}, restart {restart + 1}/{restarts}, step {i + 1}/{iters})"
                meter.update(0, at, partial=n * done)

            watch = inside if meter.every else None
            kw = dict(progress=watch, generator=generator)
            out.append(attack_pgd(model, xb, yb, eps, step, iters, restarts, loss, **kw)[1])
            meter.update(len(yb))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


def autoattack_correct(model, x, y, eps, num_classes, batch_size=500, seed=0):
    """Per sample, correct under standard L∞ AutoAttack (the official package, github.com/fra31/auto-attack),
    and the attacks that ran. Its targeted attacks get min(9, C − 1) target classes; below 4 classes, where
    its DLR losses are not defined, APGD-CE and Square run (with the standard version's settings). It runs
    batch by batch with its seed set again in each (its own way), so that a batch gets the same attack in
    whichever process runs it."""
    from autoattack import AutoAttack

    with eval_mode(model):
        few = num_classes < 4
        adversary = AutoAttack(
            model, "Linf", eps, seed=seed, version="custom" if few else "standard",
            device=y.device, verbose=False, attacks_to_run=["apgd-ce", "square"] if few else [],
        )  # fmt: skip
        if few:
            adversary.apgd.n_restarts = 1
            adversary.square.n_queries = 5000
        targets = min(9, num_classes - 1)
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        mask = [torch.zeros(0, dtype=torch.bool, device=y.device)]
        for i in range(0, len(y), batch_size):
            xb = x[i : i + batch_size]
            yb = y[i : i + batch_size]
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
            x_adv = adversary.run_standard_evaluation(xb, yb, bs=batch_size)
            with torch.no_grad():
                mask.append(model(x_adv).argmax(1) == yb)
    return torch.cat(mask), adversary.attacks_to_run


def eval_step(eps, iters, dataset):
    """PGD step of the evaluation: 2/255 at ε = 8/255 (MNIST: 0.01 at 0.3), in proportion to ε, and at
    least 1.5ε/iters so that a short attack can still cross the ball from its random start."""
    step = eps / 30 if dataset == "mnist" else eps / 4
    return max(step, 1.5 * eps / iters)


def protocol(iters, restarts, cw_iters, autoattack=False):
    """The attacks of evaluate() in words: "PGD-50-10, CW-20, AutoAttack"."""
    words = [f"PGD-{iters}-{restarts}"] + [f"CW-{cw_iters}"] * bool(cw_iters)
    return ", ".join(words + ["AutoAttack"] * bool(autoattack))


def eval_seconds(model, x, y, iters, restarts, cw_iters, batch_size):
    """About how long evaluate() takes on x, y, AutoAttack aside: one attack step (forward and input
    gradient) timed on the first batch after an untimed one (cuDNN's autotuning, the allocator's first
    blocks), times the steps of the protocol, a forward pass counted as a third of a step. Two GPU syncs."""
    if not len(y):
        return 0.0
    xb = x[:batch_size]
    yb = y[:batch_size]
    xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
    with eval_mode(model):
        for _ in range(2):
            if xb.is_cuda:
                torch.cuda.synchronize(xb.device)
            start = time.time()
            delta = torch.zeros_like(xb, requires_grad=True)
            torch.autograd.grad(F.cross_entropy(model(xb + delta), yb), delta)
            if xb.is_cuda:
                torch.cuda.synchronize(xb.device)
    step = time.time() - start
    forwards = restarts + 1 + bool(cw_iters)  # each restart's last, the CW attack's, the clean pass
    return len(y) / len(yb) * step * (iters * restarts + cw_iters + forwards / 3)


def duration(seconds):
    """A duration as the line that starts a long computation says it: "about 4 min"."""
    if seconds < 60:
        return "under a minute"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def evaluate(model, x, y, eps, iters=50, restarts=10, cw_iters=20, autoattack=False, num_classes=10,
             batch_size=500, step=None, dataset="cifar10", progress=0.0, seed=0, total=None):  # fmt: skip
    """The evaluation protocol: clean, PGD-iters-restarts (CE, random start, per-sample worst restart), PGD
    on the CW margin (cw_iters steps; 0: none), optional AutoAttack, and "worst_case": the share of samples
    correct clean and under every attack that ran, per sample (as RobustBench counts). x uint8 N×C×H×W,
    eps in [0, 1] units. A CE attack is weak against a model trained on soft labels: the worst case is the
    honest headline. Returns {name: accuracy in [0, 1]}.

    Under torchrun each process attacks whole batches (eval_share): x, y are all the images (total None) or
    this process's share of `total` images. Each batch's random starts are seeded by (seed, batch) and the
    counts are summed over the processes: every process returns the numbers one process would."""
    if total is None:
        total = len(y)
        x = x[eval_share(total, batch_size)]
        y = y[eval_share(total, batch_size)]
    first_batch = eval_share(total, batch_size).start // batch_size
    kw = dict(batch_size=batch_size, progress=progress, seed=seed, first_batch=first_batch)
    masks = {"clean": pgd_correct(model, x, y, eps, 0, 0, label="clean", **kw)}
    pgd_step = step or eval_step(eps, iters, dataset)
    masks[f"pgd{iters}_{restarts}"] = pgd_correct(
        model, x, y, eps, pgd_step, iters, restarts, label=f"PGD-{iters}-{restarts}", **kw
    )
    if cw_iters:
        cw_step = step or eval_step(eps, cw_iters, dataset)
        masks[f"cw{cw_iters}"] = pgd_correct(
            model, x, y, eps, cw_step, cw_iters, loss="cw", label=f"CW-{cw_iters}", **kw
        )
    if autoattack:
        if len(y):
            masks["autoattack"], ran = autoattack_correct(
                model, x, y, eps, num_classes, batch_size, seed
            )
        else:  # a process with no image to attack
            masks["autoattack"], ran = masks["clean"], []
        log(f"# AutoAttack ran {', '.join(ran)}")
    masks["worst_case"] = torch.stack(list(masks.values())).all(0)
    # exact counts, summed over the processes: the numbers of one process, to the last digit
    counts = torch.stack(
        [torch.tensor(len(y), device=y.device)] + [m.sum() for m in masks.values()]
    )
    counts = counts.double()
    if world() > 1:
        dist.all_reduce(counts)
    images, *correct = counts.tolist()
    if images != total:
        raise ValueError(f"the processes hold {images:.0f} of the {total} images to evaluate")
    return {k: c / images if images else 0.0 for k, c in zip(masks, correct)}
