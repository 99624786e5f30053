"""teach.py: course exercises cut from the reference code itself, graded by their own tests.

The holes are marked in the real source by two comment lines around a body or block,
    # >>> exercise: NAME
    ...reference code...
    # <<< exercise
with the signature and the docstring outside the markers, so the reference runs unchanged. A cut copy
replaces what is between the markers by `raise NotImplementedError("exercise NAME: see docs/exercises/NAME.md")`
and keeps everything else as reference code: exercises never cascade.

Commands (function that runs each):
  python teach.py list [NAME]                           cmd_list      exercises, tier, files, grading tests, dependents
  python teach.py start NAME,...|all [DIR]              cmd_start     the copy to hand out: NAMEs cut (and every other
                                                                      exercise except those they call), STUDENT.md
  python teach.py grade [NAME,...] [--tree=DIR] [--json=F] cmd_grade  the regions of DIR (default: the current
                                                                      directory) graded in a clean copy, score + JSON
  python teach.py package NAME,... [OUT]                cmd_package   a Gradescope autograder.zip
  python teach.py verify [--full]                       cmd_verify    the teacher's check (CI: tests/test_teach.py)
  python teach.py snapshot                              cmd_snapshot  regenerate the medium tier's snapshots + hashes
  python teach.py calibrate                             cmd_calibrate the large tier's thresholds (several reference seeds)
  python teach.py deps FILE...                          cmd_deps      which tests of FILE fail when each hole is cut

Files: the manifest is EXERCISES below (TEACHES: objective, prerequisites, time, difficulty; ORDER: a module
plan); oracles teach/oracles.py (instructor side only: never copied into a student's copy or a grading tree);
grading tests tests/exercises/test_ex_NAME.py (each has test_shapes_and_finite); stored wrong implementations teach/wrong/NAME__MISTAKE.py (a replacement body,
never copied into a student's tree); medium-tier snapshots teach/snapshots/NAME.safetensors + hashes.json (the
commit and the sha256 of the files they were made from); large-tier thresholds teach/thresholds.json (the same);
the task sheets docs/exercises/NAME.md.
Runtime imports: the standard library and pytest (torch in `snapshot` / `calibrate`, and preloaded once by
`verify` / `deps` so that each forked test run only imports the project).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
BEGIN = re.compile(r"^(\s*)# >>> exercise: (\w+)\s*$")
END = re.compile(r"^\s*# <<< exercise\s*$")
HOLE = 'raise NotImplementedError("exercise {0}: see docs/exercises/{0}.md")'
HOLE_ERROR = re.compile(r"NotImplementedError: exercise (\w+): see docs/exercises/")
SNAPSHOTS = os.path.join("teach", "snapshots")
WRONG = os.path.join("teach", "wrong")
NEVER_COPIED = (".git", "__pycache__", ".pytest_cache", ".venv", ".venv-ci", "venv", "data", "runs", "out", WRONG,
                "test_teach.py")  # the teacher's own tests (verify, the round trip) are not the student's
TEACHING = ("docs/exercises/", "tests/exercises/", "teach/", "teach.py")  # written for the course
SHAPE_TEST = "test_shapes_and_finite"
ORACLES = os.path.join("teach", "oracles.py")  # the oracles the grading tests compare with: instructor side only
HIDDEN = os.path.join("teach", "hidden")  # hidden grading cases (test_hidden_*.py; seed: package): instructor side only
# The rubric: an exercise passes at PASS_MARK; the shape/finiteness test is worth SHAPE_WEIGHT, the other tests
# share the rest; a failing (or skipped) test caps the exercise at FAIL_CAP, so wrong code never passes.
PASS_MARK, SHAPE_WEIGHT, FAIL_CAP = 0.6, 0.1, 0.5
# What a region has no business naming: the grader's own machinery (its modules, frames, the oracles).
GRADER_INTERNALS = re.compile(r"\boracles\b|sys\.modules|\bgc\b|\binspect\b|_getframe|\bf_back\b|f_globals|"
                              r"f_locals|test_ex_|__import__|importlib|\bconftest\b|builtins|__main__|/proc\b|\bargv\b")
SLOW = {"GEM_SLOW": "1"}  # the large tier's training tests run only with it (grade, verify --full, calibrate)  # every grading file has one: the wrong implementations must pass it


def _ex(tier, files, uses=(), depends=(), snapshot_files=(), large=None):
    return dict(tier=tier, files=list(files), uses=list(uses), depends=list(depends),
                snapshot_files=list(snapshot_files), large=large)


def _t(file: str, *names: str) -> list[str]:
    return [f"tests/{file}::{n}" for n in names]


# Tests outside tests/exercises/ that run a whole GEM forward: every hole on that path breaks them.
GEM_FORWARD = _t("test_model.py", "test_gem_from_hf", "test_generate_eos_and_temperature",
                 "test_image_hidden_is_the_last_layer_at_the_image_tokens_in_patch_order",
                 "test_kv_cache_generation_equals_full_forward", "test_padding_does_not_change_real_tokens",
                 "test_save_load_roundtrip_and_errors", "test_sdpa_equals_plain_softmax",
                 "test_text_loss_ignores_masked_labels", "test_tiny_gem_overfits_through_the_image") + _t(
    "test_eval.py", "test_image_use_tells_a_model_that_sees_from_one_that_dropped_its_image")
HEAD_TESTS = ("test_cfg_guidance_and_the_training_drop", "test_flow_overfits_and_sampler_reproduces_target",
              "test_rgb_target_has_three_channels")

# The manifest. tests: tests/exercises/test_ex_NAME.py (all of its tests grade NAME). uses: other exercises'
# functions that NAME's code calls (they stay reference code in a cut tree). depends: the tests of DEP_FILES
# that fail when NAME alone is cut (measured by `python teach.py deps tests/test_model.py tests/test_depth_head.py
# tests/test_eval.py`; `verify` checks them on the cut tree; the other test files are checked by `verify --full`).
# snapshot_files: what the medium tier's snapshot was computed from (verify checks their hashes).
EXERCISES = {
    # small: one function, graded against an oracle written differently inside the test plus properties
    "rope": _ex("small", ["model.py"], depends=GEM_FORWARD + _t("test_model.py", "test_qwen3_parity")),
    "attention": _ex("small", ["model.py"], depends=GEM_FORWARD + _t("test_model.py", "test_qwen3_parity",
                                                                     "test_siglip_vision_parity")),
    "merger": _ex("small", ["model.py"], depends=GEM_FORWARD + _t("test_model.py", "test_merger_layout")),
    "connector": _ex("small", ["depth_head.py"], depends=_t(
        "test_depth_head.py", *HEAD_TESTS, "test_drop_rate_and_null_condition_match_the_sampler",
        "test_invalid_samples_contribute_nothing", "test_regress_learns_with_the_right_sign")),
    "depth_target": _ex("small", ["data.py"], depends=_t("test_eval.py", "test_point_answers_are_scored_on_the_grid_their_mask_was_encoded_on",
                                                         "test_image_use_tells_a_model_that_sees_from_one_that_dropped_its_image")),
    "flow_pair": _ex("small", ["depth_head.py"], depends=_t(
        "test_depth_head.py", *HEAD_TESTS, "test_drop_rate_and_null_condition_match_the_sampler",
        "test_invalid_samples_contribute_nothing", "test_flow_convention_analytic")),
    "euler_sample": _ex("small", ["depth_head.py"], depends=_t("test_depth_head.py", *HEAD_TESTS,
                                                               "test_flow_convention_analytic")),
    "cfg": _ex("small", ["depth_head.py"], uses=["euler_sample", "connector"],
               depends=_t("test_depth_head.py", *HEAD_TESTS)),
    "wilson": _ex("small", ["eval.py"], depends=_t(
        "test_eval.py", "test_wilson_hand_cases", "test_eval_rules_on_generated_data_scores_the_best_train_rule",
        "test_expert_reference_row_smoke", "test_score_table_macro_and_chance", "test_summarise_vla_rates",
        "test_point_answers_are_scored_on_the_grid_their_mask_was_encoded_on")),
    "mra": _ex("small", ["eval.py"], depends=_t(
        "test_eval.py", "test_mean_relative_accuracy_hand_cases", "test_score_answer_per_kind",
        "test_eval_rules_on_generated_data_scores_the_best_train_rule", "test_parsers_malformed_do_not_crash_and_count_wrong",
        "test_point_answers_are_scored_on_the_grid_their_mask_was_encoded_on", "test_text_only_baseline_finds_a_planted_leak_and_nothing_else")),
    "flow_loss": _ex("small", ["train_vla.py"], uses=["flow_pair"]),
    # medium: a module swapped into the reference model, checked against a stored snapshot + properties
    "vit_block": _ex("medium", ["model.py"], uses=["attention"], snapshot_files=["model.py"],
                     depends=GEM_FORWARD + _t("test_model.py", "test_siglip_vision_parity")),
    "llm_block": _ex("medium", ["model.py"], uses=["rope", "attention"], snapshot_files=["model.py"],
                     depends=GEM_FORWARD + _t("test_model.py", "test_qwen3_parity")),
    "cross_attention": _ex("medium", ["train_vla.py"], snapshot_files=["train_vla.py", "model.py", "depth_head.py"]),
    "stage_freezing": _ex("medium", ["train_pretrain.py"]),
    # large: write it, train with it, hit a number. threshold = mean - k * std of the reference's score over
    # `seeds` (teach.py calibrate; higher is better); graded on grade_seed. Slow: out of CI (GEM_SLOW=1 runs it: grade, verify --full)
    "head_loss": _ex("large", ["depth_head.py"], uses=["connector", "flow_pair", "euler_sample", "cfg"],
                     depends=_t("test_depth_head.py", "test_flow_overfits_and_sampler_reproduces_target",
                                "test_cfg_guidance_and_the_training_drop", "test_drop_rate_and_null_condition_match_the_sampler",
                                "test_regress_learns_with_the_right_sign", "test_rgb_target_has_three_channels",
                                "test_invalid_samples_contribute_nothing"),
                     large=dict(procedure="tests/exercises/large.py:head_loss", seeds=[0, 1, 2, 3, 4], k=3.0,
                                grade_seed=11, steps=400, metric="residual correlation: corr(sample - mean map, target - mean map), the mean of 4 samples per test scene (higher is better; the mean map scores 0)",
                                made_from=["depth_head.py", "sim_env.py", "model.py", "tests/exercises/large.py",
                                           "teach/oracles.py"])),
}
THRESHOLDS = os.path.join("teach", "thresholds.json")

# What each exercise teaches: (difficulty 1-3, estimated minutes, learning objective, prerequisites: ideas and
# exercises it builds on). The minutes are estimated, not measured on students: the tier's base + 3 min per line
# of reference code (estimate(); verify checks them, and a student's copy, whose regions are cut, shows them).
TEACHES = {
    "rope": (1, 26, "apply rotary position embedding in the rotate-half layout and see why scores depend only on "
             "relative position", "complex rotation; attention scores q.k"),
    "attention": (2, 56, "write scaled dot-product attention with grouped-query heads, a causal and a boolean mask, by "
                  "hand and through SDPA", "softmax; matrix shapes (B, H, T, hd); rope"),
    "merger": (2, 53, "turn a grid of ViT patches into LLM tokens: LayerNorm, 2x2 grouping in row-major order, "
               "padding an odd grid, an MLP projection", "tensor reshapes and permutes; LayerNorm"),
    "connector": (1, 23, "build GEM's connector (Linear, tanh GELU, Linear, RMSNorm) from the equation",
                  "MLPs; RMSNorm"),
    "depth_target": (2, 56, "make a robust depth target: inverse depth, percentile normalisation, area resize over "
                     "valid pixels only", "numpy percentiles; masked means"),
    "flow_pair": (1, 26, "state the rectified-flow path and its velocity target in the project's convention",
                  "linear interpolation; derivatives in t"),
    "euler_sample": (1, 35, "integrate a learnt velocity field from noise to data with Euler steps",
                     "ODEs; flow_pair"),
    "cfg": (2, 32, "implement classifier-free guidance with one batched generator call",
            "conditional generation; euler_sample, connector"),
    "wilson": (1, 41, "compute a Wilson score interval and see why it beats the Wald interval at small n",
               "binomial proportions; confidence intervals"),
    "mra": (1, 35, "score numeric answers with VSI-Bench's mean relative accuracy", "relative error; thresholds"),
    "flow_loss": (2, 50, "write the action expert's flow-matching loss: logit-normal time, masked mean over valid "
                  "steps, repeated samples", "flow_pair; masked means"),
    "vit_block": (2, 60, "write a pre-norm transformer encoder layer (multi-head self-attention + MLP)",
                  "attention; residual streams; LayerNorm"),
    "llm_block": (3, 81, "write a Qwen3 decoder layer: per-head q/k norms, RoPE, a KV cache, SwiGLU",
                  "rope, attention, vit_block; autoregressive decoding"),
    "cross_attention": (2, 57, "let each action-expert block read its own VLM layer through masked cross-attention",
                        "attention; padding masks; llm_block"),
    "stage_freezing": (2, 81, "freeze and unfreeze model parts by training stage and hand the optimizer exactly the "
                       "trained parameters", "requires_grad; optimizers; GEM's three stages"),
    "head_loss": (3, 114, "write GEM's generative loss (masked per-sample means, the condition drop) and train a depth "
                  "head with it to a calibrated number", "flow_pair, euler_sample, cfg, connector; masked means"),
}
TIME_BASE = {"small": 20, "medium": 45, "large": 60}
ORDER = [  # a 6-week module, two or three exercises a week, each week's exercises building on the earlier ones
    ("1: scoring and the flow convention", ["wilson", "mra", "flow_pair"]),
    ("2: sampling from a flow", ["euler_sample", "connector", "cfg"]),
    ("3: the transformer core", ["rope", "attention", "vit_block"]),
    ("4: from image to tokens, decoding", ["merger", "llm_block"]),
    ("5: GEM's depth objective", ["depth_target", "head_loss"]),
    ("6: the action expert and training stages", ["flow_loss", "cross_attention", "stage_freezing"]),
]


def minutes(name: str) -> int:
    return TEACHES[name][1]


def estimate(name: str) -> int:
    """Estimated working time: the tier's base plus 3 minutes per non-blank line of reference code."""
    lines = sum(len([x for x in b.splitlines() if x.strip()]) for b in region_text(ROOT, name))
    return TIME_BASE[EXERCISES[name]["tier"]] + 3 * lines


