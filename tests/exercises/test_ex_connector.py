"""Exercise connector (depth_head.Connector.forward): Linear -> GELU(tanh) -> Linear -> RMSNorm, graded
against the formula written out and the RMS property."""
import math

import torch

import depth_head as DH


def _conn(seed=0):
    torch.manual_seed(seed)
    c = DH.Connector(12, 8)
    with torch.no_grad():
        c.fc1.weight.normal_(0, 0.8), c.fc1.bias.normal_(0, 0.5), c.norm.weight.uniform_(0.5, 2.0)
    return c


def _h(seed=1):
    return torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(seed))


def _oracle(c, h, exact_gelu=False):
    a = h.double() @ c.fc1.weight.double().T + c.fc1.bias.double()
    if exact_gelu:
        a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    else:
        a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    b = a @ c.fc2.weight.double().T + c.fc2.bias.double()
    return (b / torch.sqrt(b.pow(2).mean(-1, keepdim=True) + c.norm.eps) * c.norm.weight.double()).float()


def test_shapes_and_finite():
    c, h = _conn(), _h()
    y = c(h)
    assert y.shape == (3, 5, 8), f"Connector: {tuple(y.shape)}, want (B, N, cond_dim) = (3, 5, 8)"
    assert torch.isfinite(y).all()


def test_matches_formula():
    c, h = _conn(), _h()
    with torch.no_grad():
        y, want = c(h), _oracle(c, h)
        if not torch.allclose(y, want, atol=1e-5):
            if torch.allclose(y, _oracle(c, h, exact_gelu=True), atol=1e-5):
                raise AssertionError("Connector: that is the exact (erf) GELU; the paper's connector (SigLIP/Qwen "
                                     "gelu_pytorch_tanh) uses the tanh approximation: F.gelu(x, approximate='tanh')")
            raise AssertionError(f"Connector: max error {(y - want).abs().max():.3g} against "
                                 "RMSNorm(fc2(gelu_tanh(fc1(h))))")


def test_output_is_rms_normalised():
    """With the norm's weight at 1 every output token has root-mean-square 1: the RMSNorm comes last."""
    c, h = _conn(), _h()
    with torch.no_grad():
        c.norm.weight.fill_(1.0)
        rms = c(h).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), \
        f"Connector: output RMS {rms.min():.3f}..{rms.max():.3f}, want 1: is the RMSNorm the last layer?"
