"""Speed of training, inference, augmentation and data loading, with FLOPs and model FLOPs utilisation.

    python benchmarks/speed.py --device cuda --json speed_cuda.json   # a GPU: every net, both shapes, every mode
    python benchmarks/speed.py --json speed_cpu.json                  # CPU: short defaults, no compile (~30 min)
    python benchmarks/speed.py --tiny                                  # the _tiny nets: checks that it all runs
    python benchmarks/speed.py --nets fishnet3d --shapes 48x96x96 --modes fp32,bf16 --skip augment,loader

Nets (--nets) at each shape (--shapes), one row per mode (--modes):
  fp32           the baseline: float32, contiguous (NCDHW) tensors, eager;
  bf16           bf16 autocast (what `precision: bf16-mixed` does), alone;
  channels_last  channels_last_3d weights and input (VolumeClassifier(channels_last=True)), alone;
  compile        torch.compile of the net (VolumeClassifier(compile=True)), alone;
  all            every other mode named in --modes at once.
Each row times a training step (forward, cross-entropy, backward, AdamW step; no host sync inside) and
inference (eval, inference_mode). FLOPs per volume are counted by torch.utils.flop_counter on one forward
at batch 1 (training = 3x forward); MFU is achieved training FLOP/s over the bf16 matrix-multiply peak
measured at the start of the same run. Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU
the rise of the process's resident set (Linux VmHWM after resetting it through /proc/self/clear_refs)
over the RSS before the model was built.

Then: leuko's batched augmentation against MONAI's per-volume pipeline (the transforms of
benchmarks/augment.py), data loading from a synthetic prepared memmap with LeukoDataModule's train loader
at each --workers count, and the whole input pipeline (loader -> device -> augmentation -> training step)
against the training step alone on a batch already on the device; their time ratio is the share of time
the device computes (on CUDA also measured with torch.profiler as kernel time over wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# this folder's scripts import each other when run as `python benchmarks/speed.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from augment import _monai_pipeline, _parse_shape
from augment import _time as _median_seconds
from nets_table import count as count_flops

from leuko.data.augment import BatchAugment
from leuko.data.datamodule import LeukoDataModule
from leuko.data.optics import DEFAULT_CLASSES
from leuko.data.prepared import INDEX, META, VOLUMES
from leuko.training.module import VolumeClassifier

FULL_NETS = ("resnet3d_50", "vit3d", "fishnet3d")
TOGGLES = ("bf16", "channels_last", "compile")
MODES = ("fp32", *TOGGLES, "all")
# benchmarks/augment.py's strengths: moderate, the ones the tests call plausible for cells
AUGMENT = dict(elastic=2.0, crop=0.1, noise=0.05, flip=0.5)
GIB = 2**30

# Short on the CPU, where one ResNet3D-50 training step at 48x96x96 takes tens of seconds per volume (the
# default CPU run took about 30 minutes on 2 busy cores); long enough on a GPU for steady state. compile is off
# on the CPU by default: compiling forward and backward of a full-size net takes minutes there.
DEFAULTS = {
    "cpu": dict(
        batch=1,
        infer_batch=2,
        steps=1,
        warmup=1,
        modes="fp32,bf16,channels_last,all",
        aug_batch=8,
        workers="0,1,2",
        loader_cells=256,
        peak_size=2048,
    ),
    "cuda": dict(
        batch=16,
        infer_batch=128,
        steps=20,
        warmup=5,
        modes="fp32,bf16,channels_last,compile,all",
        aug_batch=64,
        workers="0,2,4,8",
        loader_cells=1024,
        peak_size=8192,
    ),
}

# ---------------------------------------------------------------- timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds for n calls of fn, fn's device work included.

    On a GPU: CUDA events around all n calls back to back (steady state, nothing waits in between). On the
    CPU: n times the median call, so that a burst of other processes during one call does not set the result.
    """
    if n == 0:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n * float(np.median(times))


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU; on the CPU the rise of the resident set above
    `baseline` bytes (VmHWM, reset through /proc/self/clear_refs; where that is not possible, ru_maxrss,
    which only shows new highs of the whole process)."""

    def __init__(self, device: torch.device, baseline: int = 0) -> None:
        self.device = device
        self.baseline = baseline
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "rss"

    @staticmethod
    def rss() -> int:
        kib = _proc_status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM - RSS before the model (clear_refs)"
        except OSError:
            self.method = "ru_maxrss - RSS before the model (a lower bound)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        kib = _proc_status_kib("VmHWM")
        if kib is None:
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(kib * 1024 - self.baseline, 0)


def _free(device: torch.device, *, collect: bool = True) -> None:
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform == "linux":
        # hand freed heap back to the OS, so that the next row's RSS baseline is not inflated by this one's
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------- peak FLOP/s


def matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matrix multiply in dtype: the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    step = lambda: torch.matmul(a, b, out=out)
    time_loop(step, 2, device)  # warm-up: kernel selection, clocks
    seconds = min(time_loop(step, 1, device) for _ in range(repeats))
    return 2 * n**3 / seconds


# ---------------------------------------------------------------- nets


def mode_toggles(mode: str, modes: list[str]) -> dict[str, bool]:
    """bf16 / channels_last / compile for a mode; "all" switches on every toggle named in `modes`."""
    if mode == "all":
        return {t: t in modes for t in TOGGLES}
    return {t: t == mode for t in TOGGLES}


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def build_model(
    net: str,
    shape: tuple[int, int, int],
    *,
    in_channels: int,
    num_classes: int,
    channels_last: bool,
    compile: bool,
    device: torch.device,
) -> VolumeClassifier:
    """The classifier exactly as training builds it (its forward applies channels_last to the input)."""
    model = VolumeClassifier(
        net=net,
        in_channels=in_channels,
        num_classes=num_classes,
        input_shape=shape,
        channels_last=channels_last,
        compile=compile,
    )
    return model.to(device)


def make_train_step(
    model: VolumeClassifier,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    bf16: bool,
    augment: BatchAugment | None = None,
    batches: Iterator[dict] | None = None,
) -> Callable[[], None]:
    """One optimisation step, as Lightning runs it (autocast around forward and loss; backward and the
    optimizer outside). With `batches`, each step takes the next loader batch, moves it with
    non_blocking=True (pinned memory) and augments it on the device first. Nothing here waits for the device.
    """
    device = x.device

    def step() -> None:
        volume, labels = x, y
        if batches is not None:
            batch = next(batches)
            volume = batch["volume"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
        if augment is not None:
            volume = augment(volume)
        with _autocast(device, bf16):
            logits = model(volume)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_net(
    net: str,
    shape: tuple[int, int, int],
    mode: str,
    *,
    modes: list[str],
    device: torch.device,
    batch: int,
    infer_batch: int,
    steps: int,
    warmup: int,
    in_channels: int = 1,
    num_classes: int = 4,
    peak_bf16: float | None = None,
    flops: tuple[int, int] | None = None,
) -> dict:
    """Training and inference throughput, peak memory, FLOPs and MFU of one net at one shape in one mode."""
    toggles = mode_toggles(mode, modes)
    params, fwd_flops = flops or count_flops(net, shape=shape, in_channels=in_channels, num_classes=num_classes)
    row: dict = {
        "net": net,
        "shape": "x".join(map(str, shape)),
        "mode": mode,
        **toggles,
        "batch": batch,
        "infer_batch": infer_batch,
        "steps": steps,
        "params_m": params / 1e6,
        "fwd_gflop_per_volume": fwd_flops / 1e9,
    }
    _free(device)  # whatever an earlier row (or its exception) still held
    memory = PeakMemory(device, baseline=PeakMemory.rss())
    model = optimizer = None
    try:
        torch.manual_seed(0)
        model = build_model(
            net,
            shape,
            in_channels=in_channels,
            num_classes=num_classes,
            channels_last=toggles["channels_last"],
            compile=toggles["compile"],
            device=device,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        x = torch.randn(batch, in_channels, *shape, device=device)  # (B, C, D, H, W)
        y = torch.randint(0, num_classes, (batch,), device=device)
        step = make_train_step(model.train(), optimizer, x, y, bf16=toggles["bf16"])

        memory.reset()
        start = time.perf_counter()
        step()  # the first step pays for compilation, cuDNN autotuning and allocator growth
        _sync(device)
        row["first_step_s"] = time.perf_counter() - start
        time_loop(step, max(warmup - 1, 0), device)
        seconds = time_loop(step, steps, device)
        row["train_peak_mem_gib"] = memory.peak() / GIB
        row["train_volumes_per_s"] = batch * steps / seconds
        row["train_tflops"] = 3 * fwd_flops * row["train_volumes_per_s"] / 1e12
        if peak_bf16:
            row["mfu"] = row["train_tflops"] * 1e12 / peak_bf16

        del optimizer, step
        optimizer = None
        model.zero_grad(set_to_none=True)
        model.eval()
        _free(device, collect=False)  # nothing here is in a reference cycle: dropping the references freed it
        xi = torch.randn(infer_batch, in_channels, *shape, device=device)

        def infer() -> None:
            with torch.inference_mode(), _autocast(device, toggles["bf16"]):
                model(xi)

        memory.reset()
        time_loop(infer, max(warmup, 1), device)
        seconds = time_loop(infer, steps, device)
        row["infer_peak_mem_gib"] = memory.peak() / GIB
        row["infer_cells_per_s"] = infer_batch * steps / seconds
        row["infer_tflops"] = fwd_flops * row["infer_cells_per_s"] / 1e12
    except torch.OutOfMemoryError:
        row["error"] = f"out of memory (batch {batch}, inference batch {infer_batch}); lower --batch/--infer-batch"
    except Exception as exc:  # one failing row (say, a compiler error) must not lose the rest of the table
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        del optimizer
        model = None  # drop the reference (infer() closes over model, so no del)
        if toggles["compile"]:
            torch._dynamo.reset()
        _free(device)
    row["memory_method"] = memory.method
    return row


def add_speedups(rows: list[dict]) -> None:
    """Each row's throughput relative to the fp32 row of the same net and shape."""
    base = {(r["net"], r["shape"]): r for r in rows if r["mode"] == "fp32" and "error" not in r}
    for r in rows:
        b = base.get((r["net"], r["shape"]))
        for key, out in (("train_volumes_per_s", "train_speedup"), ("infer_cells_per_s", "infer_speedup")):
            if b is not None and key in r:
                r[out] = r[key] / b[key]


