"""Evaluate saved weights with the protocol of the training scripts, or a stronger one.

    python evaluate.py --weights runs/fgsm_rs-cifar10/model_best.pt
    python evaluate.py --weights runs/fgsm_rs-cifar10/model_last.pt --eval-restarts 20 --autoattack
    torchrun --nproc_per_node 8 evaluate.py --weights runs/fgsm_rs-imagenet/model_best.pt

The protocol (evaluation.evaluate): clean accuracy; PGD on the cross-entropy (random start, a sample counts as robust
only if it survives every restart); PGD on the Carlini-Wagner margin; with --autoattack, standard L∞ AutoAttack;
and the worst case, per sample, over all of them. Everything comes from the results.json beside the weights (a run
writes it before its own evaluation starts): the network, the data (its classes and image shape are checked), ε,
the attacks, their step, the test subset and the batch, so that the defaults repeat the run's evaluation; the
flags override them (--eval-samples 50000: all of ImageNet's). Under torchrun each process attacks its share of
the batches, and the numbers are those of one process.
"""

import argparse
import json
import os
import pickle
import zipfile

import torch

import common
import evaluation
import flags
import harness
import imagenet

GIVE = "give a run's model_last.pt or model_best.pt"
ATTACKS = ("eval_iters", "eval_restarts", "eval_cw_iters", "autoattack")
# the flags that default to the run's (batch_size: its evaluation batch)
FROM_RUN = ("dataset", "data_dir", "epsilon", "eval_samples", *ATTACKS, "batch_size", "seed")


