import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.cli import main


def test_help_explains_every_command(capsys):
    for argv in (
        ["--help"],
        ["data", "--help"],
        ["data", "prepare", "--help"],
        ["cluster", "up", "--help"],
        ["submit", "--help"],
    ):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0
    out = capsys.readouterr().out
    assert "trec-dl" in out and "--workers" in out and "Jobs API" in out


def test_validate_corrupted_copy_exits_1_naming_column_and_row(ray_session, synth_dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(synth_dataset, bad)
    part = bad / "queries" / "part-00000.parquet"
    rows = pq.read_table(part).to_pylist()
    rows[5]["qid"] = None
    pq.write_table(pa.Table.from_pylist(rows), part)
    assert main(["data", "validate", str(synth_dataset)]) == 0
    assert main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "column 'qid', row 5: missing value (null)" in out and "INVALID" in out


def test_bad_config_key_is_one_line_error_not_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "data",
            "synth",
            "--out",
            str(tmp_path),
            "--set",
            "entitys=3",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "entitys: unknown key" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_synth_split_through_cli(tmp_path, capsys):
    raw, data, splits = tmp_path / "raw", tmp_path / "data", tmp_path / "splits"
    assert main(["data", "synth", "--out", str(raw), "--entities", "9"]) == 0
    assert main(["data", "prepare", "beir", "--src", str(raw), "--out", str(data)]) == 0
    assert main(["data", "split", str(data), "--out", str(splits), "--fractions", "train=0.5,test=0.5"]) == 0
    assert (splits / "train" / "pairs" / "part-00000.parquet").exists()
    assert not (splits / "val").exists()
