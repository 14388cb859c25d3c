"""Plain progress lines when stdout is not a terminal (sbatch logs, ``> log``): a real tiny training run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kangaroo_train.progress import ProgressLines, progress_lines_enabled
from tests.helpers import REPO, train_env

LINE = re.compile(
    r"train: step (\d+)/(\d+) \(([\d.]+)%\) \| loss ([\d.]+) \| top1 ([\d.]+) \| ([\d,]+) tokens/s \| "
    r"elapsed (\d+:\d\d:\d\d)(?: \| ETA (\d+:\d\d:\d\d))?$"
)


def progress_lines(text: str) -> list[re.Match]:
    """Every progress line of a log, parsed (the logging prefix before ``train:`` ignored)."""
    found = []
    for line in text.splitlines():
        if "train: step " in line:
            match = LINE.search(line)
            assert match, f"malformed progress line: {line!r}"
            found.append(match)
    return found


def test_lines_every_n_optimizer_steps_in_a_log_file(tmp_path):
    log = tmp_path / "train.log"
    env = train_env()
    command = [
        sys.executable,
        "-m",
        "kangaroo_train",
        "experiment=tiny",
        f"paths.output_dir={tmp_path / 'out'}",
        "trainer.max_steps=7",
        "trainer.accumulate_grad_batches=2",  # lines count optimizer steps, not micro-batches
        "trainer.val_check_interval=100",
        "callbacks.progress_lines.every_n_steps=3",
        "stage=train",
    ]
    with open(log, "w") as out:  # stdout is a file, as under sbatch: no terminal, so the lines are on by default
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    lines = progress_lines(text)
    # every 3 optimizer steps and the last one, each once (one process: rank 0)
    assert [(int(m[1]), int(m[2])) for m in lines] == [(3, 7), (6, 7), (7, 7)]
    for m in lines:
        assert float(m[3]) == pytest.approx(100 * int(m[1]) / 7, abs=0.05)
        assert 0 < float(m[4]) < 20 and 0 <= float(m[5]) <= 1  # loss and top-1 of the step
        assert int(m[6].replace(",", "")) > 0  # tokens/s
    assert lines[0][8] and lines[1][8] and lines[2][8] is None  # an ETA until the last step


def test_on_by_default_only_when_stdout_is_not_a_terminal(tmp_path):
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal, open(tmp_path / "log", "w") as file:
        assert not progress_lines_enabled(None, terminal)  # a terminal: the progress bar shows
        assert progress_lines_enabled(None, file)  # a file (sbatch --output, > log)
        assert progress_lines_enabled(True, terminal) and not progress_lines_enabled(False, file)  # forced
    os.close(primary)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_step_interval_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="callbacks.progress_lines.every_n_steps"):
        ProgressLines(bad)
