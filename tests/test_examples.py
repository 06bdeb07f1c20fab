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


def test_cli_walkthrough_runs():
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", str(ROOT / "examples" / "cli_walkthrough.sh"), "1500"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "doc-7" in out.stdout and "exported 1499 vectors" in out.stdout
