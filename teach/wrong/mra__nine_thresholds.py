# mistake: np.arange(0.50, 0.95, 0.05) stops before 0.95: nine thresholds, not ten
if pred is None or not math.isfinite(pred):
    return 0.0
rel = abs(pred - gt) / max(abs(gt), 1e-9)
thetas = np.arange(0.50, 0.95, 0.05)
return float(np.mean(rel < 1.0 - thetas))
