"""docs/walkthrough.md: every command in it runs, prints what the page says (line by line; words equal,
numbers within the page's tolerance) and writes the figure it names. micro sizes, CPU."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
REL, ABS = 0.02, 0.002  # the page's stated default tolerance


def sections() -> list[tuple[str, str, float, list[str]]]:
    """-> [(command, expected output, relative tolerance, figures)] in page order."""
    text = open(os.path.join(ROOT, "docs", "walkthrough.md")).read()
    out = []
    pat = (r"```sh\n\$ (?P<cmd>[^\n]+)\n```\n(?:<!-- tolerance: (?P<tol>[\d.]+) -->\n)?```text\n(?P<out>.*?)```\n"
           r"Figure: (?P<fig>[^\n]+)")
    for m in re.finditer(pat, text, re.S):
        figs = re.findall(r"`OUT/([^`]+)`", m["fig"])
        out.append((m["cmd"], m["out"], float(m["tol"]) if m["tol"] else REL, figs))
    return out


def test_the_page_has_a_command_per_section():
    text = open(os.path.join(ROOT, "docs", "walkthrough.md")).read()
    assert len(sections()) == text.count("```sh") == len(re.findall(r"^## \d", text, re.M)) >= 7


def compare(got: str, want: str, rel: float) -> list[str]:
    bad = []
    g, w = got.strip().splitlines(), want.strip().splitlines()
    if len(g) != len(w):
        return [f"{len(g)} lines printed, the page shows {len(w)}:\n{got}"]
    for a, b in zip(g, w):
        if NUM.sub("#", a) != NUM.sub("#", b):
            bad.append(f"printed {a!r}\n   page {b!r}")
            continue
        for x, y in zip(NUM.findall(a), NUM.findall(b)):
            if abs(float(x) - float(y)) > max(ABS, rel * abs(float(y))):
                bad.append(f"printed {a!r}\n   page {b!r}  ({x} vs {y}, tolerance {rel:.0%})")
    return bad


@pytest.mark.parametrize("k", range(7))
def test_walkthrough_section(k, tmp_path):
    cmd, want, rel, figs = sections()[k]
    out = str(tmp_path)
    argv = [sys.executable if a == "python" else a.replace("OUT", out) for a in cmd.split()]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    bad = compare(r.stdout, want.replace("OUT", out), rel)
    assert not bad, f"docs/walkthrough.md section {k + 1} ({cmd}) no longer prints what the page says:\n" + "\n".join(bad)
    for f in figs:
        assert os.path.getsize(os.path.join(out, f)) > 100, f"{cmd}: figure OUT/{f} missing"
