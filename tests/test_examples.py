"""The shipped demo and examples run, at a small size."""

import runpy
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs(capsys):
    from rvqstore import demo

    demo.main(n=3000, dim=16, stages=4)
    out = capsys.readouterr().out
    assert "with exact rerank" in out and "retrained" in out


def test_quickstart_example_runs(capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    mod["main"](n=2000, dim=16)
    out = capsys.readouterr().out
    assert "retrained, recall@10" in out and "doc-600" in out


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "vecs.db").exists()
