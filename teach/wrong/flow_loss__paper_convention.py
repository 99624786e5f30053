# mistake: writes the paper's path (x_t = t a + (1 - t) eps, target a - eps) instead of the project's flow_pair
if repeats > 1:
    ctx = [tuple(z.repeat_interleave(repeats, 0) for z in kv) for kv in ctx]
    actions, state, action_mask = (z.repeat_interleave(repeats, 0) for z in (actions, state, action_mask))
B = actions.shape[0]
noise = torch.randn(actions.shape, generator=generator, device=actions.device)
t = torch.sigmoid(t_mu + t_sigma * torch.randn(B, generator=generator, device=actions.device))
tt = t.view(-1, 1, 1)
x_t, v = tt * actions + (1 - tt) * noise, actions - noise
err = (expert(x_t, t, state, ctx) - v).pow(2).mean(-1)
m = action_mask.float()
return (err * m).sum() / m.sum().clamp(min=1.0)
