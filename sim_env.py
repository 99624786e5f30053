"""GEM-mini tabletop simulator: pure numpy, analytic ray casting, kinematic physics, LIBERO-style suites.

What it is: a table with a back wall and a floor, movable objects (cube, block, can, ball in 8 colours),
receptacles (plate, tray) and a floating parallel-jaw gripper, seen by one fixed "agentview" pinhole camera.
Every step returns RGB, exact metric z-depth and an instance mask rendered in one ray-casting pass.

Run:  python sim_env.py --suite goal --task 3 --gif out.gif     (expert rollout, RGB | colourised depth)
      README picture: ... --suite long --task 0 --image_size 128 --png docs/scene.png --png_step 22 --gif /tmp/scene.gif
      README GIF:     ... --suite goal --task 5 --image_size 64 --start_id 1 --gif docs/scene.gif
      speed: python bench/bench_sim.py ; expert success: python bench/expert_success.py
Use:  env = TabletopEnv("goal", 3); obs, info = env.reset(options={"start_id": 0})
      obs, r, term, trunc, info = env.step(env.expert_action())

Conventions
  world frame: +x right, +y away from the camera, +z up, table top z = 0, metres / radians.
  camera: OpenCV frame (x right, y down, z forward); pixel (row i, col j) covers [j, j+1) x [i, i+1), its
    centre is (j + .5, i + .5); `project` returns (u, v) in that continuous frame. depth = camera z (not ray length).
  action (7,) in [-1, 1]: [dx, dy, dz, droll, dpitch, dyaw, grip], 1.0 = 2 cm / 0.25 rad, grip > 0 closes
    (roll and pitch are accepted and ignored).  seg: 0 = table/wall/floor, k = object id (1..n,
    info["objects"]), GRIPPER_ID = the gripper.
  state (8,) = STATE_NAMES = [x, y, z, yaw, opening, grasped, sin yaw, cos yaw] of the gripper (x, y, z = point
    between the jaws).
  success (reward 1, terminated) = all of the task's goal predicates hold now; truncated at info["max_steps"].
  info["n_subgoals"] / ["subgoals_done"] count the task's goal predicates (task.goal_texts; done = achieved in
    order, latched); task.subgoals is the finer pick / place / push step list, env.expert_subgoal indexes it.
  reset options: {"start_id": k} fixed eval start state, {"state": d} restore, {"heldout": True} instruction
    from the held-out paraphrase. augment=True: per-episode colour / light / camera jitter (its own random
    stream: the scene is the same). A state's "aug" may set any of gain, cam, look, fov, light, ambient
    (sim_data.py draws a whole new camera per VLM image this way). render_images=False: state-only observations (fast expert rollouts).
  seeds: a scene is drawn from default_rng([suite index, task id, seed]). Training uses seeds in
    [0, TRAIN_SEEDS); the 50 evaluation start states use seeds EVAL_SEED_BASE + k (kept only where the
    expert succeeds; the kept seeds are cached in sim_eval_starts.json, regenerated if missing).

Paper -> code map (GEM uses LIBERO in MuJoCo; we mirror it at toy scale)
  LIBERO suites spatial/object/goal/long         SUITES (10 tasks each), Task
  50 fixed initial states per task               eval_start_states
  RGB + depth observations (depth = GEM target)  TabletopEnv.render (ray casting, z-buffer, Lambert shading)
  success predicates (on / in / relations)       on, inside, left_of, ..., relation_margin, lifted
  scripted demonstrations for VLA training       TabletopEnv.expert_action (waypoint state machine)
"""
import json
import math
import os
import sys

import numpy as np

# ----------------------------------------------------------------------------- world constants
STEP_M, STEP_RAD = 0.02, 0.25            # action 1.0 = 2 cm / 0.25 rad
WORK = (-0.28, 0.28, -0.20, 0.19)        # x0, x1, y0, y1 where object centres may be spawned
TABLE_HALF = (0.45, 0.40)                # table top: x in [-.45,.45], y in [-.35,.45] (back edge at the wall)
TABLE_CY, WALL_Y, FLOOR_Z = 0.05, 0.45, -0.75
CAM_POS, CAM_LOOK, FOV_DEG = (0.0, -0.50, 0.46), (0.0, 0.02, 0.0), 46.0   # ~41.5 deg down
LIGHT = np.array([-0.35, -0.5, 1.0]) / np.linalg.norm([-0.35, -0.5, 1.0])
AMBIENT, DIFFUSE = 0.40, 0.60
GRIP_OPEN, FT, FW, FL, PALM_H = 0.10, 0.007, 0.012, 0.025, 0.01   # jaw opening, finger half sizes, palm half h
GRIP_LO = (-0.35, -0.28, FL + 0.002)     # the fingertips never go through the table
GRIP_HI = (0.35, 0.35, 0.30)
CLOSE_RATE, TRAVEL_Z, LIFT_Z, PUSH_DIST = 0.05, 0.13, 0.08, 0.08
GAP = 0.04                               # min free space between spawned objects (room for open fingers)
ON_TOL_Z, REL_GAP, TRAY_WALL = 0.012, 0.03, 0.008
GRIPPER_ID = 100
TRAIN_SEEDS, EVAL_SEED_BASE, N_EVAL = 1_000_000, 1_000_000, 50
STATE_NAMES = ("x", "y", "z", "yaw", "opening", "grasped", "sin_yaw", "cos_yaw")
COLOURS = {"red": (200, 40, 40), "green": (45, 165, 60), "blue": (40, 80, 215), "yellow": (235, 205, 40),
           "orange": (245, 135, 30), "purple": (140, 60, 185), "white": (240, 240, 240), "black": (30, 30, 30)}
SHAPES = ("cube", "block", "can", "ball")            # movable; receptacles: plate, tray
HALF = {"cube": (0.025, 0.025, 0.025), "block": (0.045, 0.02, 0.02), "can": (0.024, 0.024, 0.035),
        "ball": (0.026, 0.026, 0.026), "plate": (0.065, 0.065, 0.006), "tray": (0.11, 0.085, 0.025)}
RECEPTACLE_RGB = {"plate": (205, 205, 215), "tray": (95, 62, 40)}
BG_RGB = {"table": (196, 170, 130), "wall": (150, 168, 190), "floor": (85, 85, 90)}
GRIP_RGB = (70, 70, 78)
ROUND = ("can", "ball", "plate")          # footprint is a disc
SUITE_NAMES = ("spatial", "object", "goal", "long")
RELATIONS = ("on", "inside", "left_of", "right_of", "in_front_of", "behind")


