"""Session-scoped data fixtures shared by every test file (owner: data engineer).

micro_data  -> path (str) of a generated `micro` VLM dataset: train/val/test.jsonl, images/, depth/,
               states/, tokenizer.json, stats.json (tens of samples, 64x64, every question type).
micro_demos -> path (str) of a few successful expert demo episodes (*.npz) plus norm_stats.json.
one_thread   -> every test runs torch on one thread (autouse).
Both data fixtures are generated once per test session into a temporary directory (a few seconds each).
"""
import pytest
import torch


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    import sim_data
    root = tmp_path_factory.mktemp("micro_data")
    cfg = sim_data.GenConfig(**dict(sim_data.GEN_PRESETS["micro"], out=str(root), preset="micro"))
    sim_data.generate(cfg)
    return str(root)


@pytest.fixture(scope="session")
def micro_demos(tmp_path_factory):
    import sim_data
    root = tmp_path_factory.mktemp("micro_demos")
    sim_data.generate_demos(sim_data.DemoConfig(out=str(root), suite="goal", tasks="0,6", per_task=2, workers=1))
    return str(root)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on a busy 2-core machine a second intra-op thread only adds spin-waiting (up to 40x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
