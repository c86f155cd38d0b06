"""Time to accuracy of the CPU recipes: wall time of `leuko fit` until validation balanced accuracy reaches a target.

    python benchmarks/time_to_accuracy.py                       # every conf/experiment/phantoms_*.yaml, target 0.90
    python benchmarks/time_to_accuracy.py --recipes phantoms_tiny phantoms_vit --json tta.json
    python benchmarks/time_to_accuracy.py --recipes conf/experiment/phantoms_tiny.yaml --max-epochs 12
    python benchmarks/time_to_accuracy.py --recipes phantoms_tiny --repeats 2 \\
        --variants "base:" "bs32:--data.batch_size 32 --model.lr 0.006" "nw0:--data.num_workers 0"

Each row is one `leuko fit --config RECIPE --data.fold FOLD --tracking.enabled false` in a fresh process
with OMP_NUM_THREADS=--threads (and torch.set_num_threads), on the recipe's prepared data (run
`make data prepared` first for the default cohort). Its clock starts just before the process starts, so
Python, torch and Lightning start-up, the sanity check, validation and checkpoint writing all count.
Columns:
  target s      seconds from the start to the end of the first epoch whose validation balanced
                accuracy is >= --target (the validation of that epoch included); "-" if never
  epoch         that epoch, counted from 1
  best          the highest validation balanced accuracy of the fit, and (@) its epoch
  total s       the whole fit, process exit included
  target cpu s  CPU seconds (all threads and data-loader workers) until that epoch: on a shared machine
                this moves far less with the load than wall time
  cpu s         CPU seconds of the whole fit
  volumes/s     training volumes per second of the training phases (loading, augmentation, steps;
                not validation)
  x first       target s (and target cpu s) over that of the first row of the same repeat: list the
                reference recipe (or variant) first

--variants NAME:ARGS adds leuko fit arguments to every recipe (rows = repeats x recipes x variants, run in
that order, so the variants of one repeat run side by side under the same machine load). Timings on a shared
machine move by tens of percent between runs: compare within one run, and use --repeats for the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "conf" / "experiment"
MONITOR = "val/balanced_accuracy"


class EpochClock(Callback):
    """Appends one JSON line per validated epoch to `log`: wall clock, val balanced accuracy, training volumes/s.

    Loaded by the `leuko fit` process from this file (PYTHONPATH=benchmarks). With stop_at_target, the fit
    stops after the first epoch at or above target (for quick screening; best and total then mean little).
    """

    def __init__(self, log: str, target: float = 0.9, threads: int = 0, stop_at_target: bool = False):
        self.log_path, self.target, self.threads, self.stop_at_target = Path(log), target, threads, stop_at_target
        self._train_start = 0.0
        self._volumes = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch  # already imported by the fit: costs nothing

        if self.threads:
            torch.set_num_threads(self.threads)
        self._write({"net": pl_module.hparams.net, "threads": torch.get_num_threads(), "time": time.time()})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._train_start, self._volumes = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._volumes += len(batch["label"])

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._train_start:
            self._train_seconds = time.perf_counter() - self._train_start

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or MONITOR not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[MONITOR])
        self._write(
            {
                "epoch": trainer.current_epoch + 1,
                "time": time.time(),
                "score": score,
                "train_volumes": self._volumes,
                "train_seconds": getattr(self, "_train_seconds", 0.0),
                "cpu": cpu_seconds(),
            }
        )
        if self.stop_at_target and score >= self.target:
            trainer.should_stop = True

    def _write(self, record: dict) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def cpu_seconds() -> float:
    """CPU seconds of this process, its live children (data-loader workers) and its finished ones."""
    import psutil  # an mlflow dependency; only the fit process needs it

    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        # a child that ended in between: its time is in children_* once reaped
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def recipe_path(spec: str) -> Path:
    """A YAML path, or a name under conf/experiment/ (phantoms_tiny -> conf/experiment/phantoms_tiny.yaml)."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        path = EXPERIMENTS / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(EXPERIMENTS.glob("*.yaml")))
        raise SystemExit(f"time_to_accuracy: recipe {spec!r}: no file {path}; known recipes: {known}")
    return path


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'NAME:ARGS' -> (NAME, shell-split ARGS); a bare 'NAME' adds nothing."""
    name, _, args = spec.partition(":")
    if not name.strip():
        raise SystemExit(f"time_to_accuracy: --variants {spec!r} needs a name before ':' (e.g. 'bs32:--data...')")
    return name.strip(), shlex.split(args)


def fit_command(recipe: Path, args: argparse.Namespace, extra: list[str], clock: Path, root: Path) -> list[str]:
    cmd = [sys.executable, "-m", "leuko.cli", "fit", "--config", str(recipe)]
    # `+=` appends the clock to the recipe's own callbacks (leuko still adds its default checkpoints)
    cmd += ["--trainer.callbacks+=time_to_accuracy.EpochClock", "--trainer.callbacks.log", str(clock)]
    cmd += ["--trainer.callbacks.target", str(args.target), "--trainer.callbacks.threads", str(args.threads)]
    cmd += ["--trainer.callbacks.stop_at_target", str(args.stop_at_target).lower()]
    cmd += ["--data.fold", str(args.fold), "--tracking.enabled", "false", "--trainer.default_root_dir", str(root)]
    cmd += ["--trainer.enable_progress_bar", "false"]
    if args.max_epochs:
        cmd += ["--trainer.max_epochs", str(args.max_epochs)]
    return cmd + extra


def run_fit(recipe: Path, variant: tuple[str, list[str]], args: argparse.Namespace) -> dict:
    """One `leuko fit` in a fresh process; its row of the table (plus per-epoch scores)."""
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        root, clock = Path(tmp), Path(tmp) / "clock.jsonl"
        cmd = fit_command(recipe, args, variant[1], clock, root)
        print(f"[{recipe.stem}/{variant[0]}] {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
        start, cpu_before = time.time(), _children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        total, cpu = time.time() - start, _children_cpu() - cpu_before
        records = [json.loads(line) for line in clock.read_text().splitlines()] if clock.exists() else []
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"time_to_accuracy: {recipe.stem}/{variant[0]} failed (exit {proc.returncode}):\n{tail}")
    row = summarise(recipe.stem, variant[0], records, start=start, total=total, target=args.target)
    return row | {"cpu_s": round(cpu, 1)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarise(recipe: str, variant: str, records: list[dict], *, start: float, total: float, target: float) -> dict:
    head = next((r for r in records if "net" in r), {})
    epochs = [r for r in records if "epoch" in r]
    hit = next((r for r in epochs if r["score"] >= target), None)
    best = max(epochs, key=lambda r: r["score"], default=None)
    volumes = sum(r["train_volumes"] for r in epochs)
    seconds = sum(r["train_seconds"] for r in epochs)
    return {
        "recipe": recipe,
        "variant": variant,
        "net": head.get("net", "?"),
        "threads": head.get("threads"),
        "setup_s": round(head["time"] - start, 1) if head else None,
        "target_s": round(hit["time"] - start, 1) if hit else None,
        "target_cpu_s": round(hit["cpu"], 1) if hit else None,
        "epoch": hit["epoch"] if hit else None,
        "best": round(best["score"], 3) if best else None,
        "best_epoch": best["epoch"] if best else None,
        "total_s": round(total, 1),
        "volumes_per_s": round(volumes / seconds, 1) if seconds else None,
        "scores": [round(r["score"], 3) for r in epochs],
    }


def add_ratios(rows: list[dict]) -> None:
    """x_first (x_first_cpu): target s (target cpu s) over that of the first row of the same repeat."""
    for field, ratio in (("target_s", "x_first"), ("target_cpu_s", "x_first_cpu")):
        firsts: dict[int, float | None] = {}
        for row in rows:
            first = firsts.setdefault(row["repeat"], row[field])
            row[ratio] = round(row[field] / first, 2) if first and row[field] else None


def print_table(rows: list[dict], target: float) -> None:
    cols = {
        "recipe": "recipe",
        "variant": "variant",
        "net": "net",
        "target_s": f"target {target:.2f} s",
        "epoch": "epoch",
        "x_first": "x first",
        "best": "best bal. acc",
        "total_s": "total s",
        "volumes_per_s": "volumes/s",
        "target_cpu_s": "target cpu s",
        "x_first_cpu": "x first cpu",
        "cpu_s": "cpu s",
    }
    show = [k for k in cols if k != "variant" or any(r["variant"] for r in rows)]
    cells = [[_cell(r, k) for k in show] for r in rows]
    print("| " + " | ".join(cols[k] for k in show) + " |")
    print("|" + "|".join("---" if k in ("recipe", "variant", "net") else "---:" for k in show) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "best" and value is not None:
        return f"{value:.3f} @{row['best_epoch']}"
    return "-" if value is None else str(value)


def medians(rows: list[dict]) -> list[dict]:
    """One row per (recipe, variant): the median over repeats; target s only over the repeats that reached it."""
    out = []
    for key in dict.fromkeys((r["recipe"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["recipe"], r["variant"]) == key]
        row = dict(group[0], repeat="median")
        for field in ("target_s", "epoch", "best", "total_s", "volumes_per_s", "target_cpu_s", "cpu_s"):
            values = [r[field] for r in group if r[field] is not None]
            row[field] = round(statistics.median(values), 3 if field == "best" else 1) if values else None
        for field in ("x_first", "x_first_cpu"):
            values = [r[field] for r in group if r[field] is not None]
            row[field] = round(statistics.median(values), 2) if values else None
        row["best_epoch"] = "/".join(str(r["best_epoch"]) for r in group)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", help="YAML files or names in conf/experiment/ (default phantoms_*)")
    parser.add_argument("--target", type=float, default=0.90, help="validation balanced accuracy (default 0.90)")
    parser.add_argument("--max-epochs", type=int, help="override trainer.max_epochs (default: the recipe's)")
    parser.add_argument("--json", type=Path, help="write the rows, with per-epoch scores, to this JSON file")
    parser.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS and torch threads (default 2)")
    parser.add_argument("--variants", nargs="+", default=[""], help="NAME:ARGS, leuko fit arguments per variant")
    parser.add_argument("--repeats", type=int, default=1, help="run every recipe x variant this often (default 1)")
    parser.add_argument("--stop-at-target", action="store_true", help="end each fit at the target (screening)")
    args = parser.parse_args(argv)
    recipes = [recipe_path(s) for s in args.recipes] if args.recipes else sorted(EXPERIMENTS.glob("phantoms_*.yaml"))
    variants = [parse_variant(v) if v else ("", []) for v in args.variants]
    rows = []
    for repeat in range(args.repeats):
        for recipe in recipes:
            for variant in variants:
                rows.append(run_fit(recipe, variant, args) | {"repeat": repeat})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    add_ratios(rows)
    print(f"\nfold {args.fold}, {args.threads} threads, target {args.target:.2f}, load average {_load()}\n")
    print_table(rows, args.target)
    if args.repeats > 1:
        print(f"\nmedian of {args.repeats} repeats\n")
        print_table(medians(rows), args.target)
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "fold": args.fold, "rows": rows}, indent=1))


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
