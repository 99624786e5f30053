"""train_pretrain.py on the micro preset: which parameters each stage trains, identical stage-3 start in
every recipe, exact resume, DDP (2 gloo processes) == one process with the doubled batch, a killed run
leaves a loadable checkpoint, and bad flags / checkpoints / NaN give one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common as C
import train_pretrain as TP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run(args):  # in-process, so the micro runs cost no interpreter start-up; one thread on a shared box
    n = torch.get_num_threads()
    try:
        TP.main(["--preset=micro", "--threads=1"] + [str(a) for a in args])
    finally:
        torch.set_num_threads(n)


def cli(args, **kw):
    return subprocess.Popen([sys.executable, "train_pretrain.py", "--preset=micro", "--threads=1"] + [str(a) for a in args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def weights(ck):
    return load_file(os.path.join(ck, "model.safetensors"))


def part(t, which):
    """Tensors of one part: vlm (vit./merger./llm.), connector (head.connector.), head (the generator)."""
    if which == "vlm":
        return {k: v for k, v in t.items() if not k.startswith("head.")}
    if which == "connector":
        return {k: v for k, v in t.items() if k.startswith("head.connector.")}
    return {k: v for k, v in t.items() if k.startswith("head.") and not k.startswith("head.connector.")}


def n_changed(a, b, which):
    pa, pb = part(a, which), part(b, which)
    assert pa.keys() == pb.keys() and pa, which
    return sum(not torch.equal(pa[k], pb[k]) for k in pa), len(pa)


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def initial_head(recipe, base):
    """The head a recipe starts from (train() seeds it with --seed before building it), as "head." tensors."""
    gem, _, _, tc = TP.load_pretrained(base)
    torch.manual_seed(0)
    head = TP.build_head(TP.parse_config(TP.TrainConfig, ["--preset=micro"], TP.PRESETS), gem, recipe)
    return {f"head.{k}": v for k, v in head.state_dict().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory, micro_data):
    out = str(tmp_path_factory.mktemp("pretrain") / "base")
    run([f"--data={micro_data}", "--recipe=base", f"--out={out}"])
    return out


def test_each_stage_trains_exactly_its_parameters(base, micro_data, tmp_path):
    s0 = weights(os.path.join(base, "stage0"))
    first_text = {}
    for recipe in ("gem", "rgb", "regress", "sft", "direct"):
        out = str(tmp_path / recipe)
        run([f"--data={micro_data}", f"--recipe={recipe}", f"--init={base}", f"--out={out}"])
        ck = {s: weights(os.path.join(out, f"stage{s}")) for s in TP.RECIPES[recipe]}
        if recipe in ("gem", "rgb", "regress"):
            # stage 1 (untrained head): connector + head move away from their initial weights; the VLM is frozen
            assert n_changed(s0, ck[1], "vlm")[0] == 0
            init = initial_head(recipe, base)
            for w in ("connector", "head"):
                changed, total = n_changed(init, ck[1], w)
                assert changed >= total - (recipe == "regress"), (recipe, "stage 1", w, changed, total)
            for w in ("connector", "head"):
                changed, total = n_changed(ck[1], ck[2], w)
                # regress feeds the generator a constant input, so its first conv's weight gets no gradient
                assert changed >= total - (recipe == "regress"), (recipe, "stage 2", w, changed, total)
            assert n_changed(ck[1], ck[2], "vlm")[0] == 0  # stage 2: VLM still frozen
            before = ck[2]
        else:
            before = s0
        changed, total = n_changed(before, ck[3], "vlm")  # stage 3: the VLM trains
        assert changed == total, (recipe, changed, total)
        if recipe == "sft":
            assert not any(k.startswith("head.") for k in ck[3])
        else:  # stage 3 trains connector and generator too (direct: from their initial weights)
            before_head = initial_head(recipe, base) if recipe == "direct" else before
            for w in ("connector", "head"):
                changed, total = n_changed(before_head, ck[3], w)
                assert changed >= total - (recipe == "regress"), (recipe, "stage 3", w, changed, total)
        gem, head, tok, tc = TP.load_pretrained(out)  # the run dir resolves to its final stage
        assert tc.recipe == recipe and (head is None) == (recipe == "sft")
        assert torch.equal(gem.state_dict()["llm.embed.weight"], ck[3]["llm.embed.weight"])
        first_text[recipe] = next(r["text"] for r in records(out) if r.get("stage") == 3 and r.get("step") == 1)
    # every recipe reaches stage 3 with the stage-0 VLM and sees the same first batch: same first loss
    assert len(set(first_text.values())) == 1, first_text
    assert any("val_flow" in r for r in records(str(tmp_path / "gem")))  # validated at the end of each flow stage
    # a trained head (--head_init): stage 1 then trains the connector alone
    out = str(tmp_path / "head_init")
    run([f"--data={micro_data}", "--recipe=gem", f"--init={base}", f"--head_init={tmp_path / 'gem'}", f"--out={out}",
         "--steps2=1", "--steps3=1"])
    s1, loaded = weights(os.path.join(out, "stage1")), weights(str(tmp_path / "gem" / "stage3"))
    assert n_changed(loaded, s1, "head")[0] == 0 and n_changed(s0, s1, "vlm")[0] == 0
    assert n_changed(loaded, s1, "connector")[0] == n_changed(loaded, s1, "connector")[1]
    assert any("training the connector alone" in r.get("msg", "") for r in records(out))


@pytest.mark.parametrize("stop_after,stage,step", [(1, 1, 1), (3, 2, 1), (5, 3, 1)])
def test_resume_is_exact(stop_after, stage, step, base, micro_data, tmp_path):
    """N steps straight (data loaded in the training process) == stop in the middle of stage 1, 2 or 3,
    resume (data loaded ahead by two worker processes): neither the loader nor the restart may change
    which samples, noise or CFG drops a step sees."""
    args = [f"--data={micro_data}", "--recipe=gem", f"--init={base}", "--steps3=4"]
    run(args + [f"--out={tmp_path / 'straight'}"])
    run(args + [f"--out={tmp_path / 'split'}", f"--stop_after={stop_after}", "--workers=2"])
    assert json.load(open(tmp_path / "split" / f"stage{stage}" / "pretrain.json"))["step"] == step
    if stop_after == 1:  # a resume that would change what the run computes is refused, naming the setting
        for changed in ("--batch_size=2", "--steps3=6", "--lr3=0.01", "--scenes=0:0.5", "--head_size=32"):
            with pytest.raises(SystemExit, match=f"--resume: {changed.split('=')[0]}="):
                run(args + [f"--out={tmp_path / 'split'}", "--resume", changed])
    run(args + [f"--out={tmp_path / 'split'}", "--resume", "--workers=2"])
    assert len(json.load(open(tmp_path / "split" / "run.json"))["invocations"]) == 2  # every invocation kept
    a, b = weights(str(tmp_path / "straight" / "stage3")), weights(str(tmp_path / "split" / "stage3"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    last = [[r for r in records(str(tmp_path / d)) if r.get("stage") == 3 and r.get("step") == 4 and "loss" in r][-1]
            for d in ("straight", "split")]
    assert last[0]["loss"] == pytest.approx(last[1]["loss"], rel=1e-5)


@pytest.mark.parametrize("recipe", ["base", "gem"])
def test_ddp_two_processes_equal_one_with_double_batch(recipe, base, micro_data, tmp_path):
    """gem: stages 1-3 with the CFG drop on: each sample's flow noise, time and drop come from its global
    position, so two processes with half the batch each see exactly what one process sees."""
    common = [f"--data={micro_data}", f"--recipe={recipe}", "--steps0=2", "--steps1=2", "--steps2=1", "--steps3=2"]
    common += [f"--init={base}"] if recipe != "base" else []
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_pretrain.py", "--preset=micro"] + common + ["--batch_size=2", f"--out={tmp_path / 'ddp'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run(common + ["--batch_size=4", f"--out={tmp_path / 'one'}"])
    final = "stage0" if recipe == "base" else "stage3"
    a, b = weights(str(tmp_path / "ddp" / final)), weights(str(tmp_path / "one" / final))
    # the per-step losses must agree to 1e-5 (below); weights only to a fraction of one update: Adam turns the
    # float-order noise in near-zero gradients (the zero-initialised convs of the head) into steps up to lr
    for k in a:  # measured: 2e-5 (base, 2 steps), 2.4e-4 (gem, 5 steps); lr = 2e-3
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4 if recipe == "base" else 1e-3, msg=k)
    la = [(r["stage"], r["loss"]) for r in records(str(tmp_path / "ddp")) if "loss" in r]
    lb = [(r["stage"], r["loss"]) for r in records(str(tmp_path / "one")) if "loss" in r]
    assert [s for s, _ in la] == [s for s, _ in lb] and len(la) >= 2
    assert [v for _, v in la] == pytest.approx([v for _, v in lb], rel=1e-5)


def test_killed_run_leaves_a_loadable_checkpoint(micro_data, tmp_path):
    out = tmp_path / "killed"
    proc = cli([f"--data={micro_data}", "--recipe=base", f"--out={out}", "--steps0=100000", "--ckpt_every=1"])
    try:
        deadline = time.time() + 120
        while not (out / "stage0" / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # let it be killed somewhere in the middle of later saves
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gem, head, tok, tc = TP.load_pretrained(str(out / "stage0"))
    assert head is None and tc.recipe == "base"
    step = json.load(open(out / "stage0" / "pretrain.json"))["step"]
    run([f"--data={micro_data}", "--recipe=base", f"--out={out}", "--steps0=100000", "--resume", "--stop_after=1"])
    assert json.load(open(out / "stage0" / "pretrain.json"))["step"] >= step + 1


@pytest.mark.parametrize("argv,needle", [
    (["--nope=1"], "--nope"), (["--steps0=abc"], "--steps0"), (["--recipe=magic"], "magic"),
    (["--recipe=gem"], "--init"), (["--recipe=sft", "--init=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--recipe=gem", "--init=/nonexistent/ckpt", "--blind=true"], "--blind"), (["--recipe=base", "--scenes=0.5:0.2"], "--scenes"),
    (["--recipe=base", "--scenes=0.3:0.31"], "no train records")])
def test_bad_flags_give_one_line_errors(argv, needle, micro_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        run([f"--data={micro_data}", f"--out={tmp_path / 'x'}"] + argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_of_another_shape_and_nan_stop(base, micro_data, tmp_path):
    import shutil
    out = tmp_path / "other"
    shutil.copytree(base, out)
    with pytest.raises(SystemExit, match="--resume: --dim=48"):  # resume a dim-32 run with a dim-48 model: run.json
        run([f"--data={micro_data}", "--recipe=base", f"--out={out}", "--resume", "--dim=48"])
    os.remove(out / "run.json")  # without it, the checkpoint itself refuses the other shape
    with pytest.raises(SystemExit) as e:
        run([f"--data={micro_data}", "--recipe=base", f"--out={out}", "--resume", "--dim=48", "--steps0=8"])
    msg = str(e.value)
    assert "model.safetensors" in msg and "shape" in msg and "\n" not in msg
    # a checkpoint written while training still answered questions and drew depth (its flags) still loads
    old = tmp_path / "old_flags"
    shutil.copytree(base, old)
    meta = json.load(open(old / "stage0" / "pretrain.json"))
    meta["train"] |= dict(val_gen=64, viz_every=100, sample_steps=30, cfg_scale=5.0)
    json.dump(meta, open(old / "stage0" / "pretrain.json", "w"))
    assert TP.load_pretrained(str(old))[3].recipe == "base"
    # a checkpoint written before the flow convention was recorded (or with another one) is refused
    gem_run = tmp_path / "gem_old"
    run([f"--data={micro_data}", "--recipe=gem", f"--init={base}", f"--out={gem_run}", "--steps1=1", "--steps2=1",
         "--steps3=1"])
    cfg_file = gem_run / "stage3" / "config.json"
    cfg = json.load(open(cfg_file))
    json.dump({k: v for k, v in cfg.items() if k != "flow_convention"}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="retrain"):
        TP.load_pretrained(str(gem_run))
    with pytest.raises(SystemExit) as e:
        run([f"--data={micro_data}", "--recipe=gem", f"--init={base}", f"--head_init={gem_run}", f"--out={tmp_path / 'x'}"])
    assert "flow_convention" in str(e.value) or "retrain" in str(e.value)
    with pytest.raises(SystemExit, match="non-finite"):  # an infinite lr: stop before anything is saved
        run([f"--data={micro_data}", "--recipe=base", f"--out={tmp_path / 'nan'}", "--lr0=inf", "--ckpt_every=1"])
    assert not (tmp_path / "nan" / "stage0").exists()


def test_stage_losses(base, micro_data):
    """Stages 1-2 minimise the flow loss alone; stage 3 minimises text + lam * flow. Reference: the text CE
    written out with log_softmax and the head's own loss with the same per-sample seeds."""
    gem, _, tok, tc = TP.load_pretrained(base)
    tc = TP.parse_config(TP.TrainConfig, ["--preset=micro", "--lam=0.37", "--loss_norm=token"], TP.PRESETS)
    head = TP.build_head(tc, gem, "gem")
    ds = TP.D.GemDataset(micro_data, "train", tok, gem.cfg.image_size, gem.cfg.n_image_tokens, tc.head_size)
    b = TP.make_batch(ds, [0, 1, 2, 3], TP.D.special_ids(tok)["pad_id"], "depth", "cpu")
    out = gem(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])
    logp = out["logits"][:, :-1].log_softmax(-1)
    lab = b["labels"][:, 1:]
    m = lab != -100
    text = -(logp.gather(-1, lab.clamp(min=0)[..., None])[..., 0] * m).sum() / m.sum()
    flow = head.loss(out["image_hidden"], b["target"], b["target_valid"], TP.sample_seeds(0, 3, b["pos"]))
    for stage, want in ((1, None), (2, None), (3, text + 0.37 * flow)):
        if want is None:
            want = head.loss(out["image_hidden"], b["target"], b["target_valid"], TP.sample_seeds(0, stage, b["pos"]))
        got, _, _ = TP.Bundle(gem, head, stage, tc)(b, 1.0 / m.sum().item(), 1.0)
        assert torch.allclose(got, want, atol=1e-5), stage


