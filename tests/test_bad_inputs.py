"""Bad inputs a new user would plausibly give, one table for every entry point: each ends with exit code != 0,
a last line that names the flag, file or field (a word each case lists), no traceback, and the folders it was
pointed at as they were (nothing half-written). The README's table of errors is this table.

Each case runs the script as a user does (a subprocess), two at a time."""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

# (entry point, argv, a word the message must contain). DATA: a micro data directory; CKPT: a micro pretraining
# checkpoint with a depth head; SFT: one without; DEMOS: micro demos; BADJSON / EMPTY / NOTOK: broken copies
# of the data; OUT: a fresh run folder (must still not exist afterwards) or an existing one (must be unchanged).
CASES = [
    ("data.py", ["--out=OUT", "--preset=tiny"], "sim_data.py"),                   # the old command names the new one
    ("sim_data.py", ["--out=OUT", "--preset=huge"], "--preset"),                    # unknown preset
    ("sim_data.py", ["--out=OUT", "--train_rollouts=many"], "--train_rollouts"),    # wrong type
    ("sim_data.py", ["demos", "--out=OUT", "--suite=kitchen"], "kitchen"),          # unknown suite
    ("train_pretrain.py", ["--recipe=gemm", "--data=DATA", "--out=OUT"], "--recipe"),
    ("train_pretrain.py", ["--recipe=base", "--data=DATA", "--out=OUT", "--batch_size=0"], "--batch_size"),
    ("train_pretrain.py", ["--recipe=base", "--data=/no/such/data", "--out=OUT"], "/no/such/data"),
    ("train_pretrain.py", ["--recipe=gem", "--data=DATA", "--out=OUT"], "--init"),    # a recipe needs stage 0
    ("train_pretrain.py", ["--recipe=gem", "--data=DATA", "--init=DATA", "--out=OUT"], "pretrain.json"),  # not a checkpoint
    ("train_pretrain.py", ["--recipe=base", "--data=DATA", "--out=OUT", "--device=gpu"], "--device"),
    ("train_pretrain.py", ["--recipe=base", "--data=DATA", "--out=OUT", "--scenes=0.5:0.2"], "--scenes"),
    ("train_pretrain.py", ["--recipe=base", "--data=BADJSON", "--out=OUT"], "train.jsonl:2"),  # corrupt line
    ("train_pretrain.py", ["--recipe=base", "--data=EMPTY", "--out=OUT"], "no records"),       # empty split
    ("train_pretrain.py", ["--recipe=gem", "--blind=true", "--init=CKPT", "--data=DATA", "--out=OUT"], "--blind"),
    ("train_pretrain.py", ["--recipe=base", "--data=DATA", "--out=OUT", "--image_size=sixty"], "--image_size"),
    ("train_pretrain.py", ["--recipe=sft", "--init=CKPT", "--data=NOTOK", "--out=OUT"], "image file"),  # missing image
    ("train_vla.py", ["--demos=DEMOS", "--out=OUT"], "--init"),
    ("train_vla.py", ["--init=CKPT", "--demos=/no/demos", "--out=OUT"], "--demos"),
    ("train_vla.py", ["--init=DATA", "--demos=DEMOS", "--out=OUT"], "pretrain.json"),          # a data dir as --init
    ("train_vla.py", ["--init=CKPT", "--demos=DEMOS", "--out=OUT", "--batch_size=0"], "--batch_size"),
    ("train_vla.py", ["--init=SFT", "--demos=DEMOS", "--out=OUT", "--depth_weight=0.1"], "--depth_weight"),  # no head
    ("eval.py", [], "usage"),
    ("eval.py", ["vlm", "--ckpt=/no/ckpt"], "--ckpt"),
    ("eval.py", ["vlm", "--ckpt=CKPT", "--max_questions=-3", "--out=OUT"], "--max_questions"),
    ("eval.py", ["vlm", "--ckpt=CKPT", "--split=tset", "--out=OUT"], "tset"),
    ("eval.py", ["rules", "--out=OUT"], "--data"),
    ("eval.py", ["vla", "--ckpt=expert", "--suite=kitchen", "--out=OUT"], "kitchen"),
    ("reproduce.py", ["--preset=micro", "--seeds=0,0", "--runs=OUT"], "--seeds"),
    ("reproduce.py", ["--preset=micro", "--recipes=sft,gemm", "--runs=OUT"], "--recipes"),
    ("reproduce.py", ["--preset=micro", "--shares=2", "--runs=OUT"], "--shares"),
    ("sim_env.py", ["--suite=kitchen", "--gif=OUT"], "kitchen"),
    ("sim_env.py", ["--suite=goal", "--task=99", "--gif=OUT"], "99"),
    ("teach.py", ["start", "no_such_exercise", "OUT"], "no_such_exercise"),
    ("teach.py", ["frobnicate"], "frobnicate"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, micro_data, micro_demos):
    import data as D
    import train_pretrain as TP
    from common import parse_config
    root = tmp_path_factory.mktemp("bad")
    tok_path = os.path.join(micro_data, "tokenizer.json")
    tc = parse_config(TP.TrainConfig, ["--preset=micro", f"--data={micro_data}"], TP.PRESETS)
    for name, recipe in (("ckpt", "gem"), ("sft", "sft")):  # untrained checkpoints in train_pretrain's format
        torch.manual_seed(0)
        gem = TP.build_gem(tc, D.load_tokenizer(tok_path))
        head = TP.build_head(tc, gem, recipe) if recipe == "gem" else None
        TP.save_stage(str(root / name), gem, head, tc, tok_path, 3, 0, torch.optim.AdamW(gem.parameters()), True, 0)
    for name in ("badjson", "empty", "notok"):
        shutil.copytree(micro_data, root / name, ignore=shutil.ignore_patterns("cache", "images", "depth", "states", "shards"))
        for sub in ("images", "depth")[name == "notok":]:  # notok: images/ missing
            os.symlink(os.path.join(micro_data, sub), root / name / sub)
    lines = open(root / "badjson" / "train.jsonl").read().splitlines()
    (root / "badjson" / "train.jsonl").write_text("\n".join([lines[0], lines[1][:-5]] + lines[2:]) + "\n")  # line 2 cut
    (root / "empty" / "train.jsonl").write_text("")
    return dict(DATA=micro_data, CKPT=str(root / "ckpt"), SFT=str(root / "sft"), DEMOS=micro_demos,
                BADJSON=str(root / "badjson"), EMPTY=str(root / "empty"), NOTOK=str(root / "notok"), root=root)


def _tree(path: str) -> dict:
    """Every file under path -> (size, mtime): what a failed run may not change."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


def _run(case, places, k):
    script, argv, word = case
    out = str(places["root"] / f"out{k}")
    args = [a.replace("OUT", out) for a in argv]
    for key in ("DATA", "CKPT", "SFT", "DEMOS", "BADJSON", "EMPTY", "NOTOK"):
        args = [a.replace(key, places[key]) for a in args]
    watched = [places[key] for key in ("DATA", "CKPT", "SFT", "DEMOS")]
    before = [_tree(p) for p in watched]
    proc = subprocess.run([sys.executable, script] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return dict(proc=proc, out=out, word=word, changed=[p for p, b in zip(watched, before) if _tree(p) != b])


def test_every_bad_input_ends_in_one_line_that_names_it(places):
    assert len(CASES) >= 25
    assert {s for s, _, _ in CASES} >= {"data.py", "sim_data.py", "train_pretrain.py", "train_vla.py", "eval.py",
                                         "reproduce.py", "sim_env.py", "teach.py"}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda kc: _run(kc[1], places, kc[0]), enumerate(CASES)))
    bad = []
    for case, r in zip(CASES, results):
        p, text = r["proc"], (r["proc"].stdout + r["proc"].stderr).strip()
        last = text.splitlines()[-1] if text else ""
        problems = [why for why, failed in [
            ("exit code 0", p.returncode == 0),
            ("a traceback", "Traceback" in text),
            (f"the last line does not name {r['word']!r}", r["word"] not in last),
            ("a new folder was left behind", os.path.exists(r["out"])),
            (f"files changed in {r['changed']}", bool(r["changed"]))] if failed]
        if problems:
            bad.append(f"{case[0]} {' '.join(case[1])}: {'; '.join(problems)}; last line: {last[:200]!r}")
    assert not bad, "\n".join(bad)


def test_readme_table_of_errors_is_this_table():
    """README's "Bad input" table lists exactly these cases (entry point and what it names)."""
    text = open(os.path.join(ROOT, "README.md")).read().split("\n## Bad input")[1].split("\n## ")[0]
    rows = {tuple(c.strip().strip("`") for c in ln.strip("|").split("|")[:3]) for ln in text.splitlines()
            if ln.startswith("| `")}
    want = {(s, " ".join(a), w) for s, a, w in CASES}
    assert rows == want, (sorted(want - rows)[:3], sorted(rows - want)[:3])