def sheet_meta(name: str) -> str:
    """The block each task sheet carries under its title (verify checks it matches this manifest)."""
    difficulty, _, objective, prereq = TEACHES[name]
    return (f"**Objective.** {objective[0].upper() + objective[1:]}. **Prerequisites:** {prereq}. "
            f"**Time:** ~{minutes(name)} min (estimated from the tier and the reference's length, not measured on "
            f"students). **Difficulty:** {difficulty}/3.")

# `verify --full` runs the whole suite on the cut-all tree: what else fails there, by the first hole it hits
# (measured by that run; the plain verify checks only the dependents in `depends` above).
FULL_DEPENDS = {
    "depth_target": _t("test_data.py", "test_blind_dataset_shows_one_grey_image",
                       "test_cache_gives_the_same_items_as_the_files_and_is_rebuilt_when_stale",
                       "test_demo_dataset_and_obs_to_inputs_match_the_policy_path",
                       "test_demo_frame_cache_equals_rendering_and_follows_the_files",
                       "test_depth_mask_keeps_cells_at_least_half_valid", "test_depth_target_matches_independent_formula",
                       "test_gem_dataset_on_micro_data")
    + _t("test_sim_data.py", "test_every_reference_answer_scores_one_in_eval")
    + _t("test_gem250k.py", "test_split_of_one_file_and_items", "test_train_on_the_released_file")
    + _t("test_hf.py", "test_hf_preset_end_to_end")
    + _t("test_train_pretrain.py", "test_checkpoint_of_another_shape_and_nan_stop",
         "test_ddp_two_processes_equal_one_with_double_batch", "test_each_stage_trains_exactly_its_parameters",
         "test_frames_and_targets", "test_resume_is_exact", "test_stage_losses", "test_step_flops_match_torch_flop_counter",
         "test_bad_flags_give_one_line_errors[argv7-no train records]")
    + _t("test_train_vla.py", "test_bad_flags_one_line[args1---tasks]", "test_bad_flags_one_line[args2-spatial]",
         "test_bad_flags_one_line[args3-long]", "test_block_j_reads_only_layer_j_and_padding_changes_nothing",
         "test_closed_loop_evaluation_is_reproducible_across_workers", "test_depth_loss_sends_gradients_into_the_vlm",
         "test_depth_term_only_when_weighted", "test_expert_overfits_demo_chunks", "test_freeze_vlm_really_freezes",
         "test_nan_gradient_with_a_finite_loss_stops", "test_nan_loss_stops_with_one_line",
         "test_policy_preprocessing_equals_training", "test_policy_runs_closed_loop", "test_resume_is_exact"),
    "head_loss": _t("test_gem250k.py", "test_masked_pixels_do_not_reach_the_depth_loss"),
    "merger": _t("test_hf.py", "test_merger_pads_odd_grids_like_a_loop_over_cells"),
    "stage_freezing": _t("test_bench.py", "test_profile_step_runs_on_cpu"),
    "vit_block": _t("test_hf.py", "test_checkpoints_without_the_normalisation_fields_load",
                    "test_siglip_normalisation_from_the_checkpoint", "test_vlm_flops_count_the_padded_cells"),
    "wilson": _t("test_gem250k.py", "test_other_family_has_its_own_row_outside_the_macro"),
}
# Tests that run the pipeline in a subprocess: in a cut tree they fail without naming the hole.
PIPELINE = (_t("test_reproduce.py", "test_micro_reproduction_fills_every_cell")
            + _t("test_train_pretrain.py", "test_killed_run_leaves_a_loadable_checkpoint")
            + _t("test_walkthrough.py", "test_walkthrough_section"))
