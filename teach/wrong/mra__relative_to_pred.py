# mistake: the relative error divided by the prediction instead of the ground truth
if pred is None or not math.isfinite(pred):
    return 0.0
rel = abs(pred - gt) / max(abs(pred), 1e-9)
thetas = np.arange(0.50, 0.951, 0.05)
return float(np.mean(rel < 1.0 - thetas))
