"""The run around a method: torchrun, the run folder, checkpoints and resume, the per-epoch table, the
final evaluation, results.json and curves.png. Nothing here is a method.

A method script's main() (fgsm_rs.py is the shortest example; `common.` marks the data and model contract,
`harness.` and `run.` the bookkeeping):

    args = get_args(argv)                          # flags.parse_args: the recipe fills what is not given
    harness.setup(args)                            # torchrun's process group, the seeds
    data = common.get_data(args)                   # data.train.epoch(e) yields (x in [0, 1], y, index)
    model = common.get_model(args, data)           # normalisation is inside: the model takes [0, 1] images
    run = harness.Run(args, data)                  # run folder, log.txt, precision
    attack_model, train_model = run.models(model)  # two views of one network (the same parameters)
    checkpoint = dict(model=model, opt=opt, ...)   # what a checkpoint holds
    start = run.resume(checkpoint) if args.resume else 0
    for epoch in range(start, args.epochs):
        run.start_epoch()
        ...                                        # the method's epoch
        run.end_epoch(epoch, model, checkpoint, lr=..., loss=..., acc=...)
    run.finish(model)                              # the weights, then the evaluation of last and best
"""

import atexit
import contextlib
import errno
import json
import logging
import logging.handlers
import math
import os
import random
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import evaluation
import flags
import plots
from common import FastatError, log, rank, world

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

# ---- torchrun


def global_sum(t):
    """A tensor summed over the processes."""
    if world() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def mean_over_ranks(value):
    """A number averaged over the processes, so that every process takes the same decision from it."""
    device = "cuda" if world() > 1 and dist.get_backend() == "nccl" else "cpu"
    total = global_sum(torch.tensor([float(value)], dtype=torch.float64, device=device))
    return total.item() / world()


def sync_buffers(model):
    """Under torchrun, the first process's buffers (BatchNorm's running statistics) in every process: DDP
    copies them at the start of each forward pass, and each process's forward then moves its own copy."""
    for b in model.buffers() if world() > 1 else ():
        dist.broadcast(b, 0)


def _gather(obj):
    """A list of every process's `obj` (picklable), in rank order."""
    if world() == 1:
        return [obj]
    gathered = [None] * world()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(xy):
    """This process's contiguous part of (x, y): all of it in one process."""
    mine = common.part(len(xy[1]))
    return xy[0][mine], xy[1][mine]


def _end_process_group():
    """At the process's exit (one group for all its runs): gloo's threads outlive a group left standing
    and can abort the ending process (SIGABRT, "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _Print(logging.Handler):
    """common.log's lines on stdout (the one sys.stdout is now), flushed."""

    def emit(self, record):
        print(self.format(record), flush=True)


def setup(args, training=True):
    """What a run needs before its data: under torchrun the process group (one GPU per process, its
    LOCAL_RANK's) and the same flags in every process; the first process's log lines on stdout; and
    every random generator seeded with --seed + rank (each process draws its own random starts; the
    networks start from the first process's weights, DDP). Raises FastatError, before any data is read,
    if the processes were started with different flags, the training batch does not split evenly over
    them, or the run folder is held by another run. training False: evaluate.py, whose processes take
    whole evaluation batches and write no run folder."""
    _end_previous_run()
    Run.current = None  # until this run's Run exists, an interruption names no folder
    logger = common.logger
    logger.propagate = False  # its lines go to stdout here, not through the root logger as well
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # torchrun
        if torch.device(args.device).type == "cuda":
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        atexit.register(_end_process_group)
    if not rank() and not any(isinstance(h, _Print) for h in logger.handlers):
        logger.addHandler(_Print())
    for handler in [h for h in logger.handlers if isinstance(h, logging.handlers.BufferingHandler)]:
        logger.removeHandler(handler)
    if not rank():  # the lines logged before the run's log.txt is open (the data's counts), kept
        logger.addHandler(logging.handlers.BufferingHandler(capacity=10**6))
    flags.check_processes(args, training)
    if training and not rank() and os.path.isdir(args.out_dir):
        # refused now, not after loading the data: a folder held by another run, or one that holds a
        # run when --resume is not given
        hold(args.out_dir).close()
        refuse_a_second_run(args)
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(args.seed + rank())