def test_frames_and_targets(micro_data):
    """eval.distinct_frames: one record per frame with depth, never a marked copy (its own image over the frame's
    depth map); make_batch: an RGB target is valid wherever the image exists, depth only where depth exists."""
    tok = TP.D.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    ds = TP.D.GemDataset(micro_data, "val", tok, 64, 16, 16)
    from eval import distinct_frames
    idx = distinct_frames(ds.records)
    frames = {r["meta"]["frame"] for r in ds.records}  # reference: the frame ids the generator wrote
    assert sorted(ds.records[i]["meta"]["frame"] for i in idx) == sorted(frames)
    assert any(r["meta"].get("type") == "marked" for r in ds.records)  # the case that matters is present
    assert all(ds.records[i]["meta"].get("type") != "marked" for i in idx)
    items = [dict(ds[i], pos=i, depth_valid=False) for i in idx[:2]]  # as for a record without depth
    assert TP.make_batch(ds, None, 0, "rgb", "cpu", items)["target_valid"].all()
    assert not TP.make_batch(ds, None, 0, "depth", "cpu", items)["target_valid"].any()
    # the images travel as uint8 and become the same pixel_values collate's own conversion gives, in [-1, 1]
    pv = TP.make_batch(ds, None, 0, "depth", "cpu", items)["pixel_values"]
    assert torch.equal(pv, TP.D.collate(items, 0)["pixel_values"]) and pv.dtype == torch.float32
    assert pv.min() >= -1 and pv.max() <= 1 and pv.min() < 0 < pv.max()
    bare = [dict(r, _depth=None) for r in ds.records]  # GEM-250K style, no depth
    assert distinct_frames(bare) == [] and len(distinct_frames(bare, need_depth=False)) >= len(idx)
    # validation samples are spread over the split (its first records are a few consecutive rollouts)
    assert TP.D.spread(100, 4) == [0, 33, 66, 99] and TP.D.spread(3, 8) == [0, 1, 2] and TP.D.spread(0, 4) == []


