import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.errors import DataError
from pipelines.validate import ValidateConfig, validate


def test_prepared_dataset_validates(ray_session, synth_dataset):
    report = validate(ValidateConfig(path=str(synth_dataset)))
    assert report.ok
    assert {t.table for t in report.tables} == {"queries", "docs", "qrels", "pairs", "questions"}


def test_corruptions_are_named_by_file_column_and_row(ray_session, synth_dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(synth_dataset, bad)
    part = bad / "pairs" / "part-00000.parquet"
    t = pq.read_table(part)
    labels = t.column("label").to_pylist()
    labels[11] = 9
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int8()))
    pq.write_table(t, part)
    pq.write_table(t.slice(4, 3), bad / "pairs" / "part-00001.parquet")  # keys repeated across files
    report = validate(ValidateConfig(path=str(bad), report=str(tmp_path / "report.json")))
    assert not report.ok
    pairs = next(x for x in report.tables if x.table == "pairs")
    msgs = [str(v) for v in pairs.violations]
    assert any("part-00000.parquet, column 'label', row 11: unknown grade" in m for m in msgs), msgs
    assert any("part-00001.parquet" in m and "row 0" in m and "across files" in m for m in msgs), msgs
    assert (tmp_path / "report.json").exists()


def test_unreadable_file_is_reported_not_crashed(ray_session, synth_dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(synth_dataset, bad)
    (bad / "qrels" / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    report = validate(ValidateConfig(path=str(bad)))
    qrels = next(x for x in report.tables if x.table == "qrels")
    assert "unreadable" in str(qrels.violations[0])


def test_directory_without_tables_is_a_clear_error(ray_session, tmp_path):
    with pytest.raises(DataError, match="no augrel tables"):
        validate(ValidateConfig(path=str(tmp_path)))
