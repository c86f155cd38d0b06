"""Parameters and forward FLOPs of every net in leuko.nets, as a markdown table.

    python benchmarks/nets_table.py [--shape 48 96 96] [--in-channels 1] [--num-classes 4]

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode for one volume (batch 1) on the
meta device: nothing is computed, so the full-size nets take seconds. The counter sees
convolutions, matrix products and attention (2 FLOPs per multiply-add); norms, activations
and pooling are not counted.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from leuko.nets import NETS, build_net


def count(name: str, *, shape: tuple[int, int, int], in_channels: int, num_classes: int) -> tuple[int, int]:
    with torch.device("meta"):
        net = build_net(name, in_channels=in_channels, num_classes=num_classes, input_shape=shape).eval()
        x = torch.empty(1, in_channels, *shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops()


def table(names: list[str], *, shape: tuple[int, int, int], in_channels: int, num_classes: int) -> str:
    rows = ["| net | parameters (M) | forward GFLOPs / volume |", "|---|---:|---:|"]
    for name in names:
        params, flops = count(name, shape=shape, in_channels=in_channels, num_classes=num_classes)
        rows.append(f"| {name} | {params / 1e6:.3f} | {flops / 1e9:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96), metavar=("D", "H", "W"))
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=4)
    args = parser.parse_args()
    shape = tuple(args.shape)
    setting = f"input {(1, args.in_channels, *shape)}, {args.num_classes} classes"
    for title, names in [
        ("Full-size nets", [n for n in NETS if not n.endswith("_tiny")]),
        ("Tiny nets (for tests)", [n for n in NETS if n.endswith("_tiny")]),
    ]:
        print(f"### {title}, {setting}\n")
        print(table(names, shape=shape, in_channels=args.in_channels, num_classes=args.num_classes) + "\n")


if __name__ == "__main__":
    main()
