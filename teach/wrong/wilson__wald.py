# mistake: the Wald interval p +- z sqrt(p (1 - p) / n), clipped to [0, 1]
if n == 0:
    return 0.0, 1.0
p = k / n
half = z * math.sqrt(p * (1 - p) / n)
return max(0.0, p - half), min(1.0, p + half)