# ----------------------------------------------------------------------------- geometry helpers
def _rot(yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera(image_size, pos=CAM_POS, look=CAM_LOOK, fov_deg=FOV_DEG):
    """Pinhole intrinsics K (3,3) and world_from_camera pose (4,4), OpenCV axes."""
    pos, look = np.asarray(pos, float), np.asarray(look, float)
    f = (look - pos) / np.linalg.norm(look - pos)
    r = np.cross(f, [0.0, 0.0, 1.0]); r /= np.linalg.norm(r)
    d = np.cross(f, r)                                        # image "down"
    pose = np.eye(4); pose[:3, :3] = np.stack([r, d, f], 1); pose[:3, 3] = pos
    fl = (image_size / 2) / math.tan(math.radians(fov_deg) / 2)
    K = np.array([[fl, 0, image_size / 2], [0, fl, image_size / 2], [0, 0, 1.0]])
    return K, pose


def project(K, cam_pose, points_world):
    """(N,3) world points -> (N,2) continuous pixel coords (u = column, v = row); pixel centres at +.5."""
    K, pose = np.asarray(K, float), np.asarray(cam_pose, float)
    pc = (np.asarray(points_world, float) - pose[:3, 3]) @ pose[:3, :3]        # (N,3) camera frame
    z = np.maximum(pc[:, 2:3], 1e-6)
    return np.concatenate([K[0, 0] * pc[:, :1] / z + K[0, 2], K[1, 1] * pc[:, 1:2] / z + K[1, 2]], 1)


def _ray_dirs(K, pose, n):
    """Per-pixel world ray directions scaled so the camera-z component is 1: hit distance t == z-depth."""
    c = (np.arange(n) + 0.5)
    x = (c[None, :] - K[0, 2]) / K[0, 0]
    y = (c[:, None] - K[1, 2]) / K[1, 1]
    dc = np.stack(np.broadcast_arrays(x, y, np.ones((n, n))), -1)              # (H,W,3) camera frame
    return dc @ pose[:3, :3].T                                                  # (H,W,3) world frame


def _hit_boxes(o, D, C, yaw, H):
    """Batched ray / oriented-box slab test for k boxes sharing one yaw (the gripper, the tray).
    o (3,) ray origin, D (h,w,3) directions, C (k,3) centres, H (k,3) half sizes.
    Returns t (h,w) of the nearest hit (inf = miss) and normals(mask) -> (M,3) world normals."""
    cs, sn = math.cos(yaw), math.sin(yaw)
    rel = o[None, :] - C                                                        # (k,3)
    ol = np.stack([cs * rel[:, 0] + sn * rel[:, 1], -sn * rel[:, 0] + cs * rel[:, 1], rel[:, 2]], 1)
    dl = np.stack([cs * D[..., 0] + sn * D[..., 1], -sn * D[..., 0] + cs * D[..., 1], D[..., 2]])  # (3,h,w)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (-H - ol)[:, :, None, None] * inv                                  # (k,3,h,w)
        t2 = (H - ol)[:, :, None, None] * inv
    lo = np.minimum(t1, t2)
    tn, tf = lo.max(1), np.maximum(t1, t2).min(1)                               # (k,h,w)
    tk = np.where((tn <= tf) & (tn > 0), tn, np.inf)
    kb = tk.argmin(0) if len(C) > 1 else np.zeros(tk.shape[1:], int)            # (h,w) nearest box
    t = tk.min(0)

    def normals(m):
        M = int(m.sum())
        lm = lo[:, :, m][kb[m], :, np.arange(M)]                                # (M,3) entry distances
        ax = lm.argmax(1)                                                       # entry face axis
        nl = np.zeros((M, 3)); nl[np.arange(M), ax] = -np.sign(dl[:, m].T[np.arange(M), ax])
        return nl @ _rot(yaw).T
    return t, normals


_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)


def _hit_cyl(o, D, c, r, hz):
    """Vertical cylinder (side + top cap; the camera is always above the objects)."""
    ox, oy, oz = o - c
    dx, dy, dz = D[..., 0], D[..., 1], D[..., 2]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    disc = b * b - a * (ox * ox + oy * oy - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
        tt = (hz - oz) / dz
    zs = oz + ts * dz
    side = (disc > 0) & (zs >= -hz) & (zs <= hz) & (ts > 0)
    px, py = ox + tt * dx, oy + tt * dy
    top = (px * px + py * py <= r * r) & (tt > 0)
    t = np.where(top, tt, np.where(side, ts, np.inf))

    def normals(m):
        tm = t[m]
        n = np.stack([ox + tm * dx[m], oy + tm * dy[m], np.zeros_like(tm)], 1) / r
        n[top[m]] = (0.0, 0.0, 1.0)
        return n
    return t, normals


def _hit_sphere(o, D, c, r):
    rel = o - c
    a = np.einsum("...k,...k->...", D, D)
    b = D @ rel
    disc = b * b - a * (rel @ rel - r * r)
    t = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    return t, lambda m: (rel + t[m][:, None] * D[m]) / r


# ----------------------------------------------------------------------------- predicates (one place each)
def _get(o, k):
    return np.asarray(o["half_extents"] if k == "half" and "half_extents" in o else o[k], float)


def _footprint_margin(xy, b, inset=0.0):
    """Signed distance of point xy inside b's footprint (positive = inside), footprint shrunk by inset."""
    h, p = _get(b, "half"), _get(b, "pos")
    if b["shape"] in ROUND:
        return h[0] - inset - math.hypot(xy[0] - p[0], xy[1] - p[1])
    cs, sn = math.cos(b["yaw"]), math.sin(b["yaw"])
    dx, dy = xy[0] - p[0], xy[1] - p[1]
    return min(h[0] - inset - abs(cs * dx + sn * dy), h[1] - inset - abs(-sn * dx + cs * dy))


def _top(o):
    return float(_get(o, "pos")[2] + _get(o, "half")[2])


def _bottom(o):
    return float(_get(o, "pos")[2] - _get(o, "half")[2])


def relation_margin(a, b, rel):
    """Signed margin (metres) of `a rel b` for object dicts (info["objects"] items): > 0 means true.
    on: a's centre over b's footprint and a's bottom within ON_TOL_Z of b's top; inside: a's centre over the
    tray's inner floor and a's bottom below its rim; left_of/right_of/in_front_of/behind: centre offsets along
    x / y (front = towards the camera = -y) beyond REL_GAP."""
    pa, pb = _get(a, "pos"), _get(b, "pos")
    if rel == "on":
        return float(min(_footprint_margin(pa, b), ON_TOL_Z - abs(_bottom(a) - _top(b))))
    if rel == "inside":
        inset = TRAY_WALL if b["shape"] == "tray" else 0.0
        return float(min(_footprint_margin(pa, b, inset), _top(b) - _bottom(a) - 0.005))
    d = {"left_of": pb[0] - pa[0], "right_of": pa[0] - pb[0], "in_front_of": pb[1] - pa[1], "behind": pa[1] - pb[1]}
    if rel not in d:
        raise ValueError(f"sim_env.relation_margin: unknown relation {rel!r}; valid: {', '.join(RELATIONS)}")
    return float(d[rel] - REL_GAP)


def on(a, b): return bool(relation_margin(a, b, "on") > 0)
def inside(a, b): return bool(relation_margin(a, b, "inside") > 0)
def left_of(a, b): return bool(relation_margin(a, b, "left_of") > 0)
def right_of(a, b): return bool(relation_margin(a, b, "right_of") > 0)
def in_front_of(a, b): return bool(relation_margin(a, b, "in_front_of") > 0)
def behind(a, b): return bool(relation_margin(a, b, "behind") > 0)
def lifted(a): return bool(_bottom(a) > LIFT_Z)


def pushed(a, start_pos, direction):
    """a moved at least PUSH_DIST along the unit xy `direction` from start_pos."""
    p = _get(a, "pos")
    return bool((p[0] - start_pos[0]) * direction[0] + (p[1] - start_pos[1]) * direction[1] >= PUSH_DIST)


def _dist(a, b):
    pa, pb = _get(a, "pos"), _get(b, "pos")
    return math.hypot(pa[0] - pb[0], pa[1] - pb[1])


# ----------------------------------------------------------------------------- tasks and suites
PHRASES = {  # per goal kind: training templates (first 3) and the held-out paraphrase (last)
    "on": ["put {a} on {b}", "place {a} on {b}", "move {a} onto {b}", "set {a} down on top of {b}"],
    "in": ["put {a} in {b}", "place {a} into {b}", "drop {a} in {b}", "load {a} into {b}"],
    "lift": ["pick up {a}", "lift {a}", "raise {a} off the table", "grab {a} and hold it up"],
    "push": ["push {a} to the {b}", "slide {a} to the {b}", "shove {a} towards the {b}", "nudge {a} over to the {b}"],
}
JOIN = [", then ", " and then ", ", after that ", " and afterwards "]
DIRS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "back": (0.0, 1.0), "front": (0.0, -1.0)}


