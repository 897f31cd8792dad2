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
    "pgd10": (
        "amata",
        ("--k-min", "10", "--k-max", "10", "--tau", "20", "--random-start"),
        "PGD-10 AT",
    ),
}


@dataclass(frozen=True)
class Figure:
    script: str  # the method script, without .py
    flags: Optional[
        Tuple[str, ...]
    ]  # the variant's flags: () = the default recipe; None = matches no run of ours
    dataset: str  # our --dataset name
    network: str  # as the paper names it
    model: Optional[str]  # our --model for that network (None: ours has no such network)
    results: Tuple[
        Tuple[str, str], ...
    ]  # (what was measured: "clean" or the attack, the figure in %)
    time: Optional[str]  # training time as reported
    hardware: Optional[str]  # the GPU the time was measured on, where the paper names it
    source: str  # paper and what in it
    note: str = ""

    def label(self):
        """The variant as a command tail: "fgsm_mep.py --prior batch"."""
        return " ".join((f"{self.script}.py",) + (self.flags or ()))

    def text(self, with_network=True):
        """One line: "ResNet18: 84.86 clean / 53.73 PGD-10 / ..., 83 min (FGSM-SDI, TIP 2022)"."""
        parts = " / ".join(f"{v} {k}" for k, v in self.results)
        when = ", ".join(x for x in (self.time, self.hardware and f"on {self.hardware}") if x)
        head = f"{self.network}: " if with_network else ""
        return f"{head}{parts}{f', {when}' if when else ''} ({self.source}{f'; {self.note}' if self.note else ''})"


# The authors of FGSM-SDI, FGSM-PGI and LAS-AT report the checkpoint with the best PGD accuracy on the test set.
TEST_BEST = "their best checkpoint, picked on the test set"

