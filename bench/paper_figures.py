"""The figures the papers report, kept in one place: `bench/report.py` puts them beside our runs, and the
README's table of reported figures is this file's table.

    python bench/paper_figures.py          # print that table (markdown)

Every figure is quoted as the paper writes it (each names its source), as a string, so that
"53.2" stays "53.2" and not "53.20". Each names its network, dataset and the attack of every number: a figure
is only comparable with a column of ours that ran the same attack (PGD-10 is not our PGD-50-10). None of these
numbers was measured here.

A figure is shown beside one of our runs when the run used the same script with exactly `flags` (the default
recipe, or a named variant such as `--prior batch`) on the same dataset, with our default network or the
paper's (`model`). `flags=None` marks a figure that no run of ours matches, because the sources do not say
which recipe produced it.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

# Variants of a script that have a name of their own: reproduce.py runs them, report.py names them.
# Plain training: FGSM-RS with a zero step from a zero start trains on the clean images, exactly.
# PGD-10 AT: Amata with K fixed at 10 and τ = 20/255 is PGD-10 with step τ/K = 2/255 (Amata, arXiv:2012.08112,
# Algorithm 1: α_t = τ/K_t; DECISIONS.md, 'Amata unstated details'), from a random start
# as in Madry et al.; everything else is Amata's recipe, as in the paper's own PGD-10 baseline.
VARIANTS = {
    "plain": ("fgsm_rs", ("--alpha", "0", "--delta-init", "zero"), "plain training"),
    "pgd10": ("amata", tuple("--k-min 10 --k-max 10 --tau 20 --random-start".split()), "PGD-10 AT"),
    "amata_free": ("free_at", ("--replays-min", "2"), "Amata+Free"),
}


@dataclass(frozen=True)
class Figure:
    script: str  # the method script, without .py
    flags: Optional[
        Tuple[str, ...]
    ]  # the variant's flags: () the default recipe; None: matches no run of ours
    dataset: str  # our --dataset name
    network: str  # as the paper names it
    model: Optional[str]  # our --model for that network (None: ours has no such network)
    reported: str  # "84.86 clean / 53.73 PGD-10 / ...": each figure in %, then what was measured
    time: Optional[str]  # training time as reported
    hardware: Optional[str]  # the GPU the time was measured on, where the paper names it
    source: str  # paper and what in it
    note: str = ""

    @property
    def results(self):
        """((what was measured: "clean" or the attack, the figure in % as a string), ...)."""
        return tuple(tuple(part.split(" ", 1)[::-1]) for part in self.reported.split(" / "))

    def label(self):
        """The variant as a command tail: "fgsm_mep.py --prior batch"."""
        return " ".join((f"{self.script}.py",) + (self.flags or ()))

    def when(self):
        return ", ".join(x for x in (self.time, self.hardware and f"on {self.hardware}") if x)

    def cite(self):
        return self.source + (f"; {self.note}" if self.note else "")

    def text(self):
        """One line: "ResNet18: 84.86 clean / 53.73 PGD-10 / ..., 83 min (FGSM-SDI, TIP 2022)"."""
        when = f", {self.when()}" if self.when() else ""
        return f"{self.network}: {self.reported}{when} ({self.cite()})"


# The authors of FGSM-SDI, FGSM-PGI and LAS-AT report the checkpoint with the best PGD accuracy on the test set.
TEST_BEST = "their best checkpoint, picked on the test set"
PGD10 = VARIANTS["pgd10"][1]
SDI = "Jia et al., TIP 2022"
LAS = "Jia et al., CVPR 2022"
LU = "Lu & Kumar, arXiv:2110.14030, one-step"

# fmt: off
# (a table: one figure per entry, its fields in the order of Figure's)
FIGURES = (
    Figure("fgsm_rs", (), "cifar10", "PreActResNet18", "preact18",
           "83.81 clean / 46.06 PGD-50-10 / 43.21 AutoAttack (RobustBench, same model)",
           "about 12 min", "RTX 2080 Ti", "Wong et al., ICLR 2020"),
    Figure("fgsm_sdi", (), "cifar10", "ResNet18", None,
           "84.86 clean / 53.73 PGD-10 / 52.18 PGD-50 / 51.00 C&W / 48.50 AA",
           "83 min (FGSM-RS 51 min in the same table)", None, SDI, TEST_BEST),
    Figure("fgsm_sdi", ("--lr-schedule", "cyclic"), "cifar10", "ResNet18", None,
           "82.08 clean / 51.63 PGD-10 / 50.33 PGD-50 / 48.57 C&W / 46.21 AA",
           "23 min", None, f"{SDI}, Table VI", TEST_BEST),
    Figure("fgsm_sdi", (), "cifar100", "ResNet18", None,
           "60.67 clean / 31.5 PGD-10 / 30.6 PGD-50 / 27.15 C&W / 25.23 AA",
           "99 min", None, SDI, TEST_BEST),
    Figure("fgsm_mep", (), "cifar10", "ResNet18", None,
           "81.72 clean / 55.18 PGD-10 / 54.17 PGD-50 / 50.75 C&W / 49.00 AA",
           "73 min", None, "Jia et al., ECCV 2022 (FGSM-MEP)", TEST_BEST),
    Figure("fgsm_mep", ("--prior", "batch"), "cifar10", "ResNet18", None,
           "83.15 clean / 54.59 PGD-10 / 53.2 PGD-50 / 50.24 C&W / 47.47 AA",
           None, None, "Jia et al., ECCV 2022 (FGSM-BP)", TEST_BEST),
    Figure("fgsm_mep", ("--prior", "epoch"), "cifar10", "ResNet18", None,
           "82.75 clean / 54.8 PGD-10 / 53.27 PGD-50 / 49.86 C&W / 47.94 AA",
           None, None, "Jia et al., ECCV 2022 (FGSM-EP)", TEST_BEST),
    Figure("fgsm_mep", (), "cifar100", "ResNet18", None,
           "58.78 clean / 31.88 PGD-10 / 31.14 PGD-50 / 28.06 C&W / 25.67 AA",
           None, None, "Jia et al., ECCV 2022 (FGSM-MEP)", TEST_BEST),
    Figure("atlas", (), "cifar10", "WRN-28-8", "wrn-28-8",
           "84.52 clean / 49.01 PGD-20 / 46.55 multi-targeted / 46.16 AA",
           "0.73 s per batch vs 0.25 s for one-step ADV (2.9×)", None, LU),
    Figure("atlas", (), "cifar100", "WRN-28-8", "wrn-28-8",
           "60.98 clean / 26.30 PGD-20 / 23.42 AA", None, None, LU),
    Figure("amata", (), "cifar10", "PreActResNet18", "preact18",
           "85.52 clean / 47.62 PGD-20 / 52.94 CW", "14,309 s", "GTX 1080 Ti",
           "Ye et al., AAAI 2021"),
    Figure("amata", PGD10, "cifar10", "PreActResNet18", "preact18",
           "85.27 clean / 47.31 PGD-20 / 51.73 CW", "23,108 s", "GTX 1080 Ti",
           "Ye et al., AAAI 2021, their PGD-10 AT baseline"),
    Figure("amata", (), "mnist", "LeNet", "lenet",
           "91.47 PGD-40, step 0.01", "698 s (PGD-40 AT: 90.56% in 1,086 s)", None,
           "Ye et al., AAAI 2021, Amata(5, 40)"),
    Figure("las_at", (), "cifar10", "ResNet18", None,
           "82.00 clean / 53.53 PGD-10", "418 min (PGD-AT 261 min)", None, f"{LAS}, k = 20",
           TEST_BEST),
    Figure("las_at", ("--strategy-every", "40"), "cifar10", "ResNet18", None,
           "82.3 clean / 54.29 PGD-10 / 49.89 AA", "365 min", None,
           f"{LAS}, k = 40 (the headline row)", TEST_BEST),
    Figure("las_at", ("--strategy-every", "1"), "cifar10", "ResNet18", None,
           "82.88 clean / 53.71 PGD-10", "1378 min", None, f"{LAS}, k = 1", TEST_BEST),
    # LAS-AT's own PGD-10 AT baseline ran LAS-AT's recipe, not Amata's: it matches none of our runs.
    Figure("las_at", None, "cifar10", "ResNet18", None,
           "82.56 clean / 53.15 PGD-10", "261 min", None, f"{LAS}, their PGD-AT baseline",
           TEST_BEST),
    # Our sources do not give the k of the wide-network row.
    Figure("las_at", None, "cifar10", "WRN34-10", "wrn-34-10",
           "86.23 clean / 57.64 PGD-10 / 56.12 PGD-50 / 55.73 C&W / 53.58 AA",
           None, None, LAS, TEST_BEST),
    # The paper gives one training time (200 epochs on a V100) without naming the dataset; it is put on CIFAR-10.
    Figure("rmcla", (), "cifar10", "WRN-28-10", "wrn-28-10",
           "90.8 clean / 69.3 FGSM / 54.6 PGD-20 / 52.9 PGD-100 / 51.9 CW-100",
           "about 12 h", "V100", "Wang & Zhang, ICCV 2019, β 9"),
    Figure("rmcla", (), "cifar100", "WRN-28-10", "wrn-28-10",
           "68.7 clean / 30.5 FGSM / 23.2 PGD-20 / 22.7 PGD-100 / 20.6 CW-100",
           None, None, "Wang & Zhang, ICCV 2019, β 11"),
    # The baselines. Jia et al. do not state the schedules of their re-runs: flags None, except
    # their Table VI, whose models all train with a cyclic lr (free_at.py's default is one).
    Figure("free_at", (), "cifar10", "ResNet18", None,
           "75.22 clean / 44.67 PGD-10 / 43.72 PGD-50 / 42.48 C&W / 40.30 AA",
           "59 min", None, f"{SDI}, Table VI (cyclic lr), Free-AT (m = 8)", TEST_BEST),
    Figure("free_at", None, "cifar10", "ResNet18", None,
           "80.38 clean / 47.10 PGD-10 / 45.62 PGD-50 / 44.42 C&W / 42.17 AA",
           "215 min (FGSM-RS 51 min in the same table)", None,
           f"{SDI}, Table IV, Free-AT (m = 8)", TEST_BEST),
    Figure("free_at", ("--epsilon", "2"), "imagenet", "ResNet-50", "resnet50",
           "68.37 clean / 48.31 PGD-10 / 48.28 PGD-50", "127.7 h", None,
           f"{SDI}, Table IX, Free-AT (m = 4)"),
    Figure("free_at", (), "imagenet", "ResNet-50", "resnet50",
           "63.42 clean / 33.22 PGD-10 / 33.08 PGD-50", None, None,
           f"{SDI}, Table IX, Free-AT (m = 4), ε 4"),
    Figure("free_at", (), "imagenet", "ResNet-50", "resnet50",
           "60.57 clean / 32.1 PGD-10 / 31.3 PGD-50", "30% PGD accuracy in 1,318 min", "4 V100",
           "Ye et al., AAAI 2021, Table 3, Free (22 epochs; ε not stated, Free's is 4)"),
    Figure("free_at", ("--replays-min", "2"), "imagenet", "ResNet-50", "resnet50",
           "59.7 clean / 31.8 PGD-10 / 31.0 PGD-50", "30% PGD accuracy in 948 min", "4 V100",
           "Ye et al., AAAI 2021, Table 3, Amata+Free"),
    Figure("grad_align", None, "cifar10", "ResNet18", None,
           "83.96 clean / 49.23 PGD-10 / 46.89 PGD-50 / 47.46 C&W / 43.45 AA",
           "178 min (FGSM-RS 51 min in the same table)", None, f"{SDI}, Table IV, FGSM-GA",
           TEST_BEST),
    Figure("grad_align", None, "cifar10", "ResNet18", None,
           "80.83 clean / 48.76 PGD-10 / 47.54 PGD-50 / 47.14 C&W / 44.06 AA",
           "49 min", None, f"{SDI}, Table VI (cyclic lr), FGSM-GA", TEST_BEST),
    Figure("fgsm_ckpt", None, "cifar10", "ResNet18", None,
           "90.29 clean / 41.96 PGD-10 / 39.15 PGD-50 / 41.13 C&W / 37.15 AA",
           "76 min (FGSM-RS 51 min in the same table)", None, f"{SDI}, Table IV, FGSM-CKPT",
           TEST_BEST),
    Figure("fgsm_ckpt", None, "cifar10", "ResNet18", None,
           "89.08 clean / 40.47 PGD-10 / 37.69 PGD-50 / 39.87 C&W / 35.81 AA",
           "21 min (FGSM-RS 15 min)", None, f"{SDI}, Table VI (cyclic lr), FGSM-CKPT", TEST_BEST),
)
# fmt: on


def markdown_table():
    """The table of reported figures for the README."""
    lines = [
        "| command | dataset | network | reported (%) | training time | source |",
        "|---|---|---|---|---|---|",
    ]
    for f in FIGURES:
        command = f"`{f.label()}`" if f.flags is not None else f"({f.script}.py: recipe not stated)"
        cells = (command, f.dataset, f.network, f.reported, f.when() or "–", f.cite())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