# ---------------------------------------------------------------- augmentation


def bench_augment(
    device: torch.device,
    shape: tuple[int, int, int],
    *,
    batch: int,
    warmup: int,
    repeats: int,
    monai: bool = True,
    in_channels: int = 1,
) -> list[dict]:
    """leuko's BatchAugment on the whole batch against MONAI's transforms one volume at a time."""
    torch.manual_seed(0)
    x = torch.randn(batch, in_channels, *shape, device=device)  # (B, C, D, H, W)
    leuko_aug = BatchAugment(**AUGMENT)
    seconds = {
        "leuko BatchAugment (batched)": _median_seconds(
            lambda: leuko_aug(x), device=device, warmup=warmup, repeats=repeats
        )
    }
    if monai:
        pipeline = _monai_pipeline(shape, device)
        seconds["monai Compose (per volume)"] = _median_seconds(
            lambda: [pipeline(volume) for volume in x], device=device, warmup=warmup, repeats=repeats
        )
    slowest = max(seconds.values())
    return [
        {
            "method": name,
            "device": device.type,
            "shape": "x".join(map(str, shape)),
            "batch": batch,
            "ms_per_volume": 1e3 * s / batch,
            "volumes_per_s": batch / s,
            "speedup": slowest / s,
        }
        for name, s in seconds.items()
    ]


