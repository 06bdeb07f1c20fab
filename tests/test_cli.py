"""The command line through click's CliRunner, and the input readers under it."""

import csv
import errno
import io
import json
import os
import sqlite3
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner

import rvqstore
from rvqstore import Store, benchmark
from rvqstore.algo import exact_search
from rvqstore.cli import _Progress, main
from rvqstore.inputs import MAX_ID, InputFileError, parse_vector, read_vectors

from conftest import clustered

SMALL = ["--stages", "4", "--codebook-size", "32"]


def run(*args, input=None):
    """Invoke the CLI; a success must exit 0 and print nothing on stderr."""
    result = CliRunner().invoke(main, [str(a) for a in args], input=input,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # not a terminal: no progress bar
    return result.stdout


def fails(*args, code=1, input=None):
    """Invoke the CLI expecting a handled error: ``Error: ...`` on stderr, no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args], input=input)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    assert "Traceback" not in result.output
    if code == 1:
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture
def vectors():
    return clustered(600, 16, centers=12, seed=7)


@pytest.fixture
def files(tmp_path, vectors):
    """The same 600 x 16 vectors as .npy, .fvecs, JSON lines (with keys) and CSV."""
    out = {"npy": tmp_path / "vecs.npy", "fvecs": tmp_path / "vecs.fvecs",
           "jsonl": tmp_path / "docs.jsonl", "csv": tmp_path / "vecs.csv"}
    np.save(out["npy"], vectors)
    dims = np.full((len(vectors), 1), 16, np.int32)
    out["fvecs"].write_bytes(np.hstack([dims.view(np.float32), vectors]).tobytes())
    with open(out["jsonl"], "w") as f:
        for i, v in enumerate(vectors):
            f.write(json.dumps({"key": f"doc-{i}", "vector": v.tolist()}) + "\n")
    np.savetxt(out["csv"], vectors, delimiter=",")
    return out


@pytest.fixture
def db(tmp_path, files):
    """A trained store of the 600 vectors with keys doc-0 ... doc-599."""
    path = tmp_path / "vecs.db"
    run("create", path, "--dim", "16", *SMALL)
    run("add", path, files["jsonl"], "--train")
    return path


# -- help, version ----------------------------------------------------------------------------

def test_every_command_has_help_text():
    assert main.help
    for name, command in main.commands.items():
        assert command.help and command.get_short_help_str(), name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help or param.hidden, (name, param.name)


@pytest.mark.parametrize("command", [None] + sorted(main.commands))
def test_help_fits_80_columns(command):
    args = ([command] if command else []) + ["--help"]
    for columns in ("80", "200"):
        result = CliRunner(env={"COLUMNS": columns}).invoke(main, args)
        assert result.exit_code == 0
        long = [line for line in result.stdout.splitlines() if len(line) > 80]
        assert not long, long
    short = CliRunner().invoke(main, (args[:-1]) + ["-h"])
    assert short.exit_code == 0 and short.stdout == result.stdout


def test_python_m_rvqstore_version():
    out = subprocess.run([sys.executable, "-m", "rvqstore", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"rvqstore, version {rvqstore.__version__}"


_LOADED = """
import sys
from click.testing import CliRunner
from rvqstore.cli import main
for args in {calls}:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and result.stdout, (args, result.output)
print(*sorted(m for m in ("numpy", "sqlite_utils", "numba") if m in sys.modules))
"""


def _loaded(calls):
    """Which of numpy, sqlite-utils and numba a fresh process has imported after the CLI
    ran ``calls`` (lists of arguments), each of which must succeed and print."""
    code = _LOADED.format(calls=repr([[str(a) for a in args] for args in calls]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split()


def test_option_values_are_the_librarys():
    # the CLI writes them out rather than importing them (--help would load numpy)
    from rvqstore import inputs, store

    types = {(name, p.name): p.type for name, command in main.commands.items()
             for p in command.params}
    assert types["create", "metric"].choices == store.METRICS
    assert types["create", "originals"].choices == store.ORIGINAL_FORMATS
    assert types["add", "fmt"].choices == types["search", "fmt"].choices == inputs.FORMATS
    assert {types[c, p].max for c, p in [("get", "ids"), ("delete", "ids"), ("search", "id_")]} \
        == {inputs.MAX_ID}


def test_help_imports_click_not_numpy_or_numba():
    # every command is a new process: the import set is the start-up time (not timed here)
    assert _loaded([["--help"]] + [[name, "--help"] for name in sorted(main.commands)]) == []


def test_reading_a_trained_store_imports_no_numba(db):
    # info, get and count run no kernel; search does
    assert _loaded([["info", db], ["get", db, "--id", "3"], ["count", db]]) == ["numpy",
                                                                               "sqlite_utils"]
    assert "numba" in _loaded([["search", db, "--id", "3", "-k", "2"]])


# -- the commands -----------------------------------------------------------------------------

def test_create_refuses_an_existing_file(db):
    assert "already exists" in fails("create", db, "--dim", "16")


def test_create_options_reach_the_store(tmp_path):
    path = tmp_path / "c.db"
    out = run("create", path, "--dim", "8", "--metric", "cosine", "--originals", "float16",
              *SMALL)
    assert "dim=8" in out and "cosine" in out
    info = json.loads(run("info", path, "--json"))
    assert (info["dim"], info["metric"], info["stages"], info["codebook_size"],
            info["originals"], info["keep_originals"]) == (8, "cosine", 4, 32, "float16", True)
    run("create", tmp_path / "d.db", "--no-originals", *SMALL)
    assert json.loads(run("info", tmp_path / "d.db", "--json"))["keep_originals"] is False


@pytest.mark.parametrize("fmt", ["npy", "fvecs", "jsonl", "csv"])
def test_add_every_format(tmp_path, files, vectors, fmt):
    path = tmp_path / "a.db"
    out = run("add", path, files[fmt])
    assert "Added 600 vectors" in out
    info = json.loads(run("info", path, "--json"))
    assert info["count"] == 600 and info["dim"] == 16 and not info["trained"]
    got = json.loads(run("get", path, "--id", "0", "--id", "599", "--json"))
    np.testing.assert_allclose([g["vector"] for g in got], vectors[[0, 599]], rtol=1e-6)


def test_add_from_stdin_detects_jsonl_and_csv(tmp_path, files):
    path = tmp_path / "s.db"
    run("add", path, "-", input=files["jsonl"].read_text())
    run("add", path, "-", "--format", "csv", input="1,2," + ",".join(["0"] * 14) + "\n")
    run("add", path, "-", input="id,key," + ",".join(f"c{i}" for i in range(16)) + "\n"
        + "9000,extra," + ",".join(["1"] * 16) + "\n")
    assert json.loads(run("info", path, "--json"))["count"] == 602
    got = json.loads(run("get", path, "--key", "extra", "--json"))
    assert got[0]["id"] == 9000 and got[0]["vector"] == [1.0] * 16


def test_add_skip_existing_keys(db, files):
    assert "keys already in the store" in fails("add", db, files["jsonl"])
    out = run("add", db, files["jsonl"], "--skip-existing-keys")
    assert "Added 0 vectors" in out and "skipped 600 already stored" in out


def test_add_train_then_search_by_vector(db, vectors):
    info = json.loads(run("info", db, "--json"))
    assert info["trained"] and info["codebook_version"] == 1 and info["count"] == 600
    q = json.dumps(vectors[42].tolist())
    out = run("search", db, "--vector", q, "-k", "5")
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "id", "key", "distance"] and len(lines) == 7
    assert lines[2].split()[:3] == ["1", "42", "doc-42"]
    rows = json.loads(run("search", db, "--vector", q, "-k", "5", "--rerank", "1", "--json"))
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["query"] == 0 and r["key"] == f"doc-{r['id']}" for r in rows)


def test_search_by_a_prefix_of_the_codes_and_nprobe(db, vectors):
    q = json.dumps(vectors[42].tolist())
    rows = json.loads(run("search", db, "--vector", q, "-k", "5", "--rerank", "1",
                          "--stages", "1", "--nprobe", "3", "--json"))
    with Store.open(db, readonly=True) as store:
        want = store.search(vectors[42], k=5, rerank=1, stages=1)
    assert [r["id"] for r in rows] == want.ids.tolist()
    np.testing.assert_allclose([r["distance"] for r in rows], want.distances, rtol=1e-6)
    assert "stages must be an integer in [1, " in fails("search", db, "--vector", q,
                                                        "--stages", "99")
    assert "nprobe must be an integer >= 1" in fails("search", db, "--vector", q,
                                                     "--nprobe", "0")


def test_search_like_a_stored_item(db, vectors):
    rows = json.loads(run("search", db, "--key", "doc-7", "-k", "4", "--json"))
    assert rows[0]["id"] == 7 and rows[0]["distance"] == 0.0 and len(rows) == 4
    truth = exact_search(vectors, vectors[7:8], k=5).ids[0]
    same = json.loads(run("search", db, "--id", "7", "-k", "4", "--json"))
    assert [r["id"] for r in same] == [r["id"] for r in rows]
    others = json.loads(run("search", db, "--id", "7", "-k", "4", "--exclude-self", "--json"))
    assert [r["id"] for r in others] == [r["id"] for r in rows[1:]] + [int(truth[4])]


def test_search_a_query_file_csv_output(db, tmp_path, vectors):
    qpath = tmp_path / "q.npy"
    np.save(qpath, vectors[:3])
    rows = list(csv.DictReader(io.StringIO(run("search", db, qpath, "-k", "2", "--csv"))))
    assert len(rows) == 6
    assert [(r["query"], r["rank"], r["id"]) for r in rows[::2]] == [
        ("0", "1", "0"), ("1", "1", "1"), ("2", "1", "2")]
    assert float(rows[1]["distance"]) >= float(rows[0]["distance"])
    table = run("search", db, qpath, "-k", "2")
    assert table.splitlines()[0].split() == ["query", "rank", "id", "key", "distance"]


def test_get_table_json_csv(db, vectors):
    table = run("get", db, "--key", "doc-1", "--key", "doc-2").splitlines()
    assert table[0].split() == ["id", "key", "vector"] and len(table) == 4
    assert "..." in table[2]
    got = json.loads(run("get", db, "--key", "doc-2", "--json"))
    assert got[0]["id"] == 2
    np.testing.assert_array_equal(np.float32(got[0]["vector"]), vectors[2])
    rows = list(csv.reader(io.StringIO(run("get", db, "--id", "3", "--csv"))))
    assert rows[0] == ["id", "key"] + [f"v{i}" for i in range(16)]
    np.testing.assert_array_equal(np.float32(rows[1][2:]), vectors[3])


def test_delete_compact_retrain(db):
    assert "Deleted 2 vectors" in run("delete", db, "--key", "doc-1", "--key", "doc-2")
    assert "Deleted 1 vector " in run("delete", db, "--id", "3")
    assert json.loads(run("info", db, "--json"))["deleted_pending_compact"] == 3
    assert "Compacted" in run("compact", db, "--quiet")
    assert "Retrained" in run("retrain", db)
    info = json.loads(run("info", db, "--json"))
    assert (info["count"], info["deleted_pending_compact"], info["codebook_version"]) == (597, 0, 2)
    ids = [r["id"] for r in json.loads(run("search", db, "--id", "0", "-k", "50", "--json"))]
    assert not {1, 2, 3} & set(ids)
    assert "Trained" in run("train", db, "-q")


def test_info_outputs_parse(db):
    table = run("info", db)
    assert table.splitlines()[0].split() == ["field", "value"] and "bytes.codes" in table
    rows = {r["field"]: r["value"] for r in csv.DictReader(io.StringIO(run("info", db, "--csv")))}
    assert rows["count"] == "600" and rows["trained"] == "True" and "bytes.file" in rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_reads_back(db, tmp_path, vectors, fmt):
    out = tmp_path / f"out.{fmt}"
    run("export", db, "-o", out)
    copy = tmp_path / "copy.db"
    run("add", copy, out)
    got = json.loads(run("get", copy, "--key", "doc-5", "--key", "doc-599", "--json"))
    assert [g["id"] for g in got] == [5, 599]
    np.testing.assert_array_equal(np.float32([g["vector"] for g in got]), vectors[[5, 599]])


def test_export_stdout_and_npy(db, tmp_path, vectors):
    lines = run("export", db).splitlines()
    assert len(lines) == 600
    first = json.loads(lines[0])
    assert first["id"] == 0 and first["key"] == "doc-0"
    run("export", db, "-o", tmp_path / "all.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), vectors)
    assert "needs -o" in fails("export", db, "--format", "npy", code=2)


def test_no_originals_store_refuses_get_with_one_line(tmp_path, files):
    path = tmp_path / "codes.db"
    run("create", path, "--no-originals", *SMALL)
    run("add", path, files["npy"], "--train")
    assert len(json.loads(run("search", path, "--vector", json.dumps([0.0] * 16), "--json"))) == 10
    assert "original" in fails("get", path, "--id", "1")


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    base = clustered(600, 16, centers=12, seed=3)
    queries = clustered(20, 16, centers=12, seed=4)
    np.save(folder / "base.npy", base.astype(np.float16))
    np.save(folder / "queries.npy", queries)
    np.save(folder / "gt_l2.npy", exact_search(base.astype(np.float16).astype(np.float32),
                                                queries, k=100).ids.astype(np.int32))
    return folder


def test_bench(dataset):
    args = ["bench", dataset, *SMALL, "--repeats", "1"]
    result = json.loads(run(*args, "--json"))
    assert [r["rerank"] for r in result["rows"]] == [1, 4, 10]
    assert result["vectors"] == 600 and result["queries"] == 20
    recalls = [r["recall_10_at_10"] for r in result["rows"]]
    assert recalls[2] >= 0.9 and recalls[2] >= recalls[0]
    assert all(r["qps_single"] > 0 for r in result["rows"])
    table = run(*args, "--limit", "300", "--queries", "5")
    assert table.splitlines()[0].split() == ["rerank", "10-recall@10", "QPS", "single"]
    assert "300 vectors" in table and "5 queries" in table
    rows = list(csv.DictReader(io.StringIO(run(*args, "--csv"))))
    assert [r["rerank"] for r in rows] == ["1", "4", "10"]


# -- errors -----------------------------------------------------------------------------------

def test_wrong_dimension_file(db, tmp_path):
    np.save(tmp_path / "wide.npy", np.ones((3, 8), np.float32))
    msg = fails("add", db, tmp_path / "wide.npy")
    assert "dim=8" in msg and "dim=16" in msg
    assert "dim=2" in fails("search", db, "--vector", "[1, 2]")


def test_malformed_json_lines_name_file_and_line(db, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"vector": [1, 2]}\n\n{"vector": [1, 2\n')
    assert fails("add", db, bad) == (
        f"Error: {bad} line 3: not valid JSON (Expecting ',' delimiter at column 17)\n")
    bad.write_text('{"vector": [1, 2]}\n{"vector": [1, 2, 3]}\n')
    assert "line 2: vector has 3 components, line 1 has 2" in fails("add", db, bad)
    bad.write_text('{"key": "a", "vector": [1, 2]}\n{"vector": [3, 4]}\n')
    assert "line 2" in fails("add", db, bad)
    bad.write_text('{"vector": ["1", 2]}\n')
    assert "line 1" in fails("add", db, bad)
    bad.write_text('{"embedding": [1, 2]}\n')
    assert 'no "vector"' in fails("add", db, bad)
    assert "<stdin> line 2" in fails("add", db, "-", input='[1, 2]\n[1, NaN]\n')


def test_unknown_ids_and_keys(db):
    assert "unknown ids: [999]" in fails("get", db, "--id", "999")
    assert "unknown keys: ['nope']" in fails("delete", db, "--key", "nope")
    assert "unknown" in fails("search", db, "--id", "999")
    assert "unknown" in fails("delete", db, "--id", "1", "--id", "999")
    assert json.loads(run("info", db, "--json"))["count"] == 600  # all or none


def test_not_a_store(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("hello, this is not a database\n" * 10)
    assert "not an rvqstore file" in fails("info", text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert "rvqstore" in fails("search", other, "--vector", "[1]")
    assert "rvqstore" in fails("add", other, "-", input="[1, 2]\n")


def test_missing_files(db, tmp_path):
    missing = tmp_path / "missing.db"
    for args in (["info", missing], ["search", missing, "--id", "1"], ["train", missing],
                 ["delete", missing, "--id", "1"], ["compact", missing], ["export", missing]):
        assert "does not exist" in fails(*args)
    assert not missing.exists()
    assert "cannot read" in fails("add", db, tmp_path / "nothing.npy")
    assert "no base.npy" in fails("bench", tmp_path)
    assert "Error: " in fails("export", db, "-o", tmp_path / "no" / "such" / "dir.jsonl")


def test_bad_input_files(db, tmp_path):
    (tmp_path / "t.fvecs").write_bytes(np.int32([16]).tobytes() + b"\0" * 10)
    assert "truncated" in fails("add", db, tmp_path / "t.fvecs")
    (tmp_path / "x.npy").write_text("not npy")
    assert "not a valid .npy" in fails("add", db, tmp_path / "x.npy")
    (tmp_path / "b.csv").write_text("1,2\n3,x\n")
    assert "b.csv line 2: column 2 is not a number: 'x'" in fails("add", db, tmp_path / "b.csv")
    (tmp_path / "v.txt").write_text("1,2\n")
    assert "extension" in fails("add", db, tmp_path / "v.txt")
    assert "empty" in fails("add", db, "-", input="")


def test_training_too_few_vectors(tmp_path):
    path = tmp_path / "few.db"
    run("add", path, "-", input="[1, 2]\n[3, 4]\n")
    assert "at least codebook_size" in fails("train", path)


@pytest.mark.parametrize("args", [
    ["search", "DB"],                                   # no query
    ["search", "DB", "--id", "1", "--key", "doc-1"],   # two queries
    ["search", "DB", "--vector", "[1, 2"],             # not JSON
    ["search", "DB", "--vector", '["a"]'],             # not numbers
    ["search", "DB", "--vector", "[0.5]", "--exclude-self"],
    ["search", "DB", "--id", "x"],
    ["info", "DB", "--json", "--csv"],
    ["get", "DB"],
    ["get", "DB", "--id", "1", "--key", "doc-1"],
    ["delete", "DB"],
    ["create", "NEW", "--metric", "manhattan"],
    ["add", "DB"],
    ["frobnicate"],
    ["info", "DB", "--nope"],
    ["text-search", "DB"],                             # no text
    ["text-search", "DB", "word", "--json", "--csv"],
    ["text-search", "DB", "word", "--where", "[1]"],
])
def test_usage_errors_exit_2(db, tmp_path, args):
    args = [str(db) if a == "DB" else str(tmp_path / "new.db") if a == "NEW" else a for a in args]
    assert fails(*args, code=2).startswith("Usage: ")


def test_refused_create_or_add_leaves_no_new_file(tmp_path):
    path = tmp_path / "s.db"
    assert "stages must be in [1, 64], got 0" in fails("create", path, "--stages", "0")
    assert not path.exists()
    assert "duplicates" in fails("add", path, "-", input='{"key": "a", "vector": [1]}\n' * 2)
    assert not path.exists() and not list(tmp_path.iterdir())
    run("create", path, "--stages", "8")


def test_add_refuses_keys_and_ids_a_store_cannot_hold(tmp_path):
    path = tmp_path / "s.db"
    assert fails("add", path, "-", input='{"key": "\\ud800", "vector": [1]}\n') == (
        "Error: <stdin> line 1: key '\\ud800' holds '\\ud800' at character 0, a lone "
        "surrogate that UTF-8 cannot encode\n")
    big = '{"id": 1, "vector": [1]}\n{"id": 9223372036854775808, "vector": [1]}\n'
    assert fails("add", path, "-", input=big) == (
        f"Error: <stdin> line 2: id must be an integer in [0, {MAX_ID}], "
        "got 9223372036854775808\n")
    for cell in ("1e20", "-5", "3.5"):
        assert fails("add", path, "-", "--format", "csv", input=f"id,x\n{cell},1\n") == (
            f"Error: <stdin> line 2: id must be an integer in [0, {MAX_ID}], got '{cell}'\n")
    assert not path.exists()


class _ClosedStdin(io.BytesIO):
    """Standard input closed by the time the command reads it."""

    def read(self, size=-1):
        if size == 0:  # click's CliRunner probes the stream
            return b""
        raise ValueError("I/O operation on closed file.")


class _FailingStdin(io.RawIOBase):
    def readable(self):
        return True

    def readinto(self, buffer):
        raise OSError(errno.EIO, "Input/output error")


def test_add_from_a_closed_or_failing_stdin(tmp_path):
    path = tmp_path / "s.db"
    assert fails("add", path, "-", input=_ClosedStdin()) == (
        "Error: cannot read <stdin>: standard input is closed\n")
    assert fails("add", path, "-", input=io.BufferedReader(_FailingStdin())) == (
        "Error: cannot read <stdin>: Input/output error\n")
    assert not path.exists()


def test_ids_out_of_range_on_the_command_line_are_usage_errors(db):
    for command in ("get", "delete", "search"):
        for value in (2**63, MAX_ID + 1, -1):
            assert "is not in the range 0<=x<=" in fails(command, db, "--id", value, code=2)


def test_export_csv_of_long_and_padded_keys_reads_back(tmp_path):
    """A key over the csv module's default field limit (128 KiB), and keys whose spaces,
    quotes, commas and newlines are part of them."""
    keys = ["k" * (200 * 1024), " padded ", 'a "quoted", key\nover two lines']
    src, copy, out = tmp_path / "src.db", tmp_path / "copy.db", tmp_path / "out.csv"
    run("add", src, "-", input="".join(json.dumps({"id": 10 + i, "key": k, "vector": [i, 1]})
                                       + "\n" for i, k in enumerate(keys)))
    run("export", src, "-o", out)
    run("add", copy, out)
    got = json.loads(run("get", copy, "--id", "10", "--id", "11", "--id", "12", "--json"))
    assert got == [{"id": 10 + i, "key": k, "vector": [float(i), 1.0]} for i, k in enumerate(keys)]


def test_tables_escape_control_characters_and_json_csv_keep_them(tmp_path):
    keys = ["\x1b]0;retitled\x07", "csi\x9b31m", "tab\there\nnew\rline\x7f", "\x00\x1f"]
    shown = ["\\x1b]0;retitled\\x07", "csi\\x9b31m", "tab\\there\\nnew\\rline\\x7f",
             "\\x00\\x1f"]
    path = tmp_path / "k.db"
    run("add", path, "-", input="".join(json.dumps({"key": k, "vector": [i, 1]}) + "\n"
                                        for i, k in enumerate(keys)))
    ids = [a for i in range(len(keys)) for a in ("--id", i)]
    for table in (run("get", path, *ids), run("search", path, "--vector", "[0, 1]", "-k", "4")):
        assert not [c for c in table if c != "\n" and (c < " " or "\x7f" <= c <= "\x9f")]
        assert table.count("\n") == 2 + len(keys)
        assert all(s in table for s in shown), table
    assert [g["key"] for g in json.loads(run("get", path, *ids, "--json"))] == keys
    rows = list(csv.reader(io.StringIO(run("get", path, *ids, "--csv"), newline="")))
    assert [r[1] for r in rows[1:]] == keys


def test_an_error_line_stays_one_line(tmp_path):
    bad = tmp_path / "two\nlines\x1b[2J.csv"
    bad.write_text("1,2\n3,x\n")
    assert fails("add", tmp_path / "s.db", bad) == (
        f"Error: {tmp_path}/two\\nlines\\x1b[2J.csv line 2: column 2 is not a number: 'x'\n")


def _raises(exc):
    def method(*args, **kwargs):
        raise exc
    return method


@pytest.mark.parametrize("exc, shown", [
    (sqlite3.OperationalError("database or disk is full"), "database or disk is full"),
    (sqlite3.DatabaseError("database disk image is malformed"), "database disk image is malformed"),
    (sqlite3.IntegrityError("UNIQUE constraint failed: vectors.key"),
     "UNIQUE constraint failed: vectors.key"),
    (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/elsewhere/x.db-wal"),
     None),
])
def test_sqlite_and_os_errors_escaping_the_library_are_one_line(db, monkeypatch, exc, shown):
    monkeypatch.setattr(rvqstore.Store, "info", _raises(exc))
    where = db if shown else "/elsewhere/x.db-wal"
    assert fails("info", db) == f"Error: {where}: {shown or 'No space left on device'}\n"


class _FullDisk(io.StringIO):
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_error_on_the_output_names_the_output(db, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(click, "open_file", lambda *args, **kwargs: _FullDisk())
    assert fails("export", db, "-o", out) == f"Error: {out}: No space left on device\n"


COMMAND_ARGS = {
    "create": ["NEW", "--dim", "4"], "add": ["NEW", "-"], "train": ["DB"], "retrain": ["DB"],
    "search": ["DB", "--id", "1"], "get": ["DB", "--id", "1"], "delete": ["DB", "--id", "1"],
    "compact": ["DB"], "info": ["DB"], "export": ["DB"], "bench": ["DATA"], "count": ["DB"],
    "text-search": ["DB", "word"], "import": ["EXPORT", "NEW"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_ARGS))
def test_every_command_turns_an_escaped_sqlite_error_into_one_line(
        db, tmp_path, dataset, monkeypatch, command):
    # a new command joins this test; shard build's stores are written by Dask workers (other
    # processes), and tests/test_dask.py checks its error lines
    assert set(COMMAND_ARGS) == set(main.commands) - {"shard"}
    paths = {"NEW": tmp_path / "new.db", "DB": db, "DATA": dataset, "EXPORT": tmp_path / "q"}
    if command == "import":  # a quantized export to import (needs pyarrow)
        if not os.environ.get("RVQSTORE_CI"):
            pytest.importorskip("pyarrow")
        run("export", db, "--quantized", paths["EXPORT"])
    monkeypatch.setattr(rvqstore.Store, "open", _raises(sqlite3.OperationalError("disk I/O error")))
    args = [paths.get(a, a) for a in COMMAND_ARGS[command]]
    message = fails(command, *args, input="[1, 2, 3, 4]\n")
    # bench's store is a temporary file; import's is its second argument
    where = "" if command == "bench" else f"{args[-1 if command == 'import' else 0]}: "
    assert message == f"Error: {where}disk I/O error\n"


@pytest.mark.parametrize("exc", [TypeError("a bug"), AttributeError("a bug"),
                                 sqlite3.ProgrammingError("Cannot operate on a closed database.")])
def test_programming_errors_keep_their_traceback(db, monkeypatch, exc):
    monkeypatch.setattr(rvqstore.Store, "info", _raises(exc))
    result = CliRunner().invoke(main, ["info", str(db)])
    assert result.exception is exc and "Error:" not in result.output


def test_an_interrupt_is_not_an_error_line(db, monkeypatch):
    monkeypatch.setattr(rvqstore.Store, "info", _raises(KeyboardInterrupt()))
    result = CliRunner().invoke(main, ["info", str(db)])
    assert result.exit_code == 1 and "Aborted!" in result.stderr and "Error" not in result.stderr


def test_bench_timings_leave_out_the_progress_callback(dataset, monkeypatch):
    """Each progress call moves the clock 1000 s on: no timing may include one."""
    real, moved, phases = time.perf_counter, [0.0], set()

    def progress(phase, done, total):
        phases.add(phase.split()[0])
        moved[0] += 1000.0

    monkeypatch.setattr(time, "perf_counter", lambda: real() + moved[0])
    data = benchmark.load_dataset(dataset, queries=10)
    result = benchmark.run(data, stages=4, codebook_size=32, repeats=2, progress=progress)
    assert {"add", "train", "search"} <= phases and moved[0] >= 10_000
    assert result["add_s"] < 1000 and result["train_s"] < 1000
    assert all(r["qps_single"] > 10 / 1000 for r in result["rows"])


def test_bench_claims_one_thread_only_when_it_checked(dataset, monkeypatch):
    import numba

    args = ["bench", dataset, *SMALL, "--repeats", "1", "--queries", "3"]
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # as if not installed
    table = run(*args)
    assert "call, 1 thread," not in table
    assert "numba 1 thread, BLAS threads unknown (threadpoolctl is not installed)" in table
    result = json.loads(run(*args, "--json"))
    assert result["threads"] == {"numba": 1, "blas": None} and result["search_threads"] is None
    monkeypatch.setattr(numba, "set_num_threads", lambda n: None)  # a limit that does not hold
    result = json.loads(run(*args, "--json"))
    assert result["threads"]["numba"] == numba.get_num_threads()
    if numba.get_num_threads() > 1:
        assert f"numba {numba.get_num_threads()} threads" in run(*args)


def test_bench_with_threadpoolctl_limits_and_says_so(dataset):
    pytest.importorskip("threadpoolctl")
    args = ["bench", dataset, *SMALL, "--repeats", "1", "--queries", "3"]
    result = json.loads(run(*args, "--json"))
    assert result["threads"] == {"numba": 1, "blas": 1} and result["search_threads"] == 1
    assert "one query per call, 1 thread, median of 1 runs" in run(*args)


@pytest.mark.parametrize("option", ["--repeats", "--queries", "--limit"])
def test_bench_counts_below_one_are_usage_errors(dataset, option):
    assert "x>=1" in fails("bench", dataset, option, "0", code=2)


# -- the pieces under the commands -----------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet, terminal", [(False, True), (True, True), (False, False)])
def test_progress_draws_rate_and_eta_on_a_terminal_unless_quiet(monkeypatch, quiet, terminal):
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with _Progress.for_terminal(quiet) as bar:
        for done in (0, 50, 100):
            bar("encode", done, 100)
        bar("compact", 0, 2)  # left unfinished: leaving the block ends its line
    err = err.getvalue()
    if quiet or not terminal:
        assert err == ""
    else:
        assert "encode" in err and "100/100" in err and "ETA" in err and "/s" in err
        assert err.endswith("\n") and "compact" in err


def test_read_vectors_ids_keys_and_csv_header(tmp_path):
    p = tmp_path / "v.jsonl"
    p.write_text('{"id": 5, "key": "a", "vector": [1, 2]}\n'
                 '{"id": 9, "key": "b", "vector": [3, 4.5]}\n')
    loaded = read_vectors(p)
    assert loaded.ids.tolist() == [5, 9] and loaded.keys == ["a", "b"]
    assert loaded.vectors.dtype == np.float32 and loaded.vectors.tolist() == [[1, 2], [3, 4.5]]
    p = tmp_path / "v.csv"
    p.write_text("key,x,y\r\nk1,1,2\r\nk2,3,4\r\n")
    loaded = read_vectors(p)
    assert loaded.ids is None and loaded.keys == ["k1", "k2"] and loaded.vectors.shape == (2, 2)
    with pytest.raises(InputFileError, match="v.csv line 3: 2 columns, expected 3"):
        p.write_text("id,x,y\n1,1,2\n2,3\n")
        read_vectors(p)
    assert isinstance(InputFileError("x"), rvqstore.InvalidInputError)


def test_parse_vector():
    assert parse_vector("[0.5, -1, 2e-1]").tolist() == pytest.approx([0.5, -1, 0.2])
    for bad in ("[]", "[[1, 2]]", '{"a": 1}', "[true, 1]", "[1, NaN]", "1,2"):
        with pytest.raises(rvqstore.InvalidInputError):
            parse_vector(bad)


# -- metadata, documents and filters ----------------------------------------------------------

def _item(i, v):
    """Line i of the metadata store: every item has a group, every second a document."""
    item = {"key": f"doc-{i}", "vector": v.tolist(), "metadata": {"group": i % 3, "tags": ["x"]}}
    if i % 2 == 0:
        item["document"] = f"text {i}"
    return item


@pytest.fixture
def mdb(tmp_path, vectors):
    """The 600 vectors with metadata (group i % 3) on all and documents on the even ones."""
    src = tmp_path / "meta.jsonl"
    src.write_text("".join(json.dumps(_item(i, v)) + "\n" for i, v in enumerate(vectors)))
    path = tmp_path / "meta.db"
    run("create", path, "--dim", "16", *SMALL)
    run("add", path, src, "--train")
    return path


def test_add_reads_metadata_and_documents_from_json_lines(mdb):
    with rvqstore.Store.open(mdb, readonly=True) as store:
        assert store.metadata(keys=["doc-4", "doc-5"]) == [{"group": 1, "tags": ["x"]},
                                                           {"group": 2, "tags": ["x"]}]
        assert store.documents(keys=["doc-4", "doc-5"]) == ["text 4", None]


def test_add_reads_metadata_and_document_columns_from_csv(tmp_path):
    path = tmp_path / "c.db"
    run("add", path, "-", "--format", "csv", input=(
        'key,x,metadata,y,document\n'
        'a,1,"{""year"": 2024, ""tags"": [""eu""]}",2," spaced, text "\n'
        'b,3,,4,\n'))
    with rvqstore.Store.open(path, readonly=True) as store:
        assert store.get(keys=["a", "b"]).tolist() == [[1, 2], [3, 4]]
        assert store.metadata(keys=["a", "b"]) == [{"year": 2024, "tags": ["eu"]}, None]
        assert store.documents(keys=["a", "b"]) == [" spaced, text ", None]


@pytest.mark.parametrize("line, message", [
    ('{"vector": [3, 4], "metadata": [1]}', '"metadata" must be an object, got [1]'),
    ('{"vector": [3, 4], "metadata": {"$year": 1}}', "metadata key '$year' starts with '$'"),
    ('{"vector": [3, 4], "metadata": {"a": {"b": 1}}}', "metadata key 'a'"),
    ('{"vector": [3, 4], "document": 7}', '"document" must be a string, got 7'),
])
def test_bad_metadata_and_documents_name_file_and_line(mdb, tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"vector": [1, 2], "metadata": {"a": 1}, "document": "ok"}\n' + line + "\n")
    assert fails("add", mdb, bad).startswith(f"Error: {bad} line 2: {message}")
    assert run("count", mdb) == "600\n"


def test_bad_csv_metadata_names_file_and_line(tmp_path):
    path = tmp_path / "c.db"
    for cell, message in (('"{""a"": 1"', "metadata is not valid JSON"),
                          ("[1]", "metadata must be a JSON object, got '[1]'")):
        assert fails("add", path, "-", "--format", "csv",
                     input=f'metadata,x\n"{{}}",1\n{cell},2\n').startswith(
            f"Error: <stdin> line 3: {message}")
    assert not path.exists()


def test_add_with_metadata_is_one_transaction(mdb, tmp_path):
    """A key already stored on the last line: nothing of the file is added."""
    src = tmp_path / "more.jsonl"
    src.write_text(json.dumps({"key": "new", "vector": [0.0] * 16, "metadata": {"group": 9}})
                   + "\n" + json.dumps({"key": "doc-1", "vector": [0.0] * 16}) + "\n")
    assert "already" in fails("add", mdb, src)
    assert run("count", mdb, "--where", '{"group": 9}') == "0\n"
    assert run("count", mdb) == "600\n"


def test_add_upsert_replaces_by_key(mdb, tmp_path):
    src = tmp_path / "up.jsonl"
    src.write_text(json.dumps({"key": "doc-4", "vector": [1.0] * 16, "metadata": {"group": 7}})
                   + "\n" + json.dumps({"key": "fresh", "vector": [2.0] * 16,
                                        "document": "new"}) + "\n")
    out = run("add", mdb, src, "--upsert")
    assert "Added 1 vector to" in out and "replaced 1 already stored" in out
    got = json.loads(run("get", mdb, "--key", "doc-4", "--key", "fresh", "--json"))
    assert got[0] == {"id": 4, "key": "doc-4", "vector": [1.0] * 16, "metadata": {"group": 7}}
    assert got[1]["id"] == 600 and got[1]["document"] == "new" and "metadata" not in got[1]
    assert run("count", mdb) == "601\n"
    assert "no keys" in fails("add", mdb, "-", "--upsert", input="[1, 2]\n")
    assert "give ids" in fails("add", mdb, "-", "--upsert",
                               input='{"id": 1, "key": "a", "vector": [1, 2]}\n')
    assert "not both" in fails("add", mdb, src, "--upsert", "--skip-existing-keys", code=2)


def test_search_where_keeps_k_results_that_pass(mdb, vectors):
    q = json.dumps(vectors[0].tolist())
    rows = json.loads(run("search", mdb, "--vector", q, "-k", "20", "--where",
                          '{"group": 1}', "--json"))
    assert len(rows) == 20 and all(r["id"] % 3 == 1 for r in rows)
    assert "metadata" not in rows[0] and "document" not in rows[0]
    few = json.loads(run("search", mdb, "--key", "doc-0", "--exclude-self", "--json",
                         "--where", '{"$and": [{"group": 0}, {"group": {"$in": [0, 2]}}]}'))
    assert [r["id"] % 3 for r in few] == [0] * 10 and 0 not in [r["id"] for r in few]
    assert run("search", mdb, "--id", "0", "--where", '{"group": 5}', "--json") == "[]\n"


def test_search_with_metadata_and_documents(mdb, vectors):
    args = ["search", mdb, "--id", "4", "-k", "3", "--with-metadata", "--with-documents"]
    rows = json.loads(run(*args, "--json"))
    assert rows[0]["metadata"] == {"group": 1, "tags": ["x"]}
    assert rows[0]["document"] == "text 4"
    assert all(("document" in r) and (r["document"] is None) == (r["id"] % 2 == 1)
               for r in rows)
    cells = list(csv.DictReader(io.StringIO(run(*args, "--csv"))))
    assert list(cells[0]) == ["query", "rank", "id", "key", "distance", "metadata", "document"]
    assert json.loads(cells[0]["metadata"]) == {"group": 1, "tags": ["x"]}
    assert cells[0]["document"] == "text 4"
    table = run(*args).splitlines()
    assert table[0].split() == ["rank", "id", "key", "distance", "metadata", "document"]
    assert '{"group": 1, "tags": ["x"]}' in table[2] and "text 4" in table[2]
    assert "metadata" not in run("search", mdb, "--id", "4", "-k", "3")


def test_tables_shorten_and_escape_metadata_and_documents(tmp_path):
    path = tmp_path / "t.db"
    doc = "\x1b[2Jcleared " + "long " * 50
    meta = {"note": "bell\x07" + "y" * 100}
    run("add", path, "-", input=json.dumps({"key": "a", "vector": [1, 2], "metadata": meta,
                                            "document": doc}) + "\n")
    for table in (run("get", path, "--key", "a"),
                  run("search", path, "--vector", "[1, 2]", "--with-metadata",
                      "--with-documents")):
        assert not [c for c in table if c != "\n" and (c < " " or "\x7f" <= c <= "\x9f")]
        row = table.splitlines()[2]
        assert "\\x1b[2Jcleared long" in row and '{"note": "bell\\u0007yyy' in row
        assert "long " * 10 not in row and "y" * 50 not in row and "..." in row
    got = json.loads(run("get", path, "--key", "a", "--json"))[0]
    assert (got["metadata"], got["document"]) == (meta, doc)
    cells = next(csv.DictReader(io.StringIO(run("get", path, "--key", "a", "--csv"),
                                            newline="")))
    assert (json.loads(cells["metadata"]), cells["document"]) == (meta, doc)


@pytest.mark.parametrize("where, code, message", [
    ('{"group": ', 2, "the filter is not valid JSON"),
    ("[1, 2]", 2, "the filter must be a JSON object, got [1, 2]"),
    ('"group"', 2, "the filter must be a JSON object"),
    ('{"group": {"$near": 1}}', 1, "$near"),
    ('{"group": {"$gt": [1]}}', 1, "$gt"),
])
def test_a_malformed_filter_is_a_usage_error_or_one_error_line(mdb, where, code, message):
    for args in (["search", mdb, "--id", "1"], ["count", mdb], ["delete", mdb]):
        assert message in fails(*args, "--where", where, code=code)
    assert run("count", mdb) == "600\n"


def test_count_and_delete_where(mdb):
    assert run("count", mdb) == "600\n"
    assert run("count", mdb, "--where", '{"group": {"$ne": 0}}') == "400\n"
    assert run("delete", mdb, "--where", '{"group": 2}') == (
        f"Deleted 200 vectors from {mdb} (400 left)\n")
    assert run("count", mdb, "--where", '{"group": 2}') == "0\n"
    assert "Deleted 0 vectors" in run("delete", mdb, "--where", '{"group": 2}')
    for args in ([], ["--id", "1", "--where", "{}"], ["--key", "doc-1", "--where", "{}"]):
        assert "give one of --id, --key" in fails("delete", mdb, *args, code=2)
    assert "Deleted 400 vectors" in run("delete", mdb, "--where", "{}")


def test_get_shows_metadata_and_documents_where_items_have_them(mdb):
    got = json.loads(run("get", mdb, "--id", "4", "--id", "5", "--json"))
    assert got[0]["metadata"] == {"group": 1, "tags": ["x"]} and got[0]["document"] == "text 4"
    assert "document" not in got[1] and got[1]["metadata"] == {"group": 2, "tags": ["x"]}
    assert run("get", mdb, "--id", "5").splitlines()[0].split() == ["id", "key", "vector",
                                                                    "metadata"]
    rows = list(csv.reader(io.StringIO(run("get", mdb, "--id", "4", "--id", "5", "--csv"))))
    assert rows[0][:4] == ["id", "key", "metadata", "document"] and rows[2][3] == ""


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_round_trips_metadata_and_documents(mdb, tmp_path, vectors, fmt):
    out, copy = tmp_path / f"out.{fmt}", tmp_path / "copy.db"
    run("export", mdb, "-o", out)
    if fmt == "jsonl":
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert lines[4]["metadata"] == {"group": 1, "tags": ["x"]} and "document" not in lines[5]
    else:
        assert out.read_text().startswith("id,key,metadata,document,v0,")
    run("add", copy, out)
    with rvqstore.Store.open(mdb, readonly=True) as a, rvqstore.Store.open(copy) as b:
        ids = a.ids()
        assert b.ids().tolist() == ids.tolist() and b.keys(ids) == a.keys(ids)
        assert b.metadata(ids) == a.metadata(ids) and b.documents(ids) == a.documents(ids)
        np.testing.assert_array_equal(b.get(ids), vectors)


def test_export_of_a_store_without_metadata_is_unchanged(db):
    lines = run("export", db).splitlines()
    assert all(list(json.loads(line)) == ["id", "key", "vector"] for line in lines)
    header = run("export", db, "--format", "csv").splitlines()[0]
    assert header == "id,key," + ",".join(f"v{i}" for i in range(16))
    assert run("get", db, "--id", "1").splitlines()[0].split() == ["id", "key", "vector"]


# -- keyword and hybrid search ----------------------------------------------------------------

def _strict_json(text):
    """JSON as the standard has it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_text_search_outputs_match_the_store(mdb):
    """Documents are "text i" on the even items: "text 4" ranks doc-4 first, then other
    documents that have "text"; --where and the extras as in search."""
    rows = _strict_json(run("text-search", mdb, "text 4", "-k", "5", "--json"))
    with rvqstore.Store.open(mdb, readonly=True) as store:
        want = store.text_search("text 4", k=5)
        where = store.text_search("text 4", k=3, where={"group": 1})
    assert [r["id"] for r in rows] == want.ids.tolist() and rows[0]["id"] == 4
    assert [r["score"] for r in rows] == [_f32(d) for d in want.distances]
    assert [list(r) for r in rows] == [["rank", "id", "key", "score"]] * 5
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["key"] == f"doc-{r['id']}" and r["id"] % 2 == 0 for r in rows)
    args = ["text-search", mdb, "text 4", "-k", "3", "--where", '{"group": 1}',
            "--with-metadata", "--with-documents"]
    rows = _strict_json(run(*args, "--json"))
    assert [r["id"] for r in rows] == where.ids.tolist() and 4 in where.ids
    assert all(r["metadata"] == {"group": 1, "tags": ["x"]} and r["document"] == f"text {r['id']}"
               for r in rows)
    cells = list(csv.DictReader(io.StringIO(run(*args, "--csv"))))
    assert list(cells[0]) == ["rank", "id", "key", "score", "metadata", "document"]
    assert [int(c["id"]) for c in cells] == where.ids.tolist()
    assert [float(c["score"]) for c in cells] == pytest.approx(where.distances.tolist())
    assert json.loads(cells[0]["metadata"]) == {"group": 1, "tags": ["x"]}
    table = run(*args).splitlines()
    assert table[0].split() == ["rank", "id", "key", "score", "metadata", "document"]
    assert len(table) == 2 + 3
    first = table[2].split()
    assert first[:3] == ["1", str(where.ids[0]), f"doc-{where.ids[0]}"]
    assert first[3] == f"{where.distances[0]:.4f}" and f"text {where.ids[0]}" in table[2]


