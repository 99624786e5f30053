"""reproduce.py: the seed significance rule, the step plan, and an end-to-end `micro` reproduction that
fills every cell of the tables (and skips every step when rerun)."""
import json
import os
import re

import numpy as np
import pytest

import reproduce as rp


def _seeds(*vals):  # one cell per seed: (value, question-sampling half-width, chance)
    return rp.combine([{"x": (v, 0.05, 0.5)} for v in vals])["x"]


def test_star_needs_three_seeds_one_sign_and_a_mean_beyond_two_standard_errors():
    one, other = _seeds(0.90), _seeds(0.10)
    assert one["mean"] == 0.90 and one["n"] == 1 and one["chance"] == 0.5
    assert not rp.compare(one, other)["star"]  # one seed: no claim, however large the difference
    assert not rp.compare(_seeds(0.9, 0.8), _seeds(0.1, 0.1))["star"]  # two seeds: still no claim
    # paired by seed: differences +0.10, +0.12, +0.08 -> mean 0.10, sd 0.02; 0.10 > 2 * 0.02 / sqrt(3) = 0.023
    a, b = _seeds(0.60, 0.40, 0.70), _seeds(0.50, 0.28, 0.62)
    d = rp.compare(a, b)
    assert d["mean"] == pytest.approx(0.10) and d["sd"] == pytest.approx(0.02) and d["n"] == 3 and d["star"]
    # the seed spread of each row (sd 0.15) is far larger than the difference: pairing is what finds it
    assert a["sd"] > 0.1 and b["sd"] > 0.1
    # one difference of the other sign: no star, whatever the mean
    assert not rp.compare(_seeds(0.60, 0.40, 0.70), _seeds(0.50, 0.28, 0.71))["star"]
    # one sign but a mean inside 2 sd / sqrt(n): differences 0.01, 0.01, 0.20 -> mean 0.073, sd 0.11, 2 sd / sqrt(3) = 0.127
    assert not rp.compare(_seeds(0.51, 0.51, 0.70), _seeds(0.50, 0.50, 0.50))["star"]
    # a missing seed drops that pair
    c = rp.combine([{"x": (0.6, 0.0, None)}, None, {"x": (0.7, 0.0, None)}])["x"]
    assert c["vals"] == [0.6, None, 0.7] and c["n"] == 2
    assert rp.compare(c, _seeds(0.5, 0.5, 0.5))["n"] == 2


def test_above_blind_uses_the_seed_rule_with_three_seeds_and_the_question_interval_with_one():
    assert rp.above(_seeds(0.70), _seeds(0.55))  # 0.15 > hypot(0.05, 0.05) = 0.071
    assert not rp.above(_seeds(0.60), _seeds(0.55))
    assert rp.above(_seeds(0.60, 0.62, 0.61), _seeds(0.55, 0.56, 0.55))
    assert not rp.above(_seeds(0.60, 0.50, 0.61), _seeds(0.55, 0.56, 0.55))  # one seed below


def test_plan_has_every_step_once_after_its_dependencies():
    c = rp.ReproConfig(preset="micro", seeds=(0, 1), data="/d", runs="/r", results="/o", base_share=0.25, shares=(0.5,))
    steps = rp.plan(c)
    names = [st["name"] for st in steps]
    assert len(names) == len(set(names))
    for i, st in enumerate(steps):  # listed in a valid order; every dependency exists
        assert all(d in names[:i] for d in st["deps"]), st
    flag = lambda st, key: next((a.split("=", 1)[1] for a in st["argv"] if a.startswith(f"--{key}=")), None)
    for s in (0, 1):  # stage 0 once per seed, on its own scenes; every recipe starts from that seed's stage 0
        base = next(st for st in steps if st["name"] == f"s{s} stage 0")
        assert "--recipe=base" in base["argv"] and flag(base, "seed") == str(s) and flag(base, "scenes") == "0.75:1"
        for r in rp.RECIPES:
            st = next(st for st in steps if st["name"] == f"s{s} {r}")
            assert f"s{s} eval {r}" in names and flag(st, "init") == f"/r/seed{s}/base" and flag(st, "scenes") == "0:0.75"
        for r in ("sft", "gem"):  # the data-efficiency arms: half of the recipes' scenes
            assert flag(next(st for st in steps if st["name"] == f"s{s} {r}_50pct"), "scenes") == "0:0.375"
        for v in rp.VLAS:
            assert f"s{s} eval {v}" in names
    blind = next(st for st in steps if st["name"] == "s0 blind")
    assert flag(blind, "recipe") == "sft" and flag(blind, "blind") == "true"
    # the share arms come after every main step, so the tables never wait for them
    assert max(i for i, n in enumerate(names) if "pct" not in n) < min(i for i, n in enumerate(names) if "pct" in n)
    vla_gem = next(st for st in steps if st["name"] == "s0 vla_gem")
    assert "--depth_weight=0.1" in vla_gem["argv"] and "--init=/r/seed0/gem" in vla_gem["argv"]
    assert "s0 gem" in vla_gem["deps"] and "demos" in vla_gem["deps"]
    few = rp.needed(steps, {"s1 eval gem_50pct"})  # a subset of the plan with everything it needs
    assert [st["name"] for st in few] == ["data", "s1 stage 0", "s1 gem_50pct", "s1 eval gem_50pct"]


