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


# ----------------------------------------------------------------------------- transactions
def test_transaction_commits_all_or_nothing(tmp_path):
    st = Store(tmp_path)
    # an exception inside the block rolls back the run's rows and the other statements, and the
    # run folder that commit() had moved into place is removed again
    with pytest.raises(RuntimeError, match="after the commit"):
        with st.transaction() as con:
            con.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES ('g', '{}', 0, 0)")
            with st.new_run("r1") as d:
                (d / "metrics.json").write_text("{}")
                st.commit(_rec("r1"), d)
            assert (tmp_path / "runs" / "r1").is_dir() and st.find("r1") is not None  # visible inside
            raise RuntimeError("after the commit")
    assert st.runs() == [] and st.find("r1") is None
    assert st.query("SELECT count(*) FROM grids") == [(0,)] and st.query("SELECT count(*) FROM metrics") == [(0,)]
    assert list((tmp_path / "runs").iterdir()) == []
    # without an exception, everything is committed together
    with st.transaction() as con:
        con.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES ('g', '{}', 0, 0)")
        with st.new_run("r2") as d:
            st.commit(_rec("r2"), d)
    assert st.query_one("SELECT name FROM grids") == ("g",) and st.get("r2").metrics == {"clean_accuracy": 0.9}
    assert (tmp_path / "runs" / "r2").is_dir()
    # a failing also() (same transaction) leaves neither rows nor folder, nor the temporary folder
    with st.new_run("r3") as d:
        with pytest.raises(sqlite3.IntegrityError):
            st.commit(_rec("r3"), d, also=lambda con: con.execute(
                "INSERT INTO grids (name, spec_json, created, updated) VALUES ('g', '{}', 0, 0)"))
    assert st.find("r3") is None and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r2"]


def test_nested_transaction_is_a_savepoint(tmp_path):
    st = Store(tmp_path)
    with st.transaction() as con:
        st.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES ('a', '{}', 0, 0)")
        with pytest.raises(RuntimeError):
            with st.transaction():  # joins the outer one; its failure undoes only its own work
                st.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES ('b', '{}', 0, 0)")
                with st.new_run("inner") as d:
                    st.commit(_rec("inner"), d)
                raise RuntimeError("inner")
        assert not (tmp_path / "runs" / "inner").exists() and st.find("inner") is None
        # another connection does not see uncommitted work
        other = sqlite3.connect(tmp_path / "backdoorlab.db")
        assert other.execute("SELECT count(*) FROM grids").fetchone() == (0,)
        other.close()
        assert con.in_transaction
    assert [r[0] for r in st.query("SELECT name FROM grids")] == ["a"]
    assert st.execute("UPDATE grids SET updated=1 WHERE name='a'") == 1


# ----------------------------------------------------------------------------- atomic_write_dir
def test_atomic_write_dir(tmp_path, monkeypatch):
    import os

    from backdoorlab.store import atomic_write_dir

    out = tmp_path / "rep"
    assert atomic_write_dir(out, {"a.json": b"{}", "figures/x.png": b"png"}) == out
    assert (out / "a.json").read_bytes() == b"{}" and (out / "figures" / "x.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    # a value that is not bytes: refused before anything is written
    with pytest.raises(TypeError, match="must be bytes"):
        atomic_write_dir(tmp_path / "bad", {"a.json": b"{}", "b.txt": "text"})
    with pytest.raises(ValueError, match="not a relative file path"):
        atomic_write_dir(tmp_path / "bad", {"../escape": b""})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    # an existing non-empty folder is refused, unless overwrite=True
    with pytest.raises(BackdoorLabError, match="not empty"):
        atomic_write_dir(out, {"b.json": b"[]"})
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "figures"]
    atomic_write_dir(out, {"b.json": b"[]"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    # a failure after every file is written (the final rename) leaves nothing, and the old folder intact
    real = os.replace

    def failing(src, dst):
        if os.path.isdir(src) and ".tmp-" in os.path.basename(str(src)):  # the new folder's rename
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(tmp_path / "new", {"a.json": b"{}", "figures/x.png": b"png"})
    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(out, {"c.json": b"1"}, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    # a failure while writing a file: likewise
    def failing_file(src, dst):
        raise OSError("no space")

    monkeypatch.setattr(os, "replace", failing_file)
    with pytest.raises(OSError, match="no space"):
        atomic_write_dir(tmp_path / "new", {"a.json": b"{}"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


# ----------------------------------------------------------------------------- cells whose run is gone
class _Cell:
    def __init__(self, cell_id):
        self.cell_id, self.grid, self.kind, self.victim_key = cell_id, "g", "victim", None
        self.data, self.model, self.attack, self.defense, self.family, self.seed = "mnist", "cnn", "badnets", "none", "victim", 0


def test_cell_whose_run_was_deleted_is_a_clear_error(tmp_path):
    import shutil

    from backdoorlab.cellstore import CellStore

    st = Store(tmp_path)
    cs = CellStore(st)
    for cid, rid in (("c1", "cell-1"), ("c2", "cell-2")):
        with st.new_run(rid) as d:
            cs.commit_cell(_Cell(cid), _rec(rid), d)
    assert set(cs.records(cs.cells("g"))) == {"c1", "c2"}
    # a done cell is never redone in place: refused, nothing stored
    with st.new_run("cell-1b") as d:
        with pytest.raises(BackdoorLabError, match="done already"):
            cs.commit_cell(_Cell("c1"), _rec("cell-1b"), d)
    assert st.find("cell-1b") is None and not (tmp_path / "runs" / "cell-1b").exists()
    shutil.rmtree(tmp_path / "runs" / "cell-2")
    with pytest.raises(BackdoorLabError) as ei:
        cs.records(cs.cells("g"))
    msg = str(ei.value)
    assert "cell c2" in msg and "cell-2" in msg and "is gone" in msg and "backdoorlab bench" in msg
    # bench's resume: the cell is set back to failed (explicitly, with the reason) and redone
    lost = cs.forget_missing_runs("g")
    assert [(r.cell_id, r.run_id) for r, _ in lost] == [("c2", "cell-2")]
    assert cs.done_ids("g") == {"c1"}
    c2 = [r for r in cs.cells("g") if r.cell_id == "c2"][0]
    assert c2.status == "failed" and c2.run_id is None and "cell-2" in c2.error
    assert set(cs.records(cs.cells("g"))) == {"c1"}
    with st.new_run("cell-2b") as d:
        cs.commit_cell(_Cell("c2"), _rec("cell-2b"), d)
    assert {k: v.run_id for k, v in cs.records(cs.cells("g")).items()} == {"c1": "cell-1", "c2": "cell-2b"}
    # a run record deleted from the index (the cell's run_id becomes NULL)
    st.execute("DELETE FROM runs WHERE run_id='cell-1'")
    with pytest.raises(BackdoorLabError, match="cell c1 .*deleted from the index"):
        cs.records(cs.cells("g"))
