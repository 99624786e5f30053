"""GEM-mini data: GEM-style data -> training tensors, for our generated data and the released GEM-250K alike.

The data comes from sim_data.py (our miniature GEM-4M rendered by the simulator, and the expert demos):
    python sim_data.py --out data/gem-mini --preset tiny                   # VLM data (presets micro, tiny, small)
    python sim_data.py demos --suite all --per-task 20 --out data/demos    # expert demos for the VLA
or is the released GEM-250K.jsonl, read as it is. This file reads both: the layout, the tokenizer and chat
template, the depth / RGB targets and masks, the datasets with their decode-once caches, the training batches.

VLM data layout (ours; DESIGN.md section 3):
    <root>/{train,val,test}.jsonl   {"id","image","depth"(optional),"task","conversations","meta"}
    <root>/images/<id>.png (RGB)    <root>/depth/<id>.png (16-bit, millimetres, 0 = invalid)
    <root>/tokenizer.json           (sim_data.py also writes stats.json, states/, shards/)
"task" is a family of FAMILY_TYPES; "meta" holds the machine-readable answer and type, so eval.py scores
without parsing the question (question_of / answer_of: a record's question and reference answer).
The released GEM-250K layout is read as it is (split_records, read_jsonl): one GEM-250K.jsonl of LLaVA-style
{"image", "conversations"} records (no id, no task: family OTHER), images of any size (squashed to the model's
square input: load_rgb), depth at <depth root>/depth/<image basename> (depth_by_basename; resized with nearest
neighbour: load_depth), video and multi-image records skipped and counted, val = the records of every 100th image.
Demos (sim_data.py demos): <root>/*.npz episodes (load_episode) and norm_stats.json; the VLA's frames are
re-rendered exactly from the stored simulator states (DemoDataset, build_demo_cache).

Paper -> code map
  depth for every image (16-bit PNG in millimetres, 0 = invalid)          save_depth_png / load_depth_png
  depth target: inverse depth, 2nd-98th percentile, clip, 1 - x          depth_target
  RGB-reconstruction ablation target                                     rgb_target
  Qwen-VL chat template, loss on assistant tokens only                   encode_chat / encode_prompt
  LLaVA-style JSONL + depth/ folder (GEM-250K layout; depth optional)    split_records / read_jsonl / GemDataset / collate
  invalid depth pixels (0) masked per pixel in L_flow                    depth_target / depth_mask
  GEM-VLA demonstrations, action chunks, state/action normalisation      DemoDataset / normalize
  one preprocessing for training and the deployed policy                 obs_to_inputs
  (ours) training batches: stateless sampler, loader-side collation,     sample_indices / StepItems / step_loader
    uint8 images to the device                                           on_device / device_batch
"""
from __future__ import annotations

import dataclasses
import functools
import json
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

import sim_env
from common import run_jobs, write_atomic

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>"]
IMAGE = "<image>"
# The task families of the records (sim_data.py makes them; read_jsonl checks "task" against them)
FAMILY_TYPES = {
    "grounding": ["box", "point", "place", "grasp", "list"],
    "reasoning": ["rel_yn", "rel_mc", "closer", "marked", "distance", "height", "count", "fit"],
    "planning": ["decompose", "next_step", "done"],
    "trajectory": ["trajectory"], "caption": ["caption"], "depth": ["depth"]}


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
        raise FileNotFoundError(f"{path}: tokenizer file missing (generate data with sim_data.py first)")
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
# Images and depth targets

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


def question_of(r: dict) -> str:
    """A record's first human turn (with its <image> tag): the question a benchmark asks."""
    return next((t["value"] for t in r["conversations"] if t["from"] == "human"), "")


def answer_of(r: dict) -> str:
    """A record's first assistant turn: the reference answer ("" for a depth-only record)."""
    return next((t["value"] for t in r["conversations"] if t["from"] == "gpt"), "")


