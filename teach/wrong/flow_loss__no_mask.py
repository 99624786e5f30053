# mistake: averages over every step, padding past the episode end included
if repeats > 1:
    ctx = [tuple(z.repeat_interleave(repeats, 0) for z in kv) for kv in ctx]
    actions, state, action_mask = (z.repeat_interleave(repeats, 0) for z in (actions, state, action_mask))
B = actions.shape[0]
noise = torch.randn(actions.shape, generator=generator, device=actions.device)
t = torch.sigmoid(t_mu + t_sigma * torch.randn(B, generator=generator, device=actions.device))
x_t, v = flow_pair(actions, noise, t)
return (expert(x_t, t, state, ctx) - v).pow(2).mean()
