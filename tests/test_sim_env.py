"""sim_env.py: exact depth, mask/RGB agreement, determinism, replay, expert, predicates, gym API, errors."""
import json
import math

import numpy as np
import pytest

import sim_env as S


def _unproject(depth, K, pose):
    """Independent back-projection of pixel centres: (H,W) z-depth -> (H,W,3) world points."""
    n = depth.shape[0]
    j, i = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
    xc = np.stack([(j - K[0][2]) / K[0][0] * depth, (i - K[1][2]) / K[1][1] * depth, depth], -1)
    R, C = np.array(pose)[:3, :3], np.array(pose)[:3, 3]
    return xc @ R.T + C


def _env_with(objects, size=64, grip=(0.3, 0.3, 0.28), aug=None):
    """goal-suite env whose state is replaced by the given objects (dicts with shape/pos/yaw); aug: its camera."""
    env = S.TabletopEnv("goal", 0, size)
    env.reset(seed=0)
    st = env.get_state()
    objs = []
    for k, o in enumerate(objects):
        h = list(S.HALF[o["shape"]])
        objs.append({"id": k + 1, "role": o.get("role", f"o{k}"), "name": o["shape"], "shape": o["shape"],
                     "colour": o.get("colour", "red"), "size": "medium", "pos": list(o["pos"]), "yaw": o.get("yaw", 0.0),
                     "half_extents": h})
    roles = {"cube", "plate"}
    for r in roles - {o["role"] for o in objs}:   # the goal predicate needs these roles; park them out of view
        objs.append({"id": len(objs) + 1, "role": r, "name": r, "shape": "cube", "colour": "red", "size": "medium",
                     "pos": [5.0, 5.0, 0.025], "yaw": 0.0, "half_extents": list(S.HALF["cube"])})
    st.update(objects=objs, start=[o["pos"] for o in objs], grip=[*grip, 0.0, S.GRIP_OPEN], held=-1, closed=False, aug=aug)
    env.set_state(st)
    return env


@pytest.mark.parametrize("aug", [None, {"cam": [0.2, -0.6, 0.7], "look": [0.05, 0.1, 0.0], "fov": 58.0},
                                 {"cam": [-0.1, -0.3, 0.2], "look": [-0.05, 0.0, 0.0], "fov": 33.0}])
def test_plane_depth_exact(aug):
    """The default camera and two of the per-image cameras the VLM data draws (a high wide one, a low narrow one)."""
    env = _env_with([{"shape": "cube", "pos": (0.0, 0.05, 0.025), "role": "cube"}], aug=aug)
    obs, info = env.render(), env._info()
    fov = aug["fov"] if aug else S.FOV_DEG
    assert np.isclose(info["K"][0][0], 32 / math.tan(math.radians(fov) / 2))
    if aug:  # the camera sits where asked and looks at the look-at point (its optical axis passes through it)
        pose = np.array(info["cam_pose"])
        assert np.allclose(pose[:3, 3], aug["cam"])
        v = np.subtract(aug["look"], aug["cam"])
        assert np.allclose(pose[:3, 2], v / np.linalg.norm(v))
    P = _unproject(obs["depth"].astype(np.float64), info["K"], info["cam_pose"])
    bg = obs["seg"] == 0
    # every background pixel centre lies on the table top, the table's front / side faces, the wall or the floor
    d = np.stack([np.abs(P[..., 2]), np.abs(P[..., 1] - S.WALL_Y), np.abs(P[..., 2] - S.FLOOR_Z),
                  np.abs(P[..., 1] - (S.TABLE_CY - S.TABLE_HALF[1])), np.abs(np.abs(P[..., 0]) - S.TABLE_HALF[0])]).min(0)
    assert bg.sum() > 2000 and d[bg].max() < 1e-3
    # table-top pixels: the analytic plane depth t = -C_z / dir_z, from K and the pose only
    top = bg & (np.abs(P[..., 2]) < 1e-5)  # not the pixels on the front face just below the edge
    n = 64
    j, i = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
    K, pose = np.array(info["K"]), np.array(info["cam_pose"])
    dirs = np.stack([(j - K[0, 2]) / K[0, 0], (i - K[1, 2]) / K[1, 1], np.ones_like(j)], -1) @ pose[:3, :3].T
    t = -pose[2, 3] / dirs[..., 2]
    assert top.sum() > 1000 and np.abs(t[top] - obs["depth"][top]).max() < 1e-3


