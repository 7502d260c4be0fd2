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


def _record_many(path, prefix: str, count: int) -> None:
    for i in range(count):
        record_result(path, {"name": f"{prefix}{i}", "accuracy": i})


def test_record_result_keeps_every_row_of_writers_side_by_side(tmp_path):
    """Sweeps run in parallel processes append to one table: no row may be lost."""
    import multiprocessing

    path = tmp_path / "r.csv"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_record_many, args=(path, p, 25)) for p in "abcd"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * 4
    assert sorted(r["name"] for r in read_results(path)) == sorted(f"{p}{i}" for p in "abcd" for i in range(25))
