"""Time leuko's batched augmentation against MONAI's per-volume transforms.

    python benchmarks/augment.py                      # CPU, 2 threads, batch 16 of 48 x 96 x 96
    python benchmarks/augment.py --device cuda

Both sides do elastic warp + random crop + Gaussian noise + random flips with settings a user would train with.
MONAI runs one volume at a time in a Python loop, as a Dataset transform chain would; it crops to 90% per side
without resizing back (which only makes its side cheaper), leuko crops up to 10% per side and resizes back.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from leuko.data.augment import BatchAugment


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 4:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give D x H x W with sides >= 4, e.g. 48x96x96")
    return shape  # type: ignore[return-value]


def _time(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _monai_pipeline(shape: tuple[int, int, int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from monai.transforms import Compose, Rand3DElastic, RandFlip, RandGaussianNoise, RandSpatialCrop

    return Compose(
        [
            # sigma 5-8 voxels and magnitude 50-150: the range MONAI's own 3D tutorials use for elastic warps
            Rand3DElastic(sigma_range=(5, 8), magnitude_range=(50, 150), prob=1.0, padding_mode="zeros", device=device),
            RandSpatialCrop(roi_size=[round(0.9 * n) for n in shape], random_size=False),
            RandGaussianNoise(prob=1.0, std=0.05),
            RandFlip(prob=0.5, spatial_axis=0),
            RandFlip(prob=0.5, spatial_axis=1),
            RandFlip(prob=0.5, spatial_axis=2),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shape", type=_parse_shape, default=(48, 96, 96), help="D x H x W (default 48x96x96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--skip-monai", action="store_true", help="time leuko only")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, *args.shape, device=device)  # (B, C, D, H, W)

    # moderate strengths, the ones the tests call plausible for cells
    leuko_aug = BatchAugment(elastic=2.0, crop=0.1, noise=0.05, flip=0.5)
    seconds = {
        "leuko BatchAugment (batched)": _time(
            lambda: leuko_aug(x), device=device, warmup=args.warmup, repeats=args.repeats
        )
    }
    if not args.skip_monai:
        pipeline = _monai_pipeline(args.shape, device)
        seconds["monai Compose (per volume)"] = _time(
            lambda: [pipeline(volume) for volume in x], device=device, warmup=args.warmup, repeats=args.repeats
        )

    threads = f", {args.threads} threads" if device.type == "cpu" else ""
    print(f"batch {args.batch} x 1 x {'x'.join(map(str, args.shape))}, median of {args.repeats}{threads}")
    print(f"{'method':<30} {'device':<8} {'ms/volume':>10} {'volumes/s':>10} {'speed-up':>9}")
    slowest = max(seconds.values())
    for name, total in seconds.items():
        per_volume = total / args.batch
        print(f"{name:<30} {device.type:<8} {1e3 * per_volume:>10.1f} {1 / per_volume:>10.1f} {slowest / total:>8.1f}x")


if __name__ == "__main__":
    main()