def refuse_a_second_run(args):
    """FastatError if args.out_dir holds a run (its checkpoint.pt) and --resume is not given."""
    if os.path.exists(os.path.join(args.out_dir, "checkpoint.pt")) and not args.resume:
        raise FastatError(
            f"{args.out_dir} already holds a run (checkpoint.pt): pass --resume to continue it, "
            f"or choose another --out-dir"
        )


def hold(folder):
    """This process's hold on a run folder: an exclusive lock on folder/run.lock, with the holder written
    in it. A POSIX record lock (fcntl.lockf): the system releases it when the process ends, even killed,
    and DataLoader workers forked from the process do not inherit it. Returns the open lock file (keep
    it open). Raises FastatError naming the holder if another process has it, or the folder if it is
    not writable."""
    try:
        f = open(os.path.join(folder, "run.lock"), "a+")
    except OSError as err:  # read-only: permissions, a read-only file system
        raise FastatError(f"--out-dir {folder}: not writable ({err.strerror})") from None
    if fcntl is None:  # not a POSIX system: no lock
        return f
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)  # the whole file
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise FastatError(
            f"{folder} is the folder of a run that is still going ({holder}): wait for it to end, "
            f"or give another --out-dir"
        ) from None
    f.seek(0)
    f.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)}\n")
    f.flush()
    return f


# ---- A training run: its folder, the per-epoch table, checkpoints, the final evaluation


class NonFiniteLoss(Exception):
    pass


class PerProcess:
    """A checkpoint entry that each process holds its own value of (FGSM-RS's previous δ under torchrun):
    checkpoint.pt keeps every process's copy, and a resumed process gets back its own."""

    def __init__(self, tensor):
        self.tensor = tensor


def _end_previous_run():
    """Close the log.txt and release the folder of this process's last run (ended, failed or
    interrupted) before another one starts in the same process (a notebook, the tests)."""
    for handler in list(common.logger.handlers):
        if isinstance(handler, logging.FileHandler):
            common.logger.removeHandler(handler)
            handler.close()
    if Run.current is not None and Run.current.lock is not None:
        Run.current.lock.close()
        Run.current.lock = None


