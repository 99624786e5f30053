"""GEM-mini data: a miniature GEM-4M rendered by our simulator, the tokenizer, the datasets, the demos.

Run:
    python data.py --out data/gem-mini --preset tiny          # VLM data (presets micro, tiny, small)
    python data.py demos --suite all --per-task 20 --out data/demos   # expert demos for the VLA

VLM data layout (ours; DESIGN.md section 3):
    <root>/{train,val,test}.jsonl   {"id","image","depth"(optional),"task","conversations","meta"}
    <root>/images/<id>.png (RGB)    <root>/depth/<id>.png (16-bit, millimetres, 0 = invalid)
    <root>/tokenizer.json  <root>/stats.json (counts per family and type)  <root>/shards/ (restart points)
The released GEM-250K layout is read as it is (split_records, read_jsonl): one GEM-250K.jsonl of LLaVA-style
{"image", "conversations"} records (no id, no task: family OTHER), images of any size (squashed to the model's
square input: load_rgb), depth at <depth root>/depth/<image basename> (depth_by_basename; resized with nearest
neighbour: load_depth), video and multi-image records skipped and counted, val = every 100th record.
Every answer is computed from the simulator state; "meta" holds the machine-readable answer and type
so eval.py scores without parsing the question (and the named objects' 2D boxes, obj_box / ref_box, for
the 2D-rule baseline). Coordinates in text: integers in [0, 1000).
Geometry needs the image: every VLM image has its own camera (VIEW: look-at point, distance, pitch, yaw,
fov; draw_view) and every movable object its own size (SCALE; scale_objects), so neither "how tall" nor
"how far" follows from names or 2D positions (bench/world_check.py measures it). The VLA suites keep
sim_env's one fixed camera. Scenes are split for stage 0 / the recipes / data shares by select_scenes.

Families (DESIGN.md; type names go into meta["type"]; FAMILY_TYPES, TEMPLATES):
  grounding  box, point, place (free spot beside an object), grasp, list      answers "[x1, y1, x2, y2]", "(x, y)"
  reasoning  rel_yn, rel_mc, closer, marked (two drawn marks), distance, height, count, fit
  planning   decompose, next_step, done        trajectory: 5-8 future gripper points
  caption    the visible objects by colour and shape (stage 0's data)       depth: image only, no question
Answers are chosen first where that keeps them balanced (yes/no, letter positions); relations use the
simulator's predicates and are rejected within REL_MARGIN of their threshold. The test split adds
held-out templates and the HELDOUT_COMBOS (colour x shape never in train/val).

Paper -> code map
  GEM-4M mixture: grounding / spatial reasoning / planning, with depth   MAKERS (q_*), gen_shard (MIXTURE)
    training samples records uniformly; shares of records (`python data.py --out /tmp/tinydata --preset tiny`,
    train): grounding 24%, caption 23%, reasoning 23%, planning 22%, trajectory 5%, depth 3%
  varied embodied viewpoints (GEM-4M mixes many cameras)                 VIEW, draw_view, SCALE, scale_objects
  depth for every image (exact here; the paper uses GT or DA3 pseudo-depth)  save_depth_png / load_depth_png
  depth target: inverse depth, 2nd-98th percentile, clip, 1 - x          depth_target
  RGB-reconstruction ablation target                                     rgb_target
  Qwen-VL chat template, loss on assistant tokens only                   encode_chat / encode_prompt
  LLaVA-style JSONL + depth/ folder (GEM-250K layout; depth optional)    split_records / read_jsonl / GemDataset / collate
  invalid depth pixels (0) masked per pixel in L_flow                    depth_target / depth_mask
  GEM-VLA demonstrations, action chunks, state/action normalisation      demo_task / DemoDataset / normalize
  one preprocessing for training and the deployed policy                 obs_to_inputs
  (ours) training batches: stateless sampler, loader-side collation,     sample_indices / StepItems / step_loader
    uint8 images to the device                                           on_device / device_batch
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>"]
IMAGE = "<image>"
# Family weights of the extra questions drawn per frame (_draw_types); record shares: module docstring.
MIXTURE = {"grounding": 0.33, "reasoning": 0.30, "planning": 0.17, "trajectory": 0.10, "depth": 0.05}
FAMILY_TYPES = {
    "grounding": ["box", "point", "place", "grasp", "list"],
    "reasoning": ["rel_yn", "rel_mc", "closer", "marked", "distance", "height", "count", "fit"],
    "planning": ["decompose", "next_step", "done"],
    "trajectory": ["trajectory"], "caption": ["caption"], "depth": ["depth"]}
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
# Tokenizer and chat template (one owner for each, imported by the training scripts and eval.py)

def train_tokenizer(texts, path: str, vocab_size: int = 512):
    """Byte-level BPE on the generated text; digits are split one by one so coordinates are compositional."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the chat template's role words are in every sample: make sure they become single tokens
    tok.train_from_iterator(["user\n", "assistant\n", "\n"] * 1000 + list(texts), trainer)
    tmp = f"{path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: tokenizer file missing (generate data with data.py first)")
    tok = Tokenizer.from_file(path)
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: tokenizer lacks special tokens {missing}")
    return tok


def special_ids(tok) -> dict:
    names = ["pad_id", "im_start_id", "im_end_id", "vision_start_id", "vision_end_id", "image_pad_id"]
    return {n: tok.token_to_id(t) for n, t in zip(names, SPECIAL_TOKENS)}


def _text_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids if text else []


def _user_ids(tok, question: str, n_image_tokens: int, image_first: bool) -> list[int]:
    """`<|im_start|>user\\n<image>\\nQ<|im_end|>\\n` with <image> expanded (or after Q if not image_first)."""
    s = special_ids(tok)
    text = question.replace(IMAGE, "").strip("\n")
    body = _text_ids(tok, text)
    if IMAGE in question:  # the newline between image and text belongs to the text's tokens
        image = [s["vision_start_id"]] + [s["image_pad_id"]] * n_image_tokens + [s["vision_end_id"]]
        sep = "\n" if text else ""
        body = image + _text_ids(tok, sep + text) if image_first else _text_ids(tok, text + sep) + image
    return [s["im_start_id"]] + _text_ids(tok, "user\n") + body + [s["im_end_id"]] + _text_ids(tok, "\n")


def _assistant_head(tok) -> list[int]:
    return [special_ids(tok)["im_start_id"]] + _text_ids(tok, "assistant\n")


def encode_chat(tok, conversations, n_image_tokens: int, image_first: bool = True):
    """Conversations -> (ids, labels); labels are -100 except the assistant's tokens and its <|im_end|>.

    With a real Qwen3 tokenizer (hf preset) the ids equal Qwen3's own chat template (tests/test_hf.py, with
    the template of Qwen3-0.6B) rendered on the same turns, `<image>` replaced by
    `<|vision_start|>` + n_image_tokens x `<|image_pad|>` + `<|vision_end|>` as Qwen-VL's fine-tuning code
    does (Qwen3's text template cannot render image items itself), for `<image>\\nQ` user turns (image_first
    moves an image that stood elsewhere to the front). One deliberate difference: no think
    block. Qwen3's template writes an empty `<think>\\n\\n</think>\\n\\n` before the LAST assistant answer
    (its non-thinking mode); we train and prompt without it, as Qwen3-VL-Instruct's template does, so the
    answer follows `<|im_start|>assistant\\n` directly, and encode_prompt is exactly Qwen3's generation
    prompt (enable_thinking left at its default)."""
    im_end, tail = special_ids(tok)["im_end_id"], _text_ids(tok, "\n")
    ids, labels = [], []
    for turn in conversations:
        if turn["from"] == "human":
            part = _user_ids(tok, turn["value"], n_image_tokens, image_first)
            ids += part
            labels += [-100] * len(part)
        else:
            head, body = _assistant_head(tok), _text_ids(tok, turn["value"]) + [im_end]
            ids += head + body + tail
            labels += [-100] * len(head) + body + [-100] * len(tail)
    return ids, labels


