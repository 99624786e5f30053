# mistake: no condition drop in training (the unconditional flow that CFG needs is never learnt)
m = torch.ones(B, dtype=torch.bool, device=target.device) if valid is None else valid.bool()
m = (m[:, None, None, None] if m.dim() == 1 else m).expand(B, C, S, S)
cond = self.connector(image_hidden)
x0 = torch.where(m, target.nan_to_num(0.0), 0.0).to(cond.dtype) * 2 - 1
if self.cfg.objective == "regress":
    pred = self.generator(torch.zeros_like(x0), torch.zeros(B, device=x0.device), cond)
    err = (pred - x0).float().pow(2)
else:
    t, noise, u = draw_noise(x0, seeds)
    xt, v = flow_pair(x0, noise, t)
    err = (self.generator(xt, t, cond) - v).float().pow(2)
n = m.flatten(1).sum(1)
per = (err * m).flatten(1).sum(1) / n.clamp(min=1)
return per.sum() / (n > 0).sum().clamp(min=1)