def load_model(weights, device="cpu"):
    """The network saved in a run's model_last.pt / model_best.pt, in eval mode, and the run's results.json (read
    from beside the weights: it names the network and the data's classes, shape, mean and std; no data is read).
    Raises FastatError, one line saying what the file is and what to give instead, if the weights are missing,
    are no weights (a checkpoint.pt, a log), have no results.json beside them, or do not fit its network."""
    name = f"--weights {weights}"
    if not os.path.isfile(weights):
        raise common.FastatError(f"{name}: no such file; {GIVE}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        if not zipfile.is_zipfile(weights):
            raise common.FastatError(
                f"{name} is not a file torch.save wrote (a log?); {GIVE}"
            ) from None
        if os.path.basename(weights) == "checkpoint.pt" or "numpy" in str(err):
            folder = os.path.dirname(weights) or "."
            raise common.FastatError(
                f"{name} is a training checkpoint, not weights; {GIVE} from the same folder (an "
                f"unfinished run: python SCRIPT.py --resume --out-dir {folder})"
            ) from None
        raise common.FastatError(f"{name} holds no network weights; {GIVE}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.FastatError(f"{name} holds no network weights; {GIVE}")
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) else "not readable JSON"
        raise common.FastatError(
            f"{name}: {path}: {why}; {GIVE} in its run folder (the run writes results.json there)"
        ) from None
    d = res["data"]
    net = res["args"]["model"]
    dropout = res["args"].get("dropout") or 0.0
    model = common.make_model(net, d["classes"], d["shape"], d["mean"], d["std"], dropout)
    own = model.state_dict()
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    missing = len(own.keys() - state.keys())
    unknown = len(state.keys() - own.keys())
    if wrong or missing or unknown:
        raise common.FastatError(
            f"{name} do not fit the {net} that the results.json beside them describes "
            f"({missing} tensors missing, {unknown} unknown, {len(wrong)} of another shape): "
            f"weights of another run? {GIVE} with its own results.json"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), res


def test_images(args, res):
    """This process's share (common.eval_share) of the run's fixed test subset as uint8 images and labels, the
    subset's size, and the data's class names and image shape. Streamed runs are read from disk as trained:
    resized, centre-cropped."""
    if args.dataset == "imagenet" or res["args"].get("image_size"):
        size = res["data"]["shape"][1]
        train, test = common.image_folders(args.dataset, args.data_dir)
        pick = common.subset(len(test), args.eval_samples)
        mine = pick[common.eval_share(len(pick), args.batch_size)]
        x, y = common.decode_images(test, args.workers, mine, imagenet.eval_transform(size))
        return x, y, len(pick), {"class_names": train.classes, "shape": [3, size, size]}
    _, (x, y), info = common.load_dataset(args.dataset, args.data_dir, args.workers)
    pick = common.subset(len(y), args.eval_samples)
    mine = pick[common.eval_share(len(pick), args.batch_size)]
    return x[mine], y[mine], len(pick), info


def check_same_data(run, data, where):
    """Refuse (FastatError, one line naming what differs) to evaluate weights on data they were not trained
    for. run: results.json's "data" record; data: the data's class_names (label i is class_names[i]) and
    shape (C, H, W), as load_dataset's info; where: the data's name in the message. The image shape and the
    class names, in their order, must be the run's; another dataset with the run's classes is accepted (a
    CIFAR-10.1 folder for CIFAR-10 weights). A record without class names (a run made before they were
    recorded) cannot be checked: returns False, else True."""
    trained = f"the network was trained on {run.get('dataset', 'its run')}'s"
    if list(data["shape"]) != list(run["shape"]):
        shown = ["×".join(map(str, s)) for s in (data["shape"], run["shape"])]
        raise common.FastatError(f"{where} has {shown[0]} images (C×H×W); {trained}, {shown[1]}")
    names = run.get("class_names")
    if names is None:
        return False
    if len(data["class_names"]) != len(names):
        raise common.FastatError(
            f"{where} has {len(data['class_names'])} classes; {trained} {len(names)}"
        )
    differ = [i for i, (a, b) in enumerate(zip(data["class_names"], names)) if a != b]
    if differ:
        i = differ[0]
        raise common.FastatError(
            f"{where}: class {i} is '{data['class_names'][i]}' but {trained} class {i} is "
            f"'{names[i]}' ({len(differ)} of {len(names)} classes differ: renamed or reordered "
            f"class folders, or another dataset)"
        )
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=flags.Help)
    p.add_argument("--weights", required=True, help="a run's model_last.pt or model_best.pt")
    p.add_argument("--dataset", choices=common.DATASET_NAMES, help="default: the run's")
    p.add_argument("--data-dir", help="default: the run's")
    p.add_argument("--epsilon", type=flags.epsilon, help="/255 units (default: the run's)")
    flags.eval_flags(p, default="the run's")
    p.add_argument("--batch-size", type=flags.pos_int, help="default: the run's evaluation batch")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to evaluate"
    )
    workers = min(8, os.cpu_count() or 1)
    p.add_argument(
        "--workers",
        type=flags.nonneg_int,
        default=workers,
        help="processes that decode image files",
    )
    p.add_argument("--seed", type=flags.seed, default=None, help="default: the run's")
    p.add_argument(
        "--progress-every",
        type=flags.nonneg_float,
        default=10,
        metavar="SECONDS",
        help="a progress line this often (0: none)",
    )
    p.add_argument("--out", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    model, res = load_model(args.weights)
    run = {**res["args"], "batch_size": res.get("eval", {}).get("batch", 500)}
    for key in FROM_RUN:
        if getattr(args, key) is None:
            setattr(args, key, run[key])
    flags.check_autoattack(p, args)
    harness.setup(args, training=False)
    model.to(args.device)
    x, y, total, info = test_images(args, res)
    where = f"--dataset {args.dataset} in {args.data_dir}"
    if not check_same_data(res["data"], info, where):
        common.log("# results.json names no classes (an older run): the class order is not checked")
    x, y = x.to(args.device), y.to(args.device)
    attacks = (args.eval_iters, args.eval_restarts, args.eval_cw_iters)
    seconds = evaluation.eval_seconds(model, x, y, *attacks, args.batch_size)
    origin = "the run's" if all(getattr(args, k) == run[k] for k in ATTACKS) else None
    common.log(
        f"# evaluating {args.weights} on {total} {args.dataset} test images at "
        f"ε = {args.epsilon:g}/255 with {evaluation.protocol(*attacks, args.autoattack)}"
        f"{flags.eval_note(args, origin)}: {evaluation.duration(seconds)}"
        + (" and AutoAttack's time" if args.autoattack else "")
    )
    step = args.eval_step and args.eval_step / 255
    final = evaluation.evaluate(
        model, x, y, args.epsilon / 255, *attacks, args.autoattack, res["data"]["classes"],
        args.batch_size, step, args.dataset, args.progress_every, args.seed, total,
    )  # fmt: skip
    for k, v in final.items():
        common.log(f"  {k:>12}  {100 * v:6.2f}%")
    if args.out and not common.rank():
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": final}, f, indent=1)
    return final


if __name__ == "__main__":
    harness.main_guard(main)