TIERS = ("small", "medium", "large")


def grading_file(name: str) -> str:
    return f"tests/exercises/test_ex_{name}.py"


def die(msg: str):
    print(f"teach.py: {msg}", file=sys.stderr)
    sys.exit(2)


def check_name(name: str) -> list[str]:
    if name == "all":
        return list(EXERCISES)
    if name not in EXERCISES:
        die(f"unknown exercise {name!r}; `python teach.py list` shows them: {', '.join(EXERCISES)}")
    return [name]


# ----------------------------------------------------------------------------------------------------
# Regions: find the markers, cut or replace what is between them

def regions(text: str, path: str = "?") -> list[tuple[str, int, int, str]]:
    """-> [(name, begin line index, end line index, indent)] of the marker pairs in text (markers excluded)."""
    out, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        m = BEGIN.match(line)
        if m:
            if open_:
                raise ValueError(f"{path}:{i + 1}: exercise marker inside exercise {open_[0]!r}")
            open_ = (m.group(2), i, m.group(1))
        elif END.match(line):
            if not open_:
                raise ValueError(f"{path}:{i + 1}: '# <<< exercise' without an opening marker")
            out.append((open_[0], open_[1], i, open_[2]))
            open_ = None
    if open_:
        raise ValueError(f"{path}:{open_[1] + 1}: exercise {open_[0]!r} is never closed by '# <<< exercise'")
    return out


def splice(text: str, name: str, bodies: list[str] | None = None, path: str = "?") -> str:
    """Replace exercise `name`'s regions in text: by the NotImplementedError (bodies None) or by bodies[k]
    (k-th region of this file; None keeps that region's reference code). Markers stay."""
    lines, out, last, k = text.splitlines(keepends=True), [], 0, 0
    for n, b, e, indent in regions(text, path):
        if n != name:
            continue
        out += lines[last:b + 1]
        body = HOLE.format(name) if bodies is None else (bodies[k] if k < len(bodies) else None)
        if body is None:
            out += lines[b + 1:e]
        else:
            out += [indent + line if line.strip() else "\n" for line in textwrap.dedent(body).strip("\n").splitlines(True)]
            out[-1] = out[-1].rstrip("\n") + "\n"
        last, k = e, k + 1
    return "".join(out + lines[last:])


def region_text(root: str, name: str) -> list[str]:
    """The reference code of every region of `name` (file order), markers excluded."""
    out = []
    for f in EXERCISES[name]["files"]:
        text = open(os.path.join(root, f)).read()
        lines = text.splitlines(True)
        out += ["".join(lines[b + 1:e]) for n, b, e, _ in regions(text, f) if n == name]
    return out


def tree_files(src: str) -> list[str]:
    """The repo's files, relative: tracked + untracked-not-ignored when src is a git work tree, else a walk."""
    try:
        r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src, capture_output=True,
                           text=True, timeout=60)
        files = [f for f in r.stdout.split("\0") if f] if r.returncode == 0 else None
    except OSError:
        files = None
    if files is None:
        files = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs]
    keep = []
    for f in files:
        parts = f.replace(os.sep, "/").split("/")
        if (any(p in NEVER_COPIED for p in parts) or f.replace(os.sep, "/").startswith(WRONG.replace(os.sep, "/"))
                or f.replace(os.sep, "/") == ORACLES.replace(os.sep, "/")
                or f.replace(os.sep, "/").startswith(HIDDEN.replace(os.sep, "/") + "/")):
            continue
        if f.endswith((".pyc", ".pyo")) or not os.path.isfile(os.path.join(src, f)):
            continue
        keep.append(f)
    return sorted(keep)


def make_tree(dst: str, cut=(), wrong: dict | None = None, src: str = ROOT) -> str:
    """Copy the repo to dst (no history, no caches, no stored wrong implementations); cut the exercises in
    `cut`; wrong = {name: [body per region]} splices those bodies in instead."""
    for f in tree_files(src):
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    todo = [(n, None) for n in cut] + list((wrong or {}).items())
    for name, bodies in todo:
        for f in EXERCISES[name]["files"]:
            p = os.path.join(dst, f)
            with open(p) as fh:
                text = fh.read()
            with open(p, "w") as fh:
                fh.write(splice(text, name, bodies, f))
    return dst


def given(names) -> list[str]:
    """The exercises that `names` call (their `uses`, transitively): reference code in a copy cutting `names`."""
    out, todo = [], list(names)
    while todo:
        for u in EXERCISES[todo.pop()]["uses"]:
            if u not in out and u not in names:
                out.append(u)
                todo.append(u)
    return out


def student_regions(tree: str, name: str) -> list[str]:
    """The student's code between `name`'s markers in their copy, one body per region (file order); ValueError
    naming the file when a region is missing or added (the markers must stay as they were handed out)."""
    want = len(region_text(ROOT, name))
    out = []
    for f in EXERCISES[name]["files"]:
        p = os.path.join(tree, f)
        if not os.path.isfile(p):
            raise ValueError(f"{f}: not in the submission")
        text = open(p).read()
        lines = text.splitlines(True)
        out += ["".join(lines[b + 1:e]) or "pass\n" for n, b, e, _ in regions(text, f) if n == name]
    if len(out) != want:
        raise ValueError(f"{', '.join(EXERCISES[name]['files'])}: {len(out)} region(s) of {name}, the handout has {want} "
                         "(keep the '# >>> exercise' / '# <<< exercise' lines as they were)")
    return out


