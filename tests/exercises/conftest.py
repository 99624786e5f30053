"""How the grading tests reach the oracles (teach/oracles.py), which are never in a student's copy nor in the
tree where a submission is graded (an oracle of flow_pair IS flow_pair: a submission that imports it would score).

Three places the grading tests run:
- `teach.py grade` / `verify` on the instructor's side: teach.py serves `import oracles` to the files of
  tests/exercises/ alone, from its own teach/oracles.py, and withdraws it once the tests are collected,
  before any submitted code runs (teach._OracleFinder); this file then finds it and does nothing.
- the instructor's repository under plain pytest (the suite, CI): loaded from teach/oracles.py here.
- a student's copy (no teach/oracles.py): a stand-in whose functions skip the test that calls them
  ("compared with the instructor's oracle when graded"); the property tests still run.
"""
import importlib.util
import os
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _skipper(name: str):
    def skip(*args, **kwargs):
        pytest.skip(f"compares with the instructor's oracle {name} (not in a student's copy): graded on submission")
    return skip


def _install():
    if "oracles" in sys.modules or importlib.util.find_spec("oracles") is not None:
        return  # the grader's finder serves it (teach.py), or already loaded
    path = os.path.join(REPO, "teach", "oracles.py")
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location("oracles", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["oracles"] = module
        spec.loader.exec_module(module)
        return
    stub = types.ModuleType("oracles", "stand-in in a student's copy: every oracle skips its test")
    def attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _skipper(name)
    stub.__getattr__ = attr
    sys.modules["oracles"] = stub


_install()