@pytest.mark.parametrize("yaw", [0.0, 0.6])
def test_cube_depth_exact_and_mask(yaw):
    c, h = np.array([0.02, 0.0, 0.025]), S.HALF["cube"][0]
    env = _env_with([{"shape": "cube", "pos": c, "yaw": yaw, "role": "cube"}], size=128)
    obs, info = env.render(), env._info()
    K, pose = np.array(info["K"]), np.array(info["cam_pose"])
    n = 128
    j, i = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
    dirs = np.stack([(j - K[0, 2]) / K[0, 0], (i - K[1, 2]) / K[1, 1], np.ones_like(j)], -1) @ pose[:3, :3].T
    # independent per-pixel scalar slab test in the cube's frame
    R = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    o = R.T @ (pose[:3, 3] - c)
    ref = np.full((n, n), np.inf)
    for a in range(n):
        for b in range(n):
            dl = R.T @ dirs[a, b]
            lo, hi = -np.inf, np.inf
            for k in range(3):
                if abs(dl[k]) < 1e-12:
                    if abs(o[k]) > h:
                        lo = np.inf
                    continue
                t1, t2 = (-h - o[k]) / dl[k], (h - o[k]) / dl[k]
                lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
            if lo <= hi and lo > 0:
                ref[a, b] = lo
    cube = obs["seg"] == 1
    assert cube.sum() > 50
    assert np.array_equal(cube, np.isfinite(ref))                     # the mask is exactly the cube's pixels
    assert np.abs(obs["depth"][cube] - ref[cube]).max() < 1e-3        # < 1 mm at every pixel centre
    box = info["objects"][0]["box2d"]
    rows, cols = np.nonzero(cube)
    assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert info["objects"][0]["visible_px"] == cube.sum()
    u, v = S.project(K, pose, c[None])[0]
    assert box[0] <= u <= box[2] and box[1] <= v <= box[3]


def test_mask_and_rgb_agree():
    env = S.TabletopEnv("object", 0, 64)
    obs, info = env.reset(seed=5)
    for o in info["objects"]:
        m = obs["seg"] == o["id"]
        assert o["visible_px"] == m.sum() and m.sum() > 5, o["name"]
        base = np.array(S.COLOURS.get(o["colour"]) or S.RECEPTACLE_RGB[o["shape"]], float)
        px = obs["rgb"][m].astype(float)
        ratio = (px + 1) / (base + 1)                  # Lambert shading scales all channels together
        assert np.abs(ratio - ratio.mean(1, keepdims=True)).max() < 0.35 * ratio.mean() + 0.05, o["name"]
    assert (obs["seg"] == S.GRIPPER_ID).sum() > 10


def _rollout(env, actions):
    out = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs, r, term, info["objects"]))
    return out


def test_determinism_and_state_replay():
    acts = np.random.default_rng(0).uniform(-1, 1, (25, 7))
    e1, e2 = S.TabletopEnv("long", 3, 64), S.TabletopEnv("long", 3, 64)
    o1, _ = e1.reset(seed=11)
    o2, _ = e2.reset(seed=11)
    for k in ("rgb", "depth", "seg", "state"):
        assert np.array_equal(o1[k], o2[k])
    assert o1["instruction"] == o2["instruction"]
    for _ in range(30):                               # the expert for a while, then random actions
        e1.step(e1.expert_action()); e2.step(e2.expert_action())
    saved = json.loads(json.dumps(e1.get_state()))   # JSON round trip must be exact
    r1, r2 = _rollout(e1, acts), _rollout(e2, acts)
    e3 = S.TabletopEnv("long", 3, 64)
    o3, _ = e3.reset(options={"state": saved})
    r3 = _rollout(e3, acts)
    e2.set_state(saved)                               # a reused env (render caches) renders like a fresh one
    for k in ("rgb", "depth", "seg"):
        assert np.array_equal(e2.render()[k], o3[k])
    for (a, _, _, oa), (b, _, _, ob), (c, _, _, oc) in zip(r1, r2, r3):
        for k in ("rgb", "depth", "seg", "state"):
            assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k])
        assert oa == ob == oc
    assert e1.get_state() == e3.get_state()


def test_expert_solves_every_task():
    for suite, tasks in S.SUITES.items():
        for tid in range(len(tasks)):
            env = S.TabletopEnv(suite, tid, render_images=False)
            env.reset(options={"start_id": tid % S.N_EVAL})
            for _ in range(env.max_steps):
                _, r, term, trunc, info = env.step(env.expert_action())
                if term or trunc:
                    break
            assert term and r == 1.0 and info["subgoals_done"] == info["n_subgoals"], (suite, tid)


def test_random_policy_almost_never_succeeds():
    rng, wins = np.random.default_rng(1), 0
    for suite, tasks in S.SUITES.items():
        for tid in range(len(tasks)):
            env = S.TabletopEnv(suite, tid, render_images=False)
            env.reset(seed=int(rng.integers(1000)))
            for _ in range(env.max_steps):
                _, _, term, trunc, _ = env.step(rng.uniform(-1, 1, 7))
                if term or trunc:
                    break
            wins += term
    assert wins <= 2


