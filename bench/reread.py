"""Re-read a committed results.json under today's star rule, without rerunning anything.

    python bench/reread.py results/tiny/results.json

Prints every difference the results page shows in tables 1 and 2 (gem vs sft, rgb, direct, regress), with
its paired t-test's p, whether it is starred after Holm over its table (reproduce.compare / holm), and the
smallest difference the seeds could have shown; then sft - blind per question type and on the macro with its one-sided p,
and the types where sft is above blind (the one-sided check, reproduce.above)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reproduce as rp  # noqa: E402

T1 = ["grounding", "reasoning", "planning", "trajectory", "macro", "held-out templates", "held-out combos", "probe ordinal"]
T2 = list(rp.GROUPS) + ["reasoning (VSI-like)", "probe AbsRel", "probe δ1", "probe ordinal", "own head ordinal"]


def main(path: str) -> None:
    raw = json.load(open(path))
    vlm = {r: rp.combine(list(per.values())) for r, per in raw["vlm"].items()}
    for name, cols, others in (("table 1", T1, ["sft"]), ("table 2", T2, ["rgb", "direct", "regress"])):
        comps = {(b, c): rp.compare(vlm["gem"][c], vlm[b][c]) for b in others if b in vlm for c in cols
                 if isinstance(vlm["gem"].get(c), dict) and isinstance(vlm[b].get(c), dict)}
        rp.holm(list(comps.values()))
        print(f"{name}: {len(comps)} differences, {sum(d['star'] for d in comps.values())} starred after Holm")
        for (b, c), d in comps.items():
            if d["p"] is not None:
                print(f"  gem - {b}, {c}: {d['mean']:+.4f} ±{d['sd']:.4f}, p = {d['p']:.4f}{' *' if d['star'] else ''}, "
                      f"smallest detectable {d['mdd']:.4f}")
    if "blind" in vlm:
        types = [t for t in rp.TYPES if isinstance(vlm["sft"].get(t), dict) and isinstance(vlm["blind"].get(t), dict)]
        for t in types + [c for c in ["macro"] if isinstance(vlm["sft"].get(c), dict) and isinstance(vlm["blind"].get(c), dict)]:
            d = rp.compare(vlm["sft"][t], vlm["blind"][t])
            if d["p_above"] is not None:
                print(f"  sft - blind, {t}: {d['mean']:+.4f} ±{d['sd']:.4f}, one-sided p = {d['p_above']:.4f}")
        above = [t for t in types if rp.above(vlm["sft"][t], vlm["blind"][t])]
        print(f"sft above blind (one-sided paired t-test, p < 0.05) on: {', '.join(above) or 'no type'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/tiny/results.json")
