"""benchmarks/speed.py on the _tiny nets at a tiny shape for one step: the script keeps running, no timings checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
speed = pytest.importorskip("speed")

SHAPE = (16, 32, 32)  # a multiple of vit3d_tiny's 8^3 patches
ONE_STEP = dict(batch=2, infer_batch=2, steps=1, warmup=0)


def test_bench_net_all_modes_on():
    row = speed.bench_net(
        "fishnet3d_tiny",
        SHAPE,
        "all",
        modes=["fp32", "bf16", "channels_last"],
        device=torch.device("cpu"),
        peak_bf16=1e12,
        **ONE_STEP,
    )
    assert "error" not in row, row.get("error")
    assert row["bf16"] and row["channels_last"] and not row["compile"]
    assert row["train_volumes_per_s"] > 0 and row["infer_cells_per_s"] > 0
    assert row["fwd_gflop_per_volume"] > 0 and row["mfu"] > 0
    assert row["train_peak_mem_gib"] >= 0


def test_main_end_to_end(tmp_path, capsys):
    out = tmp_path / "speed.json"
    report = speed.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--shapes",
            "x".join(map(str, SHAPE)),
            "--modes",
            "fp32",
            "--batch",
            "2",
            "--infer-batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--aug-batch",
            "2",
            "--aug-repeats",
            "1",
            "--loader-cells",
            "8",
            "--workers",
            "0",
            "--peak-size",
            "256",
            "--json",
            str(out),
        ]
    )
    assert speed.failures(report) == []
    saved = json.loads(out.read_text())
    assert saved["environment"]["command"].startswith("python benchmarks/speed.py --device cpu")
    assert {r["net"] for r in saved["nets"]} == {"resnet3d_50_tiny", "vit3d_tiny", "fishnet3d_tiny"}
    assert all("train_speedup" in r for r in saved["nets"])
    assert [r["method"].split()[0] for r in saved["augmentation"]] == ["leuko", "monai"]
    assert saved["loader"][0]["volumes"] == 8
    assert saved["pipeline"][0]["pipeline_volumes_per_s"] > 0
    statuses = {t["target"]: t["status"] for t in saved["targets"]}
    assert all(s.startswith("unmeasured") for t, s in statuses.items() if "2-core CPU" not in t)
    printed = capsys.readouterr().out
    for section in ("### Nets", "### Augmentation", "### Data loading", "### Input pipeline", "### Targets"):
        assert section in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "fp16"], "--modes: unknown ['fp16']"),
        (["--nets", "resnet18"], "--nets: unknown ['resnet18']"),
        (["--shapes", "48x96"], "--shapes"),
        (["--batch", "0"], "--batch must be >= 1"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_net_compiled():
    row = speed.bench_net(
        "vit3d_tiny", SHAPE, "compile", modes=["fp32", "compile"], device=torch.device("cpu"), **ONE_STEP
    )
    assert "error" not in row, row.get("error")
    assert row["compile"] and row["train_volumes_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_main_on_cuda(tmp_path):
    report = speed.main(
        [
            "--device",
            "cuda",
            "--tiny",
            "--shapes",
            "x".join(map(str, SHAPE)),
            "--modes",
            "fp32,bf16,channels_last",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--loader-cells",
            "32",
            "--workers",
            "0,2",
            "--peak-size",
            "1024",
        ]
    )
    assert speed.failures(report) == []
    assert "profiler_busy" in report["pipeline"][0], report["pipeline"][0]
