"""The data-efficiency curve (issue 12): `sft` vs `gem` trained on a share of the train scenes, several seeds.

    python bench/data_efficiency.py --preset=tiny --seeds=0,1,2 --shares=0.1,0.3,1

An arm is (recipe, share, seed). Per seed, stage 0 trains once on its own caption scenes that no arm
counts (reproduce.py --base_share), then each recipe trains on the first `share` of the recipes' scenes
(data.select_scenes: the 10% scenes are inside the 30% ones; every family cut together) for the same number
of steps; share 1 is reproduce.py's own sft / gem run. Each arm is scored on the in-distribution test
questions: the geometry types (closer, marked, distance, height) and the rest.

Finished arms are kept in results/<preset>/data_efficiency.json (commit it), so the curve can be filled over
several sittings: an arm in it is never rerun, and reproduce.py's steps skip what runs/ already holds.
Writes data_efficiency.md (mean ±sd over seeds; `*`: >= 3 seeds and a paired t-test's p < 0.05 after Holm
over the page's differences, reproduce.compare / holm) and data_efficiency.png (score vs share, one line per
recipe, band = sd over seeds). `--collect_only=true` trains nothing: it adds the arms that runs/ holds
finished (e.g. from `reproduce.py --shares=0.1,0.3`) and redraws the page. The JSON's "timing" and "notes"
(written by hand: how long it took, how to read it) are printed under the table.
"""
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reproduce as rp  # noqa: E402
from common import parse_config  # noqa: E402

GEOMETRY = ["closer", "marked", "distance", "height"]  # the types where depth should matter
RECIPES = ("sft", "gem")


@dataclasses.dataclass
class EffConfig:
    preset: str = "tiny"
    seeds: tuple[int, ...] = (0, 1, 2)
    shares: tuple[float, ...] = (0.1, 0.3, 1.0)
    data: str = ""          # defaults as reproduce.py: data/<preset>, runs/<preset>, results/<preset>
    runs: str = ""
    results: str = ""
    jobs: int = 2
    collect_only: bool = False  # train nothing: add the arms runs/ already holds finished to the JSON, redraw


def arm_key(recipe: str, share: float, seed: int) -> str:
    return f"{recipe}|{share:g}|{seed}"


def arm_scores(res: dict) -> dict:
    """One eval.py vlm results.json -> geometry / rest / macro on the in-distribution test questions."""
    if not res.get("seen"):
        raise SystemExit(f"error: {res.get('ckpt')}: no in-distribution ('seen') test questions in its eval results")
    per = res["seen"]["per_type"]
    bench = [t for t, v in per.items() if v["family"] not in ("caption", "depth")]
    mean = lambda ts: float(np.mean([per[t]["score"] for t in ts])) if ts else None
    return {"geometry": mean([t for t in bench if t in GEOMETRY]), "rest": mean([t for t in bench if t not in GEOMETRY]),
            "macro": mean(bench), "per_type": {t: per[t]["score"] for t in bench}}


def cell(arms: dict, recipe: str, share: float, seeds, col: str) -> dict | None:
    vals = [arms.get(arm_key(recipe, share, s), {}).get(col) for s in seeds]
    got = [v for v in vals if v is not None]
    if not got:
        return None
    return dict(mean=float(np.mean(got)), sd=float(np.std(got, ddof=1)) if len(got) > 1 else 0.0, n=len(got), vals=vals,
                half=0.0, chance=None)


