# mistake: min-max normalisation instead of the 2nd-98th percentiles (one outlier pixel rescales everything)
d = np.asarray(depth_m, dtype=np.float64)
valid = np.isfinite(d) & (d > 0)
out = np.ones(d.shape, np.float32)
if valid.any():
    inv = 1.0 / d[valid]
    lo, hi = inv.min(), inv.max()
    out[valid] = 1.0 - np.clip((inv - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
w = _resize(torch.from_numpy(valid.astype(np.float32))[None], size)
t = _resize(torch.from_numpy(out * valid)[None], size) / w.clamp(min=1e-8)
return torch.where(w > 0, t, torch.ones_like(t))