class Task:
    """One task: which objects to spawn (role, shape, colour, spawn region), goal list, language.
    goals: ("on", a, b) | ("in", a, "tray") | ("lift", a) | ("push", a, "left"|"right"|"back"|"front").
    Objects with shape None are filled from `distractors` ((shape, colour) pairs, drawn per scene); `valid`
    is an extra scene predicate (on the objects by role); the name defaults to the goal texts."""

    def __init__(self, suite, name, objects, goals, desc=None, valid=None, distractors=None):
        self.suite, self.objects, self.goals, self.valid, self.distractors = suite, objects, goals, valid, distractors
        self.desc = {r: f"the {c + ' ' if c else ''}{s}" for r, s, c, _ in objects}
        self.desc.update(desc or {})
        texts = [self._text(k) for k in range(4)]
        self.templates, self.heldout_templates = texts[:3], texts[3:]
        self.goal_texts = [PHRASES[g[0]][0].format(a=self.desc[g[1]], b=self._b(g)) for g in goals]
        self.name = name or "; ".join(self.goal_texts)
        self.subgoals, self.subgoal_base = [], []
        for g in goals:
            self.subgoal_base.append(len(self.subgoals))
            a = self.desc[g[1]]
            if g[0] == "push":
                self.subgoals.append(f"push {a} to the {g[2]}")
            else:
                self.subgoals.append(f"pick up {a}")
                self.subgoals.append("lift it up" if g[0] == "lift" else f"place it {g[0]} {self._b(g)}")

    def _b(self, g):
        return g[2] if g[0] == "push" else (self.desc[g[2]] if len(g) > 2 else "")

    def _text(self, k):
        parts = [PHRASES[g[0]][k].format(a=self.desc[g[1]], b=self._b(g)) for g in self.goals]
        return JOIN[k].join(parts)

    def instruction(self, rng, heldout=False):
        pool = self.heldout_templates if heldout else self.templates
        return pool[int(rng.integers(len(pool)))]


def _spatial_tasks():
    lm = [("t", "cube", "red", None), ("d", "cube", "red", None), ("can", "can", "blue", None),
          ("ball", "ball", "green", None), ("plate", "plate", "", (-0.05, 0.05, 0.08, 0.12))]
    def rel(r, ref):  # target satisfies r w.r.t. ref by a margin, the distractor clearly does not
        return lambda o: relation_margin(o["t"], o[ref], r) > 0.02 and relation_margin(o["d"], o[ref], r) < -0.05
    def closer(ref, far=False):
        s = -1 if far else 1
        return lambda o: s * (_dist(o["d"], o[ref]) - _dist(o["t"], o[ref])) > 0.08
    def between(o):  # target on the middle of the segment can -> ball, the distractor clearly off it
        a = _get(o["can"], "pos")[:2]
        u = _get(o["ball"], "pos")[:2] - a
        def along_across(x):
            r = _get(x, "pos")[:2] - a
            return float(r @ u / (u @ u)), abs(float(u[0] * r[1] - u[1] * r[0])) / np.linalg.norm(u)
        (s, perp), (sd, pd) = along_across(o["t"]), along_across(o["d"])
        return 0.25 < s < 0.75 and perp < 0.04 and (sd < -0.1 or sd > 1.1 or pd > 0.1)
    spec = [("left of the blue can", rel("left_of", "can")), ("right of the blue can", rel("right_of", "can")),
            ("behind the green ball", rel("behind", "ball")), ("in front of the green ball", rel("in_front_of", "ball")),
            ("closest to the plate", closer("plate")), ("farthest from the plate", closer("plate", True)),
            ("next to the blue can", closer("can")),
            ("LEFTMOST", lambda o: relation_margin(o["t"], o["d"], "left_of") > 0.08),
            ("FRONTMOST", lambda o: relation_margin(o["t"], o["d"], "in_front_of") > 0.06),
            ("between the blue can and the green ball", between)]
    name = lambda w: f"the {w[:-4].lower()} red cube" if w.endswith("MOST") else f"the red cube {w}"
    return [Task("spatial", f"{name(w)[4:]} -> plate", lm, [("on", "t", "plate")],
                 desc={"t": name(w)}, valid=v) for w, v in spec]


CATALOGUE = [("cube", "red"), ("can", "blue"), ("ball", "green"), ("block", "yellow"), ("can", "orange"),
             ("cube", "purple"), ("ball", "white"), ("block", "black"), ("cube", "blue"), ("ball", "orange")]
TRAY = ("tray", "tray", "", (0.11, 0.15, 0.08, 0.12))
PLATE = ("plate", "plate", "", (-0.17, -0.13, 0.08, 0.12))


def _object_tasks():   # the target, three distractors from the rest of the catalogue, the tray
    spare = [("d0", None, None, None), ("d1", None, None, None), ("d2", None, None, None)]
    return [Task("object", f"{c} {s} -> tray", [("t", s, c, None)] + spare + [TRAY], [("in", "t", "tray")],
                 distractors=[x for x in CATALOGUE if x != (s, c)]) for s, c in CATALOGUE]


def _goal_tasks():
    j = lambda x, y: (x - 0.008, x + 0.008, y - 0.008, y + 0.008)   # one fixed scene, +-8 mm jitter
    objs = [("cube", "cube", "red", j(-0.17, -0.05)), ("can", "can", "blue", j(-0.03, -0.045)),
            ("ball", "ball", "green", j(0.0, -0.16)), ("block", "block", "yellow", j(0.14, -0.075)),
            ("plate", "plate", "", j(-0.15, 0.11)), ("tray", "tray", "", j(0.13, 0.12))]
    goals = [[("on", "cube", "plate")], [("in", "can", "tray")], [("on", "ball", "plate")], [("in", "block", "tray")],
             [("push", "can", "back")], [("on", "cube", "block")], [("lift", "ball")], [("push", "ball", "left")],
             [("in", "cube", "tray")], [("on", "can", "plate")]]
    return [Task("goal", "", objs, g) for g in goals]


def _long_tasks():
    base = [("cube", "cube", "red", None), ("can", "can", "blue", None), ("ball", "ball", "green", None),
            ("block", "block", "yellow", None), PLATE, TRAY]
    two = [("cube", "cube", "red", None), ("can", "can", "blue", None), ("ball", "ball", "green", None),
           ("lplate", "plate", "", (-0.18, -0.14, 0.07, 0.11)), ("rplate", "plate", "", (0.14, 0.18, 0.07, 0.11))]
    G = [[("on", "cube", "plate"), ("in", "can", "tray")], [("in", "ball", "tray"), ("in", "block", "tray")],
         [("in", "cube", "tray"), ("on", "ball", "plate")], [("on", "cube", "block"), ("on", "can", "plate")],
         [("push", "can", "left"), ("on", "cube", "plate")],
         [("on", "can", "plate"), ("in", "ball", "tray"), ("in", "cube", "tray")],
         [("on", "block", "plate"), ("on", "cube", "block")], [("on", "cube", "lplate"), ("on", "can", "rplate")],
         [("in", "cube", "tray"), ("in", "block", "tray"), ("in", "ball", "tray")],
         [("push", "block", "back"), ("on", "ball", "plate")]]
    out = []
    for g in G:
        used = {r for goal in g for r in goal[1:]}
        spare = [o for o in base if o[0] not in used][:1]         # one distractor besides the used objects
        objs = two if g[0][2] == "lplate" else [o for o in base if o[0] in used] + spare
        out.append(Task("long", "", objs, g, desc={"lplate": "the left plate", "rplate": "the right plate"}))
    return out