# ---------------------------------------------------------------- data loading


def write_synthetic_prepared(
    out_dir: Path,
    *,
    n_cells: int,
    shape: tuple[int, int, int],
    in_channels: int = 1,
    n_patients: int = 16,
    seed: int = 0,
) -> Path:
    """A prepared folder (volumes.npy memmap, index.csv, meta.json) of random volumes, as `leuko prepare`
    lays it out: what a data loader reads does not depend on what the voxels show."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    volumes = np.lib.format.open_memmap(
        out_dir / VOLUMES, mode="w+", dtype=np.float32, shape=(n_cells, in_channels, *shape)
    )
    for i in range(n_cells):
        volumes[i] = rng.standard_normal((in_channels, *shape), dtype=np.float32)
    volumes.flush()
    del volumes
    labels = [DEFAULT_CLASSES[i % len(DEFAULT_CLASSES)] for i in range(n_cells)]
    patients = [f"p{i % n_patients:02d}" for i in range(n_cells)]
    index = "row,cell_id,label,label_index,patient_id,sample_type\n" + "".join(
        f"{i},c{i:05d},{label},{DEFAULT_CLASSES.index(label)},{patient},blood\n"
        for i, (label, patient) in enumerate(zip(labels, patients))
    )
    (out_dir / INDEX).write_text(index)
    meta = {
        "shape": list(shape),
        "channels": in_channels,
        "classes": list(DEFAULT_CLASSES),
        "modality": "ri",
        "n_cells": n_cells,
    }
    (out_dir / META).write_text(json.dumps(meta))
    return out_dir


def _datamodule(prepared: Path, *, batch: int, workers: int) -> LeukoDataModule:
    # fold=None with no test patients: every cell trains, so an epoch covers the whole memmap
    dm = LeukoDataModule(
        str(prepared), fold=None, k=2, test_fraction=0.0, batch_size=batch, num_workers=workers, pin_memory=True
    )
    dm.setup("fit")
    return dm


def _forever(loader) -> Iterator[dict]:
    while True:
        yield from loader


def bench_loader(prepared: Path, device: torch.device, *, batch: int, workers: list[int]) -> list[dict]:
    """Volumes/s of LeukoDataModule's train loader (shuffled rows of the memmap, collated, moved to the device
    with non_blocking=True), one warm epoch after one that starts the workers and fills the page cache."""
    rows = []
    for n in workers:
        loader = _datamodule(prepared, batch=batch, workers=n).train_dataloader()
        start = time.perf_counter()
        next(iter(loader))
        first_batch = time.perf_counter() - start
        for b in loader:  # warm-up epoch
            b["volume"].to(device, non_blocking=True)
        _sync(device)
        volumes = 0
        start = time.perf_counter()
        for b in loader:
            b["volume"].to(device, non_blocking=True)
            volumes += len(b["volume"])
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "workers": n,
                "batch": batch,
                "pin_memory": loader.pin_memory,
                "persistent_workers": loader.persistent_workers,
                "volumes": volumes,
                "volumes_per_s": volumes / seconds,
                "first_batch_s": first_batch,
            }
        )
        del loader
        gc.collect()
    return rows


def _kernel_busy(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Share of wall time with a CUDA kernel or copy running (union of their intervals), from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, -float("inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / wall_us


def bench_pipeline(
    net: str,
    shape: tuple[int, int, int],
    mode: str,
    prepared: Path,
    *,
    modes: list[str],
    device: torch.device,
    batch: int,
    workers: int,
    steps: int,
    warmup: int,
    in_channels: int = 1,
    num_classes: int = 4,
) -> dict:
    """Training fed by the real input path (loader with pinned memory and persistent workers, non-blocking
    copy, batched augmentation on the device) against the same steps on one batch already on the device."""
    toggles = mode_toggles(mode, modes)
    row: dict = {
        "net": net,
        "shape": "x".join(map(str, shape)),
        "mode": mode,
        "batch": batch,
        "workers": workers,
        "steps": steps,
    }
    model = optimizer = loader = None
    try:
        torch.manual_seed(0)
        model = build_model(
            net,
            shape,
            in_channels=in_channels,
            num_classes=num_classes,
            channels_last=toggles["channels_last"],
            compile=toggles["compile"],
            device=device,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        model.train()
        x = torch.randn(batch, in_channels, *shape, device=device)
        y = torch.randint(0, num_classes, (batch,), device=device)
        compute = make_train_step(model, optimizer, x, y, bf16=toggles["bf16"])
        time_loop(compute, max(warmup, 1), device)
        compute_s = time_loop(compute, steps, device)

        loader = _datamodule(prepared, batch=batch, workers=workers).train_dataloader()
        fed = make_train_step(
            model, optimizer, x, None, bf16=toggles["bf16"], augment=BatchAugment(**AUGMENT), batches=_forever(loader)
        )
        time_loop(fed, max(warmup, 1), device)
        fed_s = time_loop(fed, steps, device)
        # the step alone once more, after: steps still speeding up (allocator, caches) must not favour the fed run
        compute_s = min(compute_s, time_loop(compute, steps, device))
        row.update(
            compute_volumes_per_s=batch * steps / compute_s,
            pipeline_volumes_per_s=batch * steps / fed_s,
            busy=compute_s / fed_s,
        )
        if device.type == "cuda":
            try:
                row["profiler_busy"] = _kernel_busy(fed, steps, device)
            except Exception as exc:
                row["profiler_busy_error"] = f"{type(exc).__name__}: {exc}"[:300]
    except torch.OutOfMemoryError:
        row["error"] = f"out of memory (batch {batch}); lower --batch"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        del model, optimizer, loader
        if toggles["compile"]:
            torch._dynamo.reset()
        _free(device)
    return row


# ---------------------------------------------------------------- report


def environment(device: torch.device, argv: list[str]) -> dict:
    import lightning
    import monai
    import timm

    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/speed.py", *argv]),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lightning": lightning.__version__,
        "monai": monai.__version__,
        "timm": timm.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cpu":
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], lines: list[list], text_columns: int = 1) -> str:
    """Markdown; the first text_columns are left-aligned, the numbers after them right-aligned."""
    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"
    out = ["| " + " | ".join(header) + " |", rule]
    out += ["| " + " | ".join(map(str, line)) + " |" for line in lines]
    return "\n".join(out)


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with the measured value where this run measured it."""
    env, nets = report["environment"], [r for r in report["nets"] if "error" not in r]
    on_gpu = env["device"] == "cuda"
    gpu_note = "" if "H100" in env["device_name"] else f" (measured on {env['device_name']}, target is for an H100)"
    out = []

    def add(target: str, value: str, ok: bool | None, gpu: bool) -> None:
        if gpu and not on_gpu:
            status = (
                f"unmeasured: needs a GPU (CPU value for reference: {value})"
                if value != "-"
                else "unmeasured: needs a GPU"
            )
        elif ok is None:
            status = "unmeasured: not in this run"
        else:
            status = ("met" if ok else "missed") + (gpu_note if gpu else "")
        out.append({"target": target, "measured": value, "status": status})

    rn = [r for r in nets if r["net"] == "resnet3d_50" and r["shape"] == "48x96x96" and r["bf16"] and "mfu" in r]
    best = max(rn, key=lambda r: r["mfu"], default=None)
    add(
        ">= 35% MFU, ResNet3D-50 training at 48x96x96 in bf16",
        f"{100 * best['mfu']:.1f}% ({best['mode']})" if best else "-",
        best["mfu"] >= 0.35 if best else None,
        True,
    )
    for net in FULL_NETS:
        rows = [r for r in nets if r["net"] == net and r["shape"] == "40x96x96" and "infer_cells_per_s" in r]
        best = max(rows, key=lambda r: r["infer_cells_per_s"], default=None)
        add(
            f">= 2,000 cells/s, {net} inference at 40x96x96",
            f"{best['infer_cells_per_s']:.1f} ({best['mode']})" if best else "-",
            best["infer_cells_per_s"] >= 2000 if best else None,
            True,
        )
    aug = {r["method"].split()[0]: r for r in report["augmentation"]}
    fastest = max(
        (r for r in nets if r["shape"] == "48x96x96"), key=lambda r: r.get("train_volumes_per_s", 0), default=None
    )
    if "leuko" in aug and fastest and "train_volumes_per_s" in fastest:
        ratio = aug["leuko"]["volumes_per_s"] / fastest["train_volumes_per_s"]
        add(
            ">= 20x: GPU augmentation volumes/s over the fastest training step's volumes/s",
            f"{ratio:.1f}x (vs {fastest['net']} {fastest['mode']})",
            ratio >= 20,
            True,
        )
    else:
        add(">= 20x: GPU augmentation volumes/s over the fastest training step's volumes/s", "-", None, True)
    pipe = [r for r in report["pipeline"] if "busy" in r]
    if pipe:
        r = pipe[0]
        busy = r.get("profiler_busy", r["busy"])
        add(
            "data loader never starves the GPU (device busy share in steady state)",
            f"{100 * r['busy']:.0f}% of compute-only speed"
            + (f", kernels busy {100 * r['profiler_busy']:.0f}% of wall time" if "profiler_busy" in r else ""),
            busy >= 0.9,
            True,
        )
    else:
        add("data loader never starves the GPU (device busy share in steady state)", "-", None, True)
    if "leuko" in aug and "monai" in aug:
        ratio = aug["leuko"]["volumes_per_s"] / aug["monai"]["volumes_per_s"]
        value = f"{ratio:.1f}x ({aug['leuko']['ms_per_volume']:.1f} vs {aug['monai']['ms_per_volume']:.1f} ms/volume)"
        if on_gpu:
            out.append(
                {
                    "target": ">= 5x: batched augmentation vs MONAI per volume on the 2-core CPU",
                    "measured": value + " on the GPU",
                    "status": "unmeasured: run with --device cpu",
                }
            )
        else:
            add(">= 5x: batched augmentation vs MONAI per volume on the 2-core CPU", value, ratio >= 5, False)
    return out


