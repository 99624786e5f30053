"""Hidden cases (issue 24): the small exercises that have an oracle, on inputs drawn from the instructor's seed
(GEM_HIDDEN_SEED: chosen by `teach.py package`, else teach.py's default), never shipped to students. `grade`
copies this file into the grading tree as tests/exercises/test_hidden_small.py; each test names its exercise
(test_NAME_...), and its failure details are reported with Gradescope visibility "after_published"."""
import os

import pytest
import torch

import depth_head as DH
import model as M
from inputs import rope_tables
from oracles import attention_loop, euler, flow_pair, rope_complex

SEED = int(os.environ.get("GEM_HIDDEN_SEED", "20240917"))
CASES = range(3)


def _g(case: int):
    return torch.Generator().manual_seed(SEED * 97 + case)


def _int(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


@pytest.mark.parametrize("case", CASES)
def test_rope_hidden(case):
    g = _g(case)
    B, H, T, hd, offset = _int(g, 1, 3), _int(g, 1, 4), _int(g, 1, 9), 2 * _int(g, 2, 16), _int(g, 0, 50)
    x = torch.randn(B, H, T, hd, generator=g)
    cos, sin = rope_tables(T, hd, offset=offset)
    assert torch.allclose(M.rope(x, cos, sin), rope_complex(x, cos, sin), atol=1e-4), "rope: a hidden case differs"


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "plain"])
@pytest.mark.parametrize("case", CASES)
def test_attention_hidden(case, sdpa, monkeypatch):
    monkeypatch.setattr(M, "SDPA", sdpa)
    g = _g(case)
    B, KV, groups, T, hd = _int(g, 1, 3), _int(g, 1, 3), _int(g, 1, 3), _int(g, 1, 7), 2 * _int(g, 2, 8)
    q = torch.randn(B, KV * groups, T, hd, generator=g)
    k, v = torch.randn(B, KV, T, hd, generator=g), torch.randn(B, KV, T, hd, generator=g)
    mask = torch.rand(B, 1, T, T, generator=g) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    assert torch.allclose(M.attention(q, k, v, is_causal=True), attention_loop(q, k, v, is_causal=True), atol=1e-5), \
        "attention: a hidden causal case differs"
    assert torch.allclose(M.attention(q, k, v, mask=mask), attention_loop(q, k, v, mask=mask), atol=1e-5), \
        "attention: a hidden masked case differs"


@pytest.mark.parametrize("case", CASES)
def test_flow_pair_hidden(case):
    g = _g(case)
    shape = [_int(g, 1, 5)] + [_int(g, 1, 6) for _ in range(_int(g, 1, 3))]
    x0, noise, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(shape[0], generator=g)
    for got, want in zip(DH.flow_pair(x0, noise, t), flow_pair(x0, noise, t)):
        assert torch.allclose(got, want, atol=1e-6), "flow_pair: a hidden case differs"


@pytest.mark.parametrize("case", CASES)
def test_euler_sample_hidden(case):
    g = _g(case)
    B, steps = _int(g, 1, 4), _int(g, 1, 12)
    a, noise = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)

    def velocity(x, t):  # a field that depends on x and t: every step's time and state matter
        return a * t[:, None] - 0.5 * x

    got, want = DH.euler_sample(velocity, noise, steps), euler(velocity, noise, steps)
    assert torch.allclose(got, want, atol=1e-5), "euler_sample: a hidden case differs"
