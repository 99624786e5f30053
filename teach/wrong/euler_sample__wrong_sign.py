# mistake: steps +1/steps in t (x + v / steps) although t runs from 1 down to 0
x = noise
for i in range(steps):
    t = torch.full((x.shape[0],), 1.0 - i / steps, device=x.device)
    x = x + velocity(x, t) / steps
return x
