"""Exercise merger (model.Merger.forward): the 2x2 patch merger, graded against a loop over merged cells."""
import torch
import torch.nn.functional as F

import model as M


def _merger(seed=0):
    torch.manual_seed(seed)
    m = M.Merger(vit_dim=6, llm_dim=10, merge=2)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5), m.norm.bias.uniform_(-0.5, 0.5)
    return m


def _oracle(m, x, order="ab"):
    """Merged token (i, j), row-major over the merged grid = Linear-GELU-Linear of the LayerNormed patches
    (2i + a, 2j + b) concatenated for (a, b) = (0,0), (0,1), (1,0), (1,1); missing patches (odd grid) are zeros."""
    B, N, D = x.shape
    s = int(round(N ** 0.5))
    g = (s + 1) // 2
    y = F.layer_norm(x, (D,), m.norm.weight, m.norm.bias, m.norm.eps)
    toks = []
    for i in range(g):
        for j in range(g):
            parts = []
            for a in range(2):
                for b in range(2):
                    r, c = (2 * i + a, 2 * j + b) if order == "ab" else (2 * i + b, 2 * j + a)
                    parts.append(y[:, r * s + c] if r < s and c < s else torch.zeros(B, D))
            toks.append(torch.cat(parts, dim=-1))
    z = torch.stack(toks, dim=1)
    return m.fc2(F.gelu(m.fc1(z)))


def _x(s, seed=1):
    return torch.randn(2, s * s, 6, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_finite():
    m = _merger()
    for s, g in ((4, 2), (3, 2), (6, 3)):
        y = m(_x(s))
        assert y.shape == (2, g * g, 10), f"Merger: {s}x{s} patches -> {tuple(y.shape)}, want (2, {g * g}, 10)"
        assert torch.isfinite(y).all()


def test_matches_loop_over_merged_cells():
    m, x = _merger(), _x(4)
    y = m(x)
    with torch.no_grad():
        want = _oracle(m, x)
        if not torch.allclose(y, want, atol=1e-5):
            if torch.allclose(y, _oracle(m, x, order="ba"), atol=1e-5):
                raise AssertionError("Merger: inside each 2x2 block concatenate row-major, (0,0),(0,1),(1,0),(1,1); "
                                     "yours is column-major (a permute that swaps the two in-block axes)")
            raise AssertionError(f"Merger: max error {(y - want).abs().max():.3g} against the loop over merged cells")


def test_each_token_sees_only_its_own_patches():
    """Patch (row 0, col 2) belongs to merged token 1 (row-major over the merged grid): only token 1 changes."""
    m, x = _merger(), _x(4)
    x2 = x.clone()
    x2[:, 2] += torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    changed = ((m(x2) - m(x)).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()
    assert changed == [1], f"Merger: changing patch (0, 2) changed tokens {changed}, want [1] (row-major merged grid)"


def test_odd_grid_is_padded_after_the_norm():
    m, x = _merger(), _x(3)
    y = m(x)
    with torch.no_grad():
        want = _oracle(m, x)
    assert torch.allclose(y, want, atol=1e-5), ("Merger (3x3 patches): pad the grid to 4x4 with zero features AFTER "
                                                f"the LayerNorm; max error {(y - want).abs().max():.3g}")