def test_text_search_without_a_match_prints_no_rows(mdb):
    assert run("text-search", mdb, "zebra", "--json") == "[]\n"
    assert run("text-search", mdb, "zebra", "--csv") == "rank,id,key,score\n"
    assert run("text-search", mdb, "text", "--where", '{"group": 7}', "--json") == "[]\n"
    assert run("text-search", mdb, "zebra").splitlines()[0].split() == ["rank", "id", "score"]


def test_text_search_errors(db, mdb, tmp_path):
    """No documents to search, and text without a word: one error line each."""
    message = f"Error: {db} holds no documents to search"
    assert fails("text-search", db, "doc").startswith(message)
    empty = tmp_path / "empty.db"
    run("create", empty, "--dim", "16")
    assert fails("text-search", empty, "doc", "--json").startswith(f"Error: {empty} holds no")
    for text in ("", " ,;!? ", "--"):
        assert "has no words to search for" in fails("text-search", mdb, "--", text)
        assert "has no words to search for" in fails("search", mdb, "--id", "4", "--text", text)
    assert "k must be" in fails("text-search", mdb, "text", "-k", "0")
    assert "$near" in fails("text-search", mdb, "text", "--where", '{"group": {"$near": 1}}')


def test_text_search_takes_words_not_query_syntax(mdb):
    """FTS5 operators in TEXT are words like any other: no syntax error, no NOT."""
    rows = json.loads(run("text-search", mdb, 'text NOT "4" OR 6*', "-k", "600", "--json"))
    assert {4, 6} <= {r["id"] for r in rows}


