"""GEM-mini world data: our miniature GEM-4M rendered by the simulator, and the expert demos for the VLA.

Run:
    python sim_data.py --out data/gem-mini --preset tiny                   # VLM data (presets micro, tiny, small)
    python sim_data.py demos --suite all --per-task 20 --out data/demos    # expert demos for the VLA

It writes the GEM layout that data.py reads (data.py's docstring; DESIGN.md section 3), with our extras:
    <root>/states/<frame>.json (each frame's simulator state)  <root>/stats.json (counts per family and type)
    <root>/shards/ (restart points)  <root>/gen_config.json (the recipe: another one in the same --out is refused)
    demos: <out>/<suite>_<task>_<k>.npz (actions, states, sim_states, instruction, suite, task_id, seed) and
    <out>/norm_stats.json (data.compute_norm_stats)
Every answer is computed from the simulator state; "meta" holds the machine-readable answer and type
so eval.py scores without parsing the question (and the named objects' 2D boxes, obj_box / ref_box, for
the 2D-rule baseline). Coordinates in text: integers in [0, 1000) (to_1000).
Geometry needs the image: every VLM image has its own camera (VIEW: look-at point, distance, pitch, yaw,
fov; draw_view) and every movable object its own size (SCALE; scale_objects), so neither "how tall" nor
"how far" follows from names or 2D positions (bench/world_check.py measures it). The VLA suites keep
sim_env's one fixed camera. Scenes are split for stage 0 / the recipes / data shares by data.select_scenes.
Simulator seeds never overlap: VLM train < val < test (SEED_BASE, ATTEMPTS) < demos (demo_seed) < the
evaluation start states (sim_env.EVAL_SEED_BASE).

Families (data.FAMILY_TYPES; type names go into meta["type"]; TEMPLATES):
  grounding  box, point, place (free spot beside an object), grasp, list      answers "[x1, y1, x2, y2]", "(x, y)"
  reasoning  rel_yn, rel_mc, closer, marked (two drawn marks), distance, height, count, fit
  planning   decompose, next_step, done        trajectory: 5-8 future gripper points
  caption    the visible objects by colour and shape (stage 0's data)       depth: image only, no question
Answers that are not in the text (issue 22): a reasoning maker returns every unambiguous question of its
type in the frame (both orders of a pair; counts of colours and shapes present or not), and balance() picks
one per record over the whole split, so that per object name, shape, colour, pair, relation and option the
answers are spread as over the whole type, yes/no and letters uniform; keys whose words give the answer
(a plate is never closer than what stands on the table) are not asked. `python eval.py text` measures it:
the best text-only answerer is within 5 points of the best constant on every reasoning type (README).
Relations use the simulator's predicates and are rejected within REL_MARGIN of their threshold. The test
split adds held-out templates and the HELDOUT_COMBOS (colour x shape never in train/val). Val and test add
reasoning-only rollouts (GenConfig.*_reasoning_rollouts: one question of each reasoning type per frame,
in distribution), so that each type has >= 300 in-distribution test and >= 150 val questions (tiny); train's
(--train_reasoning_rollouts) add a caption and the grounding questions to each frame: more distinct images.

Paper -> code map
  GEM-4M mixture: grounding / spatial reasoning / planning, with depth   MAKERS (q_*), gen_shard (MIXTURE)
    training samples records uniformly; shares of records (`python sim_data.py --out /tmp/tinydata --preset tiny`,
    train): grounding 26%, caption 24%, planning 22%, reasoning 20% (23% before balance() dropped the records
    whose every question gave its answer away), trajectory 4%, depth 4%
  varied embodied viewpoints (GEM-4M mixes many cameras)                 VIEW, draw_view, SCALE, scale_objects
  depth for every image (exact here; the paper uses GT or DA3 pseudo-depth)  gen_shard -> data.save_depth_png
  GEM-VLA demonstrations (LIBERO-style scripted expert episodes)         demo_task, generate_demos
  (ours) questions whose words do not give the answer                      q_* candidates, balance
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image

import sim_env
from common import run_jobs, write_atomic
from data import FAMILY_TYPES, IMAGE, VLA_PROMPT, compute_norm_stats, rle_encode, save_depth_png, train_tokenizer

# Family weights of the extra questions drawn per frame (_draw_types); record shares: module docstring.
MIXTURE = {"grounding": 0.33, "reasoning": 0.30, "planning": 0.17, "trajectory": 0.10, "depth": 0.05}
# type -> (training templates, templates held out for the test split). Few templates on purpose: the
# tiny model must spend its capacity on binding words to image regions, not on paraphrases.
TEMPLATES = {
    "box": (["Give the box of the {a}.", "Where is the {a}? Answer with a box."],
            ["Find the {a} and give its bounding box."]),
    "point": (["Point to the {a}."], ["Show the {a} with a point."]),
    "place": (["Give a point where the {a} can be placed {rel} the {b}."],
              ["Where can the {a} go {rel} the {b}? Give a point."]),
    "grasp": (["Where should the gripper grasp the {a}?"], ["Give a grasp point for the {a}."]),
    "list": (["List the objects with their boxes."], ["Name every object and give its box."]),
    "rel_yn": (["Is the {a} {rel} the {b}?"], ["Is it true that the {a} is {rel} the {b}?"]),
    "rel_mc": (["Which object is {rel} the {b}? {choices}"], ["Pick the object {rel} the {b}. {choices}"]),
    "closer": (["Is the {a} closer to the camera than the {b}?"], ["Is the {a} nearer to the camera than the {b}?"]),
    "marked": (["Which marked point is closer to the camera? A (cyan) or B (magenta)"],
               ["Of the marks A (cyan) and B (magenta), which is nearer to the camera?"]),
    "distance": (["How far apart are the {a} and the {b} in cm?"], ["What is the distance between the {a} and the {b} in cm?"]),
    "height": (["How tall is the {a} in cm?"], ["What is the height of the {a} in cm?"]),
    "count": (["How many {what} are there?"], ["Count the {what}."]),
    "fit": (["Does the {a} fit {prep} the {b}?"], ["Can the {a} fit {prep} the {b}?"]),
    "decompose": (["List the steps to {instr}."], ["Break the task into steps: {instr}."]),
    "next_step": (["Task: {instr}. What is the next step? {choices}"], ["Task: {instr}. Which step comes next? {choices}"]),
    "done": (["Task: {instr}. Is it done?"], ["Task: {instr}. Is the goal achieved?"]),
    "trajectory": (["Give {n} points of the gripper path to {instr}."], ["Trace the gripper path in {n} points to {instr}."]),
    "caption": (["Describe the objects."], ["What objects do you see?"]),
    "depth": ([""], [""]),
}
LETTERS = "ABCD"


# ----------------------------------------------------------------------------------------------------
# Question makers: one per type. Each reads a Scene (one rendered frame + simulator state) and returns
# (question, answer, meta) or None when no unambiguous question of that type exists in this frame.
# The question comes from sc.template, called last (it records in sc.held whether it drew a held-out one).

RELATIONS = {"left_of": "left of", "right_of": "right of", "in_front_of": "in front of", "behind": "behind",
             "on": "on", "inside": "in"}
HELDOUT_COMBOS = {("white", "ball"), ("black", "block")}  # colour x shape seen only in the test split
REL_MARGIN = 0.015  # metres: relations within this of their threshold are ambiguous and rejected
MIN_VISIBLE = 0.002  # an object must cover this share of the image to be asked about (8 px at 64x64)
# The VLM world is built so that geometry needs the image, and metric geometry needs depth (issue 12; the VLA
# suites keep sim_env's one fixed LIBERO-style camera). Every VLM image gets its own camera (draw_view):
# the look-at point on the table, the distance to it (m), pitch (degrees down from horizontal), yaw (degrees
# about the vertical; small, so "left of" / "in front of" in world terms stay left / front in the image) and
# the field of view. sim_env's fixed camera is look (0, .02), distance .69, pitch 41.5, yaw 0, fov 46.
VIEW = dict(look_x=(-0.08, 0.08), look_y=(-0.06, 0.12), dist=(0.40, 1.00), pitch=(20.0, 75.0), yaw=(-12.0, 12.0),
            fov=(30.0, 65.0))
# Every movable object gets its own size (scale_objects): cubes and balls a uniform scale, blocks and cans a
# footprint scale and a separate height scale, so "how tall is the red can" has no answer in its name; plates
# and trays a footprint scale (receptacle), so "does the red cube fit on the plate" has none either.
SCALE = dict(uniform=(0.7, 1.45), xy=(0.8, 1.25), z=(0.55, 1.6), receptacle=(0.45, 1.2))


def to_1000(v, size: int) -> int:
    """Continuous pixel coordinate (pixel i covers [i, i+1)) -> integer in [0, 1000) (Qwen-VL style)."""
    return int(min(999, max(0, round(float(v) * 1000.0 / size))))


def fmt_point(p) -> str:
    return f"({p[0]}, {p[1]})"


def fmt_box(b) -> str:
    return f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]"


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


class Scene:
    """A rendered frame with the simulator's object list, camera and (for planning) the expert's future."""

    def __init__(self, obs, info, split, rng, task=None, future=None, success=False, subgoal=0, instr=None):
        self.rgb, self.depth, self.seg = obs["rgb"], obs["depth"], obs["seg"]
        self.S = self.rgb.shape[0]
        self.objs = info["objects"]
        self.K, self.pose = np.asarray(info["K"], float), np.asarray(info["cam_pose"], float)
        self.split, self.rng, self.task, self.future = split, rng, task, future
        self.success, self.subgoal, self.instr = success, subgoal, instr
        self.indist = False  # an extra reasoning-only frame (GenConfig.*_reasoning_rollouts): training templates only
        names = [o["name"] for o in self.objs]
        min_px = MIN_VISIBLE * self.S * self.S
        self.visible = [o for o in self.objs if o["visible_px"] >= min_px and o["box2d"] is not None]
        self.all_visible = len(self.visible) == len(self.objs)
        self.refs = [o for o in self.visible if names.count(o["name"]) == 1]  # unambiguous by name

    def template(self, typ, **kw) -> str:
        train, held = TEMPLATES[typ]
        self.held = self.split == "test" and not self.indist and self.rng.random() < 0.5
        return self.one(held if self.held else train).format(**kw)

    def one(self, seq):
        return seq[self.rng.integers(len(seq))]

    def cand(self, typ, ans, meta, bal, **kw) -> dict:
        """One candidate question of a balanced type: its text, answer, meta and the (key, answer) pairs
        balance() evens out when it picks one candidate per record."""
        q = self.template(typ, **kw)
        return dict(q=q, a=ans, meta=dict(meta, heldout_template=self.held), bal=bal)

    def pick(self, seq, k=1):
        idx = self.rng.choice(len(seq), size=k, replace=False)
        return [seq[i] for i in idx] if k > 1 else seq[idx[0]]

    def mask(self, o) -> np.ndarray:
        return self.seg == o["id"]

    def point(self, px) -> list[int]:
        return [to_1000(px[0], self.S), to_1000(px[1], self.S)]

    def box(self, o) -> list[int]:
        return [to_1000(v, self.S) for v in o["box2d"]]

    def project(self, pts_world) -> np.ndarray:
        """World points (N,3) -> pixel coordinates (N,2), the simulator's own camera model."""
        return sim_env.project(self.K, self.pose, np.asarray(pts_world, float))

    def cam_z(self, p_world) -> float:
        """Camera z-depth (metres) of a world point: the quantity "closer to the camera" compares."""
        R, t = self.pose[:3, :3], self.pose[:3, 3]
        return float((R.T @ (np.asarray(p_world, float) - t))[2])

    def backproject(self) -> np.ndarray:
        """World xyz (H,W,3) of every pixel centre from the metric depth map (pinhole, z-depth)."""
        v, u = np.mgrid[0:self.S, 0:self.S] + 0.5
        rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(self.K).T  # (H,W,3), z = 1
        return (rays * self.depth[..., None]) @ self.pose[:3, :3].T + self.pose[:3, 3]