def test_a_ready_vla_training_starts_before_the_other_recipes():
    """The VLAs are the longest steps and end the longest chain: once sft is trained, its VLA goes ahead of the
    recipes still waiting (plan order would start them first); then the evaluations, which the tables need."""
    steps = rp.plan(rp.config(["--preset=tiny", "--seeds=0", "--data=/d", "--runs=/r", "--results=/x"]))
    done = {"data", "demos", "s0 stage 0", "s0 sft"}
    todo = [st for st in steps if st["name"] not in done]
    names = [st["name"] for st in rp.ready(todo, done)]
    assert names[0] == "s0 vla_sft" and "s0 gem" in names and "s0 vla_gem" not in names
    evals = [n for n in names if n in ("rules", "text-only") or n.startswith(("reference", "s0 eval"))]
    assert "s0 eval sft" in evals and names[1:1 + len(evals)] == evals  # evaluations before the recipes still to train
    for part in (evals, names[1 + len(evals):]):  # each group in plan order
        assert part == [st["name"] for st in todo if st["name"] in part]


def _table_rows(text: str) -> list[str]:  # the three result tables (not the step times)
    return [ln for ln in text.split("## Step times")[0].splitlines() if ln.startswith("| ")]


def _tables(text: str) -> list[dict]:
    """Each markdown table of the results page -> {row name: {column: cell}}."""
    out = []
    for block in text.split("## Step times")[0].split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
        if len(lines) < 2:
            continue
        head = [c.strip() for c in lines[0].strip("|").split("|")]
        out.append({cells[0]: dict(zip(head[1:], cells[1:])) for cells in
                    ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])})
    return out


@pytest.fixture(scope="module")
def micro_repro(tmp_path_factory):
    """One uninterrupted `micro` reproduction -> (args, its root, every page written on the way, the final page,
    its printed output, its results.json as first written)."""
    import contextlib
    import io
    tmp = tmp_path_factory.mktemp("repro")
    args = ["--preset=micro", "--seeds=0", f"--data={tmp}/data", f"--runs={tmp}/runs", f"--results={tmp}/results"]
    pages, write = [], rp.write_readme  # the page is rewritten as each step finishes (a cut run keeps its tables)

    def spy(c, log, wall, missing=()):
        text = write(c, log, wall, missing)
        pages.append((list(missing), text))
        return text
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(rp, "write_readme", spy)
        text = rp.main(args)
    return args, tmp, pages, text, out.getvalue(), json.load(open(tmp / "results" / "results.json"))


