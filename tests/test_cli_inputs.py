"""The input readers under ``rvqstore add`` and ``search QUERYFILE``: what they refuse, and
that every refusal is an InputFileError naming the file, the line and the value."""

import csv
import io
import os
import re
import subprocess
import sys

import pytest

import rvqstore
from rvqstore import inputs
from rvqstore.inputs import MAX_ID, InputFileError, parse_object, parse_vector, read_vectors


def _jsonl(tmp_path, *lines):
    path = tmp_path / "v.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _csv(tmp_path, *lines):
    path = tmp_path / "v.csv"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_lone_surrogate_key_is_refused_with_its_line(tmp_path):
    path = _jsonl(tmp_path, '{"key": "fine", "vector": [1, 2]}',
                  '{"key": "ab\\ud800", "vector": [3, 4]}')
    with pytest.raises(InputFileError, match=r"v\.jsonl line 2: key 'ab\\ud800' holds "
                                             r"'\\ud800' at character 2, a lone surrogate"):
        read_vectors(path)
    # a surrogate pair is one character, and welcome
    path = _jsonl(tmp_path, '{"key": "\\ud83d\\ude00", "vector": [1, 2]}')
    assert read_vectors(path).keys == ["\U0001F600"]


@pytest.mark.parametrize("value", [2**63, 2**63 - 1, -1, -5, 10**30])
def test_json_ids_outside_0_to_max_id_are_refused(tmp_path, value):
    path = _jsonl(tmp_path, '{"id": 1, "vector": [1, 2]}', f'{{"id": {value}, "vector": [3, 4]}}')
    with pytest.raises(InputFileError,
                       match=rf"v\.jsonl line 2: id must be an integer in \[0, {MAX_ID}\], "
                             rf"got {value}$"):
        read_vectors(path)


@pytest.mark.parametrize("cell", ["1e20", "-5", "-1", "3.5", "9223372036854775807",
                                  "99999999999999999999", "0x10", "1_000", "١٢"])
def test_csv_ids_outside_0_to_max_id_are_refused(tmp_path, cell):
    path = _csv(tmp_path, "id,x,y", "1,1,2", f"{cell},3,4")
    with pytest.raises(InputFileError, match=r"v\.csv line 3: id must be an integer in "
                                             rf"\[0, {MAX_ID}\], got '{cell}'$"):
        read_vectors(path)


def test_ids_at_the_ends_of_the_range_are_taken(tmp_path):
    path = _jsonl(tmp_path, f'{{"id": 0, "vector": [1, 2]}}',
                  f'{{"id": {MAX_ID}, "vector": [3, 4]}}')
    assert read_vectors(path).ids.tolist() == [0, MAX_ID]
    path = _csv(tmp_path, "id,x,y", "+7,1,2", f" {MAX_ID} ,3,4")
    assert read_vectors(path).ids.tolist() == [7, MAX_ID]


def test_json_python_cannot_parse_is_invalid_input(tmp_path):
    """An integer of thousands of digits and deep nesting are not JSONDecodeError."""
    digits = "1" * 5000
    for text in (f"[{digits}, 2]", "[" * 100_000 + "]" * 100_000):
        with pytest.raises(InputFileError, match=r"v\.jsonl line 2: not valid JSON"):
            read_vectors(_jsonl(tmp_path, "[1, 2]", text))
        with pytest.raises(rvqstore.InvalidInputError, match="the query is not valid JSON"):
            parse_vector(text, name="the query")


class _Failing(io.RawIOBase):
    def readable(self):
        return True

    def readinto(self, buffer):
        raise OSError(5, "Input/output error")


def _closed():
    stream = io.TextIOWrapper(io.BytesIO(b"[1, 2]\n"))
    stream.close()
    return stream


@pytest.mark.parametrize("stdin, message", [
    (None, "standard input is closed"),
    (_closed(), "standard input is closed"),
    (io.TextIOWrapper(io.BufferedReader(_Failing())), "Input/output error"),
])
def test_an_unreadable_stdin_is_an_input_file_error(monkeypatch, stdin, message):
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(InputFileError, match=f"^cannot read <stdin>: {message}$"):
        read_vectors("-")


def test_a_text_stream_in_place_of_stdin_is_read(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"key": "é", "vector": [1, 2]}\n'))
    assert read_vectors("-").keys == ["é"]


def test_add_with_stdin_closed_prints_one_error_line(tmp_path):
    """A real process whose descriptor 0 is closed: Python sets sys.stdin to None."""
    db = tmp_path / "s.db"
    proc = subprocess.run([sys.executable, "-m", "rvqstore", "add", str(db), "-"],
                          capture_output=True, text=True, preexec_fn=lambda: os.close(0),
                          cwd=os.path.dirname(os.path.dirname(rvqstore.__file__)))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "Error: cannot read <stdin>: standard input is closed\n"
    assert not db.exists()