def grading_tree(dst: str, bodies: dict) -> str:
    """The tree a submission is graded in: the instructor's reference with the submitted bodies ({name: [body per
    region]}) spliced in, the exercises they call kept, every other exercise cut; the instructor's grading tests;
    no oracles (teach/oracles.py is served to tests/exercises/ only, see _OracleFinder)."""
    keep = set(bodies) | set(given(bodies))
    make_tree(dst, cut=[n for n in EXERCISES if n not in keep], wrong=bodies)
    for f in hidden_files(ROOT):  # beside the visible tests, so that they reach the oracles the same way
        shutil.copy2(os.path.join(ROOT, HIDDEN, f), os.path.join(dst, "tests", "exercises", f))
    return dst


def hidden_files(root: str) -> list[str]:
    d = os.path.join(root, HIDDEN)
    return sorted(f for f in os.listdir(d) if f.startswith("test_hidden") and f.endswith(".py")) if os.path.isdir(d) else []


def hidden_seed() -> str:
    """The hidden cases' seed: GEM_HIDDEN_SEED, else the one `package` wrote (teach/hidden/seed), else the default."""
    path = os.path.join(ROOT, HIDDEN, "seed")
    return os.environ.get("GEM_HIDDEN_SEED") or (open(path).read().strip() if os.path.isfile(path) else "20240917")


def hidden_of(res: dict, name: str) -> dict:
    """The hidden cases of exercise `name`: tests named test_NAME_hidden in the hidden files."""
    return {k: v for k, v in res.items() if "/test_hidden" in k and k.split("::")[-1].split("[")[0] == f"test_{name}_hidden"}


def load_wrong(path: str) -> tuple[str, str, list]:
    """teach/wrong/NAME__MISTAKE.py -> (name, mistake line, bodies per region). Header comment lines:
    '# mistake: ...' (what it gets wrong) and optionally '# region: K' (which region of NAME it replaces)."""
    name = os.path.basename(path).split("__")[0]
    text, mistake, region = open(path).read(), "", 0
    body = []
    for line in text.splitlines(True):
        if line.startswith("# mistake:"):
            mistake = line[len("# mistake:"):].strip()
        elif line.startswith("# region:"):
            region = int(line.split(":")[1])
        else:
            body.append(line)
    bodies = [None] * region + ["".join(body)]
    return name, mistake, bodies


# ----------------------------------------------------------------------------------------------------
# Running pytest on a tree: a fresh interpreter per tree (forked where possible), per-test outcomes back

class _Collect:
    """pytest plugin: nodeid -> {outcome, message} (the first failure of a test wins: setup, call, teardown)."""

    def __init__(self):
        self.res = {}

    def pytest_runtest_logreport(self, report):
        prev = self.res.get(report.nodeid)
        if prev and prev["outcome"] == "failed":
            return
        if report.failed or report.when == "call" or (report.skipped and prev is None):
            crash = getattr(report.longrepr, "reprcrash", None)
            msg = crash.message if crash is not None else (str(report.longrepr)[-1500:] if report.failed else "")
            if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
                msg = str(report.longrepr[2])
            self.res[report.nodeid] = dict(outcome=report.outcome, message=msg, when=report.when)

    def pytest_collectreport(self, report):
        if report.failed:
            self.res[report.nodeid or "<collection>"] = dict(outcome="failed", message=str(report.longrepr)[-1500:],
                                                             when="collect")


class _OracleFinder:
    """Serves `import oracles` (the instructor's teach/oracles.py) to the files of TREE/tests/exercises/ alone,
    and only until the tests are collected (pytest_collection_finish withdraws it and drops the module), so the
    code under test, which runs later, cannot import it; the file itself is not in the tree."""

    def __init__(self, path: str, tree: str):
        self.path, self.allowed = path, os.path.join(tree, "tests", "exercises") + os.sep

    def find_spec(self, name, path=None, target=None):
        if name != "oracles":
            return None
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith("<frozen") or "importlib" in f.f_code.co_filename):
            f = f.f_back  # the import machinery's own frames: the importer is the first frame outside them
        importer = os.path.abspath(f.f_code.co_filename) if f is not None else ""
        if not importer.startswith(self.allowed):
            return None
        import importlib.util
        return importlib.util.spec_from_file_location("oracles", self.path)

    def pytest_collection_finish(self, session):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        sys.modules.pop("oracles", None)


def _pytest_child(tree: str, args: list[str], out: str, log: str, env: dict | None = None) -> int:
    """Run pytest in THIS process on `tree`: cwd and sys.path point at the tree, never at the reference. The
    oracles come from this teach.py's own repository (when it has them: the instructor's side)."""
    tree = os.path.abspath(tree)
    os.environ.update(env or {})
    os.chdir(tree)
    here = {ROOT, tree}
    sys.path[:] = [tree] + [p for p in sys.path if os.path.abspath(p or ".") not in here]
    env_dir = os.path.abspath(sys.prefix) + os.sep  # a virtualenv inside the repo (CI's .venv) is not the project
    for m in list(sys.modules):  # a project module imported from elsewhere must not answer `import model`
        f = os.path.abspath(getattr(sys.modules[m], "__file__", None) or "")
        if m != "__main__" and not f.startswith(env_dir) and any(f.startswith(h + os.sep) for h in here):
            del sys.modules[m]
    sys.dont_write_bytecode = True
    import pytest
    col, plugins = _Collect(), []
    sys.modules.pop("oracles", None)
    if os.path.isfile(os.path.join(ROOT, ORACLES)):
        plugins.append(_OracleFinder(os.path.join(ROOT, ORACLES), tree))
        sys.meta_path.insert(0, plugins[0])
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", tree, "-c", os.path.join(tree, "pytest.ini"),
                        *args], plugins=[col] + plugins)
    with open(out, "w") as fh:
        json.dump(col.res, fh)
    return int(code)


def run_tests(jobs: list[tuple], parallel: int = 1) -> list[dict]:
    """jobs [(tree, pytest args[, env])] -> per job {nodeid: {outcome, message}} (+ '<log>': pytest's output).
    Each job runs in a fresh process: a fork of this one (cheap: project modules are never imported here)
    or, without fork, `python teach.py _pytest`."""
    tmp = tempfile.mkdtemp(prefix="teach-run-")
    procs, results = {}, [None] * len(jobs)

    def finish(i, code):
        out, log = os.path.join(tmp, f"{i}.json"), os.path.join(tmp, f"{i}.log")
        res = json.load(open(out)) if os.path.exists(out) else {}
        res["<log>"] = open(log).read()[-6000:] if os.path.exists(log) else ""
        if not os.path.exists(out):
            res["<crash>"] = dict(outcome="failed", message=f"pytest did not finish (exit {code})", when="run")
        results[i] = res

    for i, (tree, args, *env) in enumerate(jobs):
        env = env[0] if env else {}
        while len(procs) >= parallel:
            pid, status = os.wait()
            finish(procs.pop(pid), status)
        out, log = os.path.join(tmp, f"{i}.json"), os.path.join(tmp, f"{i}.log")
        if hasattr(os, "fork"):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _pytest_child(tree, args, out, log, env)
                finally:
                    os._exit(code)
            procs[pid] = i
        else:
            p = subprocess.run([sys.executable, os.path.join(ROOT, "teach.py"), "_pytest", tree, out, log, "--", *args],
                               cwd=tree, env=dict(os.environ, **env))
            finish(i, p.returncode)
    while procs:
        pid, status = os.wait()
        finish(procs.pop(pid), status)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def tests_of(res: dict, prefix: str) -> dict:
    """The results whose nodeid is `prefix` itself, one of its parametrisations, or inside the file `prefix`."""
    return {k: v for k, v in res.items() if k == prefix or k.startswith(prefix + "[") or k.startswith(prefix + "::")}