def encode_prompt(tok, question: str, n_image_tokens: int, image_first: bool = True) -> list[int]:
    """The user turn plus `<|im_start|>assistant\\n`: what generation (and the VLA) conditions on."""
    return _user_ids(tok, question, n_image_tokens, image_first) + _assistant_head(tok)


# ----------------------------------------------------------------------------------------------------
# Images, depth targets and coordinates

def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1]: THE image preprocessing (batches, the VLA Policy)."""
    return images.float().div_(127.5).sub_(1.0)




def _resize(x: torch.Tensor, size: int) -> torch.Tensor:  # (C,H,W) -> (C,size,size), area average
    return x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(x[None], (size, size), mode="area")[0]


def depth_target(depth_m: np.ndarray, size: int) -> torch.Tensor:
    """GEM target: inverse depth, normalised to its 2nd-98th percentile, clipped, then 1 - x (near = 0).

    Invalid pixels (depth 0 or not finite) are left out of the percentiles and of the resize (each cell is
    the mean of its valid source pixels); a cell without any is 1 (far), and depth_mask leaves it out of the loss."""
    # >>> exercise: depth_target
    d = np.asarray(depth_m, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    out = np.ones(d.shape, np.float32)
    if valid.any():
        inv = 1.0 / d[valid]
        lo, hi = np.percentile(inv, [2, 98])
        out[valid] = 1.0 - np.clip((inv - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    if valid.all():
        return _resize(torch.from_numpy(out)[None], size)  # (1,size,size)
    w = _resize(torch.from_numpy(valid.astype(np.float32))[None], size)  # share of valid pixels per cell
    t = _resize(torch.from_numpy(out * valid)[None], size) / w.clamp(min=1e-8)
    return torch.where(w > 0, t, torch.ones_like(t))
    # <<< exercise


def depth_mask(depth_m: np.ndarray, size: int) -> torch.Tensor:
    """(1,size,size) bool: the cells of the depth target that the loss trains, those at least half valid."""
    d = np.asarray(depth_m, dtype=np.float64)
    return _resize(torch.from_numpy((np.isfinite(d) & (d > 0)).astype(np.float32))[None], size) >= 0.5


def rgb_target(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The RGB-reconstruction ablation's target: (3,size,size) in [0,1]."""
    return _resize(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0, size)


def save_depth_png(path: str, depth_m: np.ndarray) -> None:
    """Metric depth -> 16-bit PNG in millimetres (0 = invalid; beyond 65.535 m clips)."""
    d = np.asarray(depth_m, dtype=np.float64)
    mm = np.where(np.isfinite(d) & (d > 0), np.round(d * 1000.0), 0).clip(0, 65535).astype(np.uint16)
    Image.fromarray(mm).save(path)


def load_depth_png(path: str) -> np.ndarray:
    """16-bit PNG in millimetres -> float32 metres (0 stays 0 = invalid)."""
    with Image.open(path) as im:
        a = np.array(im)
    if a.ndim != 2 or a.dtype not in (np.uint16, np.int32):  # PIL reads 16-bit PNGs as uint16 or int32
        raise ValueError(f"{path}: not a single-channel 16-bit depth PNG (got {a.dtype} {a.shape})")
    return a.astype(np.float32) / 1000.0


def to_1000(v, size: int) -> int:
    """Continuous pixel coordinate (pixel i covers [i, i+1)) -> integer in [0, 1000) (Qwen-VL style)."""
    return int(min(999, max(0, round(float(v) * 1000.0 / size))))


def fmt_point(p) -> str:
    return f"({p[0]}, {p[1]})"


def fmt_box(b) -> str:
    return f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]"


# ----------------------------------------------------------------------------------------------------
# Reading the JSONL layout (ours or GEM-250K-style) with one-line errors naming file and line

OTHER = "other"  # the family of records that carry no "task" (released GEM-250K): scored by exact match, own row
HOLDOUT_EVERY = 100  # a single JSONL has no val split: the records of every 100th image (~1%, at least one) are val


def parse_depth_root(spec: str) -> list[tuple[str, str]]:
    """--depth_root: "DIR" or "PREFIX=DIR,PREFIX=DIR,DIR" -> [(image path prefix, depth root)], longest prefix
    first; a bare DIR serves every image (the official get_depth_path maps each data source to its root)."""
    out = [tuple(e.split("=", 1)) if "=" in e else ("", e) for e in spec.split(",") if e]
    return sorted(out, key=lambda pr: -len(pr[0]))


def depth_by_basename(image: str, roots: list[tuple[str, str]]) -> str | None:
    """The released layout: <depth root>/depth/<basename of the image> (no field points at it)."""
    root = next((d for pre, d in roots if image.startswith(pre)), None)
    return None if root is None else os.path.join(root, "depth", os.path.basename(image))


