"""Progress: a bar on a terminal, a few plain lines in a log file."""

import io

from helpers.cells import write_cohort
from leuko.data.phantoms import make_cohort
from leuko.data.prepare import prepare
from leuko.data.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_bounded_number_of_plain_lines():
    log = io.StringIO()
    assert sum(progress(range(10_000), total=10_000, desc="prepare", file=log)) == sum(range(10_000))
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 12, lines
    assert lines[0].startswith("prepare: ") and lines[-1].startswith("prepare: 10000/10000 (100%)")


def test_a_terminal_gets_a_bar_and_disabled_prints_nothing():
    tty = Terminal()
    list(progress(range(50), total=50, desc="features", file=tty))
    assert "\r" in tty.getvalue() and "features" in tty.getvalue()
    quiet = io.StringIO()
    list(progress(range(50), total=50, desc="features", enabled=False, file=quiet))
    assert quiet.getvalue() == ""


def test_update_and_write_between_lines():
    log = io.StringIO()
    with progress(total=3, desc="phantom cells", unit="cell", file=log) as bar:
        bar.update(1)
        bar.write("skipped c1: unreadable")
        bar.update(2)
    lines = log.getvalue().splitlines()
    assert "skipped c1: unreadable" in lines and lines[-1].startswith("phantom cells: 3/3 cells (100%)")
    assert "\r" not in log.getvalue()


def test_prepare_and_phantoms_write_plain_lines_to_a_log(tmp_path, capsys):
    make_cohort(tmp_path / "c", n_patients=2, cells_per_patient=30, shape=(16, 16, 16), progress=True)
    prepare(write_cohort(tmp_path / "raw", 40), tmp_path / "prep", shape=(8, 8, 8), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert 2 <= sum(line.startswith("phantom cells: ") for line in err.splitlines()) <= 12
    assert 2 <= sum(line.startswith("prepare: ") for line in err.splitlines()) <= 12
