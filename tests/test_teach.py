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

INSTRUCTOR = os.path.join(ROOT, "teach.py")  # this repository's teach.py: the instructor's grade


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
    assert not list(tree.rglob("oracles.py")), "the oracles (a working rope, attention, flow_pair) must not reach a student"
    assert not (tree / "teach" / "hidden").exists() and not list(tree.rglob("test_hidden*")), "hidden cases stay hidden"
    text = (tree / "model.py").read_text()
    assert 'raise NotImplementedError("exercise rope: see docs/exercises/rope.md")' in text
    assert "x.chunk(2, dim=-1)" not in text.split("def rope")[1].split("class KVCache")[0]
    # the student's tree grades with its own copy of teach.py, from its own directory
    r = _teach("grade", "rope", cwd=tree)
    assert r.returncode == 1 and "score 0.00" in r.stdout, r.stdout + r.stderr
    res = json.loads((tree / "grade.json").read_text())
    assert res["score"] == 0 and res["tests"][0]["name"] == "rope"
    assert "NotImplementedError: exercise rope" in res["tests"][0]["output"]
    # paste the reference back between the markers: the copy's own grade passes what it can run (the oracle
    # comparison is skipped there), the instructor's grade of that tree gives full marks
    body = teach.region_text(ROOT, "rope")[0]
    (tree / "model.py").write_text(teach.splice(text, "rope", [body]))
    r = _teach("grade", "rope", cwd=tree)
    assert r.returncode == 0 and "score 1.00" in r.stdout and "skipped" in r.stdout, r.stdout + r.stderr
    r = _teach("grade", "rope", f"--tree={tree}", f"--json={tmp_path / 'g.json'}", cwd=tmp_path,
               script=INSTRUCTOR)
    assert r.returncode == 0 and "score 1.00" in r.stdout and "skipped" not in r.stdout, r.stdout + r.stderr
    assert json.loads((tmp_path / "g.json").read_text())["score"] == 1.0


FLOW_PAIR = {  # bodies a student might submit for flow_pair
    "import_oracles": "import oracles\nreturn oracles.flow_pair(x0, noise, t)\n",
    "hidden_import": "ns = {}\nexec('import ora' + 'cles as o', ns)\nreturn ns['o'].flow_pair(x0, noise, t)\n",
    "flipped_target": "t = t.view(-1, *[1] * (x0.dim() - 1))\nreturn (1 - t) * x0 + t * noise, x0 - noise\n",
    "from_scratch": "tt = t.reshape([x0.shape[0]] + [1] * (x0.dim() - 1))\nreturn x0 + tt * (noise - x0), noise - x0\n",
}


@pytest.fixture(scope="module")
def flow_pair_copy(tmp_path_factory):
    tree = tmp_path_factory.mktemp("fp") / "student"
    r = _teach("start", "flow_pair", str(tree))
    assert r.returncode == 0, r.stderr
    return tree


def _grade_flow_pair(tree, body, tmp_path, replace_test=False):
    """The instructor's grade (this repository's teach.py) of the copy with `body` in flow_pair's region."""
    p = tree / "depth_head.py"
    text = p.read_text()
    if body is not None:
        p.write_text(teach.splice(text, "flow_pair", [body]))
    test = tree / "tests" / "exercises" / "test_ex_flow_pair.py"
    original = test.read_text()
    if replace_test:
        test.write_text("def test_shapes_and_finite():\n    pass\n")
    try:
        r = _teach("grade", "flow_pair", f"--tree={tree}", f"--json={tmp_path / 'g.json'}", cwd=tmp_path,
               script=INSTRUCTOR)
    finally:
        p.write_text(text)
        test.write_text(original)
    return json.loads((tmp_path / "g.json").read_text())["score"], r.stdout


@pytest.mark.parametrize("name,want", [("import_oracles", 0.0), ("hidden_import", 0.0), ("flipped_target", None),
                                       ("from_scratch", 1.0)])
def test_grade_trusts_only_the_region(flow_pair_copy, tmp_path, name, want):
    """Cheat (a) of issue 24 (the oracle imported from the region, by name or hidden) scores 0; a plausible
    mistake scores below the pass mark; a correct body written differently from the reference scores 1."""
    got, out = _grade_flow_pair(flow_pair_copy, FLOW_PAIR[name], tmp_path)
    if want is None:
        assert 0 < got < teach.PASS_MARK and "the target is flipped" in out, out
    else:
        assert got == want, out


