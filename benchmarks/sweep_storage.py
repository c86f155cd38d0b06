"""Sweep throughput by study storage: the same small sweep on a journal file and on a PostgreSQL server.

    python benchmarks/sweep_storage.py                          # 3 workers, 6 trials of 2 epochs, both storages
    python benchmarks/sweep_storage.py --workers 2 --trials 8 --epochs 4
    python benchmarks/sweep_storage.py --storages postgres --keep /tmp/sweep_storage

A tiny phantom cohort (6 patients x 10 cells of 16^3, the tests' cohort) is made and prepared in a
temporary folder; the sweep is the tests' one too (ViT tiny, one fold per trial, learning rate and
dropout sampled, MLflow off). For each storage, `leuko sweep --workers N` runs as a fresh command,
one storage after the other, each on a new study:

    journal    sweeps/<study>.journal, a file (the default storage)
    postgres   a PostgreSQL server started on loopback for the run (tests/helpers/postgres.py; `make setup`
               installs Debian's postgresql package), its database created empty

The wall time is that of the whole command (start-up, config check and the workers' imports included);
trials per minute counts COMPLETE trials over it. "mean trial s" is the mean duration of a trial as the
study records it (start to finish). Prints a markdown table; the numbers are wall-clock seconds on
whatever machine runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
# The PostgreSQL server and the tiny sweep files are the tests' own (tests/helpers, which pytest puts on its path).
sys.path.insert(0, str(REPO / "tests"))

from helpers.postgres import postgres_server
from helpers.sweep import env_with, write_base, write_space
from leuko.data.phantoms import make_cohort
from leuko.data.prepare import prepare
from leuko.sweep.study import open_storage

STORAGES = ("journal", "postgres")


def tiny_cohort(folder: Path) -> Path:
    """The tests' cohort, prepared at 16^3: the prepared folder."""
    manifest = make_cohort(folder / "data", n_patients=6, cells_per_patient=10, shape=(16, 16, 16), progress=False)
    prepare(manifest, folder / "prepared", shape=(16, 16, 16), progress=False)
    return folder / "prepared"


def run_sweep(folder: Path, space: Path, study: str, url: str, trials: int, workers: int) -> dict:
    """`leuko sweep` as a command; its wall time and the study's trials."""
    cmd = [sys.executable, "-m", "leuko.cli", "sweep", "--space", str(space), "--trials", str(trials)]
    cmd += ["--workers", str(workers), "--storage", url, "--out", str(folder / "sweeps")]
    log = folder / f"{study}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env_with()).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} ended with exit code {code}; log: {log}\n" + log.read_text()[-3000:])
    done = optuna.load_study(study_name=study, storage=open_storage(url)).get_trials(states=(TrialState.COMPLETE,))
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return {"wall": wall, "complete": len(done), "trial_s": sum(took) / max(len(took), 1)}


@contextlib.contextmanager
def storage_url(kind: str, folder: Path):
    """The storage of one benchmark row: a journal file in folder, or a database on a fresh server."""
    if kind == "journal":
        yield str(folder / "sweeps" / "bench_journal.journal")
    else:
        with postgres_server("sweep_bench") as url:
            yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    parser.add_argument("--workers", type=int, default=3, help="worker processes per sweep (default 3)")
    parser.add_argument("--trials", type=int, default=None, help="trials per sweep (default 2 per worker)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    parser.add_argument(
        "--storages", default=",".join(STORAGES), help=f"comma-separated, of {', '.join(STORAGES)} (default both)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp one)")
    args = parser.parse_args(argv)
    kinds = [s.strip() for s in args.storages.split(",") if s.strip()]
    if not kinds or set(kinds) - set(STORAGES):
        parser.error(f"--storages {args.storages}: choose from {', '.join(STORAGES)}")
    trials = 2 * args.workers if args.trials is None else args.trials
    folder = Path(args.keep or tempfile.mkdtemp(prefix="leuko-sweep-storage-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        prepared = tiny_cohort(folder)
        base = write_base(folder, prepared, max_epochs=args.epochs)
        rows = []
        for kind in kinds:
            study = f"bench_{kind}"
            fixed = {"tracking.enabled": False, "trainer.logger": False}
            space = write_space(folder, base, study=study, name=f"{study}.yaml", fixed=fixed)
            with storage_url(kind, folder) as url:
                print(f"{kind}: {trials} trials on {args.workers} workers ...", file=sys.stderr, flush=True)
                rows.append((kind, run_sweep(folder, space, study, url, trials, args.workers)))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nsweep of {trials} trials x {args.epochs} epochs on the tiny phantom cohort, {os.cpu_count()} cores\n")
    print("| storage | workers | trials | wall s | trials per minute | mean trial s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, r in rows:
        rate = 60 * r["complete"] / r["wall"]
        print(f"| {kind} | {args.workers} | {r['complete']} | {r['wall']:.1f} | {rate:.1f} | {r['trial_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
