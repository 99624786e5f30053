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
            # stage 1 (untrained head): connector + head; the VLM is frozen
            assert n_changed(s0, ck[1], "vlm")[0] == 0
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
        else:
            changed, total = n_changed(before, ck[3], "head") if recipe != "direct" else (1, 1)
            assert changed >= total - (recipe == "regress")
        gem, head, tok, tc = TP.load_pretrained(out)  # the run dir resolves to its final stage
        assert tc.recipe == recipe and (head is None) == (recipe == "sft")
        assert torch.equal(gem.state_dict()["llm.embed.weight"], ck[3]["llm.embed.weight"])
        first_text[recipe] = next(r["text"] for r in records(out) if r.get("stage") == 3 and r.get("step") == 1)
    # every recipe reaches stage 3 with the stage-0 VLM and sees the same first batch: same first loss
    assert len(set(first_text.values())) == 1, first_text
    assert os.path.isfile(str(tmp_path / "gem" / "depth_latest.png"))
    # a trained head (--head_init): stage 1 then trains the connector alone
    out = str(tmp_path / "head_init")
    run([f"--data={micro_data}", "--recipe=gem", f"--init={base}", f"--head_init={tmp_path / 'gem'}", f"--out={out}",
         "--steps2=1", "--steps3=1"])
    s1, loaded = weights(os.path.join(out, "stage1")), weights(str(tmp_path / "gem" / "stage3"))
    assert n_changed(loaded, s1, "head")[0] == 0 and n_changed(s0, s1, "vlm")[0] == 0
    assert n_changed(loaded, s1, "connector")[0] == n_changed(loaded, s1, "connector")[1]
    assert any("training the connector alone" in r.get("msg", "") for r in records(out))


def test_resume_is_exact(base, micro_data, tmp_path):
    """N steps straight (data loaded in the training process) == N/2, kill, resume (data loaded ahead by two
    worker processes): the loader may not change which samples a step sees, nor may the restart."""
    args = [f"--data={micro_data}", "--recipe=gem", f"--init={base}", "--steps3=4"]
    run(args + [f"--out={tmp_path / 'straight'}"])
    run(args + [f"--out={tmp_path / 'split'}", "--stop_after=5", "--workers=2"])  # stages 1, 2 and one step of stage 3
    assert json.load(open(tmp_path / "split" / "stage3" / "pretrain.json"))["step"] == 1
    run(args + [f"--out={tmp_path / 'split'}", "--resume", "--workers=2"])
    a, b = weights(str(tmp_path / "straight" / "stage3")), weights(str(tmp_path / "split" / "stage3"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    last = [[r for r in records(str(tmp_path / d)) if r.get("stage") == 3 and r.get("step") == 4 and "loss" in r][-1]
            for d in ("straight", "split")]
    assert last[0]["loss"] == pytest.approx(last[1]["loss"], rel=1e-5)


def test_ddp_two_processes_equal_one_with_double_batch(micro_data, tmp_path):
    common = [f"--data={micro_data}", "--recipe=base", "--steps0=2", "--val_gen=0"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_pretrain.py", "--preset=micro"] + common + ["--batch_size=2", f"--out={tmp_path / 'ddp'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run(common + ["--batch_size=4", f"--out={tmp_path / 'one'}"])
    a, b = weights(str(tmp_path / "ddp" / "stage0")), weights(str(tmp_path / "one" / "stage0"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la = [r["loss"] for r in records(str(tmp_path / "ddp")) if "loss" in r]
    lb = [r["loss"] for r in records(str(tmp_path / "one")) if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)


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
    (["--recipe=gem"], "--init"), (["--recipe=sft", "--init=/nonexistent/ckpt"], "/nonexistent/ckpt")])
def test_bad_flags_give_one_line_errors(argv, needle, micro_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        run([f"--data={micro_data}", f"--out={tmp_path / 'x'}"] + argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_of_another_shape_and_nan_stop(base, micro_data, tmp_path):
    import shutil
    out = tmp_path / "other"
    shutil.copytree(base, out)
    with pytest.raises(SystemExit) as e:  # resume a dim-32 checkpoint with a dim-48 model
        run([f"--data={micro_data}", "--recipe=base", f"--out={out}", "--resume", "--dim=48", "--steps0=8"])
    msg = str(e.value)
    assert "model.safetensors" in msg and "shape" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="non-finite"):  # an infinite lr: stop before anything is saved
        run([f"--data={micro_data}", "--recipe=base", f"--out={tmp_path / 'nan'}", "--lr0=inf", "--ckpt_every=1"])
    assert not (tmp_path / "nan" / "stage0").exists()


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
