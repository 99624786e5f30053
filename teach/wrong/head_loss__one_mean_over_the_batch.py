# mistake: one mean over every valid pixel of the batch (samples with big masks weigh more), not per-sample means
m = torch.ones(B, dtype=torch.bool, device=target.device) if valid is None else valid.bool()
m = (m[:, None, None, None] if m.dim() == 1 else m).expand(B, C, S, S)
cond = self.connector(image_hidden)
x0 = torch.where(m, target.nan_to_num(0.0), 0.0).to(cond.dtype) * 2 - 1
if self.cfg.objective == "regress":
    pred = self.generator(torch.zeros_like(x0), torch.zeros(B, device=x0.device), cond)
    err = (pred - x0).float().pow(2)
else:
    t, noise, u = draw_noise(x0, seeds)
    if self.training:
        drop = u < self.cfg.cfg_drop
        cond = torch.where(drop[:, None, None], null_condition(cond), cond)
    xt, v = flow_pair(x0, noise, t)
    err = (self.generator(xt, t, cond) - v).float().pow(2)
return (err * m).sum() / m.sum().clamp(min=1)