SUITES = {"spatial": _spatial_tasks(), "object": _object_tasks(), "goal": _goal_tasks(), "long": _long_tasks()}
MAX_STEPS = {"spatial": 60, "object": 60, "goal": 60, "long": 160}


def _check_task(suite, task_id):
    if suite not in SUITES:
        raise ValueError(f"sim_env: unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < len(SUITES[suite]):
        raise ValueError(f"sim_env: unknown task {task_id!r} for suite {suite!r}; valid task ids: 0..{len(SUITES[suite]) - 1}")


def _ext(shape, h, yaw):
    """Axis-aligned half extents (x, y, z) of an object's footprint in the world."""
    if shape in ROUND:
        return np.array([h[0], h[1], h[2]])
    c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
    return np.array([c * h[0] + s * h[1], s * h[0] + c * h[1], h[2]])


def sample_scene(suite, task_id, seed):
    """Deterministic object list (dicts) for (suite, task, seed) by rejection sampling of a layout."""
    _check_task(suite, task_id)
    task = SUITES[suite][task_id]
    rng = np.random.default_rng([SUITE_NAMES.index(suite), task_id, int(seed)])
    for _ in range(2000):
        extra = [task.distractors[k] for k in rng.permutation(len(task.distractors))] if task.distractors else []
        objs, boxes = [], []
        for role, shape, colour, region in task.objects:
            if shape is None:
                shape, colour = extra.pop()
            h = HALF[shape]
            spin = 0.0 if shape in ROUND + ("tray",) else math.pi / 2 if shape == "block" else math.pi / 4
            yaw = float(rng.uniform(-spin, spin)) if spin else 0.0
            e = _ext(shape, h, yaw)
            x0, x1, y0, y1 = region or (WORK[0] + e[0], WORK[1] - e[0], WORK[2] + e[1], WORK[3] - e[1])
            xy = rng.uniform((x0, y0), (x1, y1), (64, 2))          # 64 candidates tested at once
            if region is None:   # inside the camera's view trapezoid (x range widens with distance)
                xy[:, 0] *= np.clip(_x_max(xy[:, 1] - e[1], 2 * e[2]) - e[0], 0, None) / max(abs(x0), abs(x1))
            ok = np.ones(len(xy), bool)
            for bx, by, ex, ey in boxes:
                ok &= (np.abs(xy[:, 0] - bx) >= e[0] + ex + GAP) | (np.abs(xy[:, 1] - by) >= e[1] + ey + GAP)
            if not ok.any():
                break
            x, y = (float(v) for v in xy[int(np.argmax(ok))])
            boxes.append((x, y, e[0], e[1]))
            name = task.desc[role][4:] if shape in ("plate", "tray") else f"{colour} {shape}"   # desc minus "the "
            objs.append({"id": len(objs) + 1, "role": role, "name": name, "shape": shape,
                         "colour": colour or ("grey" if shape == "plate" else "brown"), "size": "medium",
                         "pos": [x, y, h[2]], "yaw": yaw, "half_extents": list(h)})
        by_role = {o["role"]: o for o in objs}
        if (len(objs) == len(task.objects) and _in_view(objs) and (task.valid is None or task.valid(by_role))
                and all(_push_clear(by_role, g) for g in task.goals if g[0] == "push")):
            return objs, rng
    raise RuntimeError(f"sim_env: could not sample a scene for {suite}/{task_id} seed {seed}")


_VIEW = camera(1.0)


def _x_max(y, z, margin=0.04):
    """Largest |x| on the plane of depth y, height z that projects `margin` (fraction) inside the image edge."""
    f = _VIEW[1][:3, 2]
    zc = (y - CAM_POS[1]) * f[1] + (z - CAM_POS[2]) * f[2]
    return (0.5 - margin) * zc * 2 * math.tan(math.radians(FOV_DEG) / 2)


def _in_view(objs, margin=0.02):
    """Every object's footprint (at its top) projects inside the image, `margin` (fraction of width) from the edge."""
    pts = []
    for o in objs:
        e, p = _ext(o["shape"], o["half_extents"], o["yaw"]), o["pos"]
        pts += [[p[0] + sx * e[0], p[1] + sy * e[1], p[2] + e[2]] for sx in (-1, 1) for sy in (-1, 1)]
    uv = project(*_VIEW, np.array(pts))
    return bool(uv.min() > margin and uv.max() < 1 - margin)


def _push_clear(by_role, g):
    """The pushed object's path (plus room behind it for the gripper) is free of other objects (plates too:
    a can pushed onto the plate would block a later "put X on the plate")."""
    a = by_role[g[1]]; d = np.array(DIRS[g[2]]); p = _get(a, "pos")[:2]
    ea = _ext(a["shape"], a["half_extents"], a["yaw"])[:2]
    for o in by_role.values():
        if o is a:
            continue
        q, e = _get(o, "pos")[:2], _ext(o["shape"], o["half_extents"], o["yaw"])[:2]
        for s in np.linspace(-0.05, PUSH_DIST + 0.03, 12):
            c = p + s * d
            if np.all(np.abs(c - q) < ea + e + 0.01):
                return False
    return True


# ----------------------------------------------------------------------------- the environment
class TabletopEnv:
    """Gymnasium-style tabletop env (no gymnasium dependency). See the module docstring for conventions."""

    def __init__(self, suite, task_id, image_size=64, augment=False, render_depth=True, render_seg=True,
                 render_images=True):
        _check_task(suite, task_id)
        self.suite, self.task_id, self.task = suite, int(task_id), SUITES[suite][task_id]
        self.image_size, self.augment, self.render_images = int(image_size), bool(augment), render_images
        self.render_depth, self.render_seg = render_depth, render_seg
        self.max_steps = MAX_STEPS[suite]
        self._seed_rng = np.random.default_rng()
        self._cam_key, self._static = None, None

    # ---- state
    def reset(self, seed=None, options=None):
        options = options or {}
        if "state" in options:
            self.set_state(options["state"])
            return self.render(), self._info()
        if "start_id" in options:
            k = int(options["start_id"])
            if not 0 <= k < N_EVAL:
                raise ValueError(f"sim_env.reset: start_id {k} out of range 0..{N_EVAL - 1}")
            seed = eval_seeds(self.suite, self.task_id)[k]
        if seed is None:
            seed = int(self._seed_rng.integers(TRAIN_SEEDS))
        objs, rng = sample_scene(self.suite, self.task_id, seed)
        g = [float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.08, -0.04)), float(rng.uniform(0.13, 0.17)), 0.0, GRIP_OPEN]
        text = self.task.instruction(rng, heldout=bool(options.get("heldout", False)))
        aug = None
        if self.augment:  # a separate stream, so augmentation never changes the scene
            ar = np.random.default_rng([int(seed), 7])
            aug = {"gain": ar.uniform(0.85, 1.15, (len(objs) + 4, 3)).tolist(),
                   "cam": (np.array(CAM_POS) + ar.uniform(-0.01, 0.01, 3)).tolist(),
                   "look": (np.array(CAM_LOOK) + ar.uniform(-0.01, 0.01, 3)).tolist(),
                   "light": (LIGHT + ar.uniform(-0.25, 0.25, 3)).tolist(), "ambient": float(ar.uniform(0.3, 0.5))}
        self.set_state({"suite": self.suite, "task_id": self.task_id, "seed": int(seed), "t": 0, "grip": g,
                        "closed": False, "held": -1, "held_off": [0.0, 0.0, 0.0, 0.0], "objects": objs,
                        "start": [o["pos"] for o in objs], "instruction": text, "aug": aug, "goals_done": 0})
        return self.render(), self._info()

    def get_state(self):
        objs = [dict(m, pos=self.P[i].tolist(), yaw=float(self.Yaw[i]), half_extents=self.Hf[i].tolist())
                for i, m in enumerate(self.meta)]
        return {"suite": self.suite, "task_id": self.task_id, "seed": self.seed, "t": self.t,
                "grip": self.g.tolist(), "closed": self.closed, "held": self.held, "held_off": self.held_off.tolist(),
                "objects": objs, "start": self.start.tolist(), "instruction": self.instruction,
                "aug": self.aug, "goals_done": self.goals_done}

    def set_state(self, d):
        if d.get("suite", self.suite) != self.suite or d.get("task_id", self.task_id) != self.task_id:
            raise ValueError(f"sim_env.set_state: state is for {d.get('suite')}/{d.get('task_id')}, env is {self.suite}/{self.task_id}")
        self.seed, self.t, self.closed, self.held = int(d["seed"]), int(d["t"]), bool(d["closed"]), int(d["held"])
        self.g, self.held_off = np.array(d["grip"], float), np.array(d["held_off"], float)
        self.meta = [{k: v for k, v in o.items() if k not in ("pos", "yaw", "half_extents")} for o in d["objects"]]
        self.P = np.array([o["pos"] for o in d["objects"]], float)
        self.Yaw = np.array([o["yaw"] for o in d["objects"]], float)
        self.Hf = np.array([o["half_extents"] for o in d["objects"]], float)
        self.start, self.instruction, self.aug = np.array(d["start"], float), d["instruction"], d["aug"]
        self.goals_done = int(d.get("goals_done", 0))
        self.role = {m["role"]: i for i, m in enumerate(self.meta)}
        self._movable = [i for i, m in enumerate(self.meta) if m["shape"] in SHAPES]
        self._setup_camera()
        # The cached render of everything not held survives a set_state that leaves it where it was (replays).
        keep = [i for i in range(len(self.meta)) if i != self.held]
        sig = (self._cam_key, json.dumps(self.meta), self.P[keep].tobytes(), self.Yaw[keep].tobytes(), self.Hf.tobytes())
        if sig != getattr(self, "_static_sig", None):
            self._static, self._static_sig = None, sig
        self._seg = None

    def objects(self):
        """Current object dicts (the format the predicates take)."""
        return [dict(m, pos=self.P[i], yaw=float(self.Yaw[i]), half_extents=self.Hf[i]) for i, m in enumerate(self.meta)]

    # ---- goals
    def _goal_ok(self, g, objs):
        a = objs[self.role[g[1]]]
        if g[0] == "lift":
            return lifted(a)
        if g[0] == "push":
            return pushed(a, self.start[self.role[g[1]]], DIRS[g[2]])
        return (on if g[0] == "on" else inside)(a, objs[self.role[g[2]]])

    def _goals(self):
        objs = self.objects()
        return [self._goal_ok(g, objs) for g in self.task.goals]

    # ---- physics
    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"sim_env.step: action must have shape (7,) [dx,dy,dz,droll,dpitch,dyaw,grip], got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"sim_env.step: action contains NaN/inf: {a.tolist()}")
        a = np.clip(a, -1.0, 1.0)
        g = self.g
        lo = np.array(GRIP_LO)
        if self.held >= 0:   # a held object may not go through the table either
            lo[2] = max(lo[2], self.Hf[self.held, 2] - self.held_off[2])
        new = np.clip(g[:3] + a[:3] * STEP_M, lo, GRIP_HI)
        g[3] = float(np.clip(g[3] + a[5] * STEP_RAD, -math.pi / 2, math.pi / 2))
        # Sub-steps of <= 4 mm while the fingers are low, so a 2 cm move cannot tunnel through an object.
        near = [i for i in self._movable if i != self.held and abs(self.P[i, 0] - g[0]) + abs(self.P[i, 1] - g[1]) < 0.16]
        low = bool(near) and min(g[2], new[2]) - FL < 0.12
        n_sub = max(1, int(math.ceil(np.abs(new[:2] - g[:2]).max() / 0.004))) if low else 1
        changed, start = False, g[:3].copy()
        for k in range(1, n_sub + 1):
            g[:3] = start + (new - start) * (k / n_sub)
            if low:
                changed |= self._push(near)
        self.closed = bool(a[6] > 0)
        if self.closed and self.held < 0:
            cand, w = self._between_jaws()
            new = g[4] - CLOSE_RATE
            if cand >= 0 and new <= w:
                g[4], self.held = w, cand
                rel = _rot(-g[3]) @ (self.P[cand] - g[:3])
                self.held_off = np.array([rel[0], rel[1], rel[2], self.Yaw[cand] - g[3]])
                changed = True
            else:
                g[4] = max(new, 0.0)
        elif not self.closed:
            if self.held >= 0:
                self.held, changed = -1, True
            g[4] = min(g[4] + CLOSE_RATE, GRIP_OPEN)
        if self.held >= 0:
            self.P[self.held] = g[:3] + _rot(g[3]) @ self.held_off[:3]
            self.Yaw[self.held] = g[3] + self.held_off[3]
        if low:
            changed |= self._push(near)    # the jaws closing / opening can push too
        if changed:
            self._settle()
            self._static = self._static_sig = None
        self.t += 1
        ok = self._goals()
        while self.goals_done < len(ok) and ok[self.goals_done]:
            self.goals_done += 1
        success = all(ok)
        return self.render(), float(success), success, (not success) and self.t >= self.max_steps, self._info(ok)

    def _between_jaws(self):
        """Object whose centre lies between the open jaws (and its width along the jaw axis), else (-1, 0)."""
        best, w_best, d_best = -1, 0.0, 1e9
        for i in self._movable:
            rel = _rot(-self.g[3]) @ (self.P[i] - self.g[:3])
            h = self.Hf[i]
            w = 2 * _ext(self.meta[i]["shape"], h, self.Yaw[i] - self.g[3])[0]     # width along the jaw axis
            if (abs(rel[1]) <= 0.015 and abs(rel[0]) + w / 2 <= self.g[4] / 2 + 0.004 and abs(rel[2]) <= h[2] + 0.006
                    and w < GRIP_OPEN - 0.004 and abs(rel[0]) < d_best):
                best, w_best, d_best = i, w, abs(rel[0])
        return best, w_best

    def _fingers(self):
        off = _rot(self.g[3])[:, 0] * (self.g[4] / 2 + FT)
        return self.g[:3] + off, self.g[:3] - off

    def _push(self, near):
        """Fingers (discs of radius FT, height 2 FL) push the `near` objects out along the contact normal."""
        moved = False
        z0, z1 = self.g[2] - FL, self.g[2] + FL
        fingers = self._fingers()
        for i in near:
            if i == self.held or self.P[i, 2] - self.Hf[i, 2] > z1 or self.P[i, 2] + self.Hf[i, 2] < z0:
                continue
            for f in fingers:
                h, c = self.Hf[i], self.P[i]
                if self.meta[i]["shape"] in ROUND:
                    v = f[:2] - c[:2]; dist = math.hypot(*v)
                    if dist >= h[0] + FT:
                        continue
                    n = v / dist if dist > 1e-9 else np.array([1.0, 0.0])
                    c[:2] -= n * (h[0] + FT - dist)
                else:
                    R = _rot(self.Yaw[i])[:2, :2]
                    loc = R.T @ (f[:2] - c[:2]); q = np.clip(loc, -h[:2], h[:2]); v = loc - q; dist = math.hypot(*v)
                    if dist >= FT:
                        continue
                    if dist > 1e-9:
                        shift = -v / dist * (FT - dist)
                    else:  # finger centre inside the box: leave along the shallowest axis
                        pen = h[:2] - np.abs(loc); k = int(np.argmin(pen))
                        shift = np.zeros(2); shift[k] = -np.sign(loc[k] or 1.0) * (pen[k] + FT)
                    c[:2] += R @ shift
                c[0] = np.clip(c[0], -TABLE_HALF[0] + 0.03, TABLE_HALF[0] - 0.03)
                c[1] = np.clip(c[1], TABLE_CY - TABLE_HALF[1] + 0.03, WALL_Y - 0.03)
                moved = True
        return moved

    def _support(self, i):
        """Height of the highest surface under object i's centre (table, plate, tray floor/rim, objects)."""
        xy, top = self.P[i], 0.0
        for j, m in enumerate(self.meta):
            if j == i or j == self.held:
                continue
            o = {"shape": m["shape"], "pos": self.P[j], "yaw": self.Yaw[j], "half_extents": self.Hf[j]}
            if _footprint_margin(xy, o) <= 0:
                continue
            if m["shape"] == "tray":
                t = 0.01 if _footprint_margin(xy, o, TRAY_WALL) > 0 else 2 * self.Hf[j, 2]
            else:
                t = self.P[j, 2] + self.Hf[j, 2]
                if t > self.P[i, 2]:   # j is above i (i is under it), not a support
                    continue
            top = max(top, t)
        return top

    def _settle(self):
        """Everything not held drops onto its support (lowest objects first, so stacks settle in order)."""
        for i in sorted(self._movable, key=lambda k: self.P[k, 2]):
            if i != self.held:
                self.P[i, 2] = self._support(i) + self.Hf[i, 2]

    # ---- rendering
    def _setup_camera(self):
        aug = self.aug or {}
        key = (self.image_size, json.dumps(aug, sort_keys=True))   # camera, light and colours of this episode
        if key != self._cam_key:
            self.K, self.pose = camera(self.image_size, aug.get("cam", CAM_POS), aug.get("look", CAM_LOOK),
                                       aug.get("fov", FOV_DEG))
            self._dirs = _ray_dirs(self.K, self.pose, self.image_size)
            R, C = self.pose[:3, :3], self.pose[:3, 3]
            self._M = self.K @ np.concatenate([R.T, -(R.T @ C)[:, None]], 1)      # (3,4) world -> pixel * depth
            self._cam_key, self._bg = key, None
        light = np.array(aug.get("light", LIGHT))
        self._light, self._amb = light / np.linalg.norm(light), aug.get("ambient", AMBIENT)
        gains = np.array(aug["gain"]) if "gain" in aug else np.ones((len(self.meta) + 4, 3))
        self._rgb = [np.array(COLOURS.get(m["colour"]) or RECEPTACLE_RGB[m["shape"]], float) * gains[i]
                     for i, m in enumerate(self.meta)]
        self._bg_rgb = {k: np.array(v, float) * gains[-1 - n] for n, (k, v) in enumerate(BG_RGB.items())}

    def _background(self):
        """Table (a box down to the floor), back wall and floor: rendered once per camera (it never moves)."""
        n = self.image_size
        buf, full = (np.full((n, n), np.inf), np.zeros((n, n, 3), np.uint8), np.zeros((n, n), np.int16)), (0, n, 0, n)
        o, D = self.pose[:3, 3], self._dirs
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, t, nrm in [("wall", (WALL_Y - o[1]) / D[..., 1], (0.0, -1.0, 0.0)),
                                 ("floor", (FLOOR_Z - o[2]) / D[..., 2], (0.0, 0.0, 1.0))]:
                t = np.where(t > 0, t, np.inf)
                self._paint(buf, t, lambda m, nrm=nrm: np.tile(nrm, (int(m.sum()), 1)), self._bg_rgb[name], 0, full)
        tb, nb = _hit_boxes(o, D, np.array([[0.0, TABLE_CY, FLOOR_Z / 2]]), 0.0,
                            np.array([[TABLE_HALF[0], TABLE_HALF[1], -FLOOR_Z / 2]]))
        self._paint(buf, tb, nb, self._bg_rgb["table"], 0, full)
        self._bg = buf

    def _paint(self, buf, t, normals, col, sid, win):
        """z-buffer write of one primitive's hits t (window-sized) into the (depth, rgb, seg) buffers."""
        depth, rgb, seg = (a[win[0]:win[1], win[2]:win[3]] for a in buf)
        m = t < depth
        if not m.any():
            return
        depth[m] = t[m]
        shade = self._amb + (1 - self._amb) * np.clip(normals(m) @ self._light, 0.0, None)
        rgb[m] = np.clip(col[None, :] * shade[:, None], 0, 255).astype(np.uint8)
        seg[m] = sid

    def _window(self, centres, exts):
        """Pixel window [i0,i1) x [j0,j1) covering the projection of axis-aligned boxes (k,3) (ray culling)."""
        uvw = (centres[:, None, :] + exts[:, None, :] * _SIGNS[None]).reshape(-1, 3) @ self._M[:, :3].T + self._M[:, 3]
        n = self.image_size
        if uvw[:, 2].min() < 0.02:
            return 0, n, 0, n
        u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
        return (max(0, int(v.min())), min(n, int(v.max()) + 2), max(0, int(u.min())), min(n, int(u.max()) + 2))

    def _object_prims(self, i):
        """[(kind, centre, yaw, half)] for object i: box | cyl | sph; the tray is a floor and 4 walls."""
        s, c, y, h = self.meta[i]["shape"], self.P[i], float(self.Yaw[i]), self.Hf[i]
        if s != "tray":
            return [({"can": "cyl", "plate": "cyl", "ball": "sph"}.get(s, "box"), c, y, h)]
        R, w = _rot(y), TRAY_WALL
        parts = [((0, 0, 0.005 - h[2]), (h[0], h[1], 0.005)), ((h[0] - w, 0, 0), (w, h[1], h[2])),
                 ((w - h[0], 0, 0), (w, h[1], h[2])), ((0, h[1] - w, 0), (h[0], w, h[2])), ((0, w - h[1], 0), (h[0], w, h[2]))]
        return [("box", c + R @ np.array(off), y, np.array(hh)) for off, hh in parts]

    def _gripper_prims(self):
        g, f1, f2 = self.g, *self._fingers()
        palm_c = g[:3] + np.array([0, 0, FL + PALM_H])
        wrist_c = g[:3] + np.array([0, 0, FL + 2 * PALM_H + 0.025])
        return [("box", f1, g[3], np.array([FT, FW, FL])), ("box", f2, g[3], np.array([FT, FW, FL])),
                ("box", palm_c, g[3], np.array([GRIP_OPEN / 2 + 2 * FT, FW + 0.004, PALM_H])),
                ("box", wrist_c, g[3], np.array([0.012, 0.012, 0.025]))]

    def _draw(self, prims, col, sid, buf):
        """Ray cast one object's primitives (all boxes, tested in one batch, or one cylinder / sphere) inside
        their projected pixel window; returns the window."""
        kind, yaw = prims[0][0], prims[0][2]
        C, H = np.array([p[1] for p in prims]), np.array([p[3] for p in prims])
        w = self._window(C, np.array([_ext("cube", h, yaw) for h in H]) if kind == "box" else H)
        D = self._dirs[w[0]:w[1], w[2]:w[3]]
        if D.size:
            o = self.pose[:3, 3]
            hit = (_hit_boxes(o, D, C, yaw, H) if kind == "box" else
                   _hit_cyl(o, D, C[0], H[0, 0], H[0, 2]) if kind == "cyl" else _hit_sphere(o, D, C[0], H[0, 0]))
            self._paint(buf, *hit, col, sid, w)
        return w

    def _draw_object(self, i, buf):
        """Draw object i; remember its whole-object pixel window (for box2d / visibility in _info)."""
        self._boxes[i] = self._window(self.P[i][None], _ext(self.meta[i]["shape"], self.Hf[i], self.Yaw[i])[None])
        self._draw(self._object_prims(i), self._rgb[i], i + 1, buf)

    def render(self):
        """Observation of the current state. Static objects are cached over the background; only what moved
        since the last render (normally the gripper and what it holds) is ray cast again."""
        if not self.render_images:
            return self._state_obs()
        if self._bg is None:
            self._background()
        if self._static is None:
            buf = tuple(a.copy() for a in self._bg)
            self._boxes = {}
            for i in range(len(self.meta)):
                if i != self.held:
                    self._draw_object(i, buf)
            self._static, self._vis_static = buf, {}
        depth, rgb, seg = buf = tuple(a.copy() for a in self._static)
        if self.held >= 0:
            self._draw_object(self.held, buf)
        self._dyn = [self._boxes[self.held]] if self.held >= 0 else []      # windows of what moves (for _info)
        self._dyn.append(self._draw(self._gripper_prims(), np.array(GRIP_RGB, float), GRIPPER_ID, buf))
        self._seg = seg
        obs = dict(self._state_obs(), rgb=rgb)
        if self.render_depth:
            obs["depth"] = depth.astype(np.float32)
        if self.render_seg:
            obs["seg"] = seg
        return obs

    def _state_obs(self):
        x, y, z, yaw, op = self.g
        st = np.array([x, y, z, yaw, op, float(self.held >= 0), math.sin(yaw), math.cos(yaw)], np.float32)
        return {"state": st, "instruction": self.instruction}

    def _info(self, ok=None):
        ok = self._goals() if ok is None else ok
        objs, seen = [], self.render_images and self.render_seg and getattr(self, "_seg", None) is not None
        for i, m in enumerate(self.meta):
            box, vis, w = None, 0, self._boxes.get(i) if seen else None
            if w is not None:
                if i != self.held and not any(w[0] < d[1] and d[0] < w[1] and w[2] < d[3] and d[2] < w[3] for d in self._dyn):
                    if i not in self._vis_static:      # nothing moving covers it: measure once per static render
                        self._vis_static[i] = _measure(self._static[2], i + 1, w)
                    box, vis = self._vis_static[i]
                else:
                    box, vis = _measure(self._seg, i + 1, w)
            objs.append(dict(m, pos=self.P[i].tolist(), yaw=float(self.Yaw[i]), half_extents=self.Hf[i].tolist(),
                             box2d=box, visible_px=vis))
        return {"success": bool(all(ok)), "subgoals_done": self.goals_done, "n_subgoals": len(ok), "objects": objs,
                "K": self.K.tolist(), "cam_pose": self.pose.tolist(), "max_steps": self.max_steps, "t": self.t}

    # ---- scripted expert: a stateless waypoint machine, so it works from any state it (or a policy) reaches
    @property
    def expert_subgoal(self):
        ok = self._goals()
        gi = ok.index(False) if False in ok else len(ok) - 1
        g = self.task.goals[gi]
        held = g[0] != "push" and self.held == self.role[g[1]]
        return self.task.subgoal_base[gi] + int(held)

    def _travel(self, xy, z_low, tol=0.006):
        """Waypoint: rise to TRAVEL_Z, fly over, line up, then descend to z_low. Returns (target xyz, xy error)."""
        p = self.g[:3]
        d = math.hypot(xy[0] - p[0], xy[1] - p[1])
        if d > 0.03:   # far: first straight up, then across at TRAVEL_Z
            at = p if p[2] < TRAVEL_Z - 0.025 else xy
            return np.array([at[0], at[1], TRAVEL_Z]), d
        return np.array([xy[0], xy[1], p[2] if d > tol else z_low]), d

    def _support_at(self, xy, skip):
        """Support height object `skip` would land on at xy (moved there, high above everything, and back)."""
        keep = self.P[skip].copy()
        self.P[skip, :2], self.P[skip, 2] = xy, 10.0
        top = self._support(skip)
        self.P[skip] = keep
        return top

    def _tray_slot(self, tray, a):
        slots = [(-0.05, -0.03), (0.05, -0.03), (0.0, 0.035), (-0.055, 0.04), (0.055, 0.04)]
        for s in slots:
            xy = self.P[tray, :2] + _rot(self.Yaw[tray])[:2, :2] @ np.array(s)
            if all(math.hypot(*(self.P[j, :2] - xy)) > 0.045 for j in self._movable if j != a):
                return xy
        return self.P[tray, :2]

    def expert_action(self):
        """Action (7,) of the scripted expert for the first goal not yet achieved."""
        ok = self._goals()
        act = np.zeros(7)
        if all(ok):
            act[6] = 1.0 if self.held >= 0 else -1.0
            return act
        gi = ok.index(False)
        kind, a = self.task.goals[gi][0], self.role[self.task.goals[gi][1]]
        er = np.random.default_rng([self.seed, gi, 99])        # small per-episode offsets and speed
        speed, noise = er.uniform(0.75, 1.0), er.uniform(-1, 1, 4)
        p, c, grip, yaw_t = self.g[:3], self.P[a], -1.0, self.g[3]
        if self.held >= 0 and (kind == "push" or self.held != a):
            target = np.array([p[0], p[1], TRAVEL_Z])                   # drop what we hold, back off
        elif kind == "push":
            d = np.array(DIRS[self.task.goals[gi][2]])
            e2 = _ext(self.meta[a]["shape"], self.Hf[a], self.Yaw[a])[:2]
            ea, el = float(np.abs(d) @ e2), float(np.abs(d[::-1]) @ e2)     # extent along / across the push
            rel = p[:2] - c[:2]; along = rel @ d; lat = rel - along * d
            z_push, grip = GRIP_LO[2] + 0.004, 1.0
            if (-(ea + 0.05) < along < -ea + 0.01 and math.hypot(*lat) < min(0.03, 0.6 * el)
                    and p[2] < z_push + 0.012):
                target = np.concatenate([p[:2] + d * STEP_M / speed - 0.8 * lat, [z_push]])
            else:
                target, _ = self._travel(c[:2] - d * (ea + FT + 0.014), z_push)
        elif self.held == a:
            grip = 1.0
            if kind == "lift":
                target = np.array([p[0], p[1], 0.17])
            else:
                b = self.role[self.task.goals[gi][2]]
                if kind == "in":
                    xy = self._tray_slot(b, a) + 0.004 * noise[:2]
                else:
                    xy = self.P[b, :2] + (0.008 if self.meta[b]["shape"] == "plate" else 0.003) * noise[:2]
                z_rel = self._support_at(xy, a) + 0.008 - (c[2] - self.Hf[a, 2] - p[2])
                target, d = self._travel(xy, z_rel)
                if d <= 0.006 and abs(p[2] - z_rel) < 0.005:
                    grip = -1.0
        else:
            s = self.meta[a]["shape"]
            if s in ("cube", "block"):   # jaws across the cube's faces / the block's short side
                per = math.pi / 2 if s == "cube" else math.pi
                base = self.Yaw[a] + (math.pi / 2 if s == "block" else 0.0)
                yaw_t = base + per * round((self.g[3] - base) / per)
                if abs(yaw_t) > math.pi / 2:
                    yaw_t -= per * np.sign(yaw_t)
            gz = max(c[2], GRIP_LO[2] + 0.002)
            xy = c[:2] + 0.003 * noise[:2]
            target, d = self._travel(xy, gz)
            aligned = abs(yaw_t - self.g[3]) < 0.03
            at_grasp = d <= 0.006 and abs(p[2] - gz) < 0.005 and aligned
            if at_grasp and (not self.closed or self.g[4] > 2 * self.Hf[a, :2].min() - 0.01):
                grip = 1.0
            elif d <= 0.006 and (self.g[4] < GRIP_OPEN - 0.01 or not aligned):
                target[2] = max(p[2], target[2]) if p[2] > gz + 0.01 else p[2]   # open / turn before descending
        act[:3] = np.clip((target - p) / STEP_M * speed, -1, 1)
        act[5] = np.clip((yaw_t - self.g[3]) / STEP_RAD, -1, 1)
        act[6] = grip
        return act