def test_micro_reproduction_fills_every_cell(micro_repro, capsys):
    args, tmp_path, pages, text, printed, _ = micro_repro
    n_steps = len(rp.plan(rp.ReproConfig(preset="micro")))
    assert "partial page was not written" not in printed
    assert [len(m) for m, _ in pages] == list(range(n_steps - 1, -1, -1)) + [0]  # one page per step, then the last
    assert f"Partial page: {n_steps - 1} steps not finished" in pages[0][1] and "Partial page" not in text
    assert _tables(pages[0][1])[0]["sft"]["macro"] == "n/a"  # only the data made
    half = next(t for m, t in pages if "s0 eval sft" not in m and m)  # sft evaluated, other steps still to run
    assert _tables(half)[0]["sft"]["macro"] != "n/a" and "Partial page" in half
    with open(tmp_path / "results" / "README.md") as f:
        assert f.read() == text
    rows = _table_rows(text)
    assert len(rows) >= 4 * 2 + 3 + 5 + 4 + 5  # headers and chance rows, then model and difference rows
    # every cell filled; the micro test split may happen to hold no held-out colour x shape pair
    combos = json.load(open(tmp_path / "runs" / "seed0" / "gem" / "eval_test" / "results.json"))["heldout_combo"]
    for t in _tables(text):
        for name, row in t.items():
            assert not [c for col, c in row.items() if c == "n/a" and not (col == "held-out combos" and combos is None)], (name, row)
            assert "nan" not in "".join(row.values()), (name, row)
    # the cells are the evaluations' numbers: recomputed here from each run's results.json
    t1, _, _, t2 = _tables(text)[:4]  # table 1, image use, 1b (per type), 2

    def mean(per, types, key="score"):
        types = [t for t in types if t in per]
        return f"{100 * sum(per[t][key] for t in types) / len(types):.1f}"
    probe = {}
    for r in rp.RECIPES:  # the columns are the in-distribution ("seen") test questions
        a = json.load(open(tmp_path / "runs" / "seed0" / r / "eval_test" / "results.json"))
        per = a["seen"]["per_type"]
        if r in t2:
            assert t2[r]["reasoning (VSI-like)"].split()[0] == mean(per, a["seen"]["per_family"]["reasoning"]["types"]), r
            probe[r] = a["depth"]["probe"]["fg_ordinal"]
            assert t2[r]["probe ordinal"].split()[0] == f"{100 * probe[r]:.1f}", r
        if r in t1:
            assert t1[r]["macro"].split()[0] == mean(per, a["seen"]["macro"]["types"]), r
            assert t1["chance"]["macro"] == mean(per, a["seen"]["macro"]["types"], "chance")
    assert t2["gem − direct"]["probe ordinal"].split()[0] == f"{100 * (probe['gem'] - probe['direct']):+.1f}".replace("-", "−")
    assert "one seed" not in text and "1 training seed: no claim" in text and "*" not in "".join(_table_rows(text))
    saved = json.load(open(tmp_path / "results" / "results.json"))  # every per-seed number, for later pooling
    assert set(saved["vlm"]) == set(rp.RECIPES) and saved["seeds"] == [0]
    gem = json.load(open(tmp_path / "runs/seed0/gem/eval_test/results.json"))
    assert saved["vlm"]["gem"]["0"]["macro"][0] == pytest.approx(gem["seen"]["macro"]["score"])
    for t in ("closer", "fit", "height"):  # the 2D-rule row holds numbers where micro has such test questions
        if t in gem["seen"]["per_type"]:
            assert re.fullmatch(r"\d+\.\d \(±\d+\.\d\)", _tables(text)[2]["2D rule"][t]), t
    for needle in ("| gem − sft |", "| vla_gem − vla_sft |", "| expert |", "| random |", "60.0 / 28.9 / 72.7"):
        assert needle in text
    assert re.search(r"\| expert \| 100\.0", text)  # the scripted expert solves its episodes
    # the speed table: a row per run and stage; samples/s and ms/step are two readings of the same clock
    speed = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.split("## Training speed")[1].splitlines()
             if ln.startswith("| ") and not ln.startswith("| run")]
    assert {(r[0], r[1]) for r in speed} >= {("stage 0", "0"), ("gem", "1"), ("gem", "2"), ("gem", "3"), ("sft", "3"),
                                             ("vla_sft", "vla"), ("vla_gem", "vla")}
    for run, stage, steps, ms, per_s, tflops, mfu, total, total_mfu, beside in speed:
        assert float(ms) > 0 and float(tflops) > 0 and mfu == total_mfu == "n/a", run  # no GPU: no MFU
        assert float(per_s) == pytest.approx(4 * 1000 / float(ms), rel=0.02, abs=1), (run, stage)  # micro: batch 4
        assert float(total) > 0 and all(b.startswith("s0 ") for b in beside.split(", ") if b), (run, stage)
    # rerun: every step is skipped, the README is the same
    capsys.readouterr()
    again = rp.main(args)
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == n_steps
    assert _table_rows(again) == rows
    # rerun with another flag: the steps it changes are redone (old folders moved aside), the others skipped
    rp.main(args + ["--episodes=2"])
    out = capsys.readouterr().out
    redo = {"s0 eval vla_sft", "s0 eval vla_gem"}
    assert out.count("done earlier, skipped") == n_steps - 2 and all(f"{n}: its settings" in out for n in redo)
    assert (tmp_path / "runs/seed0/vla_gem/eval_vla.stale-1/results.json").is_file()
    assert json.load(open(tmp_path / "results" / "results.json"))["vla"]["vla_gem"]["0"]["avg"][0] is not None