def test_a_replaced_grading_test_does_not_score(flow_pair_copy, tmp_path):
    """Cheat (b): the student's copy of test_ex_flow_pair.py emptied, the hole left in: the instructor's tests run."""
    got, out = _grade_flow_pair(flow_pair_copy, None, tmp_path, replace_test=True)
    assert got == 0.0 and "NotImplementedError: exercise flow_pair" in out, out


def test_a_copy_holds_no_solution_of_any_exercise(tmp_path):
    """Cheat (c): cutting rope,attention leaves no line of any exercise's solution (nor the oracles) in the copy;
    an exercise that calls others (cfg: euler_sample, connector) gets them as reference code, nothing else."""
    r = _teach("start", "rope,attention", str(tmp_path / "ra"))
    assert r.returncode == 0, r.stderr
    problems = []
    teach.check_no_solution(str(tmp_path / "ra"), problems)
    assert not problems, problems[:5]
    assert "rope, attention" in (tmp_path / "ra" / "STUDENT.md").read_text()
    r = _teach("start", "cfg", str(tmp_path / "cfg"))
    assert r.returncode == 0, r.stderr
    problems = []
    teach.check_no_solution(str(tmp_path / "cfg"), problems)
    leaked = {p.split("exercise ")[1].split("'")[0] for p in problems}
    assert leaked == {"euler_sample", "connector"}, problems[:5]
    student = (tmp_path / "cfg" / "STUDENT.md").read_text()
    assert "euler_sample, connector" in student and "verify" not in student.split("README")[0]
    readme = (tmp_path / "cfg" / "README.md").read_text()
    assert "STUDENT.md" in readme and "teach.py verify" not in readme and "teach.py grade" in readme
    r = _teach("verify", cwd=tmp_path / "cfg")
    assert r.returncode == 2 and "instructor's repository only" in r.stderr, r.stderr


def test_rubric_keeps_wrong_code_below_the_pass_mark():
    """Shape test 10 %, one failing test caps the exercise below the pass mark; all passing is 1."""
    ok, bad = dict(outcome="passed", message=""), dict(outcome="failed", message="AssertionError")
    mine = {f"f.py::{teach.SHAPE_TEST}": ok, **{f"f.py::t{i}": ok for i in range(9)}}
    assert teach.score(mine) == 1.0
    assert teach.score({**mine, "f.py::t0": bad}) == teach.FAIL_CAP < teach.PASS_MARK
    assert teach.score({f"f.py::{teach.SHAPE_TEST}": ok, "f.py::t0": bad}) == pytest.approx(teach.SHAPE_WEIGHT)
    assert teach.score({**mine, "f.py::t0": dict(outcome="skipped", message="")}) == teach.FAIL_CAP