def test_text_loss_normalisation_against_a_per_sample_loop():
    """token: CE summed over every answer token; sample: each sample's mean CE, summed. Reference: a loop
    over samples with log_softmax, independent of the vectorised code."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.full((3, 6), -100)
    labels[0, 2:6] = torch.tensor([1, 2, 3, 4])  # 4 answer tokens, predicted from positions 1..4
    labels[1, 5] = 7                             # 1 answer token
    # sample 2 has none: it must add nothing and not count
    per = []
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 6) if labels[b, t] != -100]
        per.append(torch.stack(terms) if terms else torch.zeros(0))
    tok_ref = sum(p.sum() for p in per)
    smp_ref = sum(p.mean() for p in per if len(p))
    assert torch.allclose(TP.text_ce_sum(logits, labels), tok_ref, atol=1e-5)
    assert torch.allclose(TP.text_ce_sum(logits, labels, per_sample=True), smp_ref, atol=1e-5)
    assert TP.text_count(labels).item() == 5 and TP.text_count(labels, per_sample=True).item() == 2
    assert not torch.allclose(tok_ref / 5, smp_ref / 2)  # the two means differ here: the test can tell them apart


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_step_flops_match_torch_flop_counter(base, micro_data, stage, monkeypatch):
    """The FLOPs MFU is computed from (vlm_flops + head_flops per sample) equal what torch's
    FlopCounterMode counts for the same forward + backward: stage 0 (VLM only), 1 (frozen VLM forward,
    head trains), 3 (both train). A batch of one sample repeated has no padding, so both count the same tokens."""
    from torch.utils.flop_counter import FlopCounterMode
    import model
    # torch's counter does not see SDPA's CPU kernel; the reference attention path runs the same two matmuls
    monkeypatch.setattr(model, "SDPA", False)
    gem, _, tok, tc = TP.load_pretrained(base)
    head = None if stage == 0 else TP.build_head(tc, gem, "gem")
    TP.trainable(gem, head, stage, True, lambda *a: None)
    ds = TP.D.GemDataset(micro_data, "train", tok, gem.cfg.image_size, gem.cfg.n_image_tokens, tc.head_size)
    b = TP.make_batch(ds, [3, 3, 3], TP.D.special_ids(tok)["pad_id"], "depth", "cpu")
    model = TP.Bundle(gem, head, stage, tc)
    with FlopCounterMode(display=False) as fc:
        model(b, 1.0, 1.0)[0].backward()
    rng = torch.get_rng_state()
    per_sample = TP.head_flops(head, gem.cfg, stage != 1, "cpu") if head is not None else 0.0  # one blank sample
    ours = C.vlm_flops(gem.cfg, b["attention_mask"], stage != 1) + 3 * per_sample
    assert ours == pytest.approx(fc.get_total_flops(), rel=1e-9)
    if head is not None:
        assert not head.connector.fc1._forward_hooks  # hooks removed: training runs uncounted (and compiles once)
        assert torch.equal(torch.get_rng_state(), rng)  # counting draws nothing from training's RNG
    # padding is not counted: a padded batch costs exactly its samples counted one by one
    mixed = TP.make_batch(ds, [0, 3, 7], TP.D.special_ids(tok)["pad_id"], "depth", "cpu")
    assert not mixed["attention_mask"].all()
    one_by_one = sum(C.vlm_flops(gem.cfg, m[None, m], True) for m in mixed["attention_mask"])
    assert C.vlm_flops(gem.cfg, mixed["attention_mask"], True) == pytest.approx(one_by_one)


def test_peak_table_picks_the_gpu_by_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, want in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA L4", 121),
                       ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165), ("Some Future GPU", 0.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert C.peak_tflops(cuda, 0.0) == want, name
    assert C.peak_tflops(cuda, 123.0) == 123.0 and C.peak_tflops(torch.device("cpu"), 0.0) == 0.0


def test_loader_draws_the_flow_noise_the_loss_would(base, micro_data):
    """host_batch(noise=(seed, stage)) draws each sample's flow time, noise and CFG-drop number in the loader's
    worker processes; the stage's loss must be exactly the one that draws them from the same seeds itself."""
    gem, _, tok, tc = TP.load_pretrained(base)
    torch.manual_seed(0)
    head = TP.build_head(tc, gem, "gem")
    ds = TP.D.GemDataset(micro_data, "train", tok, gem.cfg.image_size, gem.cfg.n_image_tokens, tc.head_size)
    items, pad = [dict(ds[i], pos=100 + i) for i in (0, 2, 5)], TP.D.special_ids(tok)["pad_id"]
    plain = TP.D.on_device(TP.host_batch(items, pad, "depth"), "cpu")
    drawn = TP.D.on_device(TP.host_batch(items, pad, "depth", noise=(tc.seed, 3)), "cpu")
    assert "flow_noise" in drawn and "flow_noise" not in plain
    bundle = TP.Bundle(gem, head, 3, tc)
    flow_here, flow_loader = (bundle(b, 1.0, 1.0)[2] for b in (plain, drawn))
    assert flow_here == flow_loader and flow_here > 0
    other = TP.host_batch(items, pad, "depth", noise=(tc.seed, 2))  # another stage: other draws
    assert not torch.equal(other["flow_noise"], drawn["flow_noise"])