def test_rerun_redoes_changed_steps_and_what_follows_them(tmp_path, capsys):
    """fresh_steps: a step done with the same argv and code is skipped; one whose argv (or code) changed is
    moved aside and redone, and so is every step after it; an interrupted step with the same argv and code
    keeps its folder (it resumes)."""
    def step(name, script, deps=(), flag="x"):
        return dict(name=name, out=str(tmp_path / name), argv=["py", script, f"--f={flag}"], deps=list(deps))
    steps = [step("data", "data.py"), step("train", "train_pretrain.py", ["data"]), step("eval", "eval.py", ["train"]),
             step("other", "eval.py", ["data"]), step("late", "eval.py", ["data"])]
    for st in steps:
        os.makedirs(st["out"])
        sig = dict(argv=st["argv"][1:], code=rp.step_code(st["argv"][1]))
        with open(os.path.join(st["out"], ".done" if st["name"] != "late" else ".started"), "w") as f:
            json.dump(dict(name=st["name"], sig=sig) if st["name"] != "late" else sig, f)
    assert rp.fresh_steps([dict(s) for s in steps]) == {"data", "train", "eval", "other"}  # late: unfinished, resumes
    assert os.path.isdir(tmp_path / "late") and not list(tmp_path.glob("*.stale-*"))
    steps[1] = step("train", "train_pretrain.py", ["data"], flag="y")  # another flag for the training
    assert rp.fresh_steps(steps) == {"data", "other"}
    assert sorted(p.name for p in tmp_path.glob("*.stale-*")) == ["eval.stale-1", "train.stale-1"]
    assert rp.step_code("train_pretrain.py") != rp.step_code("eval.py")  # eval.py imports more than the trainer
    with pytest.raises(SystemExit, match="--seeds=0,0"):
        rp.config(["--preset=micro", "--seeds=0,0"])