def test_csv_fields_longer_than_the_csv_module_default(tmp_path):
    key = "k" * (csv.field_size_limit() + 1)
    path = _csv(tmp_path, "id,key,x,y", f"1,{key},1,2")
    before = csv.field_size_limit()
    assert read_vectors(path).keys == [key]
    assert csv.field_size_limit() == before  # the process-wide limit is put back


def test_csv_field_over_our_limit_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "CSV_FIELD_LIMIT", 100)
    path = _csv(tmp_path, "id,key,x,y", "1,short,1,2", f"2,{'k' * 101},3,4")
    with pytest.raises(InputFileError,
                       match=r"v\.csv line 3: a field is longer than 100 characters"):
        read_vectors(path)


def test_csv_keys_are_taken_as_written(tmp_path):
    path = _csv(tmp_path, "id, key ,x,y", '1," padded\t",1,2', "2,plain, 3 , 4 ")
    loaded = read_vectors(path)
    assert loaded.keys == [" padded\t", "plain"] and loaded.vectors.tolist() == [[1, 2], [3, 4]]


def test_json_ids_and_keys_of_the_wrong_type(tmp_path):
    for text in ('{"id": true, "vector": [1]}', '{"id": "7", "vector": [1]}',
                 '{"id": 7.0, "vector": [1]}', '{"key": 7, "vector": [1]}'):
        with pytest.raises(InputFileError, match=r"v\.jsonl line 1: "):
            read_vectors(_jsonl(tmp_path, text))


def test_metadata_and_documents_on_some_lines_or_none(tmp_path):
    loaded = read_vectors(_jsonl(tmp_path, '{"vector": [1, 2], "metadata": {"a": [1, "x"]}}',
                                 '{"vector": [3, 4], "metadata": null, "document": "d"}',
                                 '[5, 6]'))
    assert loaded.metadata == [{"a": [1, "x"]}, None, None]
    assert loaded.documents == [None, "d", None]
    plain = read_vectors(_jsonl(tmp_path, '{"key": "k", "vector": [1, 2]}'))
    assert plain.metadata is None and plain.documents is None
    assert read_vectors(_csv(tmp_path, "x,y", "1,2")).metadata is None


@pytest.mark.parametrize("text, message", [
    ('{"vector": [1], "metadata": "a=1"}', '"metadata" must be an object, got "a=1"'),
    ('{"vector": [1], "metadata": {"": 1}}', "metadata key is empty"),
    ('{"vector": [1], "metadata": {"n": 1e400}}', "metadata key 'n'"),
    ('{"vector": [1], "metadata": {"n": 99999999999999999999}}', "metadata key 'n'"),
    ('{"vector": [1], "metadata": {"l": [[1]]}}', "a list may hold only scalars"),
    ('{"vector": [1], "document": ["a"]}', '"document" must be a string, got ["a"]'),
    ('{"vector": [1], "document": "ab\\ud800"}',
     "document 'ab\\ud800' holds '\\ud800' at character 2, a lone surrogate"),
])
def test_bad_metadata_and_documents_name_the_line(tmp_path, text, message):
    path = _jsonl(tmp_path, '{"vector": [0], "metadata": {"a": 1}}', text)
    with pytest.raises(InputFileError) as info:
        read_vectors(path)
    assert str(info.value).startswith(f"{path} line 2: ") and message in str(info.value)


def test_csv_metadata_and_document_columns(tmp_path):
    path = _csv(tmp_path, "Document,x,METADATA,y", '" as written ",1," {""a"": 1} ",2', ",3,,4")
    loaded = read_vectors(path)
    assert loaded.vectors.tolist() == [[1, 2], [3, 4]]
    assert loaded.metadata == [{"a": 1}, None] and loaded.documents == [" as written ", None]
    for cell, message in (('"{""$a"": 1}"', "metadata key '$a' starts with '$'"),
                          ("7", "metadata must be a JSON object, got '7'"),
                          ("{", "metadata is not valid JSON")):
        with pytest.raises(InputFileError, match=r"v\.csv line 2: " + re.escape(message)):
            read_vectors(_csv(tmp_path, "metadata,x", f"{cell},1"))


def test_parse_object():
    assert parse_object('{"a": {"$gt": 1}}') == {"a": {"$gt": 1}}
    for bad, message in (("[1]", "must be a JSON object, got [1]"), ("{", "is not valid JSON"),
                         ("null", "must be a JSON object, got null")):
        with pytest.raises(rvqstore.InvalidInputError, match=re.escape(f"the filter {message}")):
            parse_object(bad, name="the filter")