def render(report: dict) -> str:
    env = report["environment"]
    peak = report["peak"]
    parts = [
        f"{env['date']}, {env['device_name']} ({env['device']}, {env['cpus_usable']} usable CPUs, "
        f"{env['torch_threads']} torch threads), torch {env['torch']}, lightning {env['lightning']}, "
        f"monai {env['monai']}, timm {env['timm']}",
        f"command: `{env['command']}`",
        "matrix-multiply peak (measured): " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peak.items()),
    ]
    if report["nets"]:
        lines = []
        for r in report["nets"]:
            if "error" in r:
                lines.append([r["net"], r["shape"], r["mode"], r["batch"], "error: " + r["error"]] + [""] * 8)
                continue
            lines.append(
                [
                    r["net"],
                    r["shape"],
                    r["mode"],
                    r["batch"],
                    _fmt(r.get("train_volumes_per_s"), 2),
                    _fmt(r.get("train_speedup"), 2),
                    _fmt(r.get("train_tflops"), 3),
                    _fmt(100 * r["mfu"] if "mfu" in r else None, 1),
                    _fmt(r.get("infer_cells_per_s"), 2),
                    _fmt(r.get("infer_speedup"), 2),
                    _fmt(r["fwd_gflop_per_volume"], 1),
                    _fmt(r.get("train_peak_mem_gib"), 2),
                    _fmt(r.get("infer_peak_mem_gib"), 2),
                ]
            )
        parts.append(
            "### Nets\n\n"
            + _table(
                [
                    "net",
                    "shape",
                    "mode",
                    "batch",
                    "train vol/s",
                    "x fp32",
                    "train TFLOP/s",
                    "MFU %",
                    "infer cells/s",
                    "x fp32",
                    "fwd GFLOP/vol",
                    "train peak GiB",
                    "infer peak GiB",
                ],
                lines,
                3,
            )
            + f"\n\nMFU: achieved training FLOP/s (3 x forward FLOPs) over the measured bf16 matmul peak. "
            f"Peak memory: {report['nets'][0]['memory_method']}. Inference batch {report['nets'][0]['infer_batch']}."
        )
    if report["augmentation"]:
        a = report["augmentation"]
        parts.append(
            f"### Augmentation, batch {a[0]['batch']} x {a[0]['shape']}\n\n"
            + _table(
                ["method", "device", "ms/volume", "volumes/s", "speed-up"],
                [
                    [
                        r["method"],
                        r["device"],
                        _fmt(r["ms_per_volume"]),
                        _fmt(r["volumes_per_s"]),
                        _fmt(r["speedup"]) + "x",
                    ]
                    for r in a
                ],
                2,
            )
        )
    if report["loader"]:
        lo = report["loader"]
        parts.append(
            f"### Data loading, {report['loader_cells']} cells x {report['loader_shape']} memmap, "
            f"batch {lo[0]['batch']}\n\n"
            + _table(
                ["workers", "pin_memory", "persistent", "volumes/s", "first batch s"],
                [
                    [
                        r["workers"],
                        r["pin_memory"],
                        r["persistent_workers"],
                        _fmt(r["volumes_per_s"]),
                        _fmt(r["first_batch_s"], 2),
                    ]
                    for r in lo
                ],
            )
        )
    if report["pipeline"]:
        lines = []
        for r in report["pipeline"]:
            if "error" in r:
                lines.append([r["net"], r["shape"], r["mode"], r["workers"], "error: " + r["error"], "", "", ""])
                continue
            lines.append(
                [
                    r["net"],
                    r["shape"],
                    r["mode"],
                    r["workers"],
                    _fmt(r["compute_volumes_per_s"], 2),
                    _fmt(r["pipeline_volumes_per_s"], 2),
                    _fmt(100 * r["busy"], 0),
                    _fmt(100 * r["profiler_busy"] if "profiler_busy" in r else None, 0),
                ]
            )
        parts.append(
            "### Input pipeline: loader -> device -> augmentation -> training step\n\n"
            + _table(
                [
                    "net",
                    "shape",
                    "mode",
                    "workers",
                    "step only vol/s",
                    "with loader vol/s",
                    "busy %",
                    "profiler busy %",
                ],
                lines,
                3,
            )
            + "\n\nbusy: step-only time over fed time (100% = the loader and augmentation cost the device nothing)."
        )
    parts.append(
        "### Targets\n\n"
        + _table(
            ["target", "measured", "status"], [[t["target"], t["measured"], t["status"]] for t in report["targets"]], 3
        )
    )
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- command line