def test_gradescope_package_grades_submissions(flow_pair_copy, tmp_path):
    """`package flow_pair` -> autograder.zip; its run_autograder (not setup.sh) grades submissions of the edited
    file into results.json: a correct body written from scratch 1, a wrong one below the pass mark, cheats 0."""
    import stat
    import zipfile
    r = _teach("package", "flow_pair", str(tmp_path / "autograder.zip"))
    assert r.returncode == 0, r.stderr
    ag = tmp_path / "ag"
    with zipfile.ZipFile(tmp_path / "autograder.zip") as z:
        names = z.namelist()
        z.extractall(ag / "source")
    assert {"setup.sh", "run_autograder", "teach/oracles.py", "teach.py", "depth_head.py", "teach/hidden/seed",
            "teach/hidden/test_hidden_small.py"} <= set(names), names[:20]
    assert not [n for n in names if "teach/wrong" in n or "/.git/" in n]
    run = ag / "run_autograder"
    run.write_text((ag / "source" / "run_autograder").read_text())  # where Gradescope puts it
    run.chmod(run.stat().st_mode | stat.S_IEXEC)
    handout = (flow_pair_copy / "depth_head.py").read_text()
    submissions = {"from_scratch": (FLOW_PAIR["from_scratch"], False), "flipped_target": (FLOW_PAIR["flipped_target"], False),
                   "import_oracles": (FLOW_PAIR["import_oracles"], False), "replaced_test": (None, True)}
    scores, hidden = {}, {}
    for name, (body, replace_test) in submissions.items():
        sub = ag / "submission"
        if sub.exists():
            import shutil
            shutil.rmtree(sub)
        sub.mkdir()
        (sub / "depth_head.py").write_text(handout if body is None else teach.splice(handout, "flow_pair", [body]))
        if replace_test:
            (sub / "tests" / "exercises").mkdir(parents=True)
            (sub / "tests" / "exercises" / "test_ex_flow_pair.py").write_text("def test_shapes_and_finite():\n    pass\n")
        p = subprocess.run(["bash", str(run)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, AUTOGRADER_ROOT=str(ag), PYTHON=sys.executable, PYTHONDONTWRITEBYTECODE="1"))
        res = json.loads((ag / "results" / "results.json").read_text())
        scores[name] = res["score"]
        hidden[name] = [t for t in res["tests"] if t["name"] == "flow_pair (hidden cases)"]
        assert res["tests"][0]["name"] == "flow_pair" and res["tests"][0]["max_score"] == 1.0, p.stdout + p.stderr
    assert scores["from_scratch"] == 1.0 and 0 < scores["flipped_target"] < teach.PASS_MARK, scores
    assert scores["import_oracles"] == 0 and scores["replaced_test"] == 0, scores
    # the hidden cases (inputs from the seed package drew) are reported apart, shown once grades are published
    for name in ("from_scratch", "flipped_target"):
        assert len(hidden[name]) == 1 and hidden[name][0]["visibility"] == "after_published", hidden
    assert "all 3 hidden cases pass" in hidden["from_scratch"][0]["output"]
    assert "flow_pair: a hidden case differs" in hidden["flipped_target"][0]["output"], hidden


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
                                         (["start", "rope", "attention", "x"], "takes NAMES [DIR]"),
                                         (["start", "rope,atention", "x"], "unknown exercise 'atention'"),
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
        assert f"~{teach.minutes(name)} min" in r.stdout and teach.TEACHES[name][2] in r.stdout
    assert len(teach.EXERCISES) >= 10 and {e["tier"] for e in teach.EXERCISES.values()} == {"small", "medium", "large"}


DEPTH_ITEM = """import sys, torch, data
root, out, cache = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
tok = data.load_tokenizer(root + "/tokenizer.json")
ds = data.GemDataset(root, "train", tok=tok, image_size=64, n_image_tokens=16, head_size=16, max_len=96, cache=cache)
torch.save(torch.stack([ds[i]["depth_target"] for i in range(len(ds))]), out)
"""


def test_a_fixed_depth_target_is_what_training_reads(micro_data, tmp_path):
    """A student trains with a wrong depth_target (the decode-once cache is built from it), then fixes the region:
    the cached items training reads follow the fix (the cache key hashes the code that fills it), equal to
    decoding the files with the fixed code, and differ from the wrong targets."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(micro_data, root)
    shutil.rmtree(root / "cache", ignore_errors=True)
    _, _, wrong = teach.load_wrong(os.path.join(ROOT, teach.WRONG, "depth_target__no_inversion.py"))
    tree = teach.make_tree(str(tmp_path / "student"), wrong={"depth_target": wrong})
    (tmp_path / "item.py").write_text(DEPTH_ITEM)

    def targets(name, cache):
        out = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, str(tmp_path / "item.py"), str(root), str(out), "1" if cache else "0"],
                           cwd=tree, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        import torch
        return torch.load(out)

    before = targets("wrong_cached", cache=True)
    p = os.path.join(tree, "data.py")
    text = open(p).read()
    open(p, "w").write(teach.splice(text, "depth_target", teach.region_text(ROOT, "depth_target"), "data.py"))
    fixed, decoded = targets("fixed_cached", cache=True), targets("fixed_files", cache=False)
    import torch
    assert torch.equal(fixed, decoded), "after the fix, the cache still serves targets other than the fixed code's"
    assert not torch.equal(fixed, before), "the wrong depth_target gave the same targets: the test shows nothing"