def _measure(seg, sid, w):
    """(box2d [x1,y1,x2,y2] or None, visible pixel count) of id `sid` inside window w of a seg image."""
    i0, i1, j0, j1 = w
    mk = seg[i0:i1, j0:j1] == sid
    vis = int(mk.sum())
    if not vis:
        return None, 0
    rows, cols = np.nonzero(mk.any(1))[0], np.nonzero(mk.any(0))[0]
    return [j0 + int(cols[0]), i0 + int(rows[0]), j0 + int(cols[-1]) + 1, i0 + int(rows[-1]) + 1], vis


# ----------------------------------------------------------------------------- fixed evaluation start states
EVAL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sim_eval_starts.json")
_EVAL_CACHE = {}


def generate_eval_seeds(suite, task_id):
    """The first N_EVAL seeds from EVAL_SEED_BASE on whose scene the expert solves (no rendering)."""
    env, seeds, k = TabletopEnv(suite, task_id, render_images=False), [], EVAL_SEED_BASE
    while len(seeds) < N_EVAL:
        env.reset(seed=k)
        term = trunc = False
        while not (term or trunc):
            _, _, term, trunc, _ = env.step(env.expert_action())
        if term:
            seeds.append(k)
        k += 1
    return seeds


def eval_seeds(suite, task_id):
    """The N_EVAL scene seeds of the fixed evaluation start states (EVAL_SEED_BASE + k, kept where the expert
    succeeds), read from sim_eval_starts.json or regenerated deterministically when the file is missing."""
    _check_task(suite, task_id)
    if not _EVAL_CACHE and os.path.exists(EVAL_FILE):
        with open(EVAL_FILE) as f:
            _EVAL_CACHE.update(json.load(f))
    key = f"{suite}/{task_id}"
    if key not in _EVAL_CACHE:
        _EVAL_CACHE[key] = generate_eval_seeds(suite, task_id)
    return list(_EVAL_CACHE[key])