def _o(shape, x, y, z=None, yaw=0.0):
    h = S.HALF[shape]
    return {"shape": shape, "pos": [x, y, h[2] if z is None else z], "yaw": yaw, "half_extents": list(h)}


def test_predicates_positive_and_negative():
    plate, tray = _o("plate", 0.0, 0.0), _o("tray", 0.2, 0.1)
    cube_on = _o("cube", 0.01, 0.0, 2 * S.HALF["plate"][2] + 0.025)
    assert S.on(cube_on, plate) and S.relation_margin(cube_on, plate, "on") > 0
    assert not S.on(_o("cube", 0.01, 0.0, 0.2), plate)            # floating above
    assert not S.on(_o("cube", 0.2, 0.0, 0.037), plate)           # beside it
    assert S.inside(_o("cube", 0.22, 0.1, 0.035), tray) and not S.inside(_o("cube", 0.0, 0.1), tray)
    assert not S.inside(_o("cube", 0.22, 0.1, 0.2), tray)         # above the tray, not in it
    a, b = _o("cube", -0.1, 0.0), _o("can", 0.1, 0.02)
    assert S.left_of(a, b) and not S.left_of(b, a) and S.right_of(b, a) and not S.right_of(a, b)
    assert S.in_front_of(a, b) is False and S.behind(a, b) is False          # 2 cm apart in y: within REL_GAP
    c = _o("ball", 0.0, 0.15)
    assert S.behind(c, a) and S.in_front_of(a, c) and not S.behind(a, c) and not S.in_front_of(c, a)
    assert not S.left_of(_o("cube", 0.0, 0.0), _o("cube", 0.02, 0.0))  # within REL_GAP: ambiguous -> false
    assert abs(S.relation_margin(a, b, "left_of") - (0.2 - S.REL_GAP)) < 1e-12
    assert S.lifted(_o("ball", 0, 0, 0.2)) and not S.lifted(_o("ball", 0, 0))
    assert S.pushed(_o("can", -0.1, 0), [0.0, 0.0, 0.03], S.DIRS["left"]) and not S.pushed(_o("can", -0.1, 0), [0, 0, 0], S.DIRS["right"])
    with pytest.raises(ValueError, match="left_of"):
        S.relation_margin(a, b, "above")


def test_grasp_release_stack_and_push_physics():
    env = _env_with([{"shape": "block", "pos": (0.0, 0.0, 0.02), "role": "block"},
                     {"shape": "cube", "pos": (-0.15, 0.0, 0.025), "role": "cube"},
                     {"shape": "can", "pos": (0.15, 0.0, 0.035), "role": "can"}], grip=(-0.15, 0.0, 0.03))
    env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))                   # close on the cube
    assert env.held == 1 and env._state_obs()["state"][5] == 1
    for _ in range(5):
        env.step(np.array([0, 0, 1.0, 0, 0, 0, 1]))               # lift 10 cm
    assert env.P[1, 2] > 0.1
    for _ in range(30):
        act = np.zeros(7); act[6] = 1; act[:2] = np.clip((env.P[0, :2] - env.g[:2]) / 0.02, -1, 1)
        env.step(act)
    env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))                  # release above the block: it stacks
    assert env.held == -1 and abs(env.P[1, 2] - (0.04 + 0.025)) < 1e-9
    objs = env.objects()
    assert S.on(objs[1], objs[0])
    for _ in range(8):                                            # the gripper cannot go through the table
        env.step(np.array([0, 0, -1.0, 0, 0, 0, -1]))
    assert env.g[2] >= S.GRIP_LO[2] - 1e-12
    env2 = _env_with([{"shape": "can", "pos": (0.0, 0.0, 0.035), "role": "cube"}], grip=(0.08, 0.0, 0.03))
    env2.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))                  # close on nothing
    for _ in range(6):
        env2.step(np.array([-1.0, 0, 0, 0, 0, 0, 1]))             # push the can to the left
    assert env2.P[0, 0] < -0.03 and abs(env2.P[0, 1]) < 1e-6 and env2.held == -1


