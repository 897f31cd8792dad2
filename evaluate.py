"""Evaluate saved weights with the protocol of the training scripts, or a stronger one.

    python evaluate.py --weights runs/fgsm_rs-cifar10/model_best.pt
    python evaluate.py --weights runs/fgsm_rs-cifar10/model_last.pt --eval-restarts 20 --autoattack

The protocol (common.evaluate): clean accuracy; PGD-50-10 on the cross-entropy (random start, a sample counts as
robust only if it survives every restart); PGD-20 on the Carlini-Wagner margin; with --autoattack, standard L∞
AutoAttack; and the worst case, per sample, over all of them. The network, dataset, ε, data folder, test subset
and batch come from the results.json beside the weights (a run writes it before its own evaluation starts), so that
the defaults repeat the run's evaluation; the flags override them (--eval-samples 50000: all of ImageNet's).
"""

import argparse
import json
import os

import torch

import common
import flags
import harness
import imagenet


def load_model(weights, device="cpu"):
    """The network saved in a run's model_last.pt / model_best.pt, in eval mode, and the run's results.json (read
    from beside the weights: it names the network and the data's classes, shape, mean and std; no data is read).
    Raises FileNotFoundError if either file is missing."""
    with open(os.path.join(os.path.dirname(os.path.abspath(weights)), "results.json")) as f:
        res = json.load(f)
    d = res["data"]
    model = common.make_model(
        res["args"]["model"],
        d["classes"],
        d["shape"],
        d["mean"],
        d["std"],
        res["args"].get("dropout") or 0.0,
    )
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model.to(device).eval(), res


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", required=True, help="a run's model_last.pt or model_best.pt")
    p.add_argument("--dataset", choices=common.DATASET_NAMES, help="default: the run's")
    p.add_argument("--data-dir", help="default: the run's")
    p.add_argument("--epsilon", type=flags.epsilon, help="/255 units (default: the run's)")
    p.add_argument(
        "--eval-samples",
        type=flags.pos_int,
        default=None,
        help="N test images, the fixed random subset the training runs use (default: the run's)",
    )
    p.add_argument("--eval-iters", type=flags.pos_int, default=50, help="PGD steps")
    p.add_argument("--eval-restarts", type=flags.pos_int, default=10, help="PGD restarts")
    p.add_argument(
        "--eval-cw-iters",
        type=flags.nonneg_int,
        default=20,
        help="steps of PGD on the CW margin (0: none)",
    )
    p.add_argument(
        "--eval-step",
        type=flags.pos_float,
        default=None,
        help="PGD step, /255 units (default: 2/255 at ε = 8/255, MNIST 0.01 at ε = 0.3, in proportion to ε)",
    )
    p.add_argument(
        "--autoattack",
        action="store_true",
        help="also run AutoAttack (github.com/fra31/auto-attack)",
    )
    p.add_argument(
        "--batch-size",
        type=flags.pos_int,
        default=None,
        help="default: the run's evaluation batch",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=flags.nonneg_int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=flags.nonneg_float, default=10, metavar="SECONDS")
    p.add_argument("--out", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    try:
        model, res = load_model(args.weights, args.device)
    except FileNotFoundError as err:
        p.error(f"--weights {args.weights}: {err.strerror}: {err.filename} (a run writes both)")
    if args.autoattack:
        try:
            import autoattack  # noqa: F401
        except ImportError:
            p.error(
                "--autoattack needs the official package: pip install git+https://github.com/fra31/auto-attack"
            )
    for key in ("dataset", "data_dir", "epsilon", "eval_samples"):
        setattr(args, key, res["args"][key] if getattr(args, key) is None else getattr(args, key))
    args.batch_size = args.batch_size or res["eval"].get("batch", 500)
    if args.dataset == "imagenet" or res["args"].get(
        "image_size"
    ):  # read from disk: Resize, CenterCrop, as trained
        _, test = common.image_folders(args.dataset, args.data_dir)
        x, y = common.decode_images(
            test,
            args.workers,
            common.subset(len(test), args.eval_samples),
            imagenet.eval_transform(res["data"]["shape"][1]),
        )
    else:
        _, (x, y), info = common.load_dataset(args.dataset, args.data_dir, args.workers)
        if list(info["shape"]) != res["data"]["shape"]:
            raise common.FastatError(
                f"{args.dataset} images are {tuple(info['shape'])}; the network was trained on "
                f"{tuple(res['data']['shape'])}"
            )
        pick = common.subset(len(y), args.eval_samples)
        x, y = x[pick], y[pick]
    x, y = x.to(args.device), y.to(args.device)
    torch.manual_seed(args.seed)
    eps = args.epsilon / 255
    final = common.evaluate(
        model,
        x,
        y,
        eps,
        args.eval_iters,
        args.eval_restarts,
        args.eval_cw_iters,
        args.autoattack,
        res["data"]["classes"],
        args.batch_size,
        args.eval_step and args.eval_step / 255,
        args.dataset,
        args.progress_every,
    )
    print(f"{args.weights} on {len(y)} {args.dataset} test images, ε = {args.epsilon:g}/255:")
    for k, v in final.items():
        print(f"  {k:>12}  {100 * v:6.2f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": final}, f, indent=1)
    return final


if __name__ == "__main__":
    harness.main_guard(main)