def eval_start_states(suite, task_id):
    """50 fixed evaluation start states (get_state dicts) for one task; reset(options={"start_id": k}) uses them."""
    env = TabletopEnv(suite, task_id, render_images=False)
    out = []
    for k in range(N_EVAL):
        env.reset(options={"start_id": k})
        out.append(env.get_state())
    return out


# ----------------------------------------------------------------------------- env construction for rendering
def cached_env(cache: dict, suite, task_id, image_size, render=True):
    """The TabletopEnv of (suite, task, image size, render) from `cache`, built on first use: the data makers
    and the VLA's frame rendering restore many states of the same few tasks, and one env serves them all."""
    key = (suite, task_id, image_size, render)
    if key not in cache:
        cache[key] = TabletopEnv(suite, task_id, image_size=image_size, render_images=render)
    return cache[key]


# ----------------------------------------------------------------------------- gymnasium wrapper (lazy import)
def gym_env(suite, task_id, **kw):
    """A real gymnasium.Env around TabletopEnv (gymnasium is a dev/test dependency only)."""
    import gymnasium as gym
    import string

    class GymTabletop(gym.Env):
        metadata = {"render_modes": ["rgb_array"]}

        def __init__(self):
            self.sim = TabletopEnv(suite, task_id, **kw)
            n = self.sim.image_size
            self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
            self.observation_space = gym.spaces.Dict({
                "rgb": gym.spaces.Box(0, 255, (n, n, 3), np.uint8),
                "depth": gym.spaces.Box(0.0, 100.0, (n, n), np.float32),
                "seg": gym.spaces.Box(0, GRIPPER_ID, (n, n), np.int16),
                "state": gym.spaces.Box(-10.0, 10.0, (8,), np.float32),
                "instruction": gym.spaces.Text(200, charset=string.ascii_letters + string.digits + " ,.'-")})
            self.render_mode = "rgb_array"

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            if seed is None:
                seed = int(self.np_random.integers(TRAIN_SEEDS))
            return self.sim.reset(seed=seed, options=options)

        def step(self, action):
            return self.sim.step(action)

        def render(self):
            return self.sim.render()["rgb"]

    return GymTabletop()