def scene_of(r: dict) -> str:
    """The scene (expert rollout) a record's image comes from: its frame id minus the time step."""
    frame = (r.get("meta") or {}).get("frame")
    return frame.rsplit("-", 1)[0] if frame else r["image"]


def parse_scenes(spec: str):
    """--scenes: "lo:hi" -> (lo, hi) fractions for select_scenes, or None ("": every scene)."""
    if not spec:
        return None
    try:
        lo, hi = (float(x) for x in spec.split(":"))
    except ValueError:
        lo = hi = -1.0
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"--scenes={spec}: expected lo:hi with 0 <= lo < hi <= 1, e.g. 0:0.5")
    return lo, hi


def select_scenes(records: list[dict], lo: float, hi: float) -> list[dict]:
    """The records of the scenes ranked [lo, hi) (fractions) in a fixed pseudo-random order (crc32 of the
    scene id): disjoint ranges give disjoint scenes, and [0, a) is inside [0, b) for a < b."""
    scenes = sorted({scene_of(r) for r in records}, key=lambda x: (zlib.crc32(x.encode()), x))
    keep = set(scenes[round(lo * len(scenes)):round(hi * len(scenes))])
    return [r for r in records if scene_of(r) in keep]


class GemDataset(torch.utils.data.Dataset):
    """One record -> model inputs: chat-templated ids/labels, image tensor, depth and RGB targets.

    `source`: a data directory (our layout) or one JSONL file (GEM-250K): split_records. Without depth a record
    gets depth_valid False and a zero target, a pixel without depth (0) a False depth_mask: the depth loss is
    masked for both. `skipped` counts the records left out (several images, video, over max_len: drop_long),
    `no_depth` those without depth. `families` / `scenes` = (lo, hi) keep only those (select_scenes); `blind`
    makes every image one grey image (the blind baseline). cache=True decodes the split once (build_cache:
    memory-mapped .npy files under <root>/cache or `cache_root`) and reads every item from there: the same
    tensors as from the PNGs. Cached items are views of copy-on-write maps: do not modify them in place."""

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

    def encode(self, r):
        """Token ids and labels of a record's whole conversation (never cut: see drop_long)."""
        return encode_chat(self.tok, r["conversations"], self.n_image_tokens, self.image_first)

    def drop_long(self, recs: list[dict]) -> list[dict]:
        """The records of at most max_len tokens: a longer one is left out whole and counted (`skipped`;
        `too_long` = (count, longest)), never cut: a cut answer loses its end and <|im_end|>. The image must fit."""
        lengths = (np.diff(self.arrays["offsets"])[[r["_row"] for r in recs]] if self.arrays is not None
                   else np.array([len(self.encode(r)[0]) for r in recs], np.int64))
        over, r = lengths > self.max_len, recs[int(np.argmax(lengths))] if recs else None
        if over.any() and self.encode(r)[0].index(special_ids(self.tok)["vision_end_id"]) >= self.max_len:
            raise ValueError(f"{r['_where']}: the image tokens do not fit in max_len={self.max_len}")
        if over.any():
            self.skipped[f"longer than max_len={self.max_len} tokens"] += int(over.sum())
        self.too_long = (int(over.sum()), int(lengths.max()) if len(lengths) else 0)
        return [r for r, o in zip(recs, over) if not o]

    def __getitem__(self, i):
        r = self.records[i]
        if self.arrays is None:
            rgb, depth, valid = load_record_image(r, self.image_size)
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
        meta = r.get("meta") or {}
        return dict(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), image=image,
                    depth_target=target, depth_mask=mask, rgb_target=rgb_t, depth_valid=valid, depth_m=torch.from_numpy(depth),
                    id=r["id"], task=r["task"], type=meta.get("type", r["task"]), question=question_of(r).replace(IMAGE, "").strip(),
                    answer=answer_of(r), meta=meta)


