"""Exercise stage_freezing (train_pretrain.trainable): GEM's progressive training, which parts each stage
trains. Graded against the paper's table written out here, and by which parameters get gradients."""
import pytest
import torch

import depth_head as DH
import model as M
import train_pretrain as TP

# stage -> (vlm, connector, generator) trained; stage 1 with an untrained head trains the generator too
TABLE = {(0, True): (1, 0, 0), (1, True): (0, 1, 0), (1, False): (0, 1, 1), (2, True): (0, 1, 1), (2, False): (0, 1, 1),
         (3, True): (1, 1, 1), (3, False): (1, 1, 1)}


def _models():
    torch.manual_seed(0)
    gem = M.GEM(M.GEMConfig(**M.MODEL_PRESETS["micro"], vocab_size=32))
    head = DH.GenerativeHead(DH.DepthHeadConfig(llm_dim=32, cond_dim=16, width=16, grid=2, out_size=8))
    return gem, head


def test_shapes_and_finite():
    gem, head = _models()
    params = TP.trainable(gem, head, 3, True, lambda msg: None)
    assert isinstance(params, list) and all(isinstance(p, torch.nn.Parameter) for p in params)
    assert len({id(p) for p in params}) == len(params), "trainable: a parameter listed twice"
    assert all(p.requires_grad and torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("stage,head_trained", list(TABLE))
def test_trainable_parts_per_stage(stage, head_trained):
    gem, head = _models()
    params = {id(p) for p in TP.trainable(gem, head, stage, head_trained, lambda msg: None)}
    for part, module, want in zip(("vlm", "connector", "generator"), (gem, head.connector, head.generator),
                                  TABLE[stage, head_trained]):
        listed = {id(p) in params for p in module.parameters()}
        flags = {p.requires_grad for p in module.parameters()}
        extra = " (stage 1 with an untrained head trains connector + generator)" if stage == 1 and not head_trained else ""
        assert listed == {bool(want)} and flags == {bool(want)}, (
            f"trainable(stage={stage}, head_trained={head_trained}): the {part} should be "
            f"{'trained' if want else 'frozen'} (returned and requires_grad={bool(want)}){extra}")


def test_without_a_head_stage_0_trains_the_vlm():
    gem, _ = _models()
    params = TP.trainable(gem, None, 0, False, lambda msg: None)
    assert len(params) == len(list(gem.parameters())), "trainable(stage 0, head=None): every VLM parameter"


def test_frozen_parts_get_no_gradient():
    """Stage 2: a loss through the embeddings, the connector and the generator leaves the VLM without grads."""
    gem, head = _models()
    TP.trainable(gem, head, 2, True, lambda msg: None)
    h = gem.llm.embed(torch.randint(0, 32, (2, 4)))  # (B, grid^2, D)
    c = head.connector
    cond = c.norm(c.fc2(torch.nn.functional.gelu(c.fc1(h))))
    head.generator(torch.randn(2, 1, 8, 8), torch.rand(2), cond).square().mean().backward()
    assert gem.llm.embed.weight.grad is None, "stage 2: the VLM is frozen (requires_grad False): it must get no gradient"
    assert head.connector.fc1.weight.grad is not None and head.generator.stem.weight.grad is not None