def _rel_ok(b, rel) -> bool:
    """"in" is asked about the tray only and "on" about anything but the tray (natural phrasing)."""
    return (rel == "inside") == (b["shape"] == "tray") or rel not in ("on", "inside")


def _clear(a, b, rel):
    """The simulator's predicate `a rel b`, or None when its margin is too small to ask about."""
    holds, margin = bool(getattr(sim_env, rel)(a, b)), float(sim_env.relation_margin(a, b, rel))
    return holds if abs(margin) >= REL_MARGIN and holds == (margin > 0) else None


def q_box(sc):
    if not sc.refs:
        return None
    o = sc.pick(sc.refs)
    box = sc.box(o)
    return sc.template("box", a=o["name"]), fmt_box(box), dict(answer=box, obj=o["id"], name=o["name"])


def q_point(sc, typ="point"):
    cands = [o for o in sc.refs if typ == "point" or o.get("graspable", o["shape"] not in ("plate", "tray"))]
    if not cands:
        return None
    o = sc.pick(cands)
    m = sc.mask(o)
    if typ == "grasp":  # the top centre of the object, where a top-down grasp closes
        top = np.asarray(o["pos"], float) + [0, 0, o["half_extents"][2]]
        px = sc.project(top[None])[0]
        if not (0 <= px[0] < sc.S and 0 <= px[1] < sc.S) or not m[int(px[1]), int(px[0])]:
            return None  # top hidden (e.g. under the gripper)
    else:  # the mask pixel nearest the mask's centroid (always on the object, even for odd shapes)
        ys, xs = np.nonzero(m)
        k = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
        px = (xs[k] + 0.5, ys[k] + 0.5)
    pt = sc.point(px)
    return sc.template(typ, a=o["name"]), fmt_point(pt), dict(answer=pt, obj=o["id"], name=o["name"], mask_rle=rle_encode(m))