CACHE_CHUNK = 256  # images per cache-building job
CACHE_ARRAYS = ("images", "depth_mm", "depth_valid", "depth_target", "depth_mask", "rgb_target", "image_of", "ids", "labels", "offsets")


# the functions that fill a cache: their source is part of its key, so changed code (a fixed depth_target, a
# solved exercise) makes a new cache, never reuses the old arrays
CACHE_CODE = ("load_record_image", "load_rgb", "load_depth", "load_depth_png", "depth_target", "depth_mask", "rgb_target",
              "encode_chat", "_text_ids", "_user_ids", "_assistant_head", "_cache_rows", "build_cache")
DEMO_CACHE_CODE = ("_render_frames", "depth_target", "build_demo_cache")


def code_key(names: tuple) -> str:  # a hash of the source of this module's functions `names`, as bound now
    import hashlib
    import inspect
    return hashlib.sha256("".join(inspect.getsource(globals()[n]) for n in names).encode()).hexdigest()[:16]


def cache_key(ds: GemDataset, records: list[dict]) -> str:
    """What the cached content depends on: the split's records, every image / depth file (size and mtime),
    the tokenizer, the sizes and prompt settings, the code that fills it (CACHE_CODE). Another key = another
    cache directory."""
    import hashlib
    h = hashlib.sha256(json.dumps(dict(image_size=ds.image_size, head_size=ds.head_size,
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
            run_jobs(_cache_rows, jobs, workers, total=len(jobs), desc=f"caching {n} images", disable=len(jobs) < 4)
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


def spread(n: int, k: int) -> list[int]:
    """k indices evenly spread over range(n) (a fixed validation sample: every part of the split, not its start)."""
    return sorted({int(j) for j in np.linspace(0, n - 1, min(k, n))}) if n else []


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
# Masks in meta (sim_data.py encodes the regions a point may hit, eval.py decodes them)

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


# ----------------------------------------------------------------------------------------------------
# VLA demonstrations (made by sim_data.py demos): reading, normalisation, and THE observation preprocessing
# shared with the Policy

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
        raise FileNotFoundError(f"{root}: no demo episodes (*.npz); run `python sim_data.py demos --out {root}`")
    return [os.path.join(root, f) for f in files]


def compute_norm_stats(root: str) -> dict:
    """Mean/std of states and actions over all demo steps -> <root>/norm_stats.json."""
    stats = norm_stats([load_episode(p, parse_states=False) for p in episode_files(root)])
    write_atomic(os.path.join(root, "norm_stats.json"), json.dumps(stats, indent=1))
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


def _render_frames(job) -> None:
    """One episode's frames, re-rendered exactly from its stored simulator states, into rows [row, row + T)
    of the demo cache being built in `tmp` (a worker process writes its own rows of the shared .npy maps)."""
    path, row, tmp, image_size, head_size = job
    ep, envs = load_episode(path), {}
    env = sim_env.cached_env(envs, ep["suite"], ep["task_id"], image_size)
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
    size, mtime), the sizes and the code that fills it (DEMO_CACHE_CODE and the simulator, which renders); built
    in a temporary directory by `workers` processes and renamed into place, so a cache is whole or absent."""
    import hashlib
    import inspect
    import sim_env
    code = code_key(DEMO_CACHE_CODE) + hashlib.sha256(inspect.getsource(sim_env).encode()).hexdigest()[:16]
    h = hashlib.sha256(json.dumps(dict(image_size=ds.cfg.image_size, head_size=ds.head_size, code=code)).encode())
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
            run_jobs(_render_frames, jobs, workers, total=len(jobs), desc="demo frames", disable=len(jobs) < 4)
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
        env = sim_env.cached_env(self._envs, ep["suite"], ep["task_id"], self.cfg.image_size)
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


if __name__ == "__main__":  # the data maker is sim_data.py now (same flags, same bytes)
    raise SystemExit(f"error: data.py makes no data; run: python sim_data.py {' '.join(sys.argv[1:])}".rstrip())