def read_jsonl(path: str, image_root: str = "", depth_root: str | None = None, skipped: Counter | None = None) -> list[dict]:
    """Records of a JSONL file (our split files or the released GEM-250K.jsonl), with one-line errors naming
    file and line. Each kept record gets "_where" ("file:line"), "_image" and "_depth" (resolved paths; _depth
    None without depth). Missing "id" -> "<file name>:<line>"; missing "task" -> OTHER. The depth map comes from
    the "depth" field, else (when `depth_root` is given: parse_depth_root) from depth_by_basename if that file
    exists, else there is none (its depth loss is masked). Records with several images, a video or no image are
    left out and counted in `skipped` (reason -> count). Paths are relative to `image_root` (default: the
    JSONL's directory)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: split file missing")
    root, out = image_root or os.path.dirname(path), []
    roots = parse_depth_root(depth_root) if depth_root is not None else None
    skipped = Counter() if skipped is None else skipped
    by_depth = {}  # depth file found by basename -> the image that claimed it first
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON line ({e.msg})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{where}: record is not a JSON object")
            if "conversations" not in r:
                raise ValueError(f"{where}: missing field 'conversations'")
            conv = r["conversations"]
            if not isinstance(conv, list) or not conv or any(
                    not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str)
                    for t in conv):
                raise ValueError(f"{where}: field 'conversations' must be a list of {{from: human|gpt, value: str}}")
            image = r.get("image")
            if isinstance(image, list) and len(image) == 1:
                image = r["image"] = image[0]
            reason = ("video" if "video" in r else "no image" if not image else
                      "several images" if isinstance(image, list) else None)
            if reason:
                skipped[reason] += 1
                continue
            if not isinstance(image, str):
                raise ValueError(f"{where}: field 'image' must be a path (or a list of one path)")
            tags = sum(t["value"].count(IMAGE) for t in conv if t["from"] == "human")
            if tags != 1:
                raise ValueError(f"{where}: {tags} {IMAGE} tags in the human turns for 1 image")
            r.setdefault("id", f"{os.path.basename(path)}:{n}")
            r.setdefault("task", OTHER)
            if r["task"] not in FAMILY_TYPES and r["task"] != OTHER:
                raise ValueError(f"{where}: unknown task family {r['task']!r} (valid: {', '.join(FAMILY_TYPES)}, {OTHER})")
            r["_image"] = os.path.join(root, image)
            if not os.path.isfile(r["_image"]):
                raise FileNotFoundError(f"{where}: image file {r['_image']} missing")
            r["_depth"] = os.path.join(root, r["depth"]) if r.get("depth") else None
            if r["_depth"] is not None and not os.path.isfile(r["_depth"]):
                raise FileNotFoundError(f"{where}: depth file {r['_depth']} missing")
            if r["_depth"] is None and roots is not None:
                d = depth_by_basename(image, roots)
                if d is not None and os.path.isfile(d):
                    first = by_depth.setdefault(d, (image, where))
                    if first[0] != image:
                        raise ValueError(f"{where}: images {first[0]} ({first[1]}) and {image} share the basename, so both "
                                         f"would get the depth map {d}: give each source its own --depth_root=PREFIX=DIR")
                    r["_depth"] = d
            r["_where"] = where
            out.append(r)
    return out


def split_records(source: str, split: str, image_root: str = "", depth_root: str = "",
                  skipped: Counter | None = None) -> list[dict]:
    """A split of a data source: a directory (our layout: <source>/<split>.jsonl) or one JSONL file (the released
    GEM-250K.jsonl: no splits, so val = the records of every HOLDOUT_EVERY-th image and train = the rest; no
    test split).
    For a file, depth is looked up by basename under `depth_root` (default: the file's directory)."""
    if not source.endswith(".jsonl"):
        return read_jsonl(os.path.join(source, f"{split}.jsonl"), image_root, depth_root or None, skipped)
    if split not in ("train", "val"):
        raise ValueError(f"{source}: a single JSONL has the splits train and val (every {HOLDOUT_EVERY}th image), "
                         f"not {split!r}: pass --split=val")
    recs = read_jsonl(source, image_root, depth_root or data_dir(source), skipped)
    # by image, not by record: several records ask about one image, and a val question must be about an image
    # never trained on. Every HOLDOUT_EVERY-th image in a fixed pseudo-random order (crc32 of its path)
    images = sorted({r["image"] for r in recs}, key=lambda x: (zlib.crc32(x.encode()), x))
    val = set(images[::HOLDOUT_EVERY])
    return [r for r in recs if (r["image"] in val) == (split == "val")]


def data_dir(source: str) -> str:
    """The directory a data source lives in (where its cache and tokenizer.json go by default)."""
    return (os.path.dirname(source) or ".") if source.endswith(".jsonl") else source  # a bare file name: the cwd


def load_rgb(path: str, image_size: int | None, where: str) -> np.ndarray:
    """uint8 (S, S, 3). An image of another size or aspect is squashed to the model's square input (bicubic):
    text coordinates are relative (integers in [0, 1000)), so they stay exact."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BICUBIC)
            return np.array(im)
    except Exception as e:  # truncated, not an image, ...
        raise ValueError(f"{path} ({where}): cannot read image ({type(e).__name__}: {e})") from None


def load_depth(path: str, shape, where: str) -> np.ndarray:
    """Metres (H, W) at `shape`; a depth map of another size is resized with nearest neighbour (as the
    official loader does: no blend of near and far, invalid zeros stay zeros)."""
    try:
        d = load_depth_png(path)
    except Exception as e:
        raise ValueError(f"{path} ({where}): cannot read depth PNG ({type(e).__name__}: {e})") from None
    if d.shape != tuple(shape):
        d = np.array(Image.fromarray(d).resize((shape[1], shape[0]), Image.NEAREST))
    return d


def scene_of(r: dict) -> str:
    """The scene (expert rollout) a record's image comes from: its frame id minus the time step."""
    frame = (r.get("meta") or {}).get("frame")
    return frame.rsplit("-", 1)[0] if frame else r["image"]


def select_scenes(records: list[dict], lo: float, hi: float) -> list[dict]:
    """The records of the scenes ranked [lo, hi) (fractions) in a fixed pseudo-random order (crc32 of the
    scene id): disjoint ranges give disjoint scenes, and [0, a) is inside [0, b) for a < b."""
    scenes = sorted({scene_of(r) for r in records}, key=lambda x: (zlib.crc32(x.encode()), x))
    keep = set(scenes[round(lo * len(scenes)):round(hi * len(scenes))])
    return [r for r in records if scene_of(r) in keep]


CACHE_VERSION = 4  # bump whenever what the cache holds, or how it is computed, changes


class GemDataset(torch.utils.data.Dataset):
    """One record -> model inputs: chat-templated ids/labels, image tensor, depth and RGB targets.

    `source` is a data directory (our layout) or one JSONL file (the released GEM-250K layout): split_records.
    Records without depth get depth_valid False and a zero target, and pixels without depth (0 in the PNG)
    a False depth_mask: the depth loss is masked for both. `skipped` counts the records left out (several
    images, video, longer than max_len tokens: drop_long) and `no_depth` those without a depth map. `families` keeps only those task families; `scenes` = (lo, hi) only those scenes
    (select_scenes); `blind` replaces every image by one constant grey image (the blind baseline).

    cache=True decodes the split once (build_cache: images at the model's size, depth in millimetres, both
    targets at the head's size, token ids and labels, as memory-mapped .npy files under <root>/cache, or
    `cache_root`; the directory of a JSONL source) and reads every item from there: the same tensors as from the PNGs, without the PNG
    decoding, percentiles, resizes and tokenisation per sample per step. Cached items are views of the
    (copy-on-write) maps: collate copies them; do not modify an item's tensors in place."""

    def __init__(self, source, split, tok, image_size, n_image_tokens, head_size, families=None,
                 image_first=True, max_len=512, scenes=None, blind=False, cache=False, cache_root=None,
                 image_root="", depth_root=""):
        self.tok, self.image_size, self.n_image_tokens = tok, image_size, n_image_tokens
        self.head_size, self.image_first, self.max_len, self.blind = head_size, image_first, max_len, blind
        self.skipped = Counter()
        recs = split_records(source, split, image_root, depth_root, self.skipped)
        self.n_read = len(recs)  # before any filter: an empty split is the data's fault, not the filters'
        self.no_depth = sum(r["_depth"] is None for r in recs)
        self.arrays = None
        if cache:  # every record of the split is cached (one cache serves every --families / --scenes)
            self.arrays = build_cache(self, recs, os.path.join(cache_root or os.path.join(data_dir(source), "cache"), split))
            for k, r in enumerate(recs):
                r["_row"] = k
        if scenes is not None:
            recs = select_scenes(recs, *scenes)
        if families is not None:
            bad = [f for f in families if f not in FAMILY_TYPES and f != OTHER]
            if bad:
                raise ValueError(f"families: unknown task family {bad[0]!r} (valid: {', '.join(FAMILY_TYPES)}, {OTHER})")
            recs = [r for r in recs if r["task"] in families]
        self.records = self.drop_long(recs)

    def __len__(self):
        return len(self.records)

    def load_image(self, r):
        return load_record_image(r, self.image_size)

    def encode(self, r):
        """Token ids and labels of a record's whole conversation (never cut: see drop_long)."""
        return encode_chat(self.tok, r["conversations"], self.n_image_tokens, self.image_first)

    def drop_long(self, recs: list[dict]) -> list[dict]:
        """The records of at most max_len tokens. A longer one is left out whole, never cut (a cut answer
        loses its end and its <|im_end|>, which the model then never learns to write), and counted in
        `skipped`; `too_long` = (count, longest length) for the caller's warning. The image must fit."""
        if self.arrays is not None:
            lengths = np.diff(self.arrays["offsets"])[[r["_row"] for r in recs]]
        else:
            lengths = np.array([len(self.encode(r)[0]) for r in recs], np.int64)
        over = lengths > self.max_len
        if over.any():
            r = recs[int(np.argmax(lengths))]
            if self.encode(r)[0].index(special_ids(self.tok)["vision_end_id"]) >= self.max_len:
                raise ValueError(f"{r['_where']}: the image tokens do not fit in max_len={self.max_len}")
            self.skipped[f"longer than max_len={self.max_len} tokens"] += int(over.sum())
        self.too_long = (int(over.sum()), int(lengths.max()) if len(lengths) else 0)
        return [r for r, o in zip(recs, over) if not o]

    def __getitem__(self, i):
        r = self.records[i]
        if self.arrays is None:
            rgb, depth, valid = self.load_image(r)
            ids, labels = self.encode(r)
            target = depth_target(depth, self.head_size) if valid else torch.zeros(1, self.head_size, self.head_size)
            mask = depth_mask(depth, self.head_size)
            rgb_t = rgb_target(rgb, self.head_size)
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # uint8 (3,S,S): collate makes pixel_values
        else:
            a, k = self.arrays, r["_row"]
            j, (lo, hi) = int(a["image_of"][k]), a["offsets"][k:k + 2]
            image, valid = torch.from_numpy(a["images"][j]), bool(a["depth_valid"][j])  # (3,S,S) uint8 view
            depth = a["depth_mm"][j].astype(np.float32) / 1000.0  # exactly load_depth_png's conversion
            ids, labels = torch.from_numpy(a["ids"][lo:hi].astype(np.int64)), torch.from_numpy(a["labels"][lo:hi].astype(np.int64))
            target, rgb_t = torch.from_numpy(a["depth_target"][j]), torch.from_numpy(a["rgb_target"][j])
            mask = torch.from_numpy(a["depth_mask"][j])
        if self.blind:
            image = torch.full_like(image, 128)
            rgb_t = rgb_target(image.permute(1, 2, 0).numpy(), self.head_size)
        conv = r["conversations"]
        question = next((t["value"] for t in conv if t["from"] == "human"), "")
        meta = r.get("meta") or {}
        return dict(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), image=image,
                    depth_target=target, depth_mask=mask, rgb_target=rgb_t, depth_valid=valid, depth_m=torch.from_numpy(depth),
                    id=r["id"], task=r["task"], type=meta.get("type", r["task"]), question=question.replace(IMAGE, "").strip(),
                    answer=next((t["value"] for t in conv if t["from"] == "gpt"), ""), meta=meta)