def hole_names(message: str) -> set[str]:
    return set(HOLE_ERROR.findall(message or ""))


# ----------------------------------------------------------------------------------------------------
# Commands

def cmd_list(args):
    """All exercises in one table; `list NAME` adds every test that cutting NAME breaks."""
    names = check_name(args[0]) if args else list(EXERCISES)
    print(f"{'exercise':16s} {'tier':7s} {'files':15s} {'grading tests':40s} also breaks (tests outside tests/exercises)")
    for name in names:
        e = EXERCISES[name]
        per_file = {}
        for d in e["depends"] + FULL_DEPENDS.get(name, []):
            f = d.split("::")[0].split("/")[-1]
            per_file[f] = per_file.get(f, 0) + 1
        breaks = ", ".join(f"{f} ({k})" for f, k in per_file.items()) or "-"
        print(f"{name:16s} {e['tier']:7s} {', '.join(e['files']):15s} {grading_file(name):40s} {breaks}")
        difficulty, _, objective, prereq = TEACHES[name]
        print(f"{'':40s} difficulty {difficulty}/3, ~{minutes(name)} min: {objective}")
        print(f"{'':40s} prerequisites: {prereq}")
        if e["uses"]:
            print(f"{'':40s} uses (reference code when cut alone): {', '.join(e['uses'])}")
        if e["large"]:
            print(f"{'':40s} large: {e['large']['metric']}; threshold from seeds {e['large']['seeds']}, "
                  f"k = {e['large']['k']} ({THRESHOLDS}; slow, out of CI)")
        if args:
            for d in e["depends"] + FULL_DEPENDS.get(name, []):
                print(f"{'':40s} breaks {d}")


STUDENT_MD = """# Your exercises: {names}

This is a copy of GEM-mini with {names} cut: between the lines `# >>> exercise: NAME` and `# <<< exercise`
the code is `raise NotImplementedError(...)`. {given}Everything else is the reference code.

- **What to edit:** only the lines between the markers, in {files}. Imports written inside a region are fine.
- **What is graded:** only those regions. The grader takes them out of your files, puts them into its own clean
  copy of the code and runs its own grading tests there (some with inputs you do not see). Anything you change
  outside the markers (other code, the tests, teach.py) is not graded, and the marker lines must stay as they are.
- **How to check your work:** `python teach.py grade {first}` (or `python teach.py grade` for all of them) runs
  the grading tests that ship with this copy. Tests that compare with the instructor's reference
  implementation are skipped here ("graded on submission"); the property tests run.
- **Task sheets:** {sheets}.
- **Scoring:** each exercise is worth 1; it passes at {pass_mark}. The shape/finiteness test is worth
  {shape_weight} of it, the other tests share the rest, and any failing test caps the exercise at {cap}.

The repository README's commands for instructors (`teach.py verify`, `snapshot`, `calibrate`) need files that
are not in this copy; you do not need them.
"""


INSTRUCTOR_ONLY = re.compile(r"teach\.py (verify|snapshot|calibrate|deps|package)\b")


def cmd_start(args):
    """A student's copy: the exercises of the assignment (a comma-separated list, or `all`) cut, every other
    exercise cut too except those they call (given as reference code), no oracles, a STUDENT.md."""
    if not args or args[0].startswith("-"):
        die("start: give exercise names (a comma-separated list, or `all`), e.g. `python teach.py start rope,attention DIR`")
    if len(args) > 2:
        die(f"start: takes NAMES [DIR], got {len(args)} arguments (several exercises: `start {','.join(args[:-1])} DIR`)")
    names = [n for part in args[0].split(",") if part for n in check_name(part)]
    names = list(dict.fromkeys(names))
    dst = os.path.abspath(args[1] if len(args) > 1 else f"gem-mini-{args[0].replace(',', '-')}")
    if os.path.exists(dst) and os.listdir(dst):
        die(f"start: {dst} exists and is not empty; give another DIR")
    keep = given(names)
    make_tree(dst, cut=[n for n in EXERCISES if n not in keep])
    readme = os.path.join(dst, "README.md")
    if os.path.isfile(readme):  # the instructor's commands fail in a copy: not shown there
        lines = [line for line in open(readme).read().splitlines(True) if not INSTRUCTOR_ONLY.search(line)]
        with open(readme, "w") as fh:
            fh.write("> A student's copy: read STUDENT.md first (what to edit, how it is graded).\n\n" + "".join(lines))
    files = sorted({f for n in names for f in EXERCISES[n]["files"]})
    with open(os.path.join(dst, "STUDENT.md"), "w") as fh:
        fh.write(STUDENT_MD.format(
            names=", ".join(names), first=names[0], files=", ".join(files),
            sheets=", ".join(f"docs/exercises/{n}.md" for n in names),
            given=(f"The exercises yours call ({', '.join(keep)}) are given as reference code; every other exercise "
                   "is cut too. " if keep else "Every other exercise is cut too. "),
            pass_mark=PASS_MARK, shape_weight=SHAPE_WEIGHT, cap=FAIL_CAP))
    print(f"{dst}: the repo with {', '.join(names)} cut (raise NotImplementedError between the markers); "
          f"read STUDENT.md")
    for n in names:
        print(f"  {n}: read docs/exercises/{n}.md, fill in {', '.join(EXERCISES[n]['files'])}, "
              f"then `python teach.py grade {n}`")


def _flag(args, key, default=None):
    for a in args:
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return default


def score(mine: dict, skipped_ok: bool = False) -> float:
    """One exercise's score from its tests' outcomes: the shape/finiteness test(s) SHAPE_WEIGHT, the others share
    1 - SHAPE_WEIGHT; a test that did not pass (failed or skipped) caps the score at FAIL_CAP (< PASS_MARK).
    skipped_ok (a student's copy, without the oracles): skipped tests count neither way (advisory score only)."""
    if skipped_ok:
        mine = {k: v for k, v in mine.items() if v["outcome"] != "skipped"}
    if not mine:
        return 0.0
    shape = [k for k in mine if k.split("::")[-1].split("[")[0] == SHAPE_TEST]
    other = [k for k in mine if k not in shape]
    weight = {k: (SHAPE_WEIGHT if other else 1.0) / len(shape) for k in shape}
    weight.update({k: (1.0 - SHAPE_WEIGHT if shape else 1.0) / len(other) for k in other})
    got = sum(weight[k] for k, v in mine.items() if v["outcome"] == "passed")
    if any(v["outcome"] != "passed" for v in mine.values()):
        got = min(got, FAIL_CAP)
    return round(got, 4)


def _hint(message: str) -> str:
    """A failure's message whole (the property and its hint), without pytest's `assert ... where ...` dump."""
    lines = (message or "").splitlines()
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("assert ") or line.lstrip().startswith("+  where"):
            return "\n".join(lines[:i])
    return "\n".join(lines)


