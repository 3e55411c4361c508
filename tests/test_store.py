import sqlite3
import time

import pytest

from backdoorlab.errors import BackdoorLabError
from backdoorlab.store import RunRecord, Store


def _rec(run_id, ca=0.9):
    return RunRecord(run_id=run_id, name="t", kind="experiment", created=time.time(), status="done", seconds=1.0,
                     config={"a": 1}, metrics={"clean_accuracy": ca}, artifacts={"metrics": "metrics.json"})


def test_commit_list_get(tmp_path):
    st = Store(tmp_path)
    with st.new_run("r1") as d:
        (d / "metrics.json").write_text("{}")
        rec = st.commit(_rec("r1"), d)
    assert (tmp_path / "runs" / "r1" / "metrics.json").is_file()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "runs").iterdir())
    assert st.get("r1").metrics == {"clean_accuracy": 0.9} and st.get("r").run_id == "r1"
    assert [r.run_id for r in Store(tmp_path).runs()] == ["r1"]
    with pytest.raises(BackdoorLabError, match="no run"):
        st.get("zzz")


def test_failed_run_leaves_nothing(tmp_path):
    st = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with st.new_run("r2") as d:
            (d / "half.json").write_text("{")
            raise RuntimeError("crash mid-run")
    assert list((tmp_path / "runs").iterdir()) == []
    # a database failure after the rename removes the folder again (duplicate id in the index)
    with st.new_run("r3") as d:
        st.commit(_rec("r3"), d)
    import shutil

    shutil.rmtree(tmp_path / "runs" / "r3")
    with st.new_run("r3b") as d:
        with pytest.raises(sqlite3.IntegrityError):
            st.commit(_rec("r3"), d)
    assert not (tmp_path / "runs" / "r3").exists()
    assert len(st.runs()) == 1


def test_not_sqlite_and_newer_schema(tmp_path):
    (tmp_path / "backdoorlab.db").write_text("hello, I am a text file")
    with pytest.raises(BackdoorLabError, match="not an SQLite database"):
        Store(tmp_path)
    assert (tmp_path / "backdoorlab.db").read_text() == "hello, I am a text file"
    other = tmp_path / "o"
    Store(other)
    con = sqlite3.connect(other / "backdoorlab.db")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(BackdoorLabError, match="newer"):
        Store(other)
