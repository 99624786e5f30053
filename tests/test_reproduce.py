"""reproduce.py: the significance rule, the step plan, and an end-to-end `micro` reproduction that fills
every cell of the three tables (and skips every step when rerun)."""
import json
import os
import re

import pytest

import reproduce as rp


def test_combine_and_significance_rule():
    one = rp.combine([{"x": (0.60, 0.05, 0.5)}])["x"]
    other = rp.combine([{"x": (0.50, 0.05, 0.5)}])["x"]
    assert one["mean"] == 0.60 and one["n"] == 1 and one["chance"] == 0.5
    assert rp.significant(one, other)  # 0.10 > hypot(0.05, 0.05) = 0.0707
    close = rp.combine([{"x": (0.55, 0.05, 0.5)}])["x"]
    assert not rp.significant(close, other)  # 0.05 < 0.0707
    # several seeds: the spread over seeds decides, not the per-seed intervals
    a = rp.combine([{"x": (v, 0.0, None)} for v in (0.60, 0.62, 0.64)])["x"]
    b = rp.combine([{"x": (v, 0.0, None)} for v in (0.50, 0.56, 0.62)])["x"]
    assert a["sd"] == pytest.approx(0.02) and b["sd"] == pytest.approx(0.06)
    assert not rp.significant(a, b)  # diff 0.06 <= 0.02 + 0.06
    c = rp.combine([{"x": (v, 0.0, None)} for v in (0.40, 0.41, 0.42)])["x"]
    assert rp.significant(a, c)  # diff 0.20 > 0.03


def test_plan_has_every_step_once_after_its_dependencies():
    c = rp.ReproConfig(preset="micro", seeds=(0, 1), data="/d", runs="/r", results="/o")
    steps = rp.plan(c)
    names = [st["name"] for st in steps]
    assert len(names) == len(set(names))
    for i, st in enumerate(steps):  # listed in a valid order; every dependency exists
        assert all(d in names[:i] for d in st["deps"]), st
    assert sum(st["argv"][1:3] == ["train_pretrain.py", "--preset=micro"] and "--recipe=base" in st["argv"]
               for st in steps) == 1  # stage 0 once, shared by every seed
    for s in (0, 1):
        for r in rp.RECIPES:
            assert f"s{s} {r}" in names and f"s{s} eval {r}" in names
        for v in rp.VLAS:
            assert f"s{s} eval {v}" in names
    vla_gem = next(st for st in steps if st["name"] == "s0 vla_gem")
    assert "--depth_weight=0.1" in vla_gem["argv"] and "--init=/r/seed0/gem" in vla_gem["argv"]
    assert "s0 gem" in vla_gem["deps"] and "demos" in vla_gem["deps"]


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


def test_micro_reproduction_fills_every_cell(tmp_path, capsys):
    args = ["--preset=micro", "--seeds=0", f"--data={tmp_path}/data", f"--runs={tmp_path}/runs",
            f"--results={tmp_path}/results"]
    text = rp.main(args)
    with open(tmp_path / "results" / "README.md") as f:
        assert f.read() == text
    rows = _table_rows(text)
    assert len(rows) >= 3 + 1 + 6 + 3 + 5 + 1  # headers, chance rows, model rows and difference rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "n/a" not in cells and "nan" not in row, row
    # the cells are the evaluations' numbers: recomputed here from each run's results.json
    t1, t2 = _tables(text)[:2]

    def mean(per, types, key="score"):
        types = [t for t in types if t in per]
        return f"{100 * sum(per[t][key] for t in types) / len(types):.1f}"
    probe = {}
    for r in rp.RECIPES:
        a = json.load(open(tmp_path / "runs" / "seed0" / r / "eval_test" / "results.json"))
        per = a["all"]["per_type"]
        assert t2[r]["reasoning (VSI-like)"].split()[0] == mean(per, a["all"]["per_family"]["reasoning"]["types"]), r
        if r in t1:
            assert t1[r]["macro"].split()[0] == mean(per, a["all"]["macro"]["types"]), r
            assert t1["chance"]["macro"] == mean(per, a["all"]["macro"]["types"], "chance")
        probe[r] = a["depth"]["probe"]["fg_ordinal"]
        assert t2[r]["probe ordinal"].split()[0] == f"{100 * probe[r]:.1f}", r
    assert t2["gem − direct"]["probe ordinal"].rstrip("*") == f"{100 * (probe['gem'] - probe['direct']):+.1f}"
    for needle in ("| gem − sft |", "| vla_gem − vla_sft |", "| expert |", "| random |", "60.0 / 28.9 / 72.7"):
        assert needle in text
    assert re.search(r"\| expert \| 100\.0", text)  # the scripted expert solves its episodes
    # rerun: every step is skipped, the README is the same
    capsys.readouterr()
    again = rp.main(args)
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == len(rp.plan(rp.ReproConfig(preset="micro")))
    assert _table_rows(again) == rows
