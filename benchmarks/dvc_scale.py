"""DVC at scale: one file per cell versus a few packed shards, for a cohort of tens of thousands of cells.

    python benchmarks/dvc_scale.py                       # 20,000 cells of 16^3 float32 (16 KB each, ~330 MB)
    python benchmarks/dvc_scale.py --cells 50000 --shard-cells 2000 --keep /tmp/dvc_scale

For each layout, in its own fresh git + DVC repository with a local remote, it times what a user runs:
`dvc add data` (hash every file, copy into the cache), `dvc status` with nothing changed, `dvc status` and
`dvc add` after one cell changed, `dvc push`, and `dvc pull` into an empty workspace and cache (a new clone).
--cache-type hardlink,symlink measures DVC's
link cache types, which let checkout and pull link files from the cache instead of copying them.

    per-file   data/volumes/<patient>/<cell>.npy + manifest.csv   (what `leuko phantoms` and most microscopes write)
    packed     data/shards/shard_<i>.npy, each (n, 1, D, H, W)    (the same cells, --shard-cells per file)

The voxel values are seeded noise: DVC's cost depends on the number and size of files, not their content.
Prints a markdown table; the numbers are wall-clock seconds on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent  # the environment's dvc, next to this python


def sh(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout}\n{done.stderr}")
    return elapsed, done.stdout


def write_per_file(data: Path, cells: int, shape: tuple[int, int, int], seed: int) -> int:
    rng = np.random.default_rng(seed)
    per_patient = 500
    rows = ["cell_id,path"]
    for i in range(cells):
        patient = f"P{i // per_patient:03d}"
        rel = f"volumes/{patient}/{patient}_C{i % per_patient + 1:04d}.npy"
        path = data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal((1, *shape), dtype=np.float32))
        rows.append(f"{patient}_C{i % per_patient + 1:04d},{rel}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    return cells + 1


def write_packed(data: Path, cells: int, shape: tuple[int, int, int], seed: int, shard_cells: int) -> int:
    rng = np.random.default_rng(seed)
    (data / "shards").mkdir(parents=True)
    rows = ["cell_id,shard,row"]
    n_shards = 0
    for start in range(0, cells, shard_cells):
        n = min(shard_cells, cells - start)
        np.save(data / "shards" / f"shard_{n_shards:04d}.npy", rng.standard_normal((n, 1, *shape), dtype=np.float32))
        rows += [f"C{start + j:06d},shards/shard_{n_shards:04d}.npy,{j}" for j in range(n)]
        n_shards += 1
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    return n_shards + 1


def touch_one(data: Path, layout: str, seed: int) -> None:
    """Change the content of one cell (per-file: its file; packed: its shard is rewritten)."""
    rng = np.random.default_rng(seed + 1)
    if layout == "per-file":
        path = sorted((data / "volumes").iterdir())[0]
        path = sorted(path.iterdir())[0]
        np.save(path, rng.standard_normal(np.load(path).shape, dtype=np.float32))
    else:
        path = data / "shards" / "shard_0000.npy"
        shard = np.load(path)
        shard[0] = rng.standard_normal(shard.shape[1:], dtype=np.float32)
        np.save(path, shard)


def run_layout(root: Path, layout: str, cells: int, shape, shard_cells: int, seed: int, cache_type: str | None) -> dict:
    repo = root / layout
    remote = root / f"{layout}-remote"
    repo.mkdir(parents=True)
    sh(["git", "init", "-q"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["dvc", "remote", "add", "-d", "local", str(remote)], repo)
    if cache_type:
        sh(["dvc", "config", "cache.type", cache_type], repo)
    start = time.perf_counter()
    if layout == "per-file":
        n_files = write_per_file(repo / "data", cells, shape, seed)
    else:
        n_files = write_packed(repo / "data", cells, shape, seed, shard_cells)
    result = {
        "layout": layout + (f" ({cache_type})" if cache_type else ""),
        "files": n_files,
        "write": time.perf_counter() - start,
    }
    result["add"], _ = sh(["dvc", "add", "data"], repo)
    result["status"], out = sh(["dvc", "status"], repo)
    assert "up to date" in out, out
    result["status_again"], _ = sh(["dvc", "status"], repo)
    touch_one(repo / "data", layout, seed)
    result["status_1_changed"], out = sh(["dvc", "status"], repo)
    assert "modified" in out, out
    result["add_1_changed"], _ = sh(["dvc", "add", "data"], repo)
    result["push"], _ = sh(["dvc", "push", "-q"], repo)
    # a new clone: no workspace data, no cache
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    result["pull"], _ = sh(["dvc", "pull", "-q"], repo)
    result["status_after_pull"], out = sh(["dvc", "status"], repo)
    assert "up to date" in out, out
    shutil.rmtree(remote, ignore_errors=True)
    return result


COLUMNS = [
    ("layout", "layout", "{}"),
    ("files", "files", "{:,}"),
    ("add", "`dvc add` (s)", "{:.1f}"),
    ("status", "`dvc status`, no change (s)", "{:.1f}"),
    ("status_again", "again (s)", "{:.1f}"),
    ("status_1_changed", "`dvc status`, 1 cell changed (s)", "{:.1f}"),
    ("add_1_changed", "`dvc add`, 1 cell changed (s)", "{:.1f}"),
    ("push", "`dvc push` (s)", "{:.1f}"),
    ("pull", "`dvc pull`, new clone (s)", "{:.1f}"),
]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--shape", type=int, default=16, help="cube side in voxels (default 16: 16 KB per cell)")
    parser.add_argument("--shard-cells", type=int, default=1000, help="cells per shard in the packed layout")
    parser.add_argument("--layouts", default="per-file,packed")
    parser.add_argument(
        "--cache-type", default=None, help="dvc config cache.type, e.g. hardlink,symlink (default: DVC's)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="leuko-dvc-scale-"))
    shape = (args.shape,) * 3
    startup, version = sh(["dvc", "--version"], Path.cwd())  # the fixed cost in every number below
    mb = args.cells * (4 * args.shape**3 + 128) / 1e6
    print(
        f"{args.cells:,} cells of {args.shape}^3 float32 ({mb:,.0f} MB), dvc {version.strip()}, {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    results = []
    try:
        for layout in args.layouts.split(","):
            print(f"{layout} ...", file=sys.stderr, flush=True)
            results.append(run_layout(root, layout, args.cells, shape, args.shard_cells, args.seed, args.cache_type))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    print(f"\n`dvc --version` alone: {startup:.1f} s (the start-up cost inside every number above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
