"""The prepared folder's integrity: meta.json records each file's size and checksum; damage is caught."""

import json

import numpy as np
import pytest

from helpers.cells import write_cohort
from leuko.data.prepare import prepare
from leuko.data.prepared import INDEX, META, VOLUMES, PrepareError, load_prepared


@pytest.fixture
def prepared(tmp_path):
    manifest = write_cohort(tmp_path / "raw", 4)
    prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    return manifest, tmp_path / "prep"


def _flip_a_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_meta_records_size_and_checksum_of_each_file(prepared):
    _, out = prepared
    files = json.loads((out / META).read_text())["files"]
    assert sorted(files) == [INDEX, VOLUMES]
    for name, record in files.items():
        assert record["bytes"] == (out / name).stat().st_size
        assert len(record["sha256"]) == 64


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), r"has \d+ bytes, meta\.json says \d+"),
        (lambda p: _flip_a_byte(p, -100), r"is not what meta\.json records \(its checksum differs\)"),
    ],
)
def test_a_damaged_cache_is_rebuilt_with_a_message(prepared, damage, why):
    manifest, out = prepared
    good = (out / VOLUMES).read_bytes()
    damage(out / VOLUMES)
    with pytest.warns(UserWarning, match=rf"{VOLUMES} {why}.*rebuilding it"):
        result = prepare(manifest, out, shape=(8, 8, 8), progress=False)
    assert not result.up_to_date
    assert (out / VOLUMES).read_bytes() == good
    assert prepare(manifest, out, shape=(8, 8, 8), progress=False).up_to_date


def test_load_prepared_refuses_a_damaged_cache(prepared):
    _, out = prepared
    with open(out / VOLUMES, "ab") as f:  # extra bytes: np.load would not notice
        f.write(b"\0" * 16)
    with pytest.raises(PrepareError, match=rf"{VOLUMES} has \d+ bytes, meta\.json says \d+.*rerun `leuko prepare"):
        load_prepared(out)


def test_load_prepared_refuses_an_edited_index(prepared):
    _, out = prepared
    text = (out / INDEX).read_text()
    (out / INDEX).write_text(text.replace("neutrophil", "eosinophil", 1).replace(",0,", ",1,", 1))
    with pytest.raises(PrepareError, match=rf"{INDEX} .*(checksum differs|bytes).*rerun `leuko prepare"):
        load_prepared(out)


def test_an_older_meta_without_checksums_still_loads_and_is_rebuilt_by_prepare(prepared):
    manifest, out = prepared
    meta = json.loads((out / META).read_text())
    del meta["files"]
    (out / META).write_text(json.dumps(meta))
    assert load_prepared(out)[0].shape == (4, 1, 8, 8, 8)
    with pytest.warns(UserWarning, match=r"records no checksums.*rebuilding it"):
        assert not prepare(manifest, out, shape=(8, 8, 8), progress=False).up_to_date
    assert np.asarray(load_prepared(out)[0]).shape == (4, 1, 8, 8, 8)