def cmd_grade(args):
    """Grade the submission in --tree (default: the current directory): its exercise regions alone are spliced
    into a clean copy of THIS teach.py's repository (grading_tree) and this repository's grading tests run there."""
    for a in args:
        if a.startswith("--") and not a.startswith(("--tree=", "--json=")):
            die(f"grade: unknown flag {a.split('=')[0]} (known: --tree=DIR, --json=FILE)")
    pos = [a for a in args if not a.startswith("--")]
    if len(pos) > 1:
        die(f"grade: takes one NAME (a comma-separated list, or none for all), got {' '.join(pos)}")
    names = list(dict.fromkeys(n for part in pos[0].split(",") if part for n in check_name(part))) if pos else list(EXERCISES)
    tree = os.path.abspath(_flag(args, "tree", os.getcwd()))
    if not os.path.isdir(tree):
        die(f"grade: --tree={tree} is not a directory")
    t0, bodies, refused = time.time(), {}, {}
    for n in names:
        try:
            bodies[n] = student_regions(tree, n)
        except (ValueError, OSError, UnicodeDecodeError) as err:
            refused[n] = f"not graded: {err}"
            continue
        hit = GRADER_INTERNALS.search("".join(bodies[n]))
        if hit:
            refused[n] = (f"not graded: the region names {hit.group(0)!r}, which reaches into the grader "
                          "(its modules, frames or oracles); score 0, ask the instructor")
            del bodies[n]
    work = tempfile.mkdtemp(prefix="teach-grade-")
    try:
        res = {"<log>": ""}
        if bodies:
            gtree = grading_tree(os.path.join(work, "tree"), bodies)
            hidden = [f"tests/exercises/{f}" for f in hidden_files(ROOT)]
            res = run_tests([(gtree, [grading_file(n) for n in bodies] + hidden,
                              dict(SLOW, GEM_HIDDEN_SEED=hidden_seed()))])[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report, total = [], 0.0
    student_side = not os.path.isfile(os.path.join(ROOT, ORACLES))
    if student_side:
        print("(a student's copy: tests that compare with the instructor's oracles are skipped and left out of this "
              "score; the instructor's grade runs them)")
    for n in names:
        mine = tests_of(res, grading_file(n)) if n in bodies else {}
        secret = hidden_of(res, n) if n in bodies else {}
        s = score({**mine, **secret}, skipped_ok=student_side) if n in bodies else 0.0
        passed = sum(v["outcome"] == "passed" for v in mine.values())
        total += s
        fails = [refused[n]] if n in refused else [
            f"{k.split('::')[-1]}: {_hint(v['message']) or v['outcome']}" for k, v in mine.items() if v["outcome"] != "passed"]
        verdict = "pass" if s >= PASS_MARK else "FAIL"
        lost = [f"{k.split('::')[-1]}: {_hint(v['message']) or v['outcome']}" for k, v in secret.items()
                if v["outcome"] != "passed"]
        if lost:
            fails.append(f"{len(lost)} of {len(secret)} hidden case(s) failed (details after grades are published)")
        print(f"{n:16s} {passed:2d}/{len(mine):<2d} tests  score {s:.2f}  {verdict}"
              + (f"  (+{len(secret)} hidden cases)" if secret else ""))
        for f in fails:  # whole: the first failing property and its hint lead
            print(textwrap.indent(f, "    "))
        report.append(dict(name=n, score=s, max_score=1.0, tier=EXERCISES[n]["tier"],
                           output="\n".join(fails) or "all grading tests pass", visibility="visible"))
        if secret:  # Gradescope shows this entry to the student only once the grades are published
            report.append(dict(name=f"{n} (hidden cases)", score=0.0, max_score=0.0, visibility="after_published",
                               output="\n".join(lost) or f"all {len(secret)} hidden cases pass"))
    if "<crash>" in res or "<collection>" in res:
        print(res["<log>"][-3000:])
    out = _flag(args, "json", os.path.join(tree, "grade.json"))
    with open(out, "w") as fh:  # the Gradescope autograder layout: score, max_score, one entry per exercise
        json.dump(dict(score=round(total, 4), max_score=float(len(names)), execution_time=round(time.time() - t0, 1),
                       pass_mark=PASS_MARK, tests=report), fh, indent=1)
    print(f"total {total:.2f} / {len(names)}   ({out})")
    return 0 if total == len(names) else 1


SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once when it builds the grader image: the CPU requirements of the course.
set -euo pipefail
apt-get update -qq && apt-get install -y -qq python3 python3-pip > /dev/null
pip3 install --quiet --index-url https://download.pytorch.org/whl/cpu "torch>=2.5"
pip3 install --quiet -r /autograder/source/requirements.txt -r /autograder/source/requirements-dev.txt
"""
RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for each submission: the submitted files (depth_head.py, model.py, ...) lie in
# $AG/submission; their exercise regions are graded in a clean copy of the course (teach.py grade).
# AUTOGRADER_ROOT (default /autograder) lets a test run it elsewhere.
AG="${{AUTOGRADER_ROOT:-/autograder}}"
mkdir -p "$AG/results"
cd "$AG/source" && "${{PYTHON:-python3}}" teach.py grade {names} --tree="$AG/submission" --json="$AG/results/results.json"
exit 0  # the score is in results.json; a non-zero exit would read as a grader failure
"""


def cmd_package(args):
    """teach.py package NAME,... [OUT]: an autograder.zip in Gradescope's layout (setup.sh, run_autograder,
    beside this repository with its oracles, no history, no stored wrong implementations; Gradescope unpacks it
    into /autograder/source and runs run_autograder from /autograder) grading NAME,..."""
    if not args or args[0].startswith("-") or len(args) > 2:
        die("package: give NAME,... [OUT], e.g. `python teach.py package rope,attention autograder.zip`")
    names = list(dict.fromkeys(n for part in args[0].split(",") if part for n in check_name(part)))
    out = os.path.abspath(args[1] if len(args) > 1 else "autograder.zip")
    import zipfile
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER.format(names=",".join(names)))):
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16  # executable, as Gradescope runs them
            z.writestr(info, text)
        for f in tree_files(ROOT) + [ORACLES] + [os.path.join(HIDDEN, f) for f in hidden_files(ROOT)]:
            z.write(os.path.join(ROOT, f), f)  # Gradescope unpacks the zip into /autograder/source
        import secrets
        z.writestr(os.path.join(HIDDEN, "seed"), f"{secrets.randbelow(10 ** 9)}\n")  # the hidden cases' inputs
    print(f"{out}: Gradescope autograder for {', '.join(names)}; students submit "
          f"{', '.join(sorted({f for n in names for f in EXERCISES[n]['files']}))}")
    return 0


def sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return (r.stdout.strip() or "unknown") + ("+dirty" if d.stdout.strip() else "")
    except OSError:
        return "unknown"


