"""The GPU paths the CPU suite cannot reach: a micro stage 0 and a gem run (stages 1-3) on `cuda` under bf16
autocast, a VLA training, answering and closed-loop rollouts with the policy on the GPU (spawned workers),
bf16 autocast against fp32, and one `small` stage-3 step's FLOP count against torch's counter.

Skipped without a GPU. `bash bench/gpu_session.sh` runs this file first on a lent GPU (seconds), so the
expensive run never meets these paths for the first time. GEM_TEST_DEVICE=cpu runs the same tests on the
CPU (their logic, not CUDA's)."""
import json
import os
import sys

import pytest
import torch

import common as C
import data as D
import eval as E
import train_pretrain as TP
import train_vla as V

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
DEV = os.environ.get("GEM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
MICRO = ["--preset=micro", f"--device={DEV}"]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


@pytest.fixture(scope="module")
def gpu_gem(tmp_path_factory, micro_data):
    """Stage 0, then the gem recipe (stages 1-3), trained on the device."""
    root = tmp_path_factory.mktemp("cuda")
    TP.main(MICRO + [f"--data={micro_data}", "--recipe=base", f"--out={root}/base"])
    TP.main(MICRO + [f"--data={micro_data}", "--recipe=gem", f"--init={root}/base", f"--out={root}/gem"])
    return str(root)


def test_stage0_and_gem_train_on_the_device(gpu_gem):
    for run, stages in (("base", {0}), ("gem", {1, 2, 3})):
        recs = [r for r in records(f"{gpu_gem}/{run}") if "loss" in r]
        assert {r["stage"] for r in recs} == stages, run
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs), run
        if DEV == "cuda":  # the GPU is in the peak table: MFU is logged, and from the device's own name
            assert all(0 < r["mfu"] < 1 for r in recs), run
        assert json.load(open(f"{gpu_gem}/{run}/run.json"))["device"].startswith(DEV)


def test_first_step_losses_match_the_cpu_within_bf16(gpu_gem, micro_data, tmp_path):
    """The first step of each gem stage sees the same samples and flow draws on both devices (the loader
    draws them); before any update only bf16 rounding separates the two losses."""
    flags = [f"--data={micro_data}", "--recipe=gem", f"--init={gpu_gem}/base", "--steps1=1", "--steps2=1", "--steps3=1"]
    TP.main(["--preset=micro", "--device=cpu", f"--out={tmp_path}/cpu"] + flags)
    TP.main(MICRO + [f"--out={tmp_path}/dev"] + flags)
    cpu, dev = ([r for r in records(f"{tmp_path}/{d}") if "loss" in r] for d in ("cpu", "dev"))
    assert [(r["stage"], r["step"]) for r in cpu] == [(r["stage"], r["step"]) for r in dev] == [(1, 1), (2, 1), (3, 1)]
    for a, b in zip(cpu, dev):
        for k in ("text", "flow"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=0.03, abs=1e-3), (a["stage"], k)


def test_autocast_bf16_forward_matches_fp32():
    """The same weights and batch: bf16 autocast logits follow the fp32 ones (the GPU trains under autocast)."""
    if DEV != "cuda":
        pytest.skip("autocast to bf16 is the GPU's path")
    torch.manual_seed(0)
    tc = C.parse_config(TP.TrainConfig, ["--preset=micro"], TP.PRESETS)
    import dataclasses
    from model import GEM
    gem = GEM(dataclasses.replace(tc.model, vocab_size=300, pad_id=0, vision_start_id=1, vision_end_id=2,
                                  image_pad_id=3)).to(DEV).eval()
    n = gem.cfg.n_image_tokens
    ids = torch.cat([torch.tensor([1] + [3] * n + [2]), torch.randint(10, 300, (20,))])[None].repeat(2, 1).to(DEV)
    pix = torch.rand(2, 3, gem.cfg.image_size, gem.cfg.image_size, device=DEV) * 2 - 1
    with torch.no_grad():
        ref = gem(ids, pix)["logits"].float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gem(ids, pix)["logits"].float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    cos = torch.nn.functional.cosine_similarity(low.flatten(1), ref.flatten(1)).min().item()
    assert cos > 0.99, cos


def test_vla_trains_answers_and_rolls_out_on_the_device(gpu_gem, micro_demos, tmp_path):
    """GEM-VLA with the depth loss on the device, then eval.py vlm (greedy answers, the depth head and probe)
    and eval.py vla with 2 spawned rollout workers, each with its policy on the device."""
    V.main([f"--init={gpu_gem}/gem", f"--demos={micro_demos}", f"--out={tmp_path}/vla", "--steps=3",
            "--depth_weight=0.1", "--tasks=goal:0"] + MICRO)
    recs = [r for r in records(f"{tmp_path}/vla") if "loss" in r]
    assert recs and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    res = E.main(["vlm", f"--ckpt={gpu_gem}/gem", f"--out={tmp_path}/ev", "--depth_frames=4", "--probe_steps=5",
                  "--sample_steps=2", "--max_new_tokens=24", f"--device={DEV}"])
    assert res["seen"]["macro"]["n"] > 0
    out = E.main(["vla", f"--ckpt={tmp_path}/vla/ckpt", "--suite=goal", "--tasks=0,6", "--episodes=1", "--workers=2",
                  "--refs=false", f"--out={tmp_path}/evla", f"--device={DEV}"])
    (summary,) = out["results"].values()
    assert summary["average"]["n"] == 2
    policy = V.Policy(f"{tmp_path}/vla/ckpt", device=DEV)
    from sim_env import TabletopEnv
    obs, _ = TabletopEnv("goal", 0, image_size=policy.model.vlm.cfg.image_size).reset(options={"start_id": 0})
    a = policy.act(obs)
    assert a.shape == (7,) and abs(a).max() <= 1


def test_small_stage3_step_flops_match_torch_counter(monkeypatch):
    """MFU's numerator (vlm_flops + head_flops) for one `small` stage-3 step at batch 8, on the device under
    autocast, within 10% of what torch.utils.flop_counter counts."""
    from torch.utils.flop_counter import FlopCounterMode
    import model as M
    import profile_step as PS
    # torch's counter cannot count our SDPA calls (its formula refuses GQA's fewer key/value heads, seen on the
    # GPU; on the CPU it does not see the kernel): the reference attention path runs the same two matmuls
    monkeypatch.setattr(M, "SDPA", False)
    tc = C.parse_config(TP.TrainConfig, ["--preset=small"], TP.PRESETS)
    c = C.parse_config(PS.ProfileConfig, ["--preset=small", "--batch_size=8", f"--device={DEV}"], {"small": {}})
    torch.manual_seed(0)
    import dataclasses
    gem = M.GEM(dataclasses.replace(tc.model, vocab_size=c.vocab_size)).to(DEV)
    head = TP.build_head(tc, gem, "gem").to(DEV)
    TP.trainable(gem, head, 3, True, lambda *a: None)
    b = D.on_device(PS.synthetic_batch(gem.cfg, c, tc.head_size, torch.device(DEV)), torch.device(DEV))
    model = TP.Bundle(gem, head, 3, tc)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if DEV == "cuda" else torch.autocast("cpu", enabled=False)
    with FlopCounterMode(display=False) as fc:
        with amp:
            loss = model(b, 1.0, 1.0)[0]
        loss.backward()
    ours = C.vlm_flops(gem.cfg, b["attention_mask"].cpu(), True) + 8 * TP.head_flops(head, gem.cfg, True, DEV)
    assert ours == pytest.approx(fc.get_total_flops(), rel=0.10)
