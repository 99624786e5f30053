"""On hand-made inputs: bench/data_efficiency.py's table and plot, bench/reread.py's re-reading of a results.json,
bench/world_check.py's two world measures; bench/profile_step.py's CPU smoke run and its kernel count;
bench/tiny_search.py's curve table and its seed summary."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import data_efficiency as de  # noqa: E402
import profile_step  # noqa: E402
import tiny_search as ts  # noqa: E402
import world_check as wc  # noqa: E402

import data  # noqa: E402


def test_data_efficiency_table_and_plot(tmp_path):
    # gem beats sft at 10% by 0.10, 0.12, 0.08 (star: mean 0.10 > 2 * 0.02 / sqrt(3)); at 100% the sign flips once
    arms = {}
    for s, (g10, g100) in enumerate([(0.10, 0.02), (0.12, -0.01), (0.08, 0.03)]):
        arms[de.arm_key("sft", 0.1, s)] = {"geometry": 0.40 + 0.1 * s, "rest": 0.5}
        arms[de.arm_key("gem", 0.1, s)] = {"geometry": 0.40 + 0.1 * s + g10, "rest": 0.55}
        arms[de.arm_key("sft", 1.0, s)] = {"geometry": 0.60, "rest": 0.7}
        arms[de.arm_key("gem", 1.0, s)] = {"geometry": 0.60 + g100, "rest": 0.75}
    c = de.EffConfig(seeds=(0, 1, 2), shares=(0.1, 0.3, 1.0), results=str(tmp_path))
    text = de.report(c, {"arms": arms, "scenes": {"0.1": 24, "0.3": 72, "1": 240}})
    rows = {ln.split("|")[1].strip(): [x.strip() for x in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("| 10")}
    row10 = rows["10%"]
    assert row10[2] == "50.0 ±10.0 (3)" and row10[3] == "60.0 ±9.2 (3)" and row10[4] == "+10.0 ±2.0* (3)"
    assert "Arms done: 12 of 18" in text
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    row100 = [x.strip() for x in lines["100%"].strip("|").split("|")]
    assert row100[4] == "+1.3 ±2.1 (3)"  # one seed of the other sign: no star
    assert row100[7] == "+5.0 ±0.0* (3)"  # the same +0.05 in every seed: a star
    assert lines["30%"].count("—") == 6  # no arm yet: the row says so
    img = np.array(Image.open(tmp_path / "data_efficiency.png").convert("RGB")).astype(int)
    for half in (img[:, :img.shape[1] // 2], img[:, img.shape[1] // 2:]):  # both panels draw both recipes' colours
        for col in [(60, 90, 200), (210, 80, 40)]:  # sft, gem
            assert (np.abs(half - col).sum(-1) < 10).sum() > 100


def _dataset(root, depths, heights):
    os.makedirs(root / "images"), os.makedirs(root / "depth")
    recs = {"train": [], "val": []}
    for split, maps in depths.items():
        for k, d in enumerate(maps):
            fid = f"{split}-{k:05d}-000"
            Image.fromarray(np.zeros((*d.shape, 3), np.uint8)).save(root / "images" / f"{fid}.png")
            data.save_depth_png(str(root / "depth" / f"{fid}.png"), d)
            recs[split].append(dict(id=fid, image=f"images/{fid}.png", depth=f"depth/{fid}.png", task="depth",
                                    conversations=[{"from": "human", "value": "<image>"}], meta=dict(type="depth", frame=fid)))
    for k, (name, h) in enumerate(heights):
        fid = f"train-{k:05d}-000"
        recs["train"].append(dict(id=f"{fid}-h", image="images/train-00000-000.png", task="reasoning", meta=dict(type="height", frame=fid),
                                  conversations=[{"from": "human", "value": f"<image>\nHow tall is the {name}?"}, {"from": "gpt", "value": str(h)}]))
    for s, rs in recs.items():
        with open(root / f"{s}.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rs))


def test_world_check_measures(tmp_path):
    ramp = np.linspace(1.0, 2.0, 16)[:, None] * np.ones((16, 16))
    # every map the same shape at another scale: the median-scaled mean map predicts each exactly
    _dataset(tmp_path / "same", {"train": [ramp, 2 * ramp], "val": [3 * ramp]}, [("red can", h) for h in (3, 5, 3, 5)])
    assert wc.mean_depth_absrel(str(tmp_path / "same"), "val") == pytest.approx(0.0, abs=1e-3)
    # a val map of another shape: the error is its AbsRel against the scaled ramp, computed here directly
    flat = np.full((16, 16), 1.5)
    _dataset(tmp_path / "other", {"train": [ramp], "val": [flat]}, [("red can", h) for h in (3, 5, 3, 5)])
    pred = ramp * 1.5 / np.median(ramp)
    assert wc.mean_depth_absrel(str(tmp_path / "other"), "val") == pytest.approx(np.mean(np.abs(pred - flat) / flat), rel=1e-3)
    # heights: one text always 3 cm, another always 9 cm, in both folds -> the text explains everything (R^2 = 1);
    # one text with 3 and 9 in each fold (folds split by rollout) -> the text explains nothing (R^2 = 0)
    _dataset(tmp_path / "named", {"train": [ramp], "val": [ramp]}, [("red can", 3), ("red can", 3), ("blue cube", 9), ("blue cube", 9)])
    assert wc.height_r2(str(tmp_path / "named")) == pytest.approx(1.0)
    _dataset(tmp_path / "image", {"train": [ramp], "val": [ramp]}, [("red can", 3), ("red can", 9), ("red can", 9), ("red can", 3)])
    assert wc.height_r2(str(tmp_path / "image")) == pytest.approx(0.0)


def test_profile_step_runs_on_cpu(capsys):
    """The GPU session's profiler (bench/gpu_session.sh) on the micro preset: it runs, lists the ops that
    take the time and ends with its one-line verdict."""
    clip = torch.nn.utils.clip_grad_norm_
    r = profile_step.main(["--preset=micro", "--batch_size=2", "--steps=1", "--warmup=0", "--device=cpu", "--top=3"])
    assert torch.nn.utils.clip_grad_norm_ is clip  # the profiler's label on it is gone
    assert r["launches"] > 50  # the kernel estimate of a micro step (forward, backward)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("profile_step: cpu batch 2 eager:") and "ms/step" in out[-1]
    assert any("aten::" in line for line in out[-4:-1])  # the top ops by time
    assert r["wall"] > 0 and r["flops"] > 1e6 and 0 < r["busy"]


def test_kernel_ops_counts_compute_not_views_nor_the_optimizer():
    """profile_step's CPU estimate of a GPU step's launches: three ops here compute; the views, the no-op, the
    allocation and everything the optimizer runs (a few fused kernels on a GPU) are not counted."""
    from torch.profiler import profile, record_function
    a, p = torch.randn(8, 8), torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = torch.optim.AdamW([p])
    with profile() as prof:
        b = a.view(64).view(8, 8).t()  # views
        c = torch.mm(a, b)  # 1
        c.add_(1.0)  # 2 (the Python scalar's wrapping is no kernel)
        b.contiguous()  # 3: a transposed view made contiguous is a copy
        a.contiguous()  # already contiguous: nothing runs
        torch.empty(3)  # an allocation
        with record_function("optimizer"):
            opt.step()
    assert profile_step.kernel_ops(prof) == 3


def test_preflight_says_in_one_line_what_is_missing(monkeypatch, capsys):
    """bench/preflight.py: everything present -> `preflight ok`, rc 0; a module that does not import, no GPU
    where one is needed, too little disk -> one line naming it, rc 1."""
    import preflight as pf
    assert pf.main(["--cuda=false"]) == 0
    assert capsys.readouterr().out.startswith("preflight ok")
    monkeypatch.setattr(pf, "MODULES", pf.MODULES + ["no_such_module_here"])
    assert pf.main(["--cuda=false"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("preflight failed: import no_such_module_here") and "\n" not in out
    monkeypatch.setattr(pf, "MODULES", pf.MODULES[:-1])
    assert pf.main(["--cuda=false", "--min_disk_gb=1e12"]) == 1
    assert "GB free, need 1e+12" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert pf.main([]) == 1 and "sees no GPU" in capsys.readouterr().out


def test_reread_holds_back_what_holm_denies_and_checks_sft_against_blind_one_sided(tmp_path, capsys):
    """bench/reread.py on a results.json made here (3 seeds). Table 2: gem - direct differs by (2, 3, 4), (3, 4, 5)
    and (2, 3, 4) hundredths on three columns; each paired t-test alone is below 0.05 (df = 2, two-sided:
    p = 1 - t / sqrt(t^2 + 2)), yet the smallest, 0.0202, times 3 is not, so Holm stars none. sft - blind: count
    (1, 2, 3) hundredths (one-sided p = 1/2 - t / (2 sqrt(t^2 + 2)) = 0.037, listed), distance (-1, 2, 5) (0.18,
    not listed), closer equal (not listed)."""
    import reread

    def rows(cols, minus=None) -> dict:  # seed -> {col: [value, half-width, chance]}, value 0.5 - minus[col][seed]
        return {str(s): {c: [0.5 - (minus or {}).get(c, (0, 0, 0))[s], 0.03, 0.4] for c in cols} for s in range(3)}

    diffs2 = {"probe ordinal": (0.02, 0.03, 0.04), "probe δ1": (0.03, 0.04, 0.05), "own head ordinal": (0.02, 0.03, 0.04)}
    types = ["count", "distance", "closer"]
    vlm = {"gem": rows(["macro", *diffs2]), "direct": rows(diffs2, diffs2), "sft": rows(["macro", *types]),
           "blind": rows(types, {"count": (0.01, 0.02, 0.03), "distance": (-0.01, 0.02, 0.05)})}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"vlm": vlm}))
    reread.main(str(path))
    out = capsys.readouterr().out
    assert "table 2: 3 differences, 0 starred after Holm" in out
    for c, d in diffs2.items():
        m, sd = sum(d) / 3, 0.01
        t = m / (sd / math.sqrt(3))
        p = 1 - t / math.sqrt(t * t + 2)
        assert p < 0.05 and f"gem - direct, {c}: +{m:.4f} ±{sd:.4f}, p = {p:.4f}, smallest" in out
    t = 0.02 / (0.01 / math.sqrt(3))
    assert f"sft - blind, count: +0.0200 ±0.0100, one-sided p = {0.5 - t / (2 * math.sqrt(t * t + 2)):.4f}" in out
    assert "sft above blind (one-sided paired t-test, p < 0.05) on: count\n" in out


def test_tiny_search_table_reads_each_chunk_in_step_order(tmp_path, capsys, monkeypatch):
    """Finished chunks are not rerun (nothing trains here: the base and every chunk's eval exist) and the table
    holds one row per chunk in step order (as text, "eval_1200" sorts first), with the mean over the 8
    reasoning types and the image use, worked by hand."""
    out, dat = tmp_path / "runs", tmp_path / "data"
    (out / "base_c" / "stage0").mkdir(parents=True)
    dat.mkdir()
    (dat / "val.jsonl").write_text("")
    for steps, score in ((1200, 0.8), (300, 0.6)):
        per = {t: dict(score=score if t == "count" else 0.5, chance=0.5, n=10) for t in ts.TYPES}
        (out / "S" / f"eval_{steps}").mkdir(parents=True)
        (out / "S" / f"eval_{steps}" / "results.json").write_text(json.dumps(
            {"all": {"per_type": per}, "image_use": dict(changed=0.25, tokens=0.5)}))
    monkeypatch.setitem(ts.RUNS, "S", ("c", [], 1200, 300))  # chunks 600 and 900 would train: give them results too
    for steps in (600, 900):
        (out / "S" / f"eval_{steps}").mkdir()
        (out / "S" / f"eval_{steps}" / "results.json").write_text((out / "S" / "eval_300" / "results.json").read_text())
    ts.main([f"--out={out}", f"--data={dat}", "--only=S", "--jobs=1"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| S |")]
    assert [int(r.split("|")[2]) for r in rows] == [300, 600, 900, 1200]
    assert rows[-1].split("|")[-4:-1] == [f" {100 * (0.5 * 7 + 0.8) / 8:.1f} ", " 25.0% ", " 0.50 "]


def test_tiny_search_summary_pairs_seeds_at_their_last_common_step(tmp_path, capsys):
    """--summary compares S3k with B3k over seeds' tables at the last step every table has for both (seed 2
    stopped at 600), with the one-sided paired t-test of reproduce.py's rule. Reference: for df = 2,
    P(T > t) = 1/2 - t / (2 sqrt(t^2 + 2)); the differences 1, 2, 3 give t = 2 sqrt(3)."""
    head = "| run | steps | " + " | ".join(ts.TYPES) + " | mean | grey changes | token spread |\n"

    def line(run, steps, count, rest=50.0):
        vals = [count if t == "count" else rest for t in ts.TYPES]
        return f"| {run} | {steps} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / 8:.1f} | 1% | 0.10 |\n"
    paths = []
    for seed, (d, lasts) in enumerate([(1.0, (600, 1200)), (2.0, (600, 1200)), (3.0, (600,))]):
        rows = "".join(line("S3k", s, 60.0 + d + (s == 1200) * 9) + line("B3k", s, 60.0) for s in lasts)
        paths.append(tmp_path / f"s{seed}.md")
        paths[-1].write_text(f"seed {seed}, said in prose | 600 |\n" + head + "|---|\n| n | | 1 | 2 |\n" + rows)
    print(ts.summary([str(p) for p in paths], "S3k,B3k"))
    out = capsys.readouterr().out
    assert "at 600 steps over 3 seeds" in out
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in out.splitlines() if r.startswith("| ")}
    t = 2 * 3 ** 0.5
    assert cells["count"][:4] == ["62.0 ±1.0", "60.0 ±0.0", "+2.0 ±1.0", "+1.0, +2.0, +3.0"]
    assert float(cells["count"][4]) == pytest.approx(0.5 - t / (2 * (t * t + 2) ** 0.5), abs=1e-3)  # 0.037
    assert cells["count"][5] == "yes" and cells["closer"][5] == "no"  # closer: no difference at all
    assert cells["mean"][2] == "+0.3 ±0.1"  # the tables' own mean column, rounded there: 51.4-51.2, 51.5-51.2, 51.6-51.2
    with pytest.raises(SystemExit, match="no step at which every table has both S3k and B9"):
        ts.summary([str(p) for p in paths], "S3k,B9")