def cmd_snapshot(args):
    """Regenerate teach/snapshots/NAME.safetensors for the medium exercises that have snapshot_files, from the reference."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "exercises"))
    import snapshots  # tests/exercises/snapshots.py: how each snapshot is computed (the grading tests reuse it)
    os.makedirs(os.path.join(ROOT, SNAPSHOTS), exist_ok=True)
    meta = dict(commit=_commit(), note="made by `python teach.py snapshot`; verify fails when a file hash changes",
                snapshots={})
    for name, e in EXERCISES.items():
        if not e["snapshot_files"]:
            continue
        path = os.path.join(ROOT, SNAPSHOTS, f"{name}.safetensors")
        snapshots.save(name, path)
        meta["snapshots"][name] = dict(file=f"{SNAPSHOTS}/{name}.safetensors", sha256=sha256(path),
                                       made_from={f: sha256(os.path.join(ROOT, f)) for f in e["snapshot_files"]})
        print(f"{path}: written from {', '.join(e['snapshot_files'])}")
    with open(os.path.join(ROOT, SNAPSHOTS, "hashes.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return 0


def cmd_calibrate(args):
    """The large tier's thresholds: run each large exercise's training procedure on the reference for its
    seeds, threshold = mean - k * std of the score (higher is better); record the commit, the file hashes, the time."""
    if args:
        die(f"calibrate: takes no arguments, got {args[0]}")
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "exercises"), os.path.join(ROOT, "teach")]
    import large as L
    path = os.path.join(ROOT, THRESHOLDS)
    meta = json.load(open(path)) if os.path.isfile(path) else {}
    meta["note"] = "made by `python teach.py calibrate`; verify fails when a made_from file changes"
    for name, e in EXERCISES.items():
        spec = e["large"]
        if not spec:
            continue
        t0, fn = time.time(), getattr(L, spec["procedure"].split(":")[1])
        runs = []
        for seed in spec["seeds"]:
            runs.append(fn(seed, steps=spec["steps"]))
            print(f"{name} seed {seed}: {runs[-1]}", flush=True)
        scores = [r["score"] for r in runs]
        mean = sum(scores) / len(scores)
        std = (sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)) ** 0.5
        meta[name] = dict(commit=_commit(), seeds=spec["seeds"], k=spec["k"], steps=spec["steps"],
                          grade_seed=spec["grade_seed"], metric=spec["metric"], scores=scores, mean=mean, std=std,
                          threshold=mean - spec["k"] * std, errors=[r["error"] for r in runs], baseline=runs[0]["baseline"],
                          seconds=round(time.time() - t0, 1), torch=torch.__version__,
                          made_from={f: sha256(os.path.join(ROOT, f)) for f in spec["made_from"]})
        print(f"{name}: threshold {mean - spec['k'] * std:.4f} = {mean:.4f} - {spec['k']} x {std:.4f} "
              f"({len(scores)} seeds, {time.time() - t0:.0f} s)")
    with open(path, "w") as fh:
        json.dump(meta, fh, indent=1)
    return 0


def check_static(problems: list):
    """Markers, manifest, grading files and snapshots agree."""
    seen = {}
    for f in sorted({f for e in EXERCISES.values() for f in e["files"]}):
        try:
            for n, *_ in regions(open(os.path.join(ROOT, f)).read(), f):
                if n not in EXERCISES:
                    problems.append(f"{f}: marker for exercise {n!r}, which the manifest (teach.py EXERCISES) lacks")
                elif f not in EXERCISES[n]["files"]:
                    problems.append(f"{f}: marker for {n!r}, but the manifest does not list {f} for it")
                seen[n] = seen.get(n, 0) + 1
        except ValueError as err:
            problems.append(str(err))
    for n in EXERCISES:
        if not seen.get(n):
            problems.append(f"exercise {n}: no '# >>> exercise: {n}' region in {', '.join(EXERCISES[n]['files'])}")
        g = os.path.join(ROOT, grading_file(n))
        if not os.path.isfile(g):
            problems.append(f"exercise {n}: grading file {grading_file(n)} missing")
        elif f"def {SHAPE_TEST}(" not in open(g).read():
            problems.append(f"{grading_file(n)}: no {SHAPE_TEST} (the shape/finiteness test wrong implementations pass)")
        sheet = os.path.join(ROOT, "docs", "exercises", f"{n}.md")
        if not os.path.isfile(sheet):
            problems.append(f"exercise {n}: docs/exercises/{n}.md missing")
        elif n not in TEACHES:
            problems.append(f"exercise {n}: no entry in teach.py TEACHES (objective, prerequisites, difficulty)")
        elif minutes(n) != estimate(n):
            problems.append(f"exercise {n}: teach.py TEACHES says {minutes(n)} min, the rule (estimate) {estimate(n)}")
        elif sheet_meta(n) not in open(sheet).read():
            problems.append(f"docs/exercises/{n}.md: its objective/prerequisites/time line differs from teach.py "
                            f"TEACHES; put this under the title: {sheet_meta(n)}")
    if sorted(n for _, week in ORDER for n in week) != sorted(EXERCISES):
        problems.append("teach.py ORDER (the suggested module order) must list every exercise once")
    meta_path = os.path.join(ROOT, SNAPSHOTS, "hashes.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {"snapshots": {}}
    for n, e in EXERCISES.items():
        if not e["snapshot_files"]:
            continue
        m = meta["snapshots"].get(n)
        if m is None or not os.path.isfile(os.path.join(ROOT, m["file"])):
            problems.append(f"exercise {n}: no snapshot; run `python teach.py snapshot`")
            continue
        if sha256(os.path.join(ROOT, m["file"])) != m["sha256"]:
            problems.append(f"{m['file']}: changed since hashes.json was written; run `python teach.py snapshot`")
        for f, h in m["made_from"].items():
            if sha256(os.path.join(ROOT, f)) != h:
                problems.append(f"exercise {n}: {f} changed since its snapshot was made (commit "
                                f"{meta.get('commit', '?')}); run `python teach.py snapshot` and commit teach/snapshots")
    path = os.path.join(ROOT, THRESHOLDS)
    thr = json.load(open(path)) if os.path.isfile(path) else {}
    for n, e in EXERCISES.items():
        if not e["large"]:
            continue
        if n not in thr:
            problems.append(f"exercise {n}: no threshold in {THRESHOLDS}; run `python teach.py calibrate`")
            continue
        for key in ("seeds", "k", "steps", "grade_seed"):
            if thr[n][key] != e["large"][key]:
                problems.append(f"exercise {n}: {THRESHOLDS} has {key}={thr[n][key]}, the manifest {e['large'][key]}; "
                                "run `python teach.py calibrate`")
        for f in e["large"]["made_from"]:
            if thr[n]["made_from"].get(f) != sha256(os.path.join(ROOT, f)):
                problems.append(f"exercise {n}: {f} changed since its threshold was calibrated (commit "
                                f"{thr[n]['commit']}); run `python teach.py calibrate` (~{thr[n]['seconds']:.0f} s)")


def check_no_solution(tree: str, problems: list):
    """No cache or history in the cut tree, and no line of any solution anywhere in it (a line counts as
    the solution's when it appears in no other place of the reference)."""
    for d, dirs, files in os.walk(tree):
        for x in dirs + files:
            if x in (".git", "__pycache__", ".pytest_cache") or x.endswith((".pyc", ".pyo")):
                problems.append(f"cut tree: {os.path.relpath(os.path.join(d, x), tree)} must not be there")
    outside = set()  # lines the reference has outside every region, teaching material (tests, sheets) excluded
    for f in tree_files(ROOT):
        if not f.endswith((".py", ".md", ".txt", ".json", ".ini", ".cfg", ".toml")) or f.startswith(TEACHING):
            continue
        text = open(os.path.join(ROOT, f), errors="replace").read()
        inside = {i for _, b, e, _ in (regions(text, f) if f.endswith(".py") else []) for i in range(b + 1, e)}
        outside |= {line.strip() for i, line in enumerate(text.splitlines()) if i not in inside}
    solution = {}
    for n in EXERCISES:
        for body in region_text(ROOT, n):
            for line in body.splitlines():
                s = line.strip()
                if len(s) >= 8 and s not in outside:
                    solution[s] = n
    for d, _, files in os.walk(tree):
        for x in files:
            p = os.path.join(d, x)
            try:
                text = open(p).read()
            except (UnicodeDecodeError, OSError):
                continue
            for i, line in enumerate(text.splitlines()):
                if line.strip() in solution:
                    problems.append(f"cut tree: {os.path.relpath(p, tree)}:{i + 1} holds a line of exercise "
                                    f"{solution[line.strip()]}'s solution: {line.strip()[:80]}")


def cmd_verify(args):
    for a in args:
        if a not in ("--full",):
            die(f"verify: unknown flag {a} (known: --full)")
    full, problems, t0 = "--full" in args, [], time.time()
    check_static(problems)
    if problems:
        return _verdict(problems, t0)
    work = tempfile.mkdtemp(prefix="teach-verify-")
    try:
        cut_all = make_tree(os.path.join(work, "cut_all"), cut=list(EXERCISES))
        check_no_solution(cut_all, problems)
        grading = [grading_file(n) for n in EXERCISES]
        dep_files = sorted({d.split("::")[0] for e in EXERCISES.values() for d in e["depends"]})
        env = SLOW if full else {}
        jobs = [(ROOT, grading, env), (cut_all, grading + (["tests"] if full else dep_files), env)]
        wrongs, skipped = sorted(f for f in os.listdir(os.path.join(ROOT, WRONG)) if f.endswith(".py")), []
        hidden = [f"tests/exercises/{f}" for f in hidden_files(ROOT)]
        for f in wrongs:
            name, mistake, bodies = load_wrong(os.path.join(ROOT, WRONG, f))
            if name not in EXERCISES:
                problems.append(f"{WRONG}/{f}: no exercise {name!r}")
                continue
            if EXERCISES[name]["large"] and not full and "caught by training" in mistake:
                skipped.append(f)  # its '# mistake:' line says only the slow training test catches it: verify --full
                continue
            jobs.append((grading_tree(os.path.join(work, f[:-3]), {name: bodies}), [grading_file(name)] + hidden, env))
        # the reference's own regions graded as a submission is (grading_tree: every other exercise cut)
        for n in EXERCISES:
            jobs.append((grading_tree(os.path.join(work, f"ref_{n}"), {n: region_text(ROOT, n)}), [grading_file(n)] + hidden, env))
        import torch  # noqa: F401  (preloaded once, so each forked run only imports the project)
        results = run_tests(jobs, parallel=2)
        check_reference(results[0], problems, full)
        check_cut_all(results[1], problems, full)
        graded = [f for f in wrongs if f not in skipped]
        for f, res in zip(graded, results[2:2 + len(graded)]):
            check_wrong(f, res, problems)
        for n, res in zip(EXERCISES, results[2 + len(graded):]):
            s = score({**tests_of(res, grading_file(n)), **hidden_of(res, n)})
            if s != 1.0 and not (EXERCISES[n]["large"] and not full):
                problems.append(f"reference {n} graded in its grading tree scores {s}, not 1.0: "
                                f"{[(k.split('::')[-1], v['message'][:300]) for k, v in res.items() if not k.startswith('<') and v['outcome'] != 'passed']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _verdict(problems, t0, f"{len(EXERCISES)} exercises, {len(wrongs) - len(skipped)} wrong implementations"
                    + (f" ({len(skipped)} of the large tier left to verify --full)" if skipped else ""))


def _slow_skip(name: str, v: dict, full: bool) -> bool:
    """A large-tier training test skipped because GEM_SLOW is off (plain verify): allowed."""
    return bool(EXERCISES[name]["large"]) and not full and v["outcome"] == "skipped"


def check_reference(res: dict, problems: list, full: bool = False):
    for n in EXERCISES:
        mine = tests_of(res, grading_file(n))
        if not mine:
            problems.append(f"reference: no grading test of {n} ran\n{res.get('<log>', '')[-1500:]}")
        for k, v in mine.items():
            if v["outcome"] != "passed" and not _slow_skip(n, v, full):
                problems.append(f"reference: {k} {v['outcome']}: {v['message'][:300]}")


def check_cut_all(res: dict, problems: list, full: bool = False):
    """Every exercise cut at once: each grading test fails with its own exercise's error; each listed
    dependent fails only with the error of an exercise that lists it; every other test passes."""
    listed = {}
    for n, e in EXERCISES.items():
        for d in e["depends"] + (FULL_DEPENDS.get(n, []) if full else []):
            listed.setdefault(d, set()).add(n)
    for k, v in res.items():
        if k.startswith("<"):
            if k != "<log>":
                problems.append(f"cut tree: {k}: {v['message'][:500]}")
            continue
        file = k.split("::")[0]
        owner = next((n for n in EXERCISES if file == grading_file(n)), None)
        base = k.split("[")[0]
        allowed = {owner} if owner else (listed.get(k) or listed.get(base, set()))  # one parametrisation, or all
        got = hole_names(v["message"])
        if (owner and _slow_skip(owner, v, full)) or (full and base in PIPELINE):
            continue
        if owner or allowed:
            if v["outcome"] != "failed" or not got or not got <= allowed:
                problems.append(f"cut tree: {k} should fail with exercise {'/'.join(sorted(allowed))}'s "
                                f"NotImplementedError, got {v['outcome']}: {v['message'][:200]}")
        elif v["outcome"] == "failed":
            problems.append(f"cut tree: {k} fails but the manifest lists it under no exercise: {v['message'][:200]} "
                            f"(`python teach.py deps {file}` measures what depends on what)")
    for d, owners in listed.items():
        if not tests_of(res, d):
            problems.append(f"manifest: dependent test {d} (of {', '.join(sorted(owners))}) did not run")


def check_wrong(f: str, res: dict, problems: list):
    """A stored wrong implementation: passes the shape/finiteness test, fails at least one other grading test
    by an assertion (a plausible mistake, caught by a property or the oracle, not by a crash)."""
    name = f.split("__")[0]
    mine = tests_of(res, grading_file(name))
    shape = [v for k, v in mine.items() if k.split("::")[-1].split("[")[0] == SHAPE_TEST]
    caught = [k for k, v in mine.items() if v["outcome"] == "failed" and "AssertionError" in v["message"]]
    if not shape or any(v["outcome"] != "passed" for v in shape):
        problems.append(f"{WRONG}/{f}: should pass {SHAPE_TEST} (a plausible mistake, not a zero), got "
                        f"{[v['message'][:150] for v in shape] or 'no such test'}")
    if score(mine) >= PASS_MARK:
        problems.append(f"{WRONG}/{f}: scores {score(mine)}, at or above the pass mark {PASS_MARK}")
    if not caught:
        problems.append(f"{WRONG}/{f}: no grading test of {name} catches it (a tolerance too loose?): "
                        f"{ {k.split('::')[-1]: v['outcome'] for k, v in mine.items()} }\n{res.get('<log>', '')[-800:]}")


def _verdict(problems: list, t0: float, what: str = "") -> int:
    for p in problems:
        print(f"FAIL {p}")
    print(("verify: OK " if not problems else f"verify: {len(problems)} problem(s) ") + f"{what} in {time.time() - t0:.0f} s")
    return 1 if problems else 0


def cmd_deps(args):
    """For each exercise cut alone: the tests of FILE... that fail with its error (to fill `depends`)."""
    if not args:
        die("deps: give test files, e.g. `python teach.py deps tests/test_model.py`")
    work = tempfile.mkdtemp(prefix="teach-deps-")
    try:
        names = list(EXERCISES)
        jobs = [(make_tree(os.path.join(work, n), cut=[n]), list(args)) for n in names]
        import torch  # noqa: F401
        for n, res in zip(names, run_tests(jobs, parallel=2)):
            res = {k: v for k, v in res.items() if not k.startswith("<")}
            broken = sorted({k.split("[")[0] for k, v in res.items() if n in hole_names(v.get("message", ""))})
            other = sorted(k for k, v in res.items() if v["outcome"] == "failed"
                           and n not in hole_names(v["message"]))
            print(json.dumps({"exercise": n, "depends": broken, "fails_otherwise": other}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["_pytest"]:  # internal: python teach.py _pytest TREE OUT LOG -- pytest args
        return _pytest_child(argv[1], argv[5:], argv[2], argv[3])
    cmds = dict(list=cmd_list, start=cmd_start, grade=cmd_grade, verify=cmd_verify, snapshot=cmd_snapshot,
                calibrate=cmd_calibrate, deps=cmd_deps, package=cmd_package)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in cmds:
        die(f"unknown command {argv[0]!r} (known: {', '.join(cmds)})")
    if argv[0] in ("verify", "snapshot", "calibrate", "deps", "package") and not os.path.isfile(os.path.join(ROOT, ORACLES)):
        die(f"{argv[0]}: the instructor's repository only ({ORACLES} is not in this copy); students use `list` and `grade`")
    return cmds[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
