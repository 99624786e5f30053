"""teach.py: the course tool. `verify` (the teacher's check) passes; start -> grade fails on the cut tree ->
the reference pasted back -> grade passes (the grader runs the student's tree, not the reference); one-line
errors; the markers parse. The grading tests themselves live in tests/exercises/ and run in the suite too."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import teach  # noqa: E402


def _teach(*args, cwd=ROOT, script=None, timeout=600):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, script or os.path.join(cwd, "teach.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_verify_passes():
    r = _teach("verify")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "verify: OK" in r.stdout


def test_start_grade_paste_back_round_trip(tmp_path):
    tree = tmp_path / "student"
    r = _teach("start", "rope", str(tree))
    assert r.returncode == 0, r.stderr
    assert not (tree / ".git").exists() and not list(tree.rglob("__pycache__"))
    assert not (tree / "teach" / "wrong").exists(), "the stored wrong implementations must not reach a student"
    text = (tree / "model.py").read_text()
    assert 'raise NotImplementedError("exercise rope: see docs/exercises/rope.md")' in text
    assert "x.chunk(2, dim=-1)" not in text.split("def rope")[1].split("class KVCache")[0]
    # the student's tree grades with its own copy of teach.py, from its own directory
    r = _teach("grade", "rope", cwd=tree)
    assert r.returncode == 1 and "score 0.00" in r.stdout, r.stdout + r.stderr
    res = json.loads((tree / "grade.json").read_text())
    assert res["score"] == 0 and res["tests"][0]["name"] == "rope"
    assert "NotImplementedError: exercise rope" in res["tests"][0]["output"]
    # paste the reference back between the markers: full marks
    body = teach.region_text(ROOT, "rope")[0]
    (tree / "model.py").write_text(teach.splice(text, "rope", [body]))
    r = _teach("grade", "rope", f"--tree={tree}", f"--json={tmp_path / 'g.json'}", cwd=tmp_path,
               script=str(tree / "teach.py"))
    assert r.returncode == 0 and "score 1.00" in r.stdout, r.stdout + r.stderr
    assert json.loads((tmp_path / "g.json").read_text())["score"] == 1.0


def test_cut_text_keeps_everything_else():
    """Cutting touches only the region's lines; the markers and the rest of the file stay byte for byte."""
    for name, e in teach.EXERCISES.items():
        for f in e["files"]:
            text = open(os.path.join(ROOT, f)).read()
            cut = teach.splice(text, name, None, f)
            regions = [r for r in teach.regions(text, f) if r[0] == name]
            removed = sum(e - b - 1 for _, b, e, _ in regions)
            assert len(cut.splitlines()) == len(text.splitlines()) - removed + len(regions)
            assert teach.splice(text, name, teach.region_text(ROOT, name), f) == text  # pasting back restores it


@pytest.mark.parametrize("args,needle", [(["start", "ropee"], "unknown exercise 'ropee'"),
                                         (["grade", "--tre=x"], "unknown flag --tre"),
                                         (["frobnicate"], "unknown command 'frobnicate'"),
                                         (["verify", "--fast"], "unknown flag --fast")])
def test_one_line_errors(args, needle):
    r = _teach(*args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unclosed_marker_is_named():
    with pytest.raises(ValueError, match="exercise 'x' is never closed"):
        teach.regions("def f():\n    # >>> exercise: x\n    return 1\n", "f.py")


def test_list_names_every_exercise():
    r = _teach("list")
    assert r.returncode == 0
    for name, e in teach.EXERCISES.items():
        assert name in r.stdout and teach.grading_file(name) in r.stdout
    assert len(teach.EXERCISES) >= 10 and {e["tier"] for e in teach.EXERCISES.values()} == {"small", "medium", "large"}