def report(c: EffConfig, store: dict) -> str:
    arms, seeds, shares = store["arms"], list(c.seeds), sorted(c.shares)
    lines = [f"# Data efficiency: sft vs gem on a share of the train scenes (`{c.preset}`)\n",
             f"Command: `python bench/data_efficiency.py --preset={c.preset} --seeds={','.join(map(str, seeds))} "
             f"--shares={','.join(f'{s:g}' for s in shares)}`. Arms done: {len(arms)} of {len(seeds) * len(shares) * len(RECIPES)} "
             f"(seeds x shares x recipes); the commit and training time of each arm in data_efficiency.json.\n",
             "Scores (%) on the in-distribution test questions: geometry = mean of closer, marked, distance, height; "
             "rest = every other question type. Cells: mean ±sd over the seeds done (n). gem − sft: mean ±sd of the "
             f"per-seed paired differences; `*` only with >= {rp.MIN_SEEDS} seeds and p < 0.05 (paired t-test) after Holm over the page.\n",
             "| share of scenes | scenes | sft geometry | gem geometry | gem − sft geometry | sft rest | gem rest | gem − sft rest |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "—" if x is None else f"{100 * x['mean']:.1f}" + (f" ±{100 * x['sd']:.1f}" if x["n"] > 1 else "") + f" ({x['n']})"
    cells = {(sh, col, r): cell(arms, r, sh, seeds, col) for sh in shares for col in ("geometry", "rest") for r in RECIPES}
    comps = {(sh, col): rp.compare(cells[sh, col, "gem"], cells[sh, col, "sft"]) for sh in shares for col in ("geometry", "rest")
             if cells[sh, col, "gem"] and cells[sh, col, "sft"]}
    rp.holm(list(comps.values()))  # the page's differences are one family
    for sh in shares:
        row = [f"{100 * sh:g}%", str(store.get("scenes", {}).get(f"{sh:g}", "?"))]
        for col in ("geometry", "rest"):
            a, b, d = cells[sh, col, "sft"], cells[sh, col, "gem"], comps.get((sh, col))
            row += [fmt(a), fmt(b), "—" if not d or not d["n"] else f"{100 * d['mean']:+.1f}" + (f" ±{100 * d['sd']:.1f}" if d["n"] > 1 else "")
                    + ("*" if d["star"] else "") + f" ({d['n']})"]
        lines.append("| " + " | ".join(row) + " |")
    for note in ([store["timing"]] if store.get("timing") else []) + store.get("notes", []):  # written by hand into the JSON
        lines.append("\n" + note)
    text = "\n".join(lines) + "\n"
    os.makedirs(c.results, exist_ok=True)
    with open(os.path.join(c.results, "data_efficiency.md"), "w") as f:
        f.write(text)
    plot(arms, seeds, shares, os.path.join(c.results, "data_efficiency.png"))
    return text


def plot(arms: dict, seeds, shares, path: str, W: int = 360, H: int = 260) -> None:
    """Two panels (geometry, rest): score vs share (log axis), a line per recipe, a band of ±sd over seeds."""
    colours = {"sft": (60, 90, 200), "gem": (210, 80, 40)}
    img = Image.new("RGB", (2 * W, H + 30), "white")
    d = ImageDraw.Draw(img)
    lo_s, hi_s = math.log(min(shares)), math.log(max(shares))
    for p, col in enumerate(("geometry", "rest")):
        x0, y0, x1, y1 = p * W + 50, 30, p * W + W - 15, H - 30  # plot box
        vals = [cell(arms, r, s, seeds, col) for r in RECIPES for s in shares]
        ys = [v["mean"] + k * v["sd"] for v in vals if v for k in (-1, 1)] or [0.0, 1.0]
        lo, hi = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)
        X = lambda s: x0 + (x1 - x0) * ((math.log(s) - lo_s) / (hi_s - lo_s) if hi_s > lo_s else 0.5)
        Y = lambda v: y1 - (y1 - y0) * (v - lo) / max(hi - lo, 1e-9)
        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        d.text((x0, 8), f"{col}: score vs share of train scenes", fill=(0, 0, 0))
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            d.line([x0 - 4, Y(v), x0, Y(v)], fill=(0, 0, 0))
            d.text((p * W + 5, Y(v) - 5), f"{100 * v:.0f}%", fill=(0, 0, 0))
        for s in shares:
            d.text((X(s) - 10, y1 + 5), f"{100 * s:g}%", fill=(0, 0, 0))
        pts = {r: [(X(s), v) for s in shares if (v := cell(arms, r, s, seeds, col))] for r in RECIPES}
        for r in RECIPES:  # every band first, so no band hides a line
            if len(pts[r]) > 1:
                band = [(x, Y(v["mean"] + v["sd"])) for x, v in pts[r]] + [(x, Y(v["mean"] - v["sd"])) for x, v in reversed(pts[r])]
                d.polygon(band, fill=tuple(int(255 - 0.25 * (255 - ch)) for ch in colours[r]))
        for r in RECIPES:
            for (xa, va), (xb, vb) in zip(pts[r], pts[r][1:]):
                d.line([xa, Y(va["mean"]), xb, Y(vb["mean"])], fill=colours[r], width=2)
            for x, v in pts[r]:
                d.ellipse([x - 3, Y(v["mean"]) - 3, x + 3, Y(v["mean"]) + 3], fill=colours[r])
        for k, r in enumerate(RECIPES):
            d.text((x0 + 8, y0 + 6 + 12 * k), r, fill=colours[r])
    img.save(path)


def main(argv):
    c = parse_config(EffConfig, argv, {p: {} for p in rp.PRESETS})  # the preset only names reproduce.py's
    rp.check_shares(c.shares)
    rc = rp.config([f"--preset={c.preset}", f"--seeds={','.join(map(str, c.seeds))}", f"--jobs={c.jobs}",
                    f"--shares={','.join(f'{s:g}' for s in c.shares)}"]
                   + [f"--{k}={getattr(c, k)}" for k in ("data", "runs", "results") if getattr(c, k)])
    c.results = rc.results
    path = os.path.join(c.results, "data_efficiency.json")
    store = json.load(open(path)) if os.path.isfile(path) else {"arms": {}}
    todo = [(r, sh, s) for s in c.seeds for sh in sorted(c.shares) for r in RECIPES if arm_key(r, sh, s) not in store["arms"]]
    if todo:
        steps = rp.plan(rc)
        names = {f"s{s} eval {rp.arm_name(r, sh)}" for r, sh, s in todo}
        t = time.time()
        try:
            if not c.collect_only:
                rp.run_steps(rc, rp.needed(steps, names))
        finally:  # keep every arm that finished, also when a later one failed or was stopped
            print(f"data_efficiency: {(time.time() - t) / 60:.1f} min for {len(todo)} arms to do")
            import data as D
            if os.path.isfile(os.path.join(rc.data, "train.jsonl")):  # scenes per share, for the table
                n_train = len({D.scene_of(r) for r in D.read_jsonl(os.path.join(rc.data, "train.jsonl"))})
                store["scenes"] = {f"{sh:g}": round((1.0 - rc.base_share) * sh * n_train) for sh in c.shares}
            for r, sh, s in todo:
                run = f"{rc.runs}/seed{s}/{rp.arm_name(r, sh)}"
                if os.path.isfile(f"{run}/eval_test/.done"):
                    store["arms"][arm_key(r, sh, s)] = arm_scores(rp.load_json(f"{run}/eval_test/results.json")) | {
                        "commit": rp.load_json(f"{run}/run.json").get("git_commit", "unknown")[:7],
                        "train_seconds": rp.load_json(f"{run}/.done")["seconds"]}
            os.makedirs(c.results, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(store, f, indent=1)
            os.replace(path + ".tmp", path)
    text = report(c, store)
    print(text)
    return store


if __name__ == "__main__":
    main(sys.argv[1:])