def test_speed_table_sums_the_runs_that_share_the_gpu(tmp_path):
    """Each run divides only its own FLOPs by the GPU's peak; the GPU total of a stage adds the FLOPs of every
    run whose log windows overlap its span, pro rata, and names those runs. Here A runs [0, 10] s at
    1 TFLOP/s, B [5, 15] s at 2 TFLOP/s, C [20, 30] s (never beside A or B); peak 100 TFLOP/s."""
    def run(name, stage, start, tflops):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            for k in range(5):  # five windows of 2 s
                t = start + 2 * (k + 1)
                f.write(json.dumps(dict(stage=stage, step=10 * (k + 1), samples_per_s=50.0, step_ms=200.0, tflops=tflops,
                                        mfu=tflops / 100, time=t, dt=2.0)) + "\n")
        return str(tmp_path / name)
    runs = {"A": run("A", 3, 0, 1.0), "B": run("B", 3, 5, 2.0), "C": run("C", 0, 20, 4.0)}
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in rp.speed(runs).splitlines()[2:])}
    # A over [0, 10]: its own 10 TFLOP + B's windows inside [5, 10] (5 s at 2 TFLOP/s) = 20 TFLOP in 10 s
    assert rows["A"][5:] == ["1", "1.0%", "2", "2.0%", "B"]
    # B over [5, 15]: its own 20 TFLOP + A's [5, 10] at 1 TFLOP/s = 25 TFLOP in 10 s
    assert rows["B"][5:] == ["2", "2.0%", "2.5", "2.5%", "A"]
    assert rows["C"][5:] == ["4", "4.0%", "4", "4.0%", ""]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (the steps run in their own sessions): a machine that dies."""
    import signal
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_killed_reproduction_reruns_to_the_same_results(micro_repro, tmp_path):
    """reproduce.py killed (with everything it started) once after a training checkpoint exists and once while
    an evaluation is writing, then rerun: the same results.json as the uninterrupted run."""
    import subprocess
    import sys
    import time
    args = ["--preset=micro", "--seeds=0", f"--data={tmp_path}/data", f"--runs={tmp_path}/runs", f"--results={tmp_path}/results",
            "--pretrain_flags=--ckpt_every=1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for ready in (lambda: (tmp_path / "runs/seed0/gem/stage1").is_dir(),  # a training checkpoint exists
                  lambda: any((tmp_path / "runs/seed0").glob("*/eval_*"))):  # an evaluation has started
        proc = subprocess.Popen([sys.executable, "reproduce.py"] + args, cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        t = time.time()
        while not ready() and proc.poll() is None and time.time() - t < 300:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the moment to kill it"
        _kill_tree(proc.pid)
        proc.wait()
    rp.main(args)
    again = json.load(open(tmp_path / "results" / "results.json"))
    assert again == micro_repro[5]


def test_star_rule_is_a_paired_t_test_with_holm():
    """Issue 22's rule: d = [1, 2, 3] (two-sided p = 0.074) starred under the old rule (one sign, mean 2 >
    2 sd / sqrt(3) = 1.15) and not under the t-test; d = [10, 11, 12] is starred. The t distribution against
    tabled values; Holm against a hand-worked example."""
    def pair(*d):
        return _seeds(*[0.5 + x for x in d]), _seeds(*[0.5] * len(d))
    null, clear = rp.compare(*pair(1, 2, 3)), rp.compare(*pair(10, 11, 12))
    assert null["p"] == pytest.approx(0.0742, abs=5e-4) and not null["star"]
    assert clear["p"] == pytest.approx(0.00275, abs=5e-5) and clear["star"]
    # the smallest detectable difference at sd 1 over 3 seeds: t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732
    assert null["mdd"] == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-3)
    assert rp.t_quantile(0.975, 2) == pytest.approx(4.3027, rel=1e-4) and rp.t_quantile(0.975, 9) == pytest.approx(2.2622, rel=1e-4)
    assert 2 * rp.t_sf(2.776, 4) == pytest.approx(0.05, abs=2e-4) and rp.t_sf(0.0, 5) == pytest.approx(0.5)
    # Holm over p = 0.01, 0.04, 0.03, 0.005 at 0.05: 0.005 * 4 = 0.02 and 0.01 * 3 = 0.03 pass, 0.03 * 2 = 0.06 stops
    comps = [dict(n=3, p=p) for p in (0.01, 0.04, 0.03, 0.005)]
    assert [c["star"] for c in rp.holm(comps)] == [True, False, False, True]
    # the image-use check is one-sided and outside the claims' correction: d = [1, 2, 3] has one-sided p = 0.037
    assert rp.above(*pair(1, 2, 3)) and not rp.above(*pair(-1, -2, -3))
    # under the null, the old rule starred ~18% of comparisons; the t-test stars ~5%
    rng = np.random.default_rng(0)
    stars = np.mean([rp.compare(*pair(*rng.normal(0, 1, 3)))["star"] for _ in range(4000)])
    assert 0.035 < stars < 0.065


def test_micro_page_has_the_text_only_row(micro_repro):
    """Table 1b holds the text-only baseline beside the 2D rule: a number on each reasoning type the test split
    has, and no model on the others."""
    t1b = _tables(micro_repro[3])[2]
    for t in rp.TYPES:
        cell = t1b["text-only"][t]
        assert (re.fullmatch(r"\d+\.\d \(±\d+\.\d\)", cell) or cell == "n/a") if t in rp.REASONING else cell == "not reasoning", (t, cell)
    assert any(re.fullmatch(r"\d+\.\d \(±\d+\.\d\)", t1b["text-only"][t]) for t in rp.REASONING)


def test_micro_page_says_whether_each_model_uses_its_image(micro_repro):
    """The image-use table: each model's share of answers changed by a grey image (blind's: none: it never saw
    an image) and its image-token spread, from each evaluation's results.json."""
    text, root = micro_repro[3], micro_repro[1]
    t = next(t for t in _tables(text) if "answers changed by a grey image" in next(iter(t.values())))
    for r in ("blind", "sft", "gem"):
        u = json.load(open(root / "runs" / "seed0" / r / "eval_test" / "results.json"))["image_use"]
        assert t[r]["answers changed by a grey image"] == f"{100 * u['changed']:.1f}" and t[r]["image-token spread"] == f"{u['tokens']:.3f}"
    assert t["blind"]["answers changed by a grey image"] == "0.0"
