# mistake: the flipped velocity target x0 - noise (the path itself is right)
t = t.view(-1, *[1] * (x0.dim() - 1))
return (1 - t) * x0 + t * noise, x0 - noise
