# mistake: the causal mask is off by one (each token also sees the next one)
rep = q.shape[1] // k.shape[1]
k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
if is_causal:
    T, S = scores.shape[-2:]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T + 1)
if mask is not None:
    scores = scores.masked_fill(~mask, float("-inf"))
return scores.softmax(-1) @ v