def test_search_text_is_the_stores_hybrid_search(mdb, vectors, tmp_path):
    args = ["search", mdb, "--id", "8", "-k", "6", "--text", "40 12",
            "--with-documents"]
    rows = _strict_json(run(*args, "--json"))
    with rvqstore.Store.open(mdb, readonly=True) as store:
        want = store.search(vectors[8], k=6, text="40 12")
        plain = store.search(vectors[8], k=6)
        where = store.search(vectors[8], k=6, text="40 12", where={"group": 0})
    assert [r["id"] for r in rows] == want.ids.tolist() != plain.ids.tolist()
    assert {40, 12} <= set(want.ids.tolist())  # the text brought them in
    assert [r["distance"] for r in rows] == [_f32(d) for d in want.distances]
    assert all(r["document"] == f"text {r['id']}" for r in rows if r["id"] % 2 == 0)
    cells = list(csv.DictReader(io.StringIO(run(*args, "--csv"))))
    assert list(cells[0]) == ["query", "rank", "id", "key", "distance", "document"]
    assert [int(c["id"]) for c in cells] == want.ids.tolist()
    table = run(*args).splitlines()
    assert table[0].split() == ["rank", "id", "key", "distance", "document"]
    assert [int(line.split()[1]) for line in table[2:]] == want.ids.tolist()
    got = json.loads(run(*args, "--where", '{"group": 0}', "--json"))
    assert [r["id"] for r in got] == where.ids.tolist()
    assert all(i % 3 == 0 for i in where.ids) and 12 in where.ids
    one = tmp_path / "one.npy"
    np.save(one, vectors[8:9])
    assert json.loads(run("search", mdb, one, "-k", "6", "--text", "40 12",
                          "--with-documents", "--json")) == rows