def test_bad_inputs_raise_clear_errors():
    env = S.TabletopEnv("goal", 0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([0, 0, np.nan, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="spatial, object, goal, long"):
        S.TabletopEnv("kitchen", 0)
    with pytest.raises(ValueError, match="0..9"):
        S.TabletopEnv("goal", 10)
    with pytest.raises(ValueError, match="start_id"):
        env.reset(options={"start_id": 50})


class _Largest:
    """Stands in for a numpy Generator: integers() returns the largest value the real one could draw."""
    def integers(self, low, high=None, *args, **kw):
        return (low if high is None else high) - 1


def test_eval_start_states_fixed_and_disjoint():
    with open(S.EVAL_FILE) as f:
        saved = json.load(f)                                      # the committed file, read directly
    assert sorted(saved) == sorted(f"{s}/{t}" for s in S.SUITES for t in range(len(S.SUITES[s])))
    seeds = saved["goal/0"]
    assert len(seeds) == S.N_EVAL and min(seeds) >= S.EVAL_SEED_BASE and len(set(seeds)) == S.N_EVAL
    assert seeds == S.generate_eval_seeds("goal", 0)            # the file matches regeneration
    states = S.eval_start_states("spatial", 2)
    assert len(states) == S.N_EVAL
    fresh = S.TabletopEnv("spatial", 2, render_images=False)
    for k in range(0, S.N_EVAL, 5):                               # start_id k = a plain reset with the file's seed k
        fresh.reset(seed=saved["spatial/2"][k])
        assert states[k] == fresh.get_state() and states[k]["seed"] == saved["spatial/2"][k]
    eval_all = {x for v in saved.values() for x in v}
    env = S.TabletopEnv("spatial", 2, render_images=False)
    drawn = []
    for _ in range(20):                                           # training resets: random seeds...
        env.reset()
        drawn.append(env.seed)
    env._seed_rng = _Largest()                                    # ...and the largest one reset can draw
    env.reset()
    drawn.append(env.seed)
    assert len(set(drawn)) > 15 and max(drawn) < min(eval_all)    # training resets never hit eval seeds
    gym = S.gym_env("spatial", 2, render_images=False)           # the gymnasium wrapper draws the same range
    gym.reset()
    gym.np_random = _Largest()
    gym.reset()
    assert gym.sim.seed == max(drawn)
    env.reset(options={"start_id": 3})                            # a reused env: nothing carried over
    assert env.get_state() == states[3]
    task = S.SUITES["spatial"][2]
    assert task.heldout_templates and not set(task.heldout_templates) & set(task.templates)
    assert len(task.subgoals) == 2 and env.expert_subgoal == 0


def test_augmentation_opt_in_and_deterministic():
    plain = S.TabletopEnv("goal", 1, 64).reset(seed=4)[0]
    a1 = S.TabletopEnv("goal", 1, 64, augment=True).reset(seed=4)[0]
    a2 = S.TabletopEnv("goal", 1, 64, augment=True).reset(seed=4)[0]
    assert np.array_equal(a1["rgb"], a2["rgb"]) and not np.array_equal(a1["rgb"], plain["rgb"])
    assert np.isfinite(a1["depth"]).all() and set(np.unique(a1["seg"])) == set(np.unique(plain["seg"]))


def test_gymnasium_env_checker():
    import gymnasium.utils.env_checker as gym_utils  # a dev requirement: missing fails, never skips
    env = S.gym_env("goal", 2, image_size=32)
    gym_utils.check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)


def test_ball_and_can_depth_on_surface():
    ball, can = np.array([-0.08, 0.0, 0.026]), np.array([0.08, 0.02, 0.035])
    env = _env_with([{"shape": "ball", "pos": ball, "role": "cube"}, {"shape": "can", "pos": can, "role": "plate"}], size=128)
    obs, info = env.render(), env._info()
    P = _unproject(obs["depth"].astype(np.float64), info["K"], info["cam_pose"])
    mb, mc = obs["seg"] == 1, obs["seg"] == 2
    assert mb.sum() > 50 and mc.sum() > 50
    assert np.abs(np.linalg.norm(P[mb] - ball, axis=1) - S.HALF["ball"][0]).max() < 1e-3
    r = np.linalg.norm(P[mc][:, :2] - can[:2], axis=1)
    on_side = np.abs(r - S.HALF["can"][0]) < 1e-3
    on_top = (np.abs(P[mc][:, 2] - 2 * S.HALF["can"][2]) < 1e-3) & (r <= S.HALF["can"][0] + 1e-3)
    assert np.all(on_side | on_top) and on_top.sum() > 5 and on_side.sum() > 5


def test_expert_recovers_from_perturbed_states():
    rng = np.random.default_rng(3)
    for suite, tid in [("spatial", 5), ("object", 3), ("goal", 4), ("long", 6)]:
        env = S.TabletopEnv(suite, tid, render_images=False)
        env.reset(seed=77)
        for t in range(2 * env.max_steps):
            a = env.expert_action()
            if 10 <= t < 16:                       # a burst of noise mid-episode (a drifting policy)
                a = np.clip(a + rng.normal(0, 0.7, 7), -1, 1)
            _, _, term, _, _ = env.step(a)
            if term:
                break
        assert term, (suite, tid)