FIGURES = (
    Figure(
        "fgsm_rs",
        (),
        "cifar10",
        "PreActResNet18",
        "preact18",
        (
            ("clean", "83.81"),
            ("PGD-50-10", "46.06"),
            ("AutoAttack (RobustBench, same model)", "43.21"),
        ),
        "about 12 min",
        "RTX 2080 Ti",
        "Wong et al., ICLR 2020",
    ),
    Figure(
        "fgsm_sdi",
        (),
        "cifar10",
        "ResNet18",
        None,
        (
            ("clean", "84.86"),
            ("PGD-10", "53.73"),
            ("PGD-50", "52.18"),
            ("C&W", "51.00"),
            ("AA", "48.50"),
        ),
        "83 min (FGSM-RS 51 min in the same table)",
        None,
        "Jia et al., TIP 2022",
        TEST_BEST,
    ),
    Figure(
        "fgsm_sdi",
        ("--lr-schedule", "cyclic"),
        "cifar10",
        "ResNet18",
        None,
        (
            ("clean", "82.08"),
            ("PGD-10", "51.63"),
            ("PGD-50", "50.33"),
            ("C&W", "48.57"),
            ("AA", "46.21"),
        ),
        "23 min",
        None,
        "Jia et al., TIP 2022, Table VI",
        TEST_BEST,
    ),
    Figure(
        "fgsm_sdi",
        (),
        "cifar100",
        "ResNet18",
        None,
        (
            ("clean", "60.67"),
            ("PGD-10", "31.5"),
            ("PGD-50", "30.6"),
            ("C&W", "27.15"),
            ("AA", "25.23"),
        ),
        "99 min",
        None,
        "Jia et al., TIP 2022",
        TEST_BEST,
    ),
    Figure(
        "fgsm_mep",
        (),
        "cifar10",
        "ResNet18",
        None,
        (
            ("clean", "81.72"),
            ("PGD-10", "55.18"),
            ("PGD-50", "54.17"),
            ("C&W", "50.75"),
            ("AA", "49.00"),
        ),
        "73 min",
        None,
        "Jia et al., ECCV 2022 (FGSM-MEP)",
        TEST_BEST,
    ),
    Figure(
        "fgsm_mep",
        ("--prior", "batch"),
        "cifar10",
        "ResNet18",
        None,
        (
            ("clean", "83.15"),
            ("PGD-10", "54.59"),
            ("PGD-50", "53.2"),
            ("C&W", "50.24"),
            ("AA", "47.47"),
        ),
        None,
        None,
        "Jia et al., ECCV 2022 (FGSM-BP)",
        TEST_BEST,
    ),
    Figure(
        "fgsm_mep",
        ("--prior", "epoch"),
        "cifar10",
        "ResNet18",
        None,
        (
            ("clean", "82.75"),
            ("PGD-10", "54.8"),
            ("PGD-50", "53.27"),
            ("C&W", "49.86"),
            ("AA", "47.94"),
        ),
        None,
        None,
        "Jia et al., ECCV 2022 (FGSM-EP)",
        TEST_BEST,
    ),
    Figure(
        "fgsm_mep",
        (),
        "cifar100",
        "ResNet18",
        None,
        (
            ("clean", "58.78"),
            ("PGD-10", "31.88"),
            ("PGD-50", "31.14"),
            ("C&W", "28.06"),
            ("AA", "25.67"),
        ),
        None,
        None,
        "Jia et al., ECCV 2022 (FGSM-MEP)",
        TEST_BEST,
    ),
    Figure(
        "atlas",
        (),
        "cifar10",
        "WRN-28-8",
        "wrn-28-8",
        (("clean", "84.52"), ("PGD-20", "49.01"), ("multi-targeted", "46.55"), ("AA", "46.16")),
        "0.73 s per batch vs 0.25 s for one-step ADV (2.9×)",
        None,
        "Lu & Kumar, arXiv:2110.14030, one-step",
    ),
    Figure(
        "atlas",
        (),
        "cifar100",
        "WRN-28-8",
        "wrn-28-8",
        (("clean", "60.98"), ("PGD-20", "26.30"), ("AA", "23.42")),
        None,
        None,
        "Lu & Kumar, arXiv:2110.14030, one-step",
    ),
    Figure(
        "amata",
        (),
        "cifar10",
        "PreActResNet18",
        "preact18",
        (("clean", "85.52"), ("PGD-20", "47.62"), ("CW", "52.94")),
        "14,309 s",
        "GTX 1080 Ti",
        "Ye et al., AAAI 2021",
    ),
    Figure(
        "amata",
        VARIANTS["pgd10"][1],
        "cifar10",
        "PreActResNet18",
        "preact18",
        (("clean", "85.27"), ("PGD-20", "47.31"), ("CW", "51.73")),
        "23,108 s",
        "GTX 1080 Ti",
        "Ye et al., AAAI 2021, their PGD-10 AT baseline",
    ),
    Figure(
        "amata",
        (),
        "mnist",
        "LeNet",
        "lenet",
        (("PGD-40, step 0.01", "91.47"),),
        "698 s (PGD-40 AT: 90.56% in 1,086 s)",
        None,
        "Ye et al., AAAI 2021, Amata(5, 40)",
    ),
    Figure(
        "las_at",
        (),
        "cifar10",
        "ResNet18",
        None,
        (("clean", "82.00"), ("PGD-10", "53.53")),
        "418 min (PGD-AT 261 min)",
        None,
        "Jia et al., CVPR 2022, k = 20",
        TEST_BEST,
    ),
    Figure(
        "las_at",
        ("--strategy-every", "40"),
        "cifar10",
        "ResNet18",
        None,
        (("clean", "82.3"), ("PGD-10", "54.29"), ("AA", "49.89")),
        "365 min",
        None,
        "Jia et al., CVPR 2022, k = 40 (the headline row)",
        TEST_BEST,
    ),
    Figure(
        "las_at",
        ("--strategy-every", "1"),
        "cifar10",
        "ResNet18",
        None,
        (("clean", "82.88"), ("PGD-10", "53.71")),
        "1378 min",
        None,
        "Jia et al., CVPR 2022, k = 1",
        TEST_BEST,
    ),
    # LAS-AT's own PGD-10 AT baseline ran LAS-AT's recipe, not Amata's: it matches none of our runs.
    Figure(
        "las_at",
        None,
        "cifar10",
        "ResNet18",
        None,
        (("clean", "82.56"), ("PGD-10", "53.15")),
        "261 min",
        None,
        "Jia et al., CVPR 2022, their PGD-AT baseline",
        TEST_BEST,
    ),
    # Our sources do not give the k of the wide-network row.
    Figure(
        "las_at",
        None,
        "cifar10",
        "WRN34-10",
        "wrn-34-10",
        (
            ("clean", "86.23"),
            ("PGD-10", "57.64"),
            ("PGD-50", "56.12"),
            ("C&W", "55.73"),
            ("AA", "53.58"),
        ),
        None,
        None,
        "Jia et al., CVPR 2022",
        TEST_BEST,
    ),
    # The paper gives one training time (200 epochs on a V100) without naming the dataset; it is put on CIFAR-10.
    Figure(
        "rmcla",
        (),
        "cifar10",
        "WRN-28-10",
        "wrn-28-10",
        (
            ("clean", "90.8"),
            ("FGSM", "69.3"),
            ("PGD-20", "54.6"),
            ("PGD-100", "52.9"),
            ("CW-100", "51.9"),
        ),
        "about 12 h",
        "V100",
        "Wang & Zhang, ICCV 2019, β 9",
    ),
    Figure(
        "rmcla",
        (),
        "cifar100",
        "WRN-28-10",
        "wrn-28-10",
        (
            ("clean", "68.7"),
            ("FGSM", "30.5"),
            ("PGD-20", "23.2"),
            ("PGD-100", "22.7"),
            ("CW-100", "20.6"),
        ),
        None,
        None,
        "Wang & Zhang, ICCV 2019, β 11",
    ),
)


def markdown_table():
    """The table of reported figures for the README."""
    lines = [
        "| command | dataset | network | reported (%) | training time | source |",
        "|---|---|---|---|---|---|",
    ]
    for f in FIGURES:
        command = f"`{f.label()}`" if f.flags is not None else f"({f.script}.py: recipe not stated)"
        results = " / ".join(f"{v} {k}" for k, v in f.results)
        time = ", ".join(x for x in (f.time, f.hardware and f"on {f.hardware}") if x) or "–"
        lines.append(
            f"| {command} | {f.dataset} | {f.network} | {results} | {time} | "
            f"{f.source}{f'; {f.note}' if f.note else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
