"""Inputs the grading tests build (not answers: these ship in a student's copy, unlike teach/oracles.py)."""
import torch


def rope_tables(T: int, hd: int, theta: float = 1e4, offset: int = 0):
    """cos/sin (1, 1, T, hd) in the model's layout: angle of pair i (dims i and i + hd/2) repeated twice."""
    i = torch.arange(hd // 2, dtype=torch.float64)
    ang = torch.outer(torch.arange(offset, offset + T, dtype=torch.float64), theta ** (-2.0 * i / hd))  # (T, hd/2)
    two = torch.cat([ang, ang], dim=1)
    return two.cos().float()[None, None], two.sin().float()[None, None]