# ----------------------------------------------------------------------------- CLI: expert rollout -> GIF
def colourise_depth(depth, lo=None, hi=None):
    """(H,W) metres -> (H,W,3) uint8, near = bright yellow, far = dark purple (a small viridis-like ramp)."""
    lo = np.percentile(depth, 2) if lo is None else lo
    hi = np.percentile(depth, 98) if hi is None else hi
    x = 1.0 - np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    f = x * (len(stops) - 1); i = np.minimum(f.astype(int), len(stops) - 2); w = (f - i)[..., None]
    return ((1 - w) * stops[i] + w * stops[i + 1]).astype(np.uint8)


def main(argv):
    import dataclasses
    from PIL import Image
    from common import parse_config

    @dataclasses.dataclass
    class CLI:
        suite: str = "goal"
        task: int = 3
        start_id: int = 0
        image_size: int = 128
        gif: str = "out.gif"
        png: str = ""          # also save one frame (RGB | depth) as a PNG
        png_step: int = 0      # ... the frame after this many expert steps
        scale: int = 2         # nearest-neighbour upscaling of the saved frames
    cfg = parse_config(CLI, argv)
    try:
        env = TabletopEnv(cfg.suite, cfg.task, cfg.image_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    obs, info = env.reset(options={"start_id": cfg.start_id})
    lo, hi = np.percentile(obs["depth"], 2), np.percentile(obs["depth"], 98)
    frames, term, trunc = [], False, False
    while True:
        frame = np.concatenate([obs["rgb"], colourise_depth(obs["depth"], lo, hi)], 1)
        frames.append(Image.fromarray(frame).resize((frame.shape[1] * cfg.scale, frame.shape[0] * cfg.scale), Image.NEAREST))
        if term or trunc:
            break
        obs, _, term, trunc, info = env.step(env.expert_action())
    if cfg.png:
        frames[min(cfg.png_step, len(frames) - 1)].save(cfg.png)
    frames[0].save(cfg.gif, save_all=True, append_images=frames[1:], duration=80, loop=0)
    print(f"{cfg.suite}/{cfg.task} \"{obs['instruction']}\": success={info['success']} in {env.t} steps -> {cfg.gif}")


if __name__ == "__main__":
    main(sys.argv[1:])