class Run:
    """One training run in args.out_dir: log.txt (the table, also on stdout), checkpoint.pt after every
    epoch, and at the end model_last.pt, model_best.pt, results.json and curves.png (written by the first
    process under torchrun). `columns`: the method's own per-epoch columns, after epoch, seconds
    (training), cpu_s (the process's CPU time), monitor_s, lr, loss, acc and pgd_monitor."""

    # An epoch whose clean predictions put this share of the monitor images into one class is never
    # "best": a constant predictor can beat a catastrophically overfitted model on robust accuracy.
    DEGENERATE_SHARE = 0.9

    current = None  # the run of this process, for main_guard's messages

    def __init__(self, args, data, columns=()):
        self.args = args
        self.data = data
        self.device = torch.device(args.device)
        # the autocast dtype of training (None: fp32), as the cores take it
        self.amp = self._precision()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.columns = [*"epoch seconds cpu_s monitor_s lr loss acc pgd_monitor".split(), *columns]
        # a step's shapes are fixed: cuDNN times its kernels once
        torch.backends.cudnn.benchmark = True
        self.ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
        self.saved_epoch = 0  # the epoch of the last checkpoint written or resumed from
        self.rows = []
        self.best = {"score": -math.inf, "epoch": 0}
        self.best_weights = None
        self.stopped = False
        self.train_time = 0.0
        self.save_seconds = 0.0
        refuse_a_second_run(args)
        _end_previous_run()
        self.lock = None
        self.log_file = None
        self.early = []  # the lines logged before log.txt was open
        for handler in list(common.logger.handlers):
            if isinstance(handler, logging.handlers.BufferingHandler):
                common.logger.removeHandler(handler)
                self.early = [handler.format(record) for record in handler.buffer]
        if not rank():  # the first process writes every file of the run
            self._open_folder()
        Run.current = self
        if args.resume and os.path.exists(self.ckpt_path):
            return  # resume() logs where the run goes on
        if args.resume:
            log(f"# --resume: no checkpoint in {args.out_dir} yet: the run starts from epoch 1")
        log(f"# python {args.method}.py {flags.command_line(args)}")
        self._log_early()
        big = ("preact18", "wrn-34-10", "wrn-28-10", *common.RESNETS)
        if self.device.type == "cpu" and args.model in big:
            log(
                f"# training {args.model} on the CPU is slow: see the ETA of the progress lines; "
                f"a small --model such as wrn-16-2 is many times faster"
            )
        self._log_monitor()
        log("  ".join(f"{c:>10}" for c in self.columns))

    def _log_early(self):
        """Into log.txt (only: stdout had them), the lines logged before it was open."""
        if self.log_file is not None:
            self.log_file.stream.writelines(line + "\n" for line in self.early)

    def _log_monitor(self):
        """What the per-epoch monitor costs, in forward-backward passes, beside an FGSM epoch's."""
        monitor = len(self.data.monitor[1])
        train = self.data.train_images
        images = "held-out" if self.data.val_size else "training"
        log(
            f"# monitor: PGD-10 (step ε/4) on {monitor} {images} images after every epoch, about "
            f"{10.5 * monitor:.0f} forward-backward passes (an FGSM epoch on the {train} training "
            f"images makes about {2 * train}); --monitor-size sets it"
        )

    def _open_folder(self):
        """Make the run folder, hold it (run.lock), record the flags (args.json: a run killed before its
        first checkpoint restarts as itself) and open log.txt (appended to by a resumed run)."""
        out = self.args.out_dir
        try:
            os.makedirs(out, exist_ok=True)
            self.lock = hold(out)
            if not os.path.exists(self.ckpt_path):
                record = {"method": self.args.method, "args": vars(self.args), "processes": world()}
                _write_json(record, os.path.join(out, "args.json"))
            log_file = os.path.join(out, "log.txt")
            mode = "a" if self.args.resume else "w"
            common.logger.addHandler(logging.FileHandler(log_file, mode=mode, encoding="utf-8"))
            self.log_file = common.logger.handlers[-1]
        except (FileExistsError, NotADirectoryError):
            raise FastatError(f"--out-dir {out}: a file of that name is in the way") from None
        except PermissionError as err:
            raise FastatError(f"--out-dir {out}: not writable ({err.strerror})") from None

    def _precision(self):
        """--precision as an autocast dtype: auto is bf16 on GPUs that compute it natively, fp16 on older
        ones, fp32 (None) on the CPU."""
        if self.args.precision == "auto":
            if self.device.type != "cuda":
                return None
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.args.precision]

    def autocast(self):
        """The autocast of the training passes (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def models(self, model, double_backward=False):
        """(attack_model, train_model): two views of `model` that share its parameters. The attacks run
        on the first (with --compile a compiled network that computes input gradients only:
        InputGradOnly), the weight step runs through the second (wrap_for_training: DDP under torchrun,
        compiled with --compile, except a loss that needs a double backward: torch.compile has none)."""
        compiled = torch.compile(model) if self.args.compile else model
        attack_model = common.InputGradOnly(compiled) if self.args.compile else model
        if world() == 1 and not double_backward:
            return attack_model, compiled
        return attack_model, self.wrap_for_training(model, compile=not double_backward)

    def wrap_for_training(self, net, compile=True):
        """A network as its weight step runs it: under torchrun in DistributedDataParallel (gradients
        averaged over the processes; attacks run on the plain module, since an input-gradient backward
        through DDP would leave its reducer waiting), torch.compile'd with --compile. Also a method's own
        network (SDI's generator, LAS-AT's strategy network)."""
        if world() > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids)
        return torch.compile(net) if self.args.compile and compile else net

    def resume(self, checkpoint):
        """Restore every object of `checkpoint` from checkpoint.pt (modules, optimisers and schedulers
        with load_state_dict, tensors with copy_, dicts with update) and the run's own state (table, best
        model, RNG states of every process); returns the epoch to continue from."""
        if not os.path.exists(self.ckpt_path):
            return 0  # __init__ said so
        ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        if len(ckpt["rng"]) != world():
            raise FastatError(
                f"{self.args.out_dir} was trained by {len(ckpt['rng'])} process(es): resume it "
                f"with as many"
            )
        for key, obj in checkpoint.items():
            saved = ckpt["objects"][key]
            if isinstance(obj, PerProcess):
                obj.tensor.copy_(saved[rank()])
            elif torch.is_tensor(obj):
                obj.copy_(saved)
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(saved)
            else:
                obj.load_state_dict(saved)
        self.rows = ckpt["rows"]
        self.best = ckpt["best"]
        self.train_time = ckpt["train_time"]
        self.stopped = ckpt["stopped"]
        done = ckpt["epoch"]
        self.saved_epoch = done
        if ckpt["best_weights"] is not None:  # kept on the CPU (map_location moved them)
            self.best_weights = {k: v.cpu() for k, v in ckpt["best_weights"].items()}
        if ckpt.get("scaler") and self.scaler.is_enabled():  # fp16's loss scale
            self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"][rank()]  # this process's generators; CUDA: its own device's only
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        if not rank():
            self._log_resume(done, ckpt["args"])
        return self.args.epochs if self.stopped else done

    def _log_resume(self, done, saved):
        """Where a resumed run goes on: the rows a skipped checkpoint (fgsm_mep.py) left in the log are
        discarded, and the flags changed since the checkpoint (the evaluation's, ...) are listed."""
        with open(os.path.join(self.args.out_dir, "log.txt")) as f:
            rows = [int(w[0]) for w in map(str.split, f) if w and w[0].isdigit()]
        logged = max(rows, default=0)
        line = f"# resumed from {self.ckpt_path} after epoch {done}"
        if logged > done:
            epochs = f"{done + 1}-{logged}"
            line += f"; the rows of epochs {epochs} above were not checkpointed: discarded"
        log(line)
        self._log_early()
        changed = []
        for key in sorted(flags.FREE_ON_RESUME - {"resume", "out_dir"}):
            now = getattr(self.args, key, None)
            if saved.get(key) != now:
                was = flags._show(saved.get(key))
                changed.append(f"--{key.replace('_', '-')} {flags._show(now)} (was {was})")
        if changed:
            log(f"# changed on resuming: {', '.join(changed)}")
        log("  ".join(f"{c:>10}" for c in self.columns))

    def start_epoch(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.time()
        self._cpu = time.process_time()

    def robust_accuracy(self, model, x, y, eps, step, iters, label=None):
        """PGD-iters accuracy (eval mode, fp32) of all the processes' model on x, y ([0, 1] units): one
        model (the first process's BatchNorm statistics in every process), each process attacks its part
        of x, one number reduced over them. x, y: the same in every process. label: progress lines."""
        sync_buffers(model)
        mine_x, mine_y = shard((x, y))
        kw = dict(batch_size=self.data.eval_batch, label=label, progress=self.args.progress_every)
        correct = evaluation.pgd_correct(model, mine_x, mine_y, eps, step, iters, **kw)
        return global_sum(correct.sum().double().reshape(1)).item() / len(y)

    def _monitor(self, model):
        """The catastrophic-overfitting monitor: PGD-10 accuracy (step ε/4) on fixed training images and
        the largest share of them that the clean predictions put into one class."""
        x, y = self.data.monitor
        eps = self.args.epsilon / 255
        accuracy = self.robust_accuracy(model, x, y, eps, eps / 4, 10, label="monitor")
        x, y = shard((x, y))
        with torch.no_grad(), evaluation.eval_mode(model):
            predictions = [model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)]
        predictions = torch.cat([*predictions, y[:0]])  # y[:0]: a process with no image
        counts = torch.bincount(predictions, minlength=self.data.num_classes).double()
        class_counts = global_sum(counts)
        top_share = (class_counts.max() / class_counts.sum()).item()
        return accuracy, top_share

    def end_epoch(self, epoch, model, checkpoint, lr, loss, acc, score=None, stop=False, save=True,
                  **extra):  # fmt: skip
        """Close an epoch: check the loss, run the monitor, keep the best weights, log the row, write the
        checkpoint.

        loss, acc: the epoch's mean training loss and accuracy (on the inputs the method trains on),
        averaged over the processes here, as the method's float columns (`extra`). score: what "best"
        maximises (default: the monitor's PGD accuracy). stop: the method ends training after this epoch
        (every process must say the same). save: write checkpoint.pt (the last epoch and a stop always
        are)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self._start
        cpu = time.process_time() - self._cpu
        self.train_time += seconds
        loss = mean_over_ranks(loss)
        acc = mean_over_ranks(acc)
        extra = {k: mean_over_ranks(v) if isinstance(v, float) else v for k, v in extra.items()}
        if not math.isfinite(loss):
            intact = "no checkpoint was written"
            if self.saved_epoch:
                intact = f"the checkpoint of epoch {self.saved_epoch} is intact"
            log(
                f"# epoch {epoch + 1}: the training loss is {loss}; stopping. {intact}, but a "
                f"resumed run would train into the same fault: start a new run with a lower --lr "
                f"or step size"
            )
            raise NonFiniteLoss()
        sync_buffers(model)
        start = time.time()
        monitor, top_share = self._monitor(model)
        row = {
            "epoch": epoch + 1,
            "seconds": seconds,
            "cpu_s": cpu,
            "monitor_s": time.time() - start,
        }
        row.update(lr=lr, loss=loss, acc=acc, pgd_monitor=monitor, **extra)
        self.rows.append(row)
        score = monitor if score is None else score
        if top_share >= self.DEGENERATE_SHARE:
            log(
                f"# epoch {epoch + 1}: {100 * top_share:.0f}% of the monitor images get one "
                f"class; not eligible as the best model"
            )
        elif score > self.best["score"]:
            self.best = {"score": score, "epoch": epoch + 1}
            self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        log("  ".join(plots.cell(c, row.get(c)) for c in self.columns))
        self.stopped = stop
        if save or stop or epoch + 1 == self.args.epochs:
            start = time.time()
            self._save(epoch, checkpoint)
            self.save_seconds += time.time() - start

    def _save(self, epoch, checkpoint):
        mine = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        rng = _gather(mine)  # every process's generators
        objects = {}
        for key, obj in checkpoint.items():
            if isinstance(obj, PerProcess):
                objects[key] = _gather(obj.tensor.cpu())
            elif torch.is_tensor(obj) or isinstance(obj, dict):
                objects[key] = obj
            else:
                objects[key] = obj.state_dict()
        if rank():
            return
        state = {
            "epoch": epoch + 1,
            "rows": self.rows,
            "best": self.best,
            "stopped": self.stopped,
            "best_weights": self.best_weights,
            "train_time": self.train_time,
            "args": vars(self.args),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
            "objects": objects,
        }
        _atomic_save(state, self.ckpt_path)
        self.saved_epoch = epoch + 1

    def _results(self):
        """results.json's content before the final evaluation."""
        args, data = self.args, self.data
        step = 255 * evaluation.eval_step(args.epsilon / 255, args.eval_iters, args.dataset)
        cuda = self.device.type == "cuda"
        return {
            "method": args.method,
            "args": vars(args),
            "epochs": self.rows,
            "train_time": self.train_time,
            "best_epoch": self.best["epoch"] or len(self.rows),
            "stopped_early": len(self.rows) < args.epochs,
            "train_images": data.train_images,
            # what evaluate.py checks data against: label i is class_names[i]
            "data": {
                "dataset": args.dataset,
                "classes": data.num_classes,
                "class_names": list(data.class_names),
                "shape": list(data.shape),
                "mean": data.mean,
                "std": data.std,
            },
            # what the final evaluation runs, evaluate.py's defaults
            "eval": {
                "images": data.test_size,
                "pgd": f"PGD-{args.eval_iters}-{args.eval_restarts}, step {step:.4g}/255",
                "iters": args.eval_iters,
                "restarts": args.eval_restarts,
                "step": step,
                "cw_iters": args.eval_cw_iters,
                "autoattack": args.autoattack,
                "batch": data.eval_batch,
                "seed": args.seed,
            },
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "precision": str(self.amp or torch.float32).replace("torch.", ""),
            "torch": torch.__version__,
            "processes": world(),
            "batch_per_process": args.batch_size / world(),
            # written now too: evaluate.py can load the weights even if this evaluation fails
            "final": None,
        }

    def finish(self, model):
        """Write the weights (first: no evaluation failure can lose them), then evaluate the last and the
        best model on the fixed test subset (evaluation.evaluate's protocol; each process its part), write
        results.json and curves.png."""
        args, out = self.args, self.args.out_dir
        sync_buffers(model)
        last = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.best_weights is None and self.rows:
            log("# no epoch was eligible as the best model (all predicted one class); best = last")
        best = self.best_weights or last
        results = self._results()
        if not rank():
            _atomic_save(last, os.path.join(out, "model_last.pt"))
            _atomic_save(best, os.path.join(out, "model_best.pt"))
            _write_json(results, os.path.join(out, "results.json"))
        final = {}
        models = [("last", last, len(self.rows)), ("best", best, results["best_epoch"])]
        for name, weights, epoch in models:
            if name == "best" and all(torch.equal(best[k], last[k]) for k in last):
                log(f"# the best model is the last one (epoch {epoch}): the same numbers")
                final[name] = final["last"]
                continue
            model.load_state_dict(weights)
            final[name] = self.evaluate(model, f"the {name} model (epoch {epoch})")
            numbers = "  ".join(f"{k} {100 * v:.2f}%" for k, v in final[name].items())
            log(f"# {name} model: {numbers}")
        model.load_state_dict(last)
        if not rank():
            _write_json({**results, "final": final}, os.path.join(out, "results.json"))
            title = f"{args.method} on {plots.data_name(args)}"
            plots.plot_curves(self.rows, os.path.join(out, "curves.png"), title)
            log(
                f"# train time {self.train_time:.1f} s; wrote {out}/results.json, curves.png, "
                f"model_last.pt, model_best.pt"
            )
        _end_previous_run()
        return results

    def evaluate(self, model, what="the model"):
        """evaluation.evaluate's protocol on the test subset (each process its share, data.test_x; the numbers
        of one process), after a line that says what runs, on how many images, and about how long it takes.
        The model must be one across the processes (finish() syncs its BatchNorm statistics)."""
        args, data = self.args, self.data
        attacks = (args.eval_iters, args.eval_restarts, args.eval_cw_iters)
        seconds = evaluation.eval_seconds(
            model, data.test_x, data.test_y, *attacks, data.eval_batch
        )
        cpu = self.device.type == "cpu" and dict(zip(flags.CPU_EVAL, attacks)) == flags.CPU_EVAL
        note = flags.eval_note(args, "CPU default" if cpu else None)
        attacks_run = evaluation.protocol(*attacks, args.autoattack)
        took = evaluation.duration(seconds) + (" and AutoAttack's time" if args.autoattack else "")
        log(f"# evaluating {what} on {data.test_size} test images with {attacks_run}{note}: {took}")
        return evaluation.evaluate(
            model, data.test_x, data.test_y, args.epsilon / 255, *attacks, args.autoattack,
            data.num_classes, data.eval_batch, dataset=args.dataset, progress=args.progress_every,
            seed=args.seed, total=data.test_size,
        )  # fmt: skip


def _atomic_save(obj, path):
    """torch.save that never leaves a half-written file: a temporary file, flushed to the disk (fsync),
    renamed over the old one, and the rename made durable (fsync of the folder). Raises RunFault (the
    old file intact) when the disk is full or the folder not writable."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        full = getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in str(err)
        reason = "the disk is full" if full else f"{type(err).__name__}: {err}".splitlines()[0]
        raise RunFault(f"could not write {path} ({reason}); the previous one is intact") from None
    os.replace(path + ".tmp", path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)


def _write_json(obj, path):
    """A JSON file written whole or not at all (RunFault if it cannot be)."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
    except OSError as err:
        raise RunFault(
            f"could not write {path} ({err.strerror}); the previous one is intact"
        ) from None
    os.replace(path + ".tmp", path)


class RunFault(FastatError):
    """A fault during the run (a full disk at a save): one line, exit 1; what was saved is intact."""


def main_guard(main):
    """Run a script's main(): a FastatError is one line on stderr and exit 2 (as argparse's errors; 1 for
    a fault during the run), Ctrl-C and a non-finite loss end it with a message, not a traceback. Under
    torchrun every process that fails says why, with its rank; the others' lines say so once."""
    process = int(os.environ.get("RANK", 0))
    prefix = f"fastat (process {process})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "fastat"
    try:
        main()
    except flags.Finished as done:
        if not process:
            print(f"fastat: {done}", flush=True)
        sys.exit(0)
    except FastatError as err:
        print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(err, RunFault) else 2)
    except KeyboardInterrupt:
        if not process:
            print(
                f"fastat: interrupted; {_where_it_stands(Run.current)}", file=sys.stderr, flush=True
            )
        sys.exit(130)
    except NonFiniteLoss:
        sys.exit(3)
    except RuntimeError as err:
        if world() == 1 or "by peer" not in str(err):
            raise
        # gloo's error ("Connection closed/reset by peer") when another process ended: its line says why
        print(f"{prefix}: another process stopped (its line says why)", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        _end_previous_run()


def _where_it_stands(run):
    """What an interrupted run left behind, and the command that continues it."""
    if run is None:
        return "the run had not started: nothing was written"
    out = run.args.out_dir
    again = f"python {run.args.method}.py --resume --out-dir {out}"
    if run.saved_epoch:
        return f"the checkpoint of epoch {run.saved_epoch} in {out} is intact: {again} continues it"
    return f"no epoch was checkpointed yet: {again} starts the run again with its own flags"
