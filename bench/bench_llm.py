"""Benchmark our LanguageModel against Hugging Face transformers' Qwen3ForCausalLM (same config, same
weights, same batch and dtype, same process).

Prints forward+backward time per step and KV-cache generation tokens/s for both, and the ratios
(ours / theirs as a speed-up; target >= 1.0x). CPU fp32 by default; on a GPU, bf16.

    .venv/bin/python bench/bench_llm.py                       # tiny preset LLM, batch 8 x 128 tokens
    .venv/bin/python bench/bench_llm.py --preset=small --threads=2
    .venv/bin/python bench/bench_llm.py --device=cuda --dtype=bfloat16 --preset=small --batch=32 --seq=512

transformers is a test/benchmark-only dependency (imported here, never by model.py).
"""
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import hf as H  # noqa: E402
from common import parse_config  # noqa: E402


@dataclasses.dataclass
class BenchConfig:
    preset: str = "tiny"  # LLM sizes from model.MODEL_PRESETS
    vocab_size: int = 2048
    batch: int = 8
    seq: int = 128
    iters: int = 10  # timed forward+backward steps (after warm-up), median reported
    gen_batch: int = 4
    gen_prompt: int = 32
    gen_tokens: int = 64
    device: str = "auto"  # auto: cuda if available
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    threads: int = 0  # torch intra-op threads on CPU (0 = torch default)
    compile: bool = False  # also time torch.compile(ours) for forward+backward


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_pair(fa, fb, dev, iters):
    """Median seconds per call of fa and fb, alternating calls so that load from other processes on a
    shared machine hits both the same way. On CPU the clock is this process's CPU time (a busy shared
    machine steals wall time from us at random); on GPU it is wall time after a synchronize."""
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    for _ in range(2):  # warm-up (allocator, kernels)
        fa(), fb()
    ta, tb = [], []
    for _ in range(iters):
        for f, out in ((fa, ta), (fb, tb)):
            sync(dev)
            t = clock()
            f()
            sync(dev)
            out.append(clock() - t)
    return statistics.median(ta), statistics.median(tb)


def main(argv):
    import transformers
    b = parse_config(BenchConfig, argv, {p: {} for p in M.MODEL_PRESETS})
    dev = torch.device("cuda" if b.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if b.device == "auto" else b.device))
    dtype = getattr(torch, b.dtype if b.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32"))
    if b.threads:
        torch.set_num_threads(b.threads)
    c = M.GEMConfig(**M.MODEL_PRESETS[b.preset], vocab_size=b.vocab_size)  # only its LLM fields are used
    torch.manual_seed(0)
    hc = transformers.Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.mlp_dim,
                                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                  num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                                  attn_implementation="sdpa")
    theirs = transformers.Qwen3ForCausalLM(hc)
    with tempfile.TemporaryDirectory() as d:  # identical weights: ours is loaded from theirs
        theirs.save_pretrained(d)
        ours = H.load_hf_qwen3(d)
    theirs, ours = theirs.to(dev, dtype).train(), ours.to(dev, dtype).train()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f", dtype {dtype}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"LLM preset {b.preset}: {n_params / 1e6:.2f}M params, {c}")

    ids = torch.randint(0, c.vocab_size, (b.batch, b.seq), device=dev)

    def step_ours(m=ours):
        M.lm_loss(m.logits(ids), ids).backward()  # the loss GEM.forward uses

    def step_theirs():
        theirs(input_ids=ids, labels=ids).loss.backward()

    t_theirs, t_ours = time_pair(step_theirs, step_ours, dev, b.iters)
    tok = b.batch * b.seq
    print(f"forward+backward  ({b.batch}x{b.seq})  theirs {t_theirs * 1e3:8.1f} ms ({tok / t_theirs:9.0f} tok/s)   "
          f"ours {t_ours * 1e3:8.1f} ms ({tok / t_ours:9.0f} tok/s)   speed-up {t_theirs / t_ours:.2f}x")
    if b.compile:
        comp = torch.compile(ours)
        t_comp, _ = time_pair(lambda: step_ours(comp), step_theirs, dev, b.iters)
        print(f"forward+backward  torch.compile(ours) {t_comp * 1e3:8.1f} ms   speed-up vs theirs {t_theirs / t_comp:.2f}x")

    theirs.eval(), ours.eval()
    prompt = torch.randint(0, c.vocab_size, (b.gen_batch, b.gen_prompt), device=dev)
    n_new = b.gen_batch * b.gen_tokens
    with torch.no_grad():
        ref = theirs.generate(prompt, max_new_tokens=b.gen_tokens, min_new_tokens=b.gen_tokens, do_sample=False,
                              pad_token_id=0)[:, b.gen_prompt:]
        same = torch.equal(ours.generate(prompt, max_new_tokens=b.gen_tokens), ref)
        t_theirs, t_ours = time_pair(lambda: theirs.generate(prompt, max_new_tokens=b.gen_tokens, do_sample=False,
                                                             min_new_tokens=b.gen_tokens, pad_token_id=0),
                                     lambda: ours.generate(prompt, max_new_tokens=b.gen_tokens), dev, max(3, b.iters // 2))
        g_theirs, g_ours = n_new / t_theirs, n_new / t_ours
    print(f"generate (KV cache, greedy, {b.gen_batch}x{b.gen_prompt} prompt +{b.gen_tokens})  theirs {g_theirs:9.0f} tok/s"
          f"   ours {g_ours:9.0f} tok/s   speed-up {g_ours / g_theirs:.2f}x   same tokens: {same}")


if __name__ == "__main__":
    main(sys.argv[1:])