def _names(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{what}: give a comma-separated list")
    if allowed is not None:
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")
    return names


def _shapes(text: str) -> list[tuple[int, int, int]]:
    return [_parse_shape(part) for part in _names(text, None, "--shapes")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--nets", default=",".join(FULL_NETS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="run the _tiny variant of each net in --nets")
    parser.add_argument(
        "--shapes",
        type=_shapes,
        default="48x96x96,40x96x96",
        help="D x H x W, comma-separated (default: %(default)s: the HHGM crop and the RI study's)",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"from {', '.join(MODES)} (default cuda: {DEFAULTS['cuda']['modes']}; cpu: {DEFAULTS['cpu']['modes']})",
    )
    parser.add_argument("--batch", type=int, default=None, help="training batch (default cuda 16, cpu 1)")
    parser.add_argument("--infer-batch", type=int, default=None, help="inference batch (default cuda 128, cpu 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default cuda 20, cpu 1)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first; training always runs one (default cuda 5, cpu 1)"
    )
    parser.add_argument("--in-channels", type=int, default=1, help="1 for RI, 2 for HHG (default 1)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--aug-batch", type=int, default=None, help="augmentation batch (default cuda 64, cpu 8)")
    parser.add_argument("--aug-repeats", type=int, default=3, help="timed augmentation batches (median)")
    parser.add_argument("--workers", default=None, help="loader worker counts (default cuda 0,2,4,8; cpu 0,1,2)")
    parser.add_argument(
        "--loader-cells", type=int, default=None, help="cells in the synthetic memmap (default cuda 1024, cpu 256)"
    )
    parser.add_argument(
        "--pipeline-net",
        default=None,
        help="net for the input-pipeline run (default: the fastest-training net of the table)",
    )
    parser.add_argument("--pipeline-mode", default=None, help="its mode (default: that net's fastest mode)")
    parser.add_argument("--pipeline-workers", type=int, default=None, help="(default: the largest --workers)")
    parser.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="n of the n x n x n matmul that measures the peak (default cuda 8192, cpu 2048)",
    )
    parser.add_argument("--skip", default="", help="sections to leave out: nets, augment, loader, pipeline")
    parser.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.shapes, str):
        args.shapes = _shapes(args.shapes)
    try:
        args.modes = _names(args.modes, MODES, "--modes")
        args.workers = [int(w) for w in _names(args.workers, None, "--workers")]
        args.skip = set(_names(args.skip, ("nets", "augment", "loader", "pipeline"), "--skip")) if args.skip else set()
        nets = _names(args.nets, None, "--nets")
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.tiny:
        nets = [n if n.endswith("_tiny") else n + "_tiny" for n in nets]
    from leuko.nets import NETS

    unknown = [n for n in nets if n not in NETS]
    if unknown:
        parser.error(f"--nets: unknown {unknown}; choose from {', '.join(NETS)}")
    args.nets = nets
    for name in ("batch", "infer_batch", "steps", "aug_batch", "loader_cells", "peak_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or min(args.workers) < 0:
        parser.error("--warmup and --workers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    # everything alive now (imported libraries) lives to the end: keep it out of the collections between rows,
    # which otherwise take seconds each on a busy CPU
    gc.freeze()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the gpu trainer preset sets it
    report: dict = {
        "environment": environment(device, argv),
        "peak": {},
        "nets": [],
        "augmentation": [],
        "loader": [],
        "pipeline": [],
        "targets": [],
    }

    log = lambda text: print(text, file=sys.stderr, flush=True)
    peak_dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.bfloat16, torch.float32]
    for dtype in peak_dtypes:
        report["peak"][str(dtype).removeprefix("torch.")] = matmul_peak(device, dtype, n=args.peak_size)
    peak_bf16 = report["peak"]["bfloat16"]

    if "nets" not in args.skip:
        for net in args.nets:
            for shape in args.shapes:
                flops = count_flops(net, shape=shape, in_channels=args.in_channels, num_classes=args.num_classes)
                for mode in args.modes:
                    log(f"net {net} {'x'.join(map(str, shape))} {mode} ...")
                    row = bench_net(
                        net,
                        shape,
                        mode,
                        modes=args.modes,
                        device=device,
                        batch=args.batch,
                        infer_batch=args.infer_batch,
                        steps=args.steps,
                        warmup=args.warmup,
                        in_channels=args.in_channels,
                        num_classes=args.num_classes,
                        peak_bf16=peak_bf16,
                        flops=flops,
                    )
                    report["nets"].append(row)
                    if "error" in row:
                        log(f"  failed: {row['error']}")
        add_speedups(report["nets"])

    shape = args.shapes[0]
    if "augment" not in args.skip:
        log(f"augmentation {'x'.join(map(str, shape))} ...")
        report["augmentation"] = bench_augment(
            device,
            shape,
            batch=args.aug_batch,
            warmup=max(args.warmup, 1),
            repeats=args.aug_repeats,
            in_channels=args.in_channels,
        )

    if not {"loader", "pipeline"} <= args.skip:
        with tempfile.TemporaryDirectory(prefix="leuko-speed-") as tmp:
            prepared = write_synthetic_prepared(
                Path(tmp) / "prepared", n_cells=args.loader_cells, shape=shape, in_channels=args.in_channels
            )
            report["loader_cells"], report["loader_shape"] = args.loader_cells, "x".join(map(str, shape))
            if "loader" not in args.skip:
                log("data loading ...")
                report["loader"] = bench_loader(prepared, device, batch=args.batch, workers=args.workers)
            if "pipeline" not in args.skip:
                net, mode = _pipeline_choice(args, report["nets"], "x".join(map(str, shape)))
                workers = args.pipeline_workers if args.pipeline_workers is not None else max(args.workers)
                log(f"input pipeline {net} {mode}, {workers} workers ...")
                report["pipeline"].append(
                    bench_pipeline(
                        net,
                        shape,
                        mode,
                        prepared,
                        modes=args.modes,
                        device=device,
                        batch=args.batch,
                        workers=workers,
                        steps=args.steps,
                        warmup=args.warmup,
                        in_channels=args.in_channels,
                        num_classes=args.num_classes,
                    )
                )

    report["targets"] = targets(report)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return report


def _pipeline_choice(args: argparse.Namespace, rows: list[dict], shape: str) -> tuple[str, str]:
    """The hungriest consumer of the table (most training volumes/s at the loader's shape) unless chosen."""
    done = [
        r
        for r in rows
        if r["shape"] == shape
        and "train_volumes_per_s" in r
        and (args.pipeline_net is None or r["net"] == args.pipeline_net)
        and (args.pipeline_mode is None or r["mode"] == args.pipeline_mode)
    ]
    best = max(done, key=lambda r: r["train_volumes_per_s"], default=None)
    net = args.pipeline_net or (best["net"] if best else args.nets[0])
    mode = args.pipeline_mode or (best["mode"] if best else args.modes[0])
    return net, mode


def failures(report: dict) -> list[dict]:
    return [r for r in report["nets"] + report["pipeline"] if "error" in r]


if __name__ == "__main__":
    if failed := failures(main()):
        sys.exit(f"{len(failed)} row(s) failed; see the table")
