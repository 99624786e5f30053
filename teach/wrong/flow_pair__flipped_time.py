# mistake: the paper's VLA time direction (t = 1 is data), self-consistent but not this project's convention
t = t.view(-1, *[1] * (x0.dim() - 1))
return t * x0 + (1 - t) * noise, x0 - noise
