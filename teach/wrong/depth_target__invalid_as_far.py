# mistake: invalid pixels are averaged in as far (1) instead of being left out of each cell's mean
d = np.asarray(depth_m, dtype=np.float64)
valid = np.isfinite(d) & (d > 0)
out = np.ones(d.shape, np.float32)
if valid.any():
    inv = 1.0 / d[valid]
    lo, hi = np.percentile(inv, [2, 98])
    out[valid] = 1.0 - np.clip((inv - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
return _resize(torch.from_numpy(out)[None], size)
