import math

import numpy as np
import pandas as pd
import pytest

from leuko.evaluation.agreement import (
    bland_altman,
    bland_altman_plot,
    bland_altman_table,
    differentials,
    log_agreement,
    reference_from_counts,
)

CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]


def _cells(n_samples=6, per_sample=40, error=0.0, seed=0):
    """Cells of several samples; a fraction `error` of the predictions is replaced by a random class."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_samples):
        p = rng.dirichlet(np.ones(len(CLASSES)) * 2)
        for label in rng.choice(CLASSES, size=per_sample, p=p):
            pred = rng.choice(CLASSES) if rng.random() < error else label
            rows.append(
                {
                    "patient_id": f"P{s // 2}",
                    "sample_type": ["BALF", "blood"][s % 2],
                    "label": label,
                    "pred_label": pred,
                }
            )
    return pd.DataFrame(rows)


def test_differentials_sum_to_100_per_sample():
    d = differentials(_cells(error=0.3), CLASSES)
    assert list(d.columns) == (
        ["patient_id", "sample_type", "n_cells"] + [f"ref_{c}" for c in CLASSES] + [f"pred_{c}" for c in CLASSES]
    )
    assert len(d) == 6 and (d["n_cells"] == 40).all()
    np.testing.assert_allclose(d[[f"ref_{c}" for c in CLASSES]].sum(axis=1), 100.0)
    np.testing.assert_allclose(d[[f"pred_{c}" for c in CLASSES]].sum(axis=1), 100.0)


def test_differential_values():
    cells = pd.DataFrame(
        {
            "patient_id": ["A", "A", "A", "A", "B"],
            "sample_type": ["blood"] * 5,
            "label": ["neutrophil", "neutrophil", "lymphocyte", "monocyte", "eosinophil"],
            "pred_label": ["neutrophil", "lymphocyte", "lymphocyte", "monocyte", "eosinophil"],
        }
    )
    d = differentials(cells, CLASSES).set_index("patient_id")
    assert d.loc["A", "ref_neutrophil"] == 50.0 and d.loc["A", "pred_neutrophil"] == 25.0
    assert d.loc["A", "ref_eosinophil"] == 0.0  # a class absent from a sample counts as 0%
    assert d.loc["B", "pred_eosinophil"] == 100.0


def test_perfect_predictions_have_zero_bias():
    table = bland_altman_table(differentials(_cells(error=0.0), CLASSES), CLASSES)
    assert list(table["class"]) == CLASSES
    np.testing.assert_allclose(table[["bias", "sd", "loa_low", "loa_high"]], 0.0, atol=1e-12)
    assert (table["n"] == 6).all()


def test_bias_sign_is_predicted_minus_reference():
    cells = _cells()
    cells.loc[cells.index[::4], "pred_label"] = "monocyte"  # over-call monocytes
    table = bland_altman_table(differentials(cells, CLASSES), CLASSES).set_index("class")
    assert table.loc["monocyte", "bias"] > 0
    assert table.loc[["neutrophil", "eosinophil", "lymphocyte"], "bias"].sum() < 0
    assert table["bias"].sum() == pytest.approx(0.0, abs=1e-9)  # percentages still sum to 100


def test_bland_altman_values():
    pred, ref = np.array([12.0, 30.0, 45.0, 8.0]), np.array([10.0, 31.0, 40.0, 8.0])
    ba = bland_altman(pred, ref)
    diff = pred - ref
    assert ba["bias"] == pytest.approx(diff.mean())
    assert ba["sd"] == pytest.approx(np.std(diff, ddof=1))
    assert ba["loa_high"] == pytest.approx(diff.mean() + 1.96 * np.std(diff, ddof=1))
    np.testing.assert_allclose(ba["mean"], (pred + ref) / 2)
    np.testing.assert_allclose(ba["diff"], diff)
    assert ba["n"] == 4


def test_matches_statsmodels_mean_diff_plot():
    from matplotlib.figure import Figure
    from statsmodels.graphics.agreement import mean_diff_plot

    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 60, 12)
    pred = ref + rng.normal(2.0, 3.0, 12)
    ax = Figure().subplots()
    mean_diff_plot(pred, ref, sd_limit=1.96, ax=ax)
    drawn_bias, drawn_low, drawn_high = (float(line.get_ydata()[0]) for line in ax.lines)
    # statsmodels draws its limits with the population sd (ddof=0)
    ba0 = bland_altman(pred, ref, ddof=0)
    assert (ba0["bias"], ba0["loa_low"], ba0["loa_high"]) == pytest.approx((drawn_bias, drawn_low, drawn_high))
    # the default, Bland & Altman's sample sd (ddof=1), is wider by sqrt(n / (n - 1))
    ba1 = bland_altman(pred, ref)
    assert ba1["bias"] == pytest.approx(drawn_bias)
    assert (ba1["loa_high"] - ba1["bias"]) == pytest.approx((drawn_high - drawn_bias) * math.sqrt(12 / 11))
    points = ax.collections[0].get_offsets()
    np.testing.assert_allclose(points[:, 0], ba1["mean"])
    np.testing.assert_allclose(points[:, 1], ba1["diff"])


def test_bland_altman_rejects_bad_input():
    with pytest.raises(ValueError, match="one length"):
        bland_altman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="more than 1 pair"):
        bland_altman([1.0], [2.0])
    with pytest.raises(ValueError, match="finite"):
        bland_altman([1.0, np.nan], [1.0, 2.0])


def test_table_by_sample_type():
    table = bland_altman_table(differentials(_cells(error=0.2), CLASSES), CLASSES, by="sample_type")
    assert list(table.columns) == ["sample_type", "class", "bias", "sd", "loa_low", "loa_high", "n"]
    assert len(table) == 2 * len(CLASSES) and (table["n"] == 3).all()


def test_differentials_reject_unknown_labels_and_columns():
    cells = _cells()
    cells.loc[0, "pred_label"] = "basophil"
    with pytest.raises(ValueError, match="pred_label holds label.*basophil.*pass classes="):
        differentials(cells, CLASSES)
    with pytest.raises(ValueError, match="lacks column.*prediction"):
        differentials(_cells(), CLASSES, pred_col="prediction")


def _write(tmp_path, text, name="counts.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reference_from_counts_rescales_to_percent(tmp_path):
    path = _write(
        tmp_path,
        "patient_id,sample_type,neutrophil,eosinophil,lymphocyte,monocyte,basophil\n"
        "P0,BALF,10,5,60,25,3\n"
        "P0,blood,55.5,2.5,30,12,0\n",
    )
    ref = reference_from_counts(path, CLASSES)
    assert list(ref.columns) == ["patient_id", "sample_type", "n_counted"] + [f"ref_{c}" for c in CLASSES]
    assert ref.loc[0, "ref_lymphocyte"] == pytest.approx(60.0) and ref.loc[0, "n_counted"] == 100
    np.testing.assert_allclose(ref[[f"ref_{c}" for c in CLASSES]].sum(axis=1), 100.0)


def test_counts_replace_the_manifest_labels_as_reference(tmp_path):
    cells = _cells(n_samples=2, error=0.0)
    path = _write(
        tmp_path,
        "patient_id,sample_type,neutrophil,eosinophil,lymphocyte,monocyte\nP0,BALF,25,25,25,25\nP0,blood,10,20,30,40\n",
    )
    d = differentials(cells.drop(columns="label"), CLASSES, reference=reference_from_counts(path, CLASSES))
    assert d.set_index("sample_type").loc["blood", "ref_monocyte"] == pytest.approx(40.0)
    missing = cells.assign(patient_id="P9")
    with pytest.raises(ValueError, match="2 sample.*no reference count.*P9, BALF.*add them"):
        differentials(missing, CLASSES, reference=reference_from_counts(path, CLASSES))


def test_counts_file_errors_name_file_and_column(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: reference count file not found"):
        reference_from_counts(tmp_path / "nope.csv", CLASSES)
    path = _write(tmp_path, "patient_id,neutrophil,eosinophil,lymphocyte\nP0,1,2,3\n")
    with pytest.raises(ValueError, match=r"counts\.csv: missing column\(s\) sample_type, monocyte \(found"):
        reference_from_counts(path, CLASSES)
    path = _write(
        tmp_path,
        "patient_id,sample_type,neutrophil,eosinophil,lymphocyte,monocyte\n"
        "P0,BALF,10,x,60,25\nP1,BALF,0,0,0,0\nP0,BALF,1,1,1,1\nP2,blood,-1,1,1,1\n",
    )
    with pytest.raises(ValueError) as info:
        reference_from_counts(path, CLASSES)
    message = str(info.value)
    assert "counts.csv: 4 problem(s)" in message
    assert "line 2: eosinophil = 'x' is not a count" in message
    assert "line 3: every class is 0" in message
    assert "line 4: sample P0, BALF appears twice" in message
    assert "line 5: neutrophil = '-1'" in message


def test_bland_altman_plot_writes_png(tmp_path):
    diffs = differentials(_cells(n_samples=8, error=0.25), CLASSES)
    png = bland_altman_plot(diffs, CLASSES, tmp_path / "ba.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _RecordingClient:
    """Stands in for mlflow.MlflowClient: records what would be logged."""

    def __init__(self):
        self.artifacts, self.metrics = [], {}

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self.artifacts.append((run_id, local_path.rsplit("/", 1)[-1], artifact_path))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.metrics.update({m.key: m.value for m in metrics})


def test_log_agreement_metric_names_for_grouped_table(tmp_path):
    diffs = differentials(_cells(n_samples=8, error=0.25), CLASSES)
    table = bland_altman_table(diffs, CLASSES, by="sample_type")
    client = _RecordingClient()
    log_agreement(client, "r1", diffs=diffs, table=table)
    assert [a[1] for a in client.artifacts] == ["differentials.csv", "bland_altman.csv"]
    assert len(client.metrics) == 2 * len(CLASSES) * 4
    blood = table.set_index(["sample_type", "class"]).loc[("blood", "monocyte")]
    assert client.metrics["ba/blood/monocyte/loa_high"] == pytest.approx(blood["loa_high"])


@pytest.mark.slow  # ~15 s on 2 cores: importing mlflow and creating the sqlite schema
def test_log_agreement_to_a_real_mlflow_store(tmp_path):
    import mlflow

    diffs = differentials(_cells(n_samples=8, error=0.25), CLASSES)
    table = bland_altman_table(diffs, CLASSES)
    png = bland_altman_plot(diffs, CLASSES, tmp_path / "ba.png")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("agreement", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    log_agreement(client, run_id, diffs=diffs, table=table, plot=png)

    listed = {a.path for a in client.list_artifacts(run_id, "agreement")}
    assert listed == {"agreement/differentials.csv", "agreement/bland_altman.csv", "agreement/ba.png"}
    metrics = client.get_run(run_id).data.metrics
    bias = table.set_index("class")["bias"]
    for c in CLASSES:
        assert metrics[f"ba/{c}/bias"] == pytest.approx(bias[c])
        assert f"ba/{c}/loa_low" in metrics and f"ba/{c}/loa_high" in metrics
    local = client.download_artifacts(run_id, "agreement/bland_altman.csv", str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_csv(local), table, check_dtype=False)
