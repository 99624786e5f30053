# mistake: drops the z^2 / 4n^2 term under the square root
if n == 0:
    return 0.0, 1.0
p = k / n
den = 1 + z * z / n
mid = (p + z * z / (2 * n)) / den
half = z * math.sqrt(p * (1 - p) / n) / den
return max(0.0, mid - half), min(1.0, mid + half)