def place_region(sc, a, b, rel) -> np.ndarray:
    """Pixels where `a` could stand on the table: free of other objects and clearly `rel` of b."""
    xyz = sc.backproject()
    ra = max(a["half_extents"][:2]) + 0.01
    ok = (np.abs(xyz[..., 2]) < 0.004) & (sc.seg == 0)  # table surface, nothing on it
    for o in sc.objs:
        if o["id"] != a["id"]:
            hx, hy = o["half_extents"][:2]
            ok &= (np.abs(xyz[..., 0] - o["pos"][0]) > hx + ra) | (np.abs(xyz[..., 1] - o["pos"][1]) > hy + ra)
    ys, xs = np.nonzero(ok)
    for y, x in zip(ys, xs):  # the side test is the simulator's own relation, on a moved copy of a
        moved = dict(a, pos=[float(xyz[y, x, 0]), float(xyz[y, x, 1]), float(a["half_extents"][2])])
        ok[y, x] = _clear(moved, b, rel) is True
    return ok


def q_place(sc):
    movable = [o for o in sc.refs if o["shape"] not in ("plate", "tray")]
    if not movable or len(sc.refs) < 2:
        return None
    a = sc.pick(movable)
    b = sc.pick([o for o in sc.refs if o is not a])
    rel = sc.pick(["left_of", "right_of", "in_front_of", "behind"])
    region = place_region(sc, a, b, rel)
    ys, xs = np.nonzero(region)
    if len(xs) < 3:
        return None
    bx, by = sc.project([b["pos"]])[0]  # canonical answer: the free pixel nearest to b's projection (just beside b)
    k = np.argmin((xs + 0.5 - bx) ** 2 + (ys + 0.5 - by) ** 2)
    pt = sc.point((xs[k] + 0.5, ys[k] + 0.5))
    q = sc.template("place", a=a["name"], b=b["name"], rel=RELATIONS[rel])
    return q, fmt_point(pt), dict(answer=pt, obj=a["id"], ref=b["id"], rel=rel, mask_rle=rle_encode(region))


def q_list(sc):
    if not sc.all_visible or len(sc.refs) != len(sc.objs):
        return None
    objs = sorted(sc.objs, key=lambda o: o["box2d"][0] + o["box2d"][2])  # left to right
    items = [dict(name=o["name"], obj=o["id"], box=sc.box(o)) for o in objs]
    return sc.template("list"), "; ".join(f"{it['name']} {fmt_box(it['box'])}" for it in items), dict(answer=items)


# Balanced types: a maker returns every unambiguous question of its type in the frame (at most MAX_CANDS),
# each with (key, answer) pairs; balance() later picks one per record so that, per key (an object's name,
# shape or colour in its role, the ordered pair, the shape pair, the relation, an option's name), the answers
# are spread as over the whole type: the words give nothing away. A "!" key's answers are chosen first to
# stay uniform (yes/no, letters per option count); a "*" key's are pulled towards uniform (counts, numbers).
MAX_CANDS = 24
BAL_MIN, BAL_SLACK = 20, 0.4  # balance(): a key seen this often whose answer share is this far off gives it away
BAL_TOL = 0.05  # balance(): a record whose best candidate leaves a key's answer share this far above target is dropped


def _named(role, o) -> list[str]:
    """Balancing keys of an object named in a role: its name, shape and colour."""
    return [f"{role}={o['name']}", f"{role}s={o['shape']}", f"{role}c={o['colour']}"]


def _pair_keys(a, b) -> list[str]:
    return _named("a", a) + _named("b", b) + [f"ab={a['name']}|{b['name']}", f"abs={a['shape']}|{b['shape']}"]


def _some(sc, cands: list) -> list:
    """At most MAX_CANDS candidates in random order (balance() takes the first of equals; small shard files)."""
    return [cands[i] for i in sc.rng.permutation(len(cands))[:MAX_CANDS]]


def q_rel_yn(sc):
    out = []
    for rel in RELATIONS:
        for a in sc.refs:
            for b in sc.refs:
                holds = _clear(a, b, rel) if a is not b and _rel_ok(b, rel) else None
                if holds is None:
                    continue
                ans = "yes" if holds else "no"
                keys = _pair_keys(a, b) + [f"r={rel}", f"ra={rel}|{a['name']}", f"rb={rel}|{b['name']}", "!"]
                out.append(sc.cand("rel_yn", ans, dict(answer=ans, obj=a["id"], ref=b["id"], rel=rel), [(k, ans) for k in keys],
                                   a=a["name"], b=b["name"], rel=RELATIONS[rel]))
    return _some(sc, out)


def _choices(sc, correct, others):
    """Options = correct + up to 3 others in random order; the correct letter is uniform over positions."""
    others = list(others)
    opts = [others[i] for i in sc.rng.permutation(len(others))[:len(LETTERS) - 1]]
    k = int(sc.rng.integers(len(opts) + 1))
    opts.insert(k, correct)
    return opts, LETTERS[k]


def _lettered(opts) -> str:
    return " ".join(f"{L}. {o}" for L, o in zip(LETTERS, opts))


def q_rel_mc(sc):
    """One true option, the others clearly false; balanced per option name (is it the true one?) and letter."""
    out = []
    for rel in RELATIONS:
        for b in sc.refs:
            others = [o for o in sc.refs if o is not b] if _rel_ok(b, rel) else []
            pos = [o for o in others if _clear(o, b, rel) is True]
            neg = [o for o in others if _clear(o, b, rel) is False]
            for a in pos if neg else []:
                opts, letter = _choices(sc, a["name"], [o["name"] for o in neg])
                by_name = {o["name"]: o for o in others}
                bal = [(f"!n={len(opts)}", letter)]  # letters uniform per option count
                for n in opts:
                    o, hit = by_name[n], "1" if n == a["name"] else "0"
                    bal += [(f"o={n}", hit), (f"os={o['shape']}", hit), (f"oc={o['colour']}", hit),
                            (f"ro={rel}|{n}", hit), (f"bo={b['name']}|{n}", hit)]
                meta = dict(answer=letter, choices=opts, obj=a["id"], ref=b["id"], rel=rel)
                out.append(sc.cand("rel_mc", letter, meta, bal, b=b["name"], rel=RELATIONS[rel], choices=_lettered(opts)))
    return _some(sc, out)


