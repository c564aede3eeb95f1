"""tools/mutation_score.py tells message text from every other change (CONTRIBUTING.md's bar)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "mutation_score", Path(__file__).resolve().parents[1] / "tools" / "mutation_score.py")
mutation_score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_score)

ORIGINAL = '''
def x_f__mutmut_orig(a):
    """Doc."""
    if a < 0:
        raise ValueError(f"a is {a}, " + (f"{a!r} " if a else "") + "not negative")
    return a * 2
'''


@pytest.mark.parametrize("mutant, text", [
    ('"""XXDoc.XX"""', True),  # the docstring
    ('raise ValueError(None)', True),  # the whole message
    ('raise ValueError(f"a is {a}, " + (f"{a!r} " if a else "") + "XXnot negativeXX")', True),
    ('return a / 2', False),
    ('if a <= 0:', False),
    ('raise ValueError(f"a is {None}, " + (f"{a!r} " if a else "") + "not negative")', False),  # from None: not text
    ('raise ValueError(f"a is {a}, " + (f"{a!r} " if a or True else "") + "not negative")', False),
])
def test_message_text_is_told_from_other_changes(mutant, text):
    lines = ORIGINAL.replace("x_f__mutmut_orig", "x_f__mutmut_1").splitlines()
    key = mutant.split("(")[0].split(" ")[0].strip('"')
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(key) or (key.startswith("XX") and stripped.startswith('"""')):
            lines[i] = line[: len(line) - len(line.lstrip())] + mutant
            break
    assert any(line.strip() == mutant for line in lines)  # the line was replaced
    functions = {}
    for source in (ORIGINAL, "\n".join(lines)):
        node = ast.parse(source).body[0]
        functions[f"camlens.m.{node.name}"] = node
    assert mutation_score.text_only("camlens.m.x_f__mutmut_1", functions) is text
    assert mutation_score.module_of("camlens.m.x_f__mutmut_1") == "camlens.m"
