# mistake: normalises depth itself (near = 0, far = 1 all the same) instead of 1 - normalised inverse depth
d = np.asarray(depth_m, dtype=np.float64)
valid = np.isfinite(d) & (d > 0)
out = np.ones(d.shape, np.float32)
if valid.any():
    lo, hi = np.percentile(d[valid], [2, 98])
    out[valid] = np.clip((d[valid] - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
w = _resize(torch.from_numpy(valid.astype(np.float32))[None], size)
t = _resize(torch.from_numpy(out * valid)[None], size) / w.clamp(min=1e-8)
return torch.where(w > 0, t, torch.ones_like(t))