def q_closer(sc):
    # the centres' depths must differ clearly AND agree with what the visible pixels show; both orders asked
    z = {o["id"]: (sc.cam_z(o["pos"]), np.median(sc.depth[sc.mask(o)])) for o in sc.refs}
    clear = lambda a, b: z[b["id"]][0] - z[a["id"]][0] >= 0.03 and z[b["id"]][1] - z[a["id"]][1] >= 0.01  # noqa: E731
    out = []
    for a in sc.refs:
        for b in sc.refs:
            holds = True if a is not b and clear(a, b) else False if a is not b and clear(b, a) else None
            if holds is None:
                continue
            ans = "yes" if holds else "no"
            out.append(sc.cand("closer", ans, dict(answer=ans, obj=a["id"], ref=b["id"]),
                               [(k, ans) for k in _pair_keys(a, b) + ["!"]], a=a["name"], b=b["name"]))
    return _some(sc, out)


def marker_size(S: int) -> int:
    return max(2, S // 21)  # 3 px at 64x64: visible, yet hides little


MARKER_RGB = ([0, 255, 255], [255, 0, 255])  # A cyan, B magenta: no object or background has these


def draw_markers(rgb, pts_px) -> np.ndarray:
    """Filled squares centred on the marked pixels."""
    out, r = rgb.copy(), marker_size(rgb.shape[0]) // 2
    for (x, y), col in zip(pts_px, MARKER_RGB):
        out[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = col
    return out


def q_marked(sc):
    """Two marked pixels; which is closer (metric z-depth at the pixel). Draws the markers (sc.marked)."""
    r = marker_size(sc.S) // 2 + 1
    for _ in range(20):
        (xa, ya), (xb, yb) = sc.rng.integers(r, sc.S - r, size=(2, 2))
        da, db = float(sc.depth[ya, xa]), float(sc.depth[yb, xb])
        if min(da, db) > 0 and abs(da - db) >= max(0.05, 0.1 * min(da, db)) and np.hypot(xa - xb, ya - yb) >= sc.S / 6:
            break
    else:
        return None
    sc.marked = draw_markers(sc.rgb, [(xa, ya), (xb, yb)])
    ans = "A" if da < db else "B"
    pts = [sc.point((xa + 0.5, ya + 0.5)), sc.point((xb + 0.5, yb + 0.5))]
    return sc.template("marked"), ans, dict(answer=ans, points_px=[[int(xa), int(ya)], [int(xb), int(yb)]],
                                            depths=[da, db], points=pts)


def q_distance(sc):
    out = []
    for a in sc.refs:  # both orders: the first-named object says nothing
        for b in sc.refs:
            if a is not b:
                cm = int(round(100 * math.hypot(a["pos"][0] - b["pos"][0], a["pos"][1] - b["pos"][1])))
                out.append(sc.cand("distance", str(cm), dict(answer=cm, obj=a["id"], ref=b["id"]),
                                   [(k, cm) for k in _pair_keys(a, b) + ["*"]], a=a["name"], b=b["name"]))
    return _some(sc, out)


def q_height(sc):
    # movable objects only: a plate or tray has one size, which its name gives away
    out = []
    for o in sc.refs:
        cm = int(round(200 * o["half_extents"][2]))
        if o["shape"] in sim_env.SHAPES and cm >= 1:
            out.append(sc.cand("height", str(cm), dict(answer=cm, obj=o["id"]), [(k, cm) for k in _named("a", o) + ["*"]], a=o["name"]))
    return _some(sc, out)


def q_count(sc):
    """How many objects of a colour or a shape, present or not (0): the words alone say nothing of the count."""
    if not sc.all_visible:  # a hidden object would make the count unanswerable from the image
        return None
    kinds = [(f"{c} objects", "colour", lambda o, c=c: o["colour"] == c) for c in sim_env.COLOURS]
    kinds += [(plural(s), "shape", lambda o, s=s: o["shape"] == s) for s in sim_env.SHAPES + ("plate", "tray")]
    out = []
    for what, kind, f in kinds:
        n = sum(map(f, sc.objs))
        out.append(sc.cand("count", str(n), dict(answer=n, what=what), [(f"w={what}", str(n)), (f"k={kind}", str(n)), ("*", str(n))],
                           what=what))
    return _some(sc, out)


def fits(a, b):
    """True / False when a's footprint clearly fits within b's (any orientation) or clearly cannot; else None."""
    (amin, amax), (bmin, bmax) = (sorted(2 * h for h in o["half_extents"][:2]) for o in (a, b))
    if amax + 0.005 <= bmin:
        return True
    if amin >= bmax + 0.005:
        return False
    return None


def q_fit(sc):
    out = []
    for a in sc.refs:
        for b in sc.refs:
            holds = fits(a, b) if a is not b else None
            if holds is None:
                continue
            ans = "yes" if holds else "no"
            out.append(sc.cand("fit", ans, dict(answer=ans, obj=a["id"], ref=b["id"]), [(k, ans) for k in _pair_keys(a, b) + ["!"]],
                               a=a["name"], b=b["name"], prep="in" if b["shape"] == "tray" else "on"))
    return _some(sc, out)


def q_decompose(sc):
    steps = list(sc.task.subgoals)
    return sc.template("decompose", instr=sc.instr), "; ".join(steps), dict(answer=steps)


def q_next_step(sc):
    steps = list(sc.task.subgoals)
    if sc.success or len(steps) < 2:
        return None
    correct = steps[sc.subgoal]
    opts, letter = _choices(sc, correct, [s for s in steps if s != correct])
    q = sc.template("next_step", instr=sc.instr, choices=_lettered(opts))
    return q, letter, dict(answer=letter, choices=opts, subgoal=int(sc.subgoal))


def q_done(sc):
    ans = "yes" if sc.success else "no"
    return sc.template("done", instr=sc.instr), ans, dict(answer=ans)


def q_trajectory(sc):
    if sc.future is None or len(sc.future) < 5:
        return None
    n = int(sc.rng.integers(5, 9))
    idx = np.round(np.linspace(0, len(sc.future) - 1, n)).astype(int)
    px = sc.project(np.asarray(sc.future, float)[idx])
    if px.min() < 0 or px.max() >= sc.S:  # part of the path out of view (cameras vary): not askable
        return None
    pts = [sc.point(p) for p in px]
    q = sc.template("trajectory", n=n, instr=sc.instr)
    return q, "[" + ", ".join(map(fmt_point, pts)) + "]", dict(answer=pts, n=n)


def caption_order(o):
    # by colour, then shape: a canonical order that carries no spatial information
    cols = list(sim_env.COLOURS)
    return (cols.index(o["colour"]) if o["colour"] in cols else len(cols), o["shape"], o["name"])


def q_caption(sc):
    if not sc.visible:
        return None
    names = [o["name"] for o in sorted(sc.visible, key=caption_order)]
    return sc.template("caption"), ", ".join(names), dict(answer=names)


MAKERS = {"box": q_box, "point": q_point, "place": q_place, "grasp": functools.partial(q_point, typ="grasp"),
          "list": q_list, "rel_yn": q_rel_yn, "rel_mc": q_rel_mc, "closer": q_closer, "marked": q_marked,
          "distance": q_distance, "height": q_height, "count": q_count, "fit": q_fit, "decompose": q_decompose,
          "next_step": q_next_step, "done": q_done, "trajectory": q_trajectory, "caption": q_caption}
TYPE_FAMILY = {t: f for f, ts in FAMILY_TYPES.items() for t in ts}


# ----------------------------------------------------------------------------------------------------
# The generator: expert rollouts of random (suite, task) from training seeds, a few frames of each,
# a caption + a few questions per frame. Shards are written atomically and skipped when present.

@dataclasses.dataclass
class GenConfig:
    out: str = "data/gem-mini"
    preset: str = "tiny"
    seed: int = 0
    image_size: int = 64
    train_rollouts: int = 240  # expert episodes per split; each gives `frames` images
    val_rollouts: int = 16
    test_rollouts: int = 40
    # extra rollouts whose frames carry one question of each reasoning type, in distribution (training templates,
    # no held-out colour x shape): val / test, enough questions per type to see 5 points (nothing else on those
    # frames); train, more scenes to learn from, each frame also with a caption and the grounding questions, so
    # stage 0 sees these images too (results/tiny/search.md: more distinct images is what teaches the ViT)
    train_reasoning_rollouts: int = 0
    val_reasoning_rollouts: int = 0
    test_reasoning_rollouts: int = 0
    reasoning_frames: int = 10  # images per extra reasoning rollout (the start, the success frame and mid-rollout frames)
    frames: int = 5  # images per rollout: the start, frames - 2 mid-rollout frames, the success frame
    reduce: float = 0.7  # share of rollouts whose scene loses some distractors (2-5 objects)
    questions: int = 3  # questions per image, families drawn by MIXTURE (+ one caption per image)
    round_robin: bool = False  # cycle through every type instead of drawing (micro: covers all types)
    shard: int = 8  # rollouts per shard: the unit of restart
    workers: int = 2
    vocab_size: int = 512


GEN_PRESETS = {
    "micro": dict(image_size=64, train_rollouts=4, val_rollouts=1, test_rollouts=3, train_reasoning_rollouts=1,
                  test_reasoning_rollouts=1, frames=3,
                  reasoning_frames=3, questions=5, round_robin=True, shard=2, workers=1, vocab_size=384),
    # tiny: 360 train scenes, 1/3 of them for stage 0 only (reproduce.py --base_share); >= 300 in-distribution
    # test and >= 150 val questions per reasoning type (README "The questions")
    "tiny": dict(image_size=64, train_rollouts=360, test_rollouts=80, val_reasoning_rollouts=70, test_reasoning_rollouts=90),
    "small": dict(image_size=128, train_rollouts=2000, val_rollouts=60, test_rollouts=200, val_reasoning_rollouts=40,
                  test_reasoning_rollouts=80, frames=5, vocab_size=1024),
}
SPLITS = ("train", "val", "test")
# simulator seeds, disjoint by construction (generate refuses more rollouts than fit): split s uses
# [SEED_BASE[s], + ATTEMPTS * rollouts), below the next split's, then the demos (demo_seed), then the eval states
SEED_BASE, ATTEMPTS = {"train": 0, "val": 300_000, "test": 600_000}, 20


def n_rollouts(cfg: dict, split: str) -> int:
    """A split's rollouts: its own, then the extra reasoning-only ones."""
    return cfg[f"{split}_rollouts"] + cfg.get(f"{split}_reasoning_rollouts", 0)


def expert_rollout(env, start: dict):
    """Expert from a start state to success, without rendering -> (sim states, expert subgoals, success)."""
    _, info = env.reset(options={"state": start})
    states, subgoals = [env.get_state()], [env.expert_subgoal]
    for _ in range(info["max_steps"]):
        _, _, term, trunc, info = env.step(env.expert_action())
        states.append(env.get_state()), subgoals.append(env.expert_subgoal)
        if term or trunc:
            break
    return states, subgoals, bool(info["success"])


def reduce_scene(state: dict, task, rng) -> dict:
    """A copy of a reset state with some distractors removed (2-5 objects left): small scenes make the
    colour -> location binding learnable for the tiny model. Objects the task's goals name stay."""
    keep_roles = {g[1] for g in task.goals} | {g[2] for g in task.goals if g[0] in ("on", "in")}
    objs = state["objects"]
    must = [i for i, o in enumerate(objs) if o["role"] in keep_roles]
    rest = [i for i in rng.permutation(len(objs)).tolist() if i not in must]
    n = max(len(must), int(rng.integers(2, min(5, len(objs)) + 1)))
    idx = sorted(must + rest[:n - len(must)])
    return dict(state, objects=[dict(objs[i], id=k + 1) for k, i in enumerate(idx)],
                start=[state["start"][i] for i in idx])


def draw_view(rng) -> dict:
    """A camera for one image (VIEW ranges) as sim_env "aug" keys: position, look-at point, fov."""
    v = {k: float(rng.uniform(*r)) for k, r in VIEW.items()}
    p, y = math.radians(v["pitch"]), math.radians(v["yaw"])
    look = np.array([v["look_x"], v["look_y"], 0.0])
    cam = look + v["dist"] * np.array([math.sin(y) * math.cos(p), -math.cos(y) * math.cos(p), math.sin(p)])
    return dict(cam=cam.tolist(), look=look.tolist(), fov=v["fov"])


def scale_objects(state: dict, rng):
    """A copy of a start state whose movable objects have their own sizes (SCALE), standing where they stood;
    None when two footprints would then come closer than 1 cm (the caller draws another scene)."""
    objs, start = [], []
    for o, st in zip(state["objects"], state["start"]):
        if o["shape"] in sim_env.SHAPES:
            s = float(rng.uniform(*SCALE["uniform" if o["shape"] in ("cube", "ball") else "xy"]))
            sz = s if o["shape"] in ("cube", "ball") else float(rng.uniform(*SCALE["z"]))
            h = [o["half_extents"][0] * s, o["half_extents"][1] * s, o["half_extents"][2] * sz]
            lift = h[2] - o["half_extents"][2]  # same support, new half height
            o, st = dict(o, half_extents=h, pos=[o["pos"][0], o["pos"][1], o["pos"][2] + lift]), [st[0], st[1], st[2] + lift]
        else:  # a plate or tray: its footprint only
            s = float(rng.uniform(*SCALE["receptacle"]))
            o = dict(o, half_extents=[o["half_extents"][0] * s, o["half_extents"][1] * s, o["half_extents"][2]])
        objs.append(o), start.append(st)
    ext = [sim_env._ext(o["shape"], o["half_extents"], o["yaw"]) for o in objs]
    for i in range(len(objs)):
        for j in range(i):
            d = np.abs(np.subtract(objs[i]["pos"][:2], objs[j]["pos"][:2])) - ext[i][:2] - ext[j][:2]
            if d.max() < 0.01:
                return None
    return dict(state, objects=objs, start=start)



def _draw_types(cfg, rng, rr, skip):
    """Question types for one frame (besides its caption and the explicitly placed "done" questions):
    the least used so far (micro: every type appears), else families drawn by MIXTURE."""
    pool = [t for t in TYPE_FAMILY if t not in skip]
    if cfg["round_robin"]:  # the least used types so far (rr counts uses): every type gets covered
        chosen = sorted(pool, key=lambda t: rr.get(t, 0))[:cfg["questions"]]
        rr.update({t: rr.get(t, 0) + 1 for t in chosen})
        return chosen
    fams = [f for f in MIXTURE if any(t in pool for t in FAMILY_TYPES[f])]
    p = np.array([MIXTURE[f] for f in fams])
    out = []
    for f in rng.choice(fams, size=cfg["questions"], p=p / p.sum()):
        types = [t for t in FAMILY_TYPES[f] if t in pool]
        out.append(types[int(rng.integers(len(types)))])
    return out


def frame_records(sc, fid, types, out, fallback=True):
    """Records for one frame. A type with no unambiguous question here falls back to its family's others
    (unless not `fallback`). A balanced type's record holds its candidates ("cands") until balance() picks."""
    recs = []
    for j, typ in enumerate(types):
        sid = f"{fid}-{j}"
        rec = dict(id=sid, image=f"images/{fid}.png", depth=f"depth/{fid}.png", task=TYPE_FAMILY[typ])
        if typ == "depth":  # the image alone, for the depth head
            recs.append(dict(rec, conversations=[{"from": "human", "value": IMAGE}], meta=dict(type="depth", frame=fid)))
            continue
        fam = FAMILY_TYPES[TYPE_FAMILY[typ]] if fallback else [typ]
        for alt in [typ] + [t for t in sc.rng.permutation(fam).tolist() if t != typ]:
            sc.marked = None
            made = MAKERS[alt](sc) if (alt != "done" or typ == "done") else None
            if made:
                break
        if not made:
            continue
        cands = made if isinstance(made, list) else [dict(q=made[0], a=made[1], meta=dict(made[2], heldout_template=sc.held))]
        for c in cands:
            for k in ("obj", "ref"):  # the objects' 2D boxes: what the 2D-rule baseline (eval.py rules) may see
                o = next((o for o in sc.visible if o["id"] == c["meta"].get(k)), None)
                if o is not None:
                    c["meta"][f"{k}_box"] = sc.box(o)
        if sc.marked is not None:  # markers drawn on a copy of the frame: its own image file
            rec["image"] = f"images/{sid}.png"
            Image.fromarray(sc.marked).save(os.path.join(out, rec["image"]))
        rec["meta"] = dict(type=alt, frame=fid)
        recs.append(dict(rec, cands=cands) if isinstance(made, list) else _fill(rec, cands[0]))
    return recs


def _fill(rec: dict, c: dict) -> dict:
    """A record with the question and answer of candidate c."""
    rec["conversations"] = [{"from": "human", "value": f"{IMAGE}\n{c['q']}"}, {"from": "gpt", "value": c["a"]}]
    rec["meta"] = dict(rec["meta"], **c["meta"])
    return rec


def balance(recs: list[dict]) -> list[dict]:
    """Pick one candidate per record of a balanced type ("cands"), greedily in record order, so that the answer
    no longer follows from the words; returns the records kept. Numbers (distance, height) count by their
    quintile within the type; keys named "g=..." form group g.
    1. A key whose words all but give the answer is never asked about: seen in >= BAL_MIN candidates of the
       split, one answer's share there exceeds the group's by > BAL_SLACK (a plate is never closer to the
       camera than what stands beside it). Candidates with such a key go, whatever their answer (dropping
       only the common answer would make the rare one certain); a record left with none is dropped.
    2. Where the candidates have a "!" key (yes/no, letter per option count), the answer first: the one that
       key has given least so far.
    3. Of those, the one whose answers are furthest below their target shares: per key, the answers' spread
       over its whole group so far; for a "*" or "!" key, uniform.
    4. Yes/no only: when even that candidate leaves a key seen >= BAL_MIN times more than BAL_TOL above
       its target, the record is dropped (tests/test_sim_data.py: without it, a strong name -> answer
       leak survives the greedy pick). Deterministic: no draws."""
    by_type, dropped = {}, set()
    for r in recs:
        if "cands" in r:
            by_type.setdefault(r["meta"]["type"], []).append(r)
    for rs in by_type.values():
        nums = [v for r in rs for c in r["cands"] for _, v in c["bal"] if isinstance(v, int)]
        edges = np.quantile(nums, [0.2, 0.4, 0.6, 0.8]) if nums else []
        cls = lambda v: int(np.searchsorted(edges, v, side="right")) if isinstance(v, int) else v  # noqa: E731
        group = lambda k: k if k.startswith(("*", "!")) else k.split("=", 1)[0]  # noqa: E731
        values, supply = {}, Counter()  # answers per group; candidates per (key, answer), key, and "g:" group
        for r in rs:
            for c in r["cands"]:
                for k, v in c["bal"]:
                    values.setdefault(group(k), set()).add(cls(v))
                    supply.update([(k, cls(v)), k, ("g:" + group(k), cls(v)), "g:" + group(k)])
        share = lambda k, v: supply[k, v] / supply[k]  # noqa: E731
        telling = {k for k in supply if isinstance(k, str) and not k.startswith(("*", "!", "g:")) and supply[k] >= BAL_MIN
                   and any(share(k, v) > share("g:" + group(k), v) + BAL_SLACK for v in values[group(k)])}
        count, total = Counter(), Counter()  # (key, answer) and key counts; groups the same with "g:" keys
        strict = values.get("!") == {"yes", "no"}  # both orders of a pair give both answers: dropping costs little

        def target(k, v):  # the share answer v should have among key k's questions
            g = group(k)
            return 1 / len(values[g]) if k.startswith(("*", "!")) else (count["g:" + g, v] + 1) / (total["g:" + g] + len(values[g]))

        def score(c):  # how far below their target shares the candidate's answers are, over its keys
            return sum(target(k, cls(v)) - count[k, cls(v)] / max(total[k], 1) for k, v in c["bal"])
        for r in rs:
            cands = [c for c in r.pop("cands") if not any(k in telling for k, _ in c["bal"])]
            if not cands:
                dropped.add(r["id"])
                continue
            hard = [(k, cls(v)) for c in cands for k, v in c["bal"] if k.startswith("!")]
            if hard:  # the answer first: the one its "!" key has given least so far (yes/no, letter per option count)
                k, v = min(hard, key=lambda kv: count[kv])
                cands = [c for c in cands if any(kk == k and cls(vv) == v for kk, vv in c["bal"])]
            c = max(cands, key=score)  # the first of equals
            if strict and any(total[k] >= BAL_MIN and count[k, cls(v)] / total[k] > target(k, cls(v)) + BAL_TOL for k, v in c["bal"]):
                dropped.add(r["id"])  # yes/no: even the best candidate would push a key further off
                continue
            for k, v in c["bal"]:
                for key in (k, "g:" + group(k)):
                    count[key, cls(v)] += 1
                    total[key] += 1
            _fill(r, c)
    return [r for r in recs if r["id"] not in dropped]


def gen_shard(job):
    """Write one shard: images, depth maps, simulator states, and last (atomically) the shard's JSONL."""
    cfg, split, k = job
    out, S = cfg["out"], cfg["image_size"]
    rng = np.random.default_rng([cfg["seed"], SPLITS.index(split), k])
    pairs = [(s, t) for s in sim_env.SUITES for t in range(len(sim_env.SUITES[s]))]
    records, cache, rr = [], {}, {}
    for r in range(k * cfg["shard"], min(n_rollouts(cfg, split), (k + 1) * cfg["shard"])):
        reasoning_only = r >= cfg[f"{split}_rollouts"]  # an extra rollout: reasoning questions only, in distribution
        for attempt in range(ATTEMPTS):  # train/val never show a held-out colour x shape combination
            suite, task_id = pairs[int(rng.integers(len(pairs)))]
            env = sim_env.cached_env(cache, suite, task_id, S, render=False)
            env.reset(seed=SEED_BASE[split] + ATTEMPTS * r + attempt)
            start = env.get_state()
            # spatial tasks' instructions name their landmarks and distractors: those scenes stay whole
            if suite != "spatial" and not reasoning_only and rng.random() < cfg["reduce"]:  # reasoning: more pairs
                start = reduce_scene(start, env.task, rng)
            start = scale_objects(start, rng)
            if start is None:  # resized objects would touch
                continue
            states, subgoals, ok = expert_rollout(env, start)
            combos = {(o["colour"], o["shape"]) for o in start["objects"]}
            if ok and ((split == "test" and not reasoning_only) or not combos & HELDOUT_COMBOS):
                break
        else:  # never with the real expert; a failed rollout, touching resized objects or a held-out combination is never written
            raise RuntimeError(f"gen_shard: {split} rollout {r}: no successful expert rollout (with non-touching resized objects) "
                               f"without a held-out colour x shape in seeds {SEED_BASE[split] + ATTEMPTS * r}..{SEED_BASE[split] + ATTEMPTS * (r + 1) - 1}")
        renv, T = sim_env.cached_env(cache, suite, task_id, S), len(states) - 1
        grip = [st["grip"][:3] for st in states]
        n_frames = cfg["reasoning_frames"] if reasoning_only else cfg["frames"]
        ts = sorted(rng.choice(np.arange(1, T), size=min(n_frames - 2, T - 1), replace=False).tolist())
        for t in [0] + ts + [T]:  # the start, a few mid-rollout frames, and the success frame
            st = dict(states[t], aug=draw_view(rng))  # this image's own camera
            obs, info = renv.reset(options={"state": st})
            fid = f"{split}-{r:05d}-{t:03d}"
            instr = env.task.instruction(rng, heldout=split == "test" and bool(rng.random() < 0.5))
            sc = Scene(obs, info, split, rng, task=env.task, future=grip[t:], success=t == T,
                       subgoal=subgoals[t], instr=instr)
            sc.indist = reasoning_only
            Image.fromarray(obs["rgb"]).save(os.path.join(out, "images", fid + ".png"))
            save_depth_png(os.path.join(out, "depth", fid + ".png"), obs["depth"])
            with open(os.path.join(out, "states", fid + ".json"), "w") as f:
                json.dump(dict(suite=suite, task_id=int(task_id), t=t, state=st), f)
            skip = {"caption", "done"}  # every frame gets a caption; "done" is placed below
            if t == T:  # nothing left to plan or trace at the success frame
                skip |= {"next_step", "trajectory"}
            types = ["caption"] + _draw_types(cfg, rng, rr, skip)
            if t == T or (ts and t == ts[len(ts) // 2]):  # "is it done?": one yes and one no per rollout
                types.append("done")
            if reasoning_only:  # (train: and a caption and the grounding questions, for stage 0 to learn to see on)
                types = (["caption"] + FAMILY_TYPES["grounding"]) * (split == "train") + list(FAMILY_TYPES["reasoning"])
            for rec in frame_records(sc, fid, types, out, fallback=not reasoning_only):
                rec["meta"].update(suite=suite, task_id=int(task_id), t=t)
                records.append(rec)
    # a shard file exists only once the shard is complete
    write_atomic(os.path.join(out, "shards", f"{split}-{k:04d}.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return split, k, len(records)


def generate(cfg: GenConfig) -> dict:
    """Generate (or finish generating) a dataset; returns the stats also written to stats.json."""
    c = dataclasses.asdict(cfg)
    for s, end in zip(SPLITS, [SEED_BASE["val"], SEED_BASE["test"], DEMO_SEED_BASE]):  # seed ranges stay disjoint
        extra = c.get(f"{s}_reasoning_rollouts", 0)
        if min(c[f"{s}_rollouts"], extra) < 0 or n_rollouts(c, s) > (end - SEED_BASE[s]) // ATTEMPTS:
            flags = f"--{s}_rollouts={c[f'{s}_rollouts']}" + (f" + --{s}_reasoning_rollouts={extra}" if extra else "")
            raise SystemExit(f"error: {flags} out of range 0..{(end - SEED_BASE[s]) // ATTEMPTS} "
                             f"(its simulator seeds would reach the next range)")
    for d in ("images", "depth", "states", "shards"):
        os.makedirs(os.path.join(cfg.out, d), exist_ok=True)
    # finished shards are only reused by the same recipe: refuse to mix two configs in one folder
    # the world's own settings too: data made before a change of cameras or sizes is never reused
    recipe = {k: v for k, v in c.items() if k not in ("out", "workers", "preset")} | {"world": dict(VIEW=VIEW, SCALE=SCALE)}
    recipe = json.loads(json.dumps(recipe))  # as read back from gen_config.json (tuples become lists)
    cfg_path = os.path.join(cfg.out, "gen_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        diff = sorted(k for k in recipe if old.get(k) != recipe[k])
        if diff:
            raise SystemExit(f"error: {cfg_path}: {cfg.out} holds data generated with other settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} there, {recipe[k]!r} now' for k in diff)}); use another --out")
    write_atomic(cfg_path, json.dumps(recipe, indent=1))
    jobs = [(c, s, k) for s in SPLITS for k in range(math.ceil(n_rollouts(c, s) / cfg.shard))]
    shard_file = lambda s, k: os.path.join(cfg.out, "shards", f"{s}-{k:04d}.jsonl")
    todo = [j for j in jobs if not os.path.isfile(shard_file(j[1], j[2]))]  # finished shards are kept
    run_jobs(gen_shard, todo, cfg.workers, total=len(jobs), desc="shards", disable=cfg.preset == "micro")
    stats, texts = {"config": c, "splits": {}}, []
    for s in SPLITS:
        recs = []
        for _, _, k in [j for j in jobs if j[1] == s]:
            with open(shard_file(s, k)) as f:
                recs += [json.loads(line) for line in f]
        recs = balance(recs)  # one question per balanced record, over the whole split
        write_atomic(os.path.join(cfg.out, f"{s}.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
        stats["splits"][s] = dict(samples=len(recs), images=len({r["image"] for r in recs}),
                                  families=dict(Counter(r["task"] for r in recs)),
                                  types=dict(Counter(r["meta"]["type"] for r in recs)))
        if s == "train":
            texts = [t["value"].replace(IMAGE, "") for r in recs for t in r["conversations"]]
    # the VLA's training instructions must tokenize compactly too
    texts += [VLA_PROMPT.format(instr=t) for ts in sim_env.SUITES.values() for task in ts for t in task.templates]
    train_tokenizer(texts, os.path.join(cfg.out, "tokenizer.json"), cfg.vocab_size)
    write_atomic(os.path.join(cfg.out, "stats.json"), json.dumps(stats, indent=1))
    return stats


# ----------------------------------------------------------------------------------------------------
# VLA demonstrations, normalisation, and THE observation preprocessing shared with the Policy

@dataclasses.dataclass
class DemoConfig:
    out: str = "data/demos"
    suite: str = "all"  # or one suite name
    tasks: str = "all"  # or comma-separated task ids
    per_task: int = 20
    seed: int = 0
    image_size: int = 64
    workers: int = 2


DEMO_SEED_BASE, DEMO_TASKS, DEMO_TRIES = 900_000, 10, 1000  # demo seed blocks: see demo_seed


def demo_seed(seed: int, task_id: int, k: int) -> int:
    """Scene seed of try k of task task_id under --seed=seed: DEMO_TRIES per task, DEMO_TASKS tasks per --seed,
    all in [DEMO_SEED_BASE, sim_env.EVAL_SEED_BASE): above the VLM data's seeds, below the eval start states'."""
    top = (sim_env.EVAL_SEED_BASE - DEMO_SEED_BASE) // (DEMO_TASKS * DEMO_TRIES) - 1
    for v, hi, what in ((seed, top, f"--seed={seed}"), (task_id, DEMO_TASKS - 1, f"demo task id {task_id}"),
                        (k, DEMO_TRIES - 1, f"demo try {k} (--per_task=n makes 3n + 5 tries)")):
        if not 0 <= v <= hi:
            raise ValueError(f"{what} out of range 0..{hi}: demo seeds must stay below the evaluation start states'")
    return DEMO_SEED_BASE + DEMO_TRIES * (DEMO_TASKS * seed + task_id) + k


def _physical(state: dict) -> str:
    """The part of a simulator state that actions change (not the step counter)."""
    return json.dumps({k: v for k, v in state.items() if k != "t"}, sort_keys=True)


def demo_task(job):
    """Expert episodes for one task until `per_task` succeed; one .npz per kept episode.

    A no-op step (one that leaves the simulator state unchanged, e.g. the expert idling) is dropped, so
    the stored actions replayed from sim_states[0] reproduce the episode exactly."""
    c, suite, task_id = job
    env = sim_env.TabletopEnv(suite, task_id, image_size=c["image_size"], render_images=False)
    kept, tries = 0, 0
    while kept < c["per_task"] and tries < 3 * c["per_task"] + 5:
        # episodes are re-simulated on a restart (cheap, no rendering) so the seed sequence is the same,
        # but a finished episode file is never rewritten
        path = os.path.join(c["out"], f"{suite}_{task_id:02d}_{kept:03d}.npz")
        seed = demo_seed(c["seed"], task_id, tries)
        tries += 1
        obs, info = env.reset(seed=seed)
        acts, states, sims = [], [], []
        for _ in range(info["max_steps"]):
            before, a = env.get_state(), np.asarray(env.expert_action(), np.float32)
            obs2, _, term, trunc, info = env.step(a)
            if _physical(env.get_state()) != _physical(before):  # the state *before* the action is the input
                acts.append(a), states.append(np.asarray(obs["state"], np.float32)), sims.append(before)
            obs = obs2
            if term or trunc:
                break
        if not info["success"]:
            continue
        kept += 1
        if os.path.isfile(path):
            continue
        sims.append(env.get_state())  # the final (success) state, for checks
        tmp = path[:-4] + ".tmp.npz"
        np.savez(tmp, actions=np.stack(acts), states=np.stack(states), sim_states=json.dumps(sims),
                 instruction=obs["instruction"], suite=suite, task_id=task_id, seed=seed)
        os.replace(tmp, path)
    return suite, task_id, kept


def generate_demos(cfg: DemoConfig) -> dict:
    suites = list(sim_env.SUITES) if cfg.suite == "all" else [cfg.suite]
    for s in suites:
        if s not in sim_env.SUITES:
            raise SystemExit(f"error: --suite={s!r} unknown; valid: all, {', '.join(sim_env.SUITES)}")
    try:  # the largest seed this run can use, checked before any work
        demo_seed(cfg.seed, max(len(sim_env.SUITES[s]) for s in suites) - 1, 3 * cfg.per_task + 4)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    os.makedirs(cfg.out, exist_ok=True)
    c = dataclasses.asdict(cfg)
    jobs = [(c, s, t) for s in suites for t in range(len(sim_env.SUITES[s]))
            if cfg.tasks == "all" or str(t) in cfg.tasks.split(",")]
    run_jobs(demo_task, jobs, cfg.workers, total=len(jobs), desc="demo tasks", disable=len(jobs) < 4)
    return compute_norm_stats(cfg.out)


if __name__ == "__main__":
    from common import parse_config
    if sys.argv[1:2] == ["demos"]:
        st = generate_demos(parse_config(DemoConfig, sys.argv[2:]))
        print(f"demos: {st['episodes']} episodes, {st['steps']} steps")
    else:
        gcfg = parse_config(GenConfig, sys.argv[1:], GEN_PRESETS)
        st = generate(gcfg)
        for s, v in st["splits"].items():
            print(f"{s}: {v['samples']} samples, {v['images']} images, families {v['families']}")
