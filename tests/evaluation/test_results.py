"""The results table: upsert by name, union of columns, None as empty."""

import pytest

from dydit_lab.evaluation.results import read_results, record_result


def test_record_result_writes_none_as_empty(tmp_path):
    path = tmp_path / "r.csv"
    record_result(path, {"name": "a", "coarse_steps": None, "accuracy": 0.5})
    assert read_results(path)[0]["coarse_steps"] == ""


def test_record_result_upserts_by_name_and_unions_columns(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert read_results(path) == []
    record_result(path, {"name": "b", "accuracy": 0.5})
    record_result(path, {"name": "a", "fd_lenet": 3.0})
    record_result(path, {"name": "b", "accuracy": 0.25})
    rows = read_results(path)
    assert [r["name"] for r in rows] == ["a", "b"]  # sorted, "b" replaced not appended
    assert rows[1] == {"name": "b", "accuracy": "0.25", "fd_lenet": ""}
    with pytest.raises(ValueError, match="name"):
        record_result(path, {"accuracy": 1.0})
