"""The layout the README promises: ruff's formatter and linter pass with the repository's pyproject.toml,
and every line of code (docstrings and comments aside) is at most 100 columns."""

import glob
import io
import os
import subprocess
import sys
import tokenize

from conftest import ROOT

CODE_WIDTH = 100


def python_files():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
    return sorted(files + glob.glob(os.path.join(ROOT, "tests", "*.py")))


def code_columns(source):
    """Per line number, the columns its code takes: tokens other than comments and docstrings."""
    widths = {}
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        docstring = tok.type == tokenize.STRING and previous in (
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.NL,
        )
        layout = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type not in layout and tok.type != tokenize.ENDMARKER and not docstring:
            for row in range(tok.start[0], tok.end[0] + 1):
                end = tok.end[1] if row == tok.end[0] else len(source.splitlines()[row - 1])
                widths[row] = max(widths.get(row, 0), end)
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok.type
    return widths


def test_code_lines_are_at_most_100_columns():
    long = []
    for path in python_files():
        with open(path, encoding="utf-8") as f:
            widths = code_columns(f.read())
        long += [f"{os.path.relpath(path, ROOT)}:{n}" for n, w in widths.items() if w > CODE_WIDTH]
    assert not long, f"code past {CODE_WIDTH} columns: {', '.join(long)}"


def test_the_columns_counter_sees_code_and_skips_docstrings_and_comments():
    source = f'def f():\n    """{"d" * 150}"""\n    # {"c" * 150}\n    return {"x" * 120}\n'
    assert code_columns(source) == {1: 8, 4: 131}


def test_ruff_format_and_check_pass():
    for command in (["format", "--check", "."], ["check", "."]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