def test_validation_measures_what_the_image_adds(base, micro_data):
    """validate's val_text_grey is the text loss with every image replaced by grey: on the real images of an
    (untrained) model it differs from val_text, and on a blind dataset (images already grey) it equals it."""
    import contextlib
    import data as D
    gem, head, tok, tc = TP.load_pretrained(os.path.join(base, "stage0"))
    pad = D.special_ids(tok)["pad_id"]
    res = {}
    for blind in (False, True):
        ds = D.GemDataset(micro_data, "val", **TP.dataset_kw(tc, gem, tok, blind=blind, cache=False))
        res[blind] = TP.validate(gem, None, ds, tc, 3, pad, torch.device("cpu"), contextlib.nullcontext())
    assert abs(res[False]["val_text_grey"] - res[False]["val_text"]) > 1e-4, res
    assert res[True]["val_text_grey"] == pytest.approx(res[True]["val_text"], abs=1e-6), res
    assert res[True]["val_text_grey"] == pytest.approx(res[False]["val_text_grey"], abs=1e-6)  # the same grey image


def test_stage0_families(micro_data, tmp_path):
    """--families0 chooses stage 0's records: the default trains on the captions alone, caption,grounding on both
    families (counted here from train.jsonl, not from the code's filter)."""
    import data as D
    recs = D.read_jsonl(os.path.join(micro_data, "train.jsonl"))
    for fams in ("caption", "caption,grounding"):
        out = str(tmp_path / fams.replace(",", "_"))
        run([f"--data={micro_data}", "--recipe=base", f"--out={out}", f"--families0={fams}", "--steps0=1", "--cache=false"])
        logged = [r["msg"] for r in records(out) if r.get("msg", "").startswith("data:")][0]
        assert f"train {sum(r['task'] in fams.split(',') for r in recs)} records" in logged, logged