def test_search_text_takes_one_query(mdb, vectors, tmp_path):
    three = tmp_path / "three.npy"
    np.save(three, vectors[:3])
    message = fails("search", mdb, three, "--text", "text", code=2)
    assert f"--text (hybrid search) takes one query; {three} holds 3" in message
    message = fails("search", mdb, "-", "--format", "csv", "--text", "text", code=2,
                    input="1" + ",0" * 15 + "\n2" + ",0" * 15 + "\n")
    assert "<stdin> holds 2" in message


def test_search_text_in_a_store_without_documents_ranks_by_vector(db, vectors):
    q = json.dumps(vectors[3].tolist())
    plain = json.loads(run("search", db, "--vector", q, "-k", "5", "--json"))
    assert json.loads(run("search", db, "--vector", q, "-k", "5", "--text", "doc",
                          "--json")) == plain


def test_hybrid_distances_a_store_cannot_compute_are_blank(tmp_path, vectors):
    """Without originals an item found by its text alone has no distance: null in JSON,
    an empty cell in CSV and the table, never a non-JSON Infinity."""
    path = tmp_path / "codes.db"
    run("create", path, "--no-originals", *SMALL)
    src = tmp_path / "meta.jsonl"
    src.write_text("".join(json.dumps(_item(i, v)) + "\n" for i, v in enumerate(vectors)))
    run("add", path, src, "--train")
    args = ["search", path, "--vector", json.dumps(vectors[1].tolist()), "-k", "200",
            "--text", "text"]
    with pytest.raises(ValueError, match="not JSON"):  # what Infinity would do
        _strict_json('[{"distance": Infinity}]')
    rows = _strict_json(run(*args, "--json"))
    assert len(rows) == 200
    blank = [r for r in rows if r["distance"] is None]
    assert blank and all(r["id"] % 2 == 0 for r in blank)  # documents on even items only
    assert all(isinstance(r["distance"], float) for r in rows if r["distance"] is not None)
    cells = list(csv.DictReader(io.StringIO(run(*args, "--csv"))))
    assert [c["distance"] == "" for c in cells] == [r["distance"] is None for r in rows]
    table = run(*args).splitlines()[2:]
    assert [len(line.split()) == 3 for line in table] == [r["distance"] is None for r in rows]


def _f32(x):
    return float(str(np.float32(x)))


def test_a_missing_extra_is_one_error_line_naming_it(db, tmp_path, monkeypatch):
    from rvqstore import arrow

    def missing():
        raise ImportError("Arrow and Parquet need pyarrow: pip install 'rvqstore[arrow]'")

    monkeypatch.setattr(arrow, "_pyarrow", missing)
    assert fails("export", db, "-o", tmp_path / "x.parquet") == (
        "Error: Arrow and Parquet need pyarrow: pip install 'rvqstore[arrow]'\n")