CACHE_CHUNK = 256  # images per cache-building job
CACHE_ARRAYS = ("images", "depth_mm", "depth_valid", "depth_target", "depth_mask", "rgb_target", "image_of", "ids", "labels", "offsets")


# the functions that compute what a cache holds: their source is part of its key, so changed code (a fixed
# depth_target, an exercise solved) is a new cache, never the old arrays (no CACHE_VERSION bump to forget)
CACHE_CODE = ("load_record_image", "load_rgb", "load_depth", "load_depth_png", "depth_target", "depth_mask", "rgb_target",
              "encode_chat", "_text_ids", "_user_ids", "_assistant_head", "_cache_rows", "build_cache")
DEMO_CACHE_CODE = ("_render_frames", "depth_target", "build_demo_cache")


def code_key(names: tuple) -> str:
    """A hash of the source of this module's functions `names` (as they are bound now)."""
    import hashlib
    import inspect
    return hashlib.sha256("".join(inspect.getsource(globals()[n]) for n in names).encode()).hexdigest()[:16]


def cache_key(ds: GemDataset, records: list[dict]) -> str:
    """What the cached content depends on: the split's records, every image / depth file (size and mtime),
    the tokenizer, the sizes and prompt settings, the code that fills it (CACHE_CODE), CACHE_VERSION.
    Another key = another cache directory."""
    import hashlib
    h = hashlib.sha256(json.dumps(dict(version=CACHE_VERSION, image_size=ds.image_size, head_size=ds.head_size,
                                       n_image_tokens=ds.n_image_tokens, image_first=ds.image_first, code=code_key(CACHE_CODE),
                                       resize="area; image bicubic; depth nearest", tokenizer=ds.tok.to_str()), sort_keys=True).encode())
    for r in records:
        h.update(json.dumps({k: v for k, v in r.items() if k not in ("_where", "_row")}, sort_keys=True).encode())
        for key in ("_image", "_depth"):
            if r[key]:
                st = os.stat(r[key])
                h.update(f"{r[key]}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_record_image(r: dict, size: int):
    """A record's files -> uint8 RGB (S,S,3), metric depth (S,S) (zeros without depth), depth valid."""
    rgb = load_rgb(r["_image"], size, r["_where"])
    if r["_depth"]:
        depth = load_depth(r["_depth"], rgb.shape[:2], r["_where"])
        return rgb, depth, bool((depth > 0).any())
    return rgb, np.zeros(rgb.shape[:2], np.float32), False


def _cache_rows(job) -> None:
    """Rows of a cache being built in `tmp`, from their images' files (one worker's share; see build_cache)."""
    tmp, rows, S, H = job
    a = {k: np.load(os.path.join(tmp, k + ".npy"), mmap_mode="r+") for k in CACHE_ARRAYS[:6]}
    for j, r in rows:
        rgb, depth, valid = load_record_image(r, S)
        a["images"][j], a["depth_mm"][j], a["depth_valid"][j] = rgb.transpose(2, 0, 1), np.round(depth * 1000.0).astype(np.uint16), valid
        a["depth_target"][j] = depth_target(depth, H).numpy() if valid else 0.0
        a["depth_mask"][j] = depth_mask(depth, H).numpy()
        a["rgb_target"][j] = rgb_target(rgb, H).numpy()
    for m in a.values():
        m.flush()


def build_cache(ds: GemDataset, records: list[dict], prefix: str, workers: int | None = None) -> dict:
    """Memory-mapped arrays of every record (built once through the dataset's own file path, written to
    a temporary directory and renamed into place, so a cache is whole or absent) -> {name: array}. The images
    are decoded by `workers` processes (default: one per 500 images, up to the CPU count; ~5 ms an image)."""
    path = f"{prefix}-{cache_key(ds, records)}"
    if not os.path.isdir(path):
        images = sorted({r["_image"] for r in records})
        first = {}
        for r in records:
            first.setdefault(r["_image"], r)
        row = {im: j for j, im in enumerate(images)}
        S, H, n = ds.image_size, ds.head_size, len(images)
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name, shape, dt in (("images", (n, 3, S, S), np.uint8), ("depth_mm", (n, S, S), np.uint16),
                                ("depth_valid", (n,), np.bool_), ("depth_target", (n, 1, H, H), np.float32),
                                ("depth_mask", (n, 1, H, H), np.bool_), ("rgb_target", (n, 3, H, H), np.float32)):
            np.lib.format.open_memmap(os.path.join(tmp, name + ".npy"), "w+", dt, shape).flush()
        files = [(j, {k: first[im][k] for k in ("_image", "_depth", "_where")}) for j, im in enumerate(images)]
        jobs = [(tmp, files[lo:lo + CACHE_CHUNK], S, H) for lo in range(0, n, CACHE_CHUNK)]
        workers = max(1, min(os.cpu_count() or 1, n // 500)) if workers is None else workers
        try:
            _run_jobs(_cache_rows, jobs, workers, total=len(jobs), desc=f"caching {n} images", disable=len(jobs) < 4)
            enc = [ds.encode(r) for r in records]
            np.save(os.path.join(tmp, "ids.npy"), np.array([t for ids, _ in enc for t in ids], np.int32))
            np.save(os.path.join(tmp, "labels.npy"), np.array([t for _, lab in enc for t in lab], np.int32))
            np.save(os.path.join(tmp, "offsets.npy"), np.cumsum([0] + [len(ids) for ids, _ in enc]).astype(np.int64))
            np.save(os.path.join(tmp, "image_of.npy"), np.array([row[r["_image"]] for r in records], np.int32))
        except BaseException:  # a failed build (a corrupt image, Ctrl-C) leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, path)
        except OSError:  # another process built the same cache first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    # plain ndarray views of the maps (indexing a np.memmap subclass costs ~10 us per access), copy-on-write
    # ("c"): items are zero-copy tensor views (collate's stack makes the one copy), and no write reaches the files
    return {k: np.asarray(np.load(os.path.join(path, k + ".npy"), mmap_mode="c")) for k in CACHE_ARRAYS}


def collate(batch, pad_id: int, pixels: bool = True) -> dict:
    """Right-pad ids (pad_id) and labels (-100); stack tensors; keep strings and meta as lists. The uint8
    images become the batch's pixel_values in one conversion (a quarter of the bytes to stack); pixels=False
    keeps them uint8 as "images" (training converts them on its device: a quarter of the bytes to copy)."""
    T = max(len(b["input_ids"]) for b in batch)
    out = {"input_ids": torch.full((len(batch), T), pad_id, dtype=torch.long),
           "labels": torch.full((len(batch), T), -100, dtype=torch.long),
           "attention_mask": torch.zeros(len(batch), T, dtype=torch.bool)}
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n], out["attention_mask"][i, :n] = b["input_ids"], True
        if "labels" in b:
            out["labels"][i, :n] = b["labels"]
    for k, v in batch[0].items():
        if k in out:
            continue
        if k == "image":
            images = torch.stack([b[k] for b in batch])  # (B, 3, S, S) uint8
            if pixels:
                out["pixel_values"] = to_pixel_values(images)
            else:
                out["images"] = images
        elif isinstance(v, torch.Tensor):
            out[k] = torch.stack([b[k] for b in batch])
        elif isinstance(v, bool):
            out[k] = torch.tensor([b[k] for b in batch])
        else:
            out[k] = [b[k] for b in batch]
    return out


# ----------------------------------------------------------------------------------------------------
# Training batches: a seeded, stateless sampler (position -> sample, so resume and every recipe see the same
# order), collation in the loader's worker processes, and the way to the device (train_pretrain, train_vla)

def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Samples at global positions [start, start+count) of an endless stream of seeded epoch permutations."""
    return [_epoch_order(n, seed, p // n)[p % n] for p in range(start, start + count)]


@functools.lru_cache(maxsize=2)  # a step's samples span at most two epochs; drawing the order each step cost ~1 ms
def _epoch_order(n: int, seed: int, epoch: int) -> tuple:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist())


class StepItems(torch.utils.data.Dataset):
    """Step k -> this rank's micro-batches of samples at step start + k, each item tagged with its global
    position ("pos"), and put together by `collate` (items -> what the training loop takes) where the step is
    loaded: in the loader's worker processes, off the loop's critical path. The sampler is stateless, so
    workers can load steps ahead without changing what any step sees (resume and DDP stay exact)."""

    def __init__(self, ds, seed, start, total, gbatch, world, rank, bs, accum, collate=None):
        self.ds, self.seed, self.start, self.total, self.gbatch = ds, seed, start, total, gbatch
        self.world, self.rank, self.bs, self.accum, self.collate = world, rank, bs, accum, collate

    def __len__(self):
        return self.total - self.start

    def __getitem__(self, k):
        first = (self.start + k) * self.gbatch
        idx = sample_indices(len(self.ds), self.seed, first, self.gbatch)
        mbs = [[dict(self.ds[idx[j]], pos=first + j) for j in range(lo, lo + self.bs)]  # only this rank's samples
               for lo in ((m * self.world + self.rank) * self.bs for m in range(self.accum))]
        return [self.collate(mb) for mb in mbs] if self.collate else mbs


def _as_is(x):  # DataLoader collate_fn: keep the step's list of micro-batches (module level: picklable)
    return x


def step_loader(steps: StepItems, workers: int, pin: bool = False):
    """Iterator over the steps' micro-batches, loaded by `workers` processes ahead of the training loop (pin:
    into page-locked memory, from which the copies to the GPU run while the GPU computes)."""
    return iter(torch.utils.data.DataLoader(steps, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                            prefetch_factor=4 if workers else None, pin_memory=pin))


def length_chunks(items: list) -> list:
    """Split a batch in two by length when that saves >25% of the padded tokens: a few long samples (object
    lists, trajectories) would otherwise pad the whole batch to 3x its mean length. The loss is token-summed
    and normalised by global counts, so the gradient is that of the whole batch."""
    items = sorted(items, key=lambda it: len(it["input_ids"]))
    L = [len(it["input_ids"]) for it in items]
    n = len(L)
    cost, c = min((c * L[c - 1] + (n - c) * L[-1], c) for c in range(1, n + 1))
    return [items[:c], items[c:]] if c < n and cost < 0.75 * n * L[-1] else [items]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def on_device(b: dict, device) -> dict:
    """A host batch on `device`: the images travel as uint8, a quarter of the bytes of floats, and become
    pixel_values where the model runs (training's way in, VLM and VLA)."""
    b = to_device(b, device)
    b["pixel_values"] = to_pixel_values(b.pop("images"))
    return b


def device_batch(items: list, pad_id: int, device) -> dict:
    """Items -> a collated batch on `device` (on_device of data.collate's uint8 batch)."""
    return on_device(collate(items, pad_id, pixels=False), device)


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
# footprint scale and a separate height scale, so "how tall is the red can" has no answer in its name.
SCALE = dict(uniform=(0.7, 1.45), xy=(0.8, 1.25), z=(0.55, 1.6))


def rle_encode(mask: np.ndarray) -> list[int]:
    """Bool (H,W) mask -> [start, length, ...] over the row-major flattened image (compact, for meta)."""
    m = np.concatenate([[0], mask.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return [int(v) for s, e in zip(edges[::2], edges[1::2]) for v in (s, e - s)]


def rle_decode(rle, shape) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), bool)
    for s, n in zip(rle[::2], rle[1::2]):
        flat[s:s + n] = True
    return flat.reshape(shape)


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
        names = [o["name"] for o in self.objs]
        min_px = MIN_VISIBLE * self.S * self.S
        self.visible = [o for o in self.objs if o["visible_px"] >= min_px and o["box2d"] is not None]
        self.all_visible = len(self.visible) == len(self.objs)
        self.refs = [o for o in self.visible if names.count(o["name"]) == 1]  # unambiguous by name

    def template(self, typ, **kw) -> str:
        train, held = TEMPLATES[typ]
        self.held = self.split == "test" and self.rng.random() < 0.5
        return self.one(held if self.held else train).format(**kw)

    def one(self, seq):
        return seq[self.rng.integers(len(seq))]

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
        import sim_env
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
    import sim_env
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


def q_rel_yn(sc):
    want = bool(sc.rng.random() < 0.5)  # choose the answer first: yes/no stay balanced
    for rel in map(str, sc.rng.permutation(list(RELATIONS))):
        pairs = [(a, b) for a in sc.refs for b in sc.refs if a is not b and _rel_ok(b, rel) and _clear(a, b, rel) is want]
        if pairs:
            a, b = sc.one(pairs)
            q, ans = sc.template("rel_yn", a=a["name"], b=b["name"], rel=RELATIONS[rel]), "yes" if want else "no"
            return q, ans, dict(answer=ans, obj=a["id"], ref=b["id"], rel=rel)
    return None


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
    for rel in map(str, sc.rng.permutation(list(RELATIONS))):
        for b in (sc.refs[i] for i in sc.rng.permutation(len(sc.refs))):
            others = [o for o in sc.refs if o is not b] if _rel_ok(b, rel) else []
            pos = [o for o in others if _clear(o, b, rel) is True]
            neg = [o for o in others if _clear(o, b, rel) is False]
            if pos and neg:  # one true option, the others clearly false
                a = sc.pick(pos)
                opts, letter = _choices(sc, a["name"], [o["name"] for o in neg])
                q = sc.template("rel_mc", b=b["name"], rel=RELATIONS[rel], choices=_lettered(opts))
                return q, letter, dict(answer=letter, choices=opts, obj=a["id"], ref=b["id"], rel=rel)
    return None


def q_closer(sc):
    want = bool(sc.rng.random() < 0.5)
    # the centres' depths must differ clearly AND agree with what the visible pixels show
    z = {o["id"]: (sc.cam_z(o["pos"]), np.median(sc.depth[sc.mask(o)])) for o in sc.refs}
    pairs = [(a, b) if want else (b, a) for a in sc.refs for b in sc.refs if a is not b
             and z[b["id"]][0] - z[a["id"]][0] >= 0.03 and z[b["id"]][1] - z[a["id"]][1] >= 0.01]
    if not pairs:
        return None
    a, b = sc.one(pairs)
    q, ans = sc.template("closer", a=a["name"], b=b["name"]), "yes" if want else "no"
    return q, ans, dict(answer=ans, obj=a["id"], ref=b["id"])


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
    if len(sc.refs) < 2:
        return None
    a, b = sc.pick(sc.refs, 2)
    cm = int(round(100 * math.hypot(a["pos"][0] - b["pos"][0], a["pos"][1] - b["pos"][1])))
    return sc.template("distance", a=a["name"], b=b["name"]), str(cm), dict(answer=cm, obj=a["id"], ref=b["id"])


def q_height(sc):
    import sim_env  # movable objects only: a plate or tray has one size, which its name gives away
    cands = [o for o in sc.refs if o["shape"] in sim_env.SHAPES]
    if not cands:
        return None
    o = sc.pick(cands)
    cm = int(round(200 * o["half_extents"][2]))
    if cm < 1:
        return None
    return sc.template("height", a=o["name"]), str(cm), dict(answer=cm, obj=o["id"])


def q_count(sc):
    if not sc.all_visible:  # a hidden object would make the count unanswerable from the image
        return None
    kinds = [("objects", lambda o: True)]
    kinds += [(f"{c} objects", lambda o, c=c: o["colour"] == c) for c in sorted({o["colour"] for o in sc.objs})]
    kinds += [(plural(s), lambda o, s=s: o["shape"] == s) for s in sorted({o["shape"] for o in sc.objs})]
    what, f = sc.one(kinds)
    n = sum(map(f, sc.objs))
    return sc.template("count", what=what), str(n), dict(answer=n, what=what)


def fits(a, b):
    """True / False when a's footprint clearly fits within b's (any orientation) or clearly cannot; else None."""
    (amin, amax), (bmin, bmax) = (sorted(2 * h for h in o["half_extents"][:2]) for o in (a, b))
    if amax + 0.005 <= bmin:
        return True
    if amin >= bmax + 0.005:
        return False
    return None


def q_fit(sc):
    want = bool(sc.rng.random() < 0.5)
    pairs = [(a, b) for a in sc.refs for b in sc.refs if a is not b and fits(a, b) is want]
    if not pairs:
        return None
    a, b = sc.one(pairs)
    q, ans = sc.template("fit", a=a["name"], b=b["name"], prep="in" if b["shape"] == "tray" else "on"), "yes" if want else "no"
    return q, ans, dict(answer=ans, obj=a["id"], ref=b["id"])


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
    import sim_env  # by colour, then shape: a canonical order that carries no spatial information
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
    frames: int = 5  # images per rollout: the start, frames - 2 mid-rollout frames, the success frame
    reduce: float = 0.7  # share of rollouts whose scene loses some distractors (2-5 objects)
    questions: int = 3  # questions per image, families drawn by MIXTURE (+ one caption per image)
    round_robin: bool = False  # cycle through every type instead of drawing (micro: covers all types)
    shard: int = 8  # rollouts per shard: the unit of restart
    workers: int = 2
    vocab_size: int = 512


GEN_PRESETS = {
    "micro": dict(image_size=64, train_rollouts=4, val_rollouts=1, test_rollouts=2, frames=3, questions=5,
                  round_robin=True, shard=2, workers=1, vocab_size=384),
    # tiny: 360 train scenes, 1/3 of them for stage 0 only (reproduce.py --base_share), ~45 test questions per reasoning type
    "tiny": dict(image_size=64, train_rollouts=360, test_rollouts=80),
    "small": dict(image_size=128, train_rollouts=2000, val_rollouts=60, test_rollouts=200, frames=5, vocab_size=1024),
}
SPLITS = ("train", "val", "test")
# simulator seeds, disjoint by construction (generate refuses more rollouts than fit): split s uses
# [SEED_BASE[s], + ATTEMPTS * rollouts), below the next split's, then the demos (demo_seed), then the eval states
SEED_BASE, ATTEMPTS = {"train": 0, "val": 300_000, "test": 600_000}, 20


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
    import sim_env
    objs, start = [], []
    for o, st in zip(state["objects"], state["start"]):
        if o["shape"] in sim_env.SHAPES:
            s = float(rng.uniform(*SCALE["uniform" if o["shape"] in ("cube", "ball") else "xy"]))
            sz = s if o["shape"] in ("cube", "ball") else float(rng.uniform(*SCALE["z"]))
            h = [o["half_extents"][0] * s, o["half_extents"][1] * s, o["half_extents"][2] * sz]
            lift = h[2] - o["half_extents"][2]  # same support, new half height
            o, st = dict(o, half_extents=h, pos=[o["pos"][0], o["pos"][1], o["pos"][2] + lift]), [st[0], st[1], st[2] + lift]
        objs.append(o), start.append(st)
    ext = [sim_env._ext(o["shape"], o["half_extents"], o["yaw"]) for o in objs]
    for i in range(len(objs)):
        for j in range(i):
            d = np.abs(np.subtract(objs[i]["pos"][:2], objs[j]["pos"][:2])) - ext[i][:2] - ext[j][:2]
            if d.max() < 0.01:
                return None
    return dict(state, objects=objs, start=start)


def _env(cache, suite, task_id, image_size, render=True):
    import sim_env
    key = (suite, task_id, image_size, render)
    if key not in cache:
        cache[key] = sim_env.TabletopEnv(suite, task_id, image_size=image_size, render_images=render)
    return cache[key]


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


def frame_records(sc, fid, types, out):
    """Records for one frame. A type with no unambiguous question here falls back to its family's others."""
    recs = []
    for j, typ in enumerate(types):
        sid = f"{fid}-{j}"
        rec = dict(id=sid, image=f"images/{fid}.png", depth=f"depth/{fid}.png", task=TYPE_FAMILY[typ])
        if typ == "depth":  # the image alone, for the depth head
            recs.append(dict(rec, conversations=[{"from": "human", "value": IMAGE}], meta=dict(type="depth", frame=fid)))
            continue
        fam = FAMILY_TYPES[TYPE_FAMILY[typ]]
        for alt in [typ] + [t for t in sc.rng.permutation(fam).tolist() if t != typ]:
            sc.marked = None
            made = MAKERS[alt](sc) if (alt != "done" or typ == "done") else None
            if made:
                break
        if not made:
            continue
        q, a, meta = made
        for k in ("obj", "ref"):  # the objects' 2D boxes: what the 2D-rule baseline (eval.py rules) may see
            o = next((o for o in sc.visible if o["id"] == meta.get(k)), None)
            if o is not None:
                meta[f"{k}_box"] = sc.box(o)
        if sc.marked is not None:  # markers drawn on a copy of the frame: its own image file
            rec["image"] = f"images/{sid}.png"
            Image.fromarray(sc.marked).save(os.path.join(out, rec["image"]))
        rec.update(conversations=[{"from": "human", "value": f"{IMAGE}\n{q}"}, {"from": "gpt", "value": a}],
                   meta=dict(type=alt, frame=fid, **meta, heldout_template=sc.held))
        recs.append(rec)
    return recs


def gen_shard(job):
    """Write one shard: images, depth maps, simulator states, and last (atomically) the shard's JSONL."""
    cfg, split, k = job
    import sim_env
    out, S = cfg["out"], cfg["image_size"]
    rng = np.random.default_rng([cfg["seed"], SPLITS.index(split), k])
    pairs = [(s, t) for s in sim_env.SUITES for t in range(len(sim_env.SUITES[s]))]
    records, cache, rr = [], {}, {}
    for r in range(k * cfg["shard"], min(cfg[f"{split}_rollouts"], (k + 1) * cfg["shard"])):
        for attempt in range(ATTEMPTS):  # train/val never show a held-out colour x shape combination
            suite, task_id = pairs[int(rng.integers(len(pairs)))]
            env = _env(cache, suite, task_id, S, render=False)
            env.reset(seed=SEED_BASE[split] + ATTEMPTS * r + attempt)
            start = env.get_state()
            # spatial tasks' instructions name their landmarks and distractors: those scenes stay whole
            if suite != "spatial" and rng.random() < cfg["reduce"]:
                start = reduce_scene(start, env.task, rng)
            start = scale_objects(start, rng)
            if start is None:  # resized objects would touch
                continue
            states, subgoals, ok = expert_rollout(env, start)
            combos = {(o["colour"], o["shape"]) for o in start["objects"]}
            if ok and (split == "test" or not combos & HELDOUT_COMBOS):
                break
        else:  # never with the real expert; a failed rollout, touching resized objects or a held-out combination is never written
            raise RuntimeError(f"gen_shard: {split} rollout {r}: no successful expert rollout (with non-touching resized objects) "
                               f"without a held-out colour x shape in seeds {SEED_BASE[split] + ATTEMPTS * r}..{SEED_BASE[split] + ATTEMPTS * (r + 1) - 1}")
        renv, T = _env(cache, suite, task_id, S), len(states) - 1
        grip = [st["grip"][:3] for st in states]
        ts = sorted(rng.choice(np.arange(1, T), size=min(cfg["frames"] - 2, T - 1), replace=False).tolist())
        for t in [0] + ts + [T]:  # the start, a few mid-rollout frames, and the success frame
            st = dict(states[t], aug=draw_view(rng))  # this image's own camera
            obs, info = renv.reset(options={"state": st})
            fid = f"{split}-{r:05d}-{t:03d}"
            instr = env.task.instruction(rng, heldout=split == "test" and bool(rng.random() < 0.5))
            sc = Scene(obs, info, split, rng, task=env.task, future=grip[t:], success=t == T,
                       subgoal=subgoals[t], instr=instr)
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
            for rec in frame_records(sc, fid, types, out):
                rec["meta"].update(suite=suite, task_id=int(task_id), t=t)
                records.append(rec)
    # a shard file exists only once the shard is complete
    _write_atomic(os.path.join(out, "shards", f"{split}-{k:04d}.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return split, k, len(records)


def generate(cfg: GenConfig) -> dict:
    """Generate (or finish generating) a dataset; returns the stats also written to stats.json."""
    import sim_env
    c = dataclasses.asdict(cfg)
    for s, end in zip(SPLITS, [SEED_BASE["val"], SEED_BASE["test"], DEMO_SEED_BASE]):  # seed ranges stay disjoint
        if not 0 <= c[f"{s}_rollouts"] <= (end - SEED_BASE[s]) // ATTEMPTS:
            raise SystemExit(f"error: --{s}_rollouts={c[f'{s}_rollouts']} out of range 0..{(end - SEED_BASE[s]) // ATTEMPTS} "
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
    _write_atomic(cfg_path, json.dumps(recipe, indent=1))
    jobs = [(c, s, k) for s in SPLITS for k in range(math.ceil(c[f"{s}_rollouts"] / cfg.shard))]
    shard_file = lambda s, k: os.path.join(cfg.out, "shards", f"{s}-{k:04d}.jsonl")
    todo = [j for j in jobs if not os.path.isfile(shard_file(j[1], j[2]))]  # finished shards are kept
    _run_jobs(gen_shard, todo, cfg.workers, total=len(jobs), desc="shards", disable=cfg.preset == "micro")
    stats, texts = {"config": c, "splits": {}}, []
    for s in SPLITS:
        recs = []
        for _, _, k in [j for j in jobs if j[1] == s]:
            with open(shard_file(s, k)) as f:
                recs += [json.loads(line) for line in f]
        _write_atomic(os.path.join(cfg.out, f"{s}.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
        stats["splits"][s] = dict(samples=len(recs), images=len({r["image"] for r in recs}),
                                  families=dict(Counter(r["task"] for r in recs)),
                                  types=dict(Counter(r["meta"]["type"] for r in recs)))
        if s == "train":
            texts = [t["value"].replace(IMAGE, "") for r in recs for t in r["conversations"]]
    # the VLA's training instructions must tokenize compactly too
    texts += [VLA_PROMPT.format(instr=t) for ts in sim_env.SUITES.values() for task in ts for t in task.templates]
    train_tokenizer(texts, os.path.join(cfg.out, "tokenizer.json"), cfg.vocab_size)
    _write_atomic(os.path.join(cfg.out, "stats.json"), json.dumps(stats, indent=1))
    return stats


def _one_thread():  # a pool worker: the pool is the parallelism (and a forked torch must not reuse its thread pool)
    torch.set_num_threads(1)


def _run_jobs(fn, jobs, workers: int, total: int, **bar_kw) -> None:
    """fn(job) for every job, in worker processes when workers > 1, with a tqdm bar over `total` jobs."""
    from tqdm import tqdm
    with tqdm(total=total, initial=total - len(jobs), **bar_kw) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp  # fork where available (cheap, inherits imports), else spawn
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, _one_thread) as pool:
                for _ in pool.imap_unordered(fn, jobs):
                    bar.update()
        else:
            for j in jobs:
                fn(j)
                bar.update()


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


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
    import sim_env
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
    import sim_env
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
    import sim_env
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
    _run_jobs(demo_task, jobs, cfg.workers, total=len(jobs), desc="demo tasks", disable=len(jobs) < 4)
    return compute_norm_stats(cfg.out)


class _LazyList(Sequence):
    """A JSON list parsed on first use (parsing demo sim_states is most of a demo folder's load time)."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def value(self) -> list:
        return json.loads(self.text)

    def __getitem__(self, i):
        return self.value[i]

    def __len__(self):
        return len(self.value)


def load_episode(path: str, parse_states: bool = True) -> dict:
    """One demo episode; with parse_states=False, sim_states is parsed on first access."""
    try:
        z = np.load(path, allow_pickle=False)
        ep = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path}: cannot read demo episode ({type(e).__name__}: {e})") from None
    for k in ("actions", "states", "sim_states", "instruction", "suite", "task_id"):
        if k not in ep:
            raise ValueError(f"{path}: demo episode lacks field {k!r}")
    ep["sim_states"] = json.loads(str(ep["sim_states"])) if parse_states else _LazyList(str(ep["sim_states"]))
    ep["instruction"], ep["suite"], ep["task_id"] = str(ep["instruction"]), str(ep["suite"]), int(ep["task_id"])
    return ep


def episode_files(root: str) -> list[str]:
    files = sorted(f for f in os.listdir(root) if f.endswith(".npz") and ".tmp" not in f) if os.path.isdir(root) else []
    if not files:
        raise FileNotFoundError(f"{root}: no demo episodes (*.npz); run `python data.py demos --out {root}`")
    return [os.path.join(root, f) for f in files]


def compute_norm_stats(root: str) -> dict:
    """Mean/std of states and actions over all demo steps -> <root>/norm_stats.json."""
    stats = norm_stats([load_episode(p, parse_states=False) for p in episode_files(root)])
    _write_atomic(os.path.join(root, "norm_stats.json"), json.dumps(stats, indent=1))
    return stats


def norm_stats(eps: list[dict]) -> dict:
    """Mean/std (and range) of states and actions over the steps of these episodes (train_vla: the training
    episodes only, never the held-out ones)."""
    stats = {}
    for key, name in (("state", "states"), ("action", "actions")):
        x = np.concatenate([e[name] for e in eps]).astype(np.float64)
        # constant dimensions (e.g. roll/pitch never used) get std 1 so they pass through unchanged
        std = x.std(0)
        stats[key] = dict(mean=x.mean(0).tolist(), std=np.where(std < 1e-6, 1.0, std).tolist(),
                          min=x.min(0).tolist(), max=x.max(0).tolist())
    stats["episodes"], stats["steps"] = len(eps), int(sum(len(e["actions"]) for e in eps))
    return stats


def _mean_std(x, stats: dict, key: str):
    """x as float32 and the statistics on x's device (a validation batch on the GPU, say)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x,) + tuple(torch.as_tensor(stats[key][k], dtype=torch.float32, device=x.device) for k in ("mean", "std"))


def normalize(x, stats: dict, key: str):
    x, m, s = _mean_std(x, stats, key)
    return (x - m) / s


def unnormalize(x, stats: dict, key: str):
    x, m, s = _mean_std(x, stats, key)
    return x * s + m


VLA_PROMPT = "What action should the robot take to {instr}?"


def obs_to_inputs(obs: dict, tok, cfg, stats: dict) -> dict:
    """THE observation -> model-input function, used by DemoDataset and by the VLA Policy alike.

    cfg needs image_size and n_image_tokens (and optionally image_first). Returns input_ids (T,) long,
    image (3,H,W) uint8 (collate makes it pixel_values), state (8,) normalised."""
    rgb = np.asarray(obs["rgb"])
    if rgb.shape[:2] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"obs['rgb'] is {rgb.shape[1]}x{rgb.shape[0]}, expected {cfg.image_size}x{cfg.image_size} (image_size)")
    ids = _vla_prompt_ids(tok, obs["instruction"], cfg.n_image_tokens, getattr(cfg, "image_first", True))
    return dict(input_ids=torch.tensor(ids), image=torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1),
                state=normalize(np.asarray(obs["state"], np.float32), stats, "state"))


@functools.lru_cache(maxsize=4096)
def _vla_prompt_ids(tok, instruction: str, n_image_tokens: int, image_first: bool) -> tuple:
    """The VLA prompt's ids, tokenised once per instruction (it was a third of the VLA's data path)."""
    return tuple(encode_prompt(tok, f"{IMAGE}\n" + VLA_PROMPT.format(instr=instruction), n_image_tokens, image_first))


DEMO_CACHE_VERSION = 1  # bump whenever what the demo frame cache holds, or how it is computed, changes


def _render_frames(job) -> None:
    """One episode's frames, re-rendered exactly from its stored simulator states, into rows [row, row + T)
    of the demo cache being built in `tmp` (a worker process writes its own rows of the shared .npy maps)."""
    path, row, tmp, image_size, head_size = job
    ep, envs = load_episode(path), {}
    env = _env(envs, ep["suite"], ep["task_id"], image_size)
    maps = {k: np.load(os.path.join(tmp, k + ".npy"), mmap_mode="r+") for k in ("rgb", "depth_target", "depth_valid")}
    for t in range(len(ep["actions"])):  # a state per action (sim_states also holds the final one)
        env.set_state(ep["sim_states"][t])
        obs = env.render()
        maps["rgb"][row + t] = obs["rgb"]
        maps["depth_target"][row + t] = depth_target(obs["depth"], head_size).half().numpy()
        maps["depth_valid"][row + t] = bool((obs["depth"] > 0).any())
    for m in maps.values():
        m.flush()


def build_demo_cache(ds, cache_dir: str, workers: int = 1) -> dict:
    """Every demo step's frame rendered once into memory-mapped arrays under <cache_dir>/frames-<key> (rgb
    uint8 (N,S,S,3), depth target float16 (N,1,H,H), depth valid (N,)), keyed by the episode files (name,
    size, mtime), the sizes, the code that fills it (DEMO_CACHE_CODE and the simulator, which renders) and
    DEMO_CACHE_VERSION; built in a temporary directory by `workers` processes and renamed into place, so a
    cache is whole or absent -> {name: array}."""
    import hashlib
    import inspect
    import sim_env
    code = code_key(DEMO_CACHE_CODE) + hashlib.sha256(inspect.getsource(sim_env).encode()).hexdigest()[:16]
    h = hashlib.sha256(json.dumps(dict(version=DEMO_CACHE_VERSION, image_size=ds.cfg.image_size, head_size=ds.head_size,
                                       code=code)).encode())
    for p in ds.files:
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = os.path.join(cache_dir, f"frames-{h.hexdigest()[:16]}")
    if not os.path.isdir(path):
        S, H, N = ds.cfg.image_size, ds.head_size, int(ds.offsets[-1])
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name, shape, dt in (("rgb", (N, S, S, 3), np.uint8), ("depth_target", (N, 1, H, H), np.float16),
                                ("depth_valid", (N,), np.bool_)):
            np.lib.format.open_memmap(os.path.join(tmp, name + ".npy"), "w+", dt, shape).flush()
        jobs = [(p, int(ds.offsets[e]), tmp, S, H) for e, p in enumerate(ds.files)]
        try:
            _run_jobs(_render_frames, jobs, workers, total=len(jobs), desc="demo frames", disable=len(jobs) < 4)
        except BaseException:  # a failed build leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, path)
        except OSError:  # another process built the same cache first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return {k: np.asarray(np.load(os.path.join(path, k + ".npy"), mmap_mode="r")) for k in ("rgb", "depth_target", "depth_valid")}


class DemoDataset(torch.utils.data.Dataset):
    """(frame, instruction, state) -> normalised action chunk of length `horizon` with a padding mask.

    Frames are re-rendered exactly from the stored simulator states: once for the whole folder into a
    memory-mapped cache (cache=True: build_demo_cache, under <root>/cache or `cache_root`, shared by every
    VLA run on these demos), or for every sample (cache=False)."""

    def __init__(self, root, tok, image_size, horizon, head_size, n_image_tokens, image_first=True, stats=None,
                 cache=True, cache_root=None, workers=1):
        self.files = episode_files(root)
        self.eps = [load_episode(p, parse_states=False) for p in self.files]
        path = os.path.join(root, "norm_stats.json")
        self.stats = stats if stats is not None else (json.load(open(path)) if os.path.isfile(path) else compute_norm_stats(root))
        self.cfg = dataclasses.make_dataclass("C", ["image_size", "n_image_tokens", "image_first"])(
            image_size, n_image_tokens, image_first)
        self.tok, self.horizon, self.head_size = tok, horizon, head_size
        self.index = [(e, t) for e, ep in enumerate(self.eps) for t in range(len(ep["actions"]))]
        self.offsets = np.cumsum([0] + [len(ep["actions"]) for ep in self.eps])  # episode e's first cache row
        self._envs = {}
        self.frames = build_demo_cache(self, cache_root or os.path.join(root, "cache"), workers) if cache else None

    def __len__(self):
        return len(self.index)

    def frame(self, e: int, t: int):
        """(rgb uint8 (H,W,3), depth target (1,S,S) float16, depth valid) of step t of episode e."""
        if self.frames is not None:
            k = int(self.offsets[e]) + t
            return (np.array(self.frames["rgb"][k]), torch.from_numpy(np.array(self.frames["depth_target"][k])),
                    bool(self.frames["depth_valid"][k]))
        ep = self.eps[e]
        env = _env(self._envs, ep["suite"], ep["task_id"], self.cfg.image_size)
        env.set_state(ep["sim_states"][t])
        obs = env.render()
        return obs["rgb"], depth_target(obs["depth"], self.head_size).half(), bool((obs["depth"] > 0).any())

    def __getitem__(self, i):
        e, t = self.index[i]
        ep, H = self.eps[e], self.horizon
        rgb, dt, valid = self.frame(e, t)
        item = obs_to_inputs(dict(rgb=rgb, state=ep["states"][t], instruction=ep["instruction"]), self.tok, self.cfg,
                             self.stats)
        chunk = ep["actions"][t:t + H]  # (<=H, 7); padded with zeros, masked out by action_mask
        actions = torch.zeros(H, 7)
        actions[:len(chunk)] = normalize(chunk, self.stats, "action")
        item.update(labels=torch.full_like(item["input_ids"], -100), actions=actions,
                    action_mask=torch.arange(H) < len(chunk), depth_target=dt.float(), depth_valid=valid,
                    instruction=ep["instruction"], suite=ep["suite"], task_id=ep["task_id"])
        return item


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
