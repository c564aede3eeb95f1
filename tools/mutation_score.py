"""The mutation score of the numeric core, per module, from mutmut's state (``make mutation``).

Message text is left aside, as the bar in CONTRIBUTING.md says: a survivor whose only change is
a string (a message, a docstring) or a whole message replaced by None is counted apart. Every
other survivor is listed by name, to be killed by a test or listed in docs/testing.md with why it
cannot change a result.

    .venv/bin/python tools/mutation_score.py             # the table
    .venv/bin/python tools/mutation_score.py --survivors # and the survivors that are not text
"""

from __future__ import annotations

import argparse
import ast
import collections
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def statuses() -> dict[str, str]:
    """``{mutant: status}`` as ``mutmut results --all true`` prints them."""
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def functions() -> dict[str, ast.FunctionDef]:
    """Every original and mutated function in mutants/, by its full mutant name."""
    found = {}
    source = ROOT / "mutants" / "src" / "camlens"
    for path in source.rglob("*.py"):
        module = ".".join(("camlens", *path.relative_to(source).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "__mutmut_" in node.name:
                found[f"{module}.{node.name}"] = node
    return found


def differences(first: object, second: object, found: list) -> None:
    if type(first) is not type(second):
        found.append((first, second))
    elif isinstance(first, ast.AST):
        for field in first._fields:
            if not (field == "name" and isinstance(first, ast.FunctionDef)):
                differences(getattr(first, field), getattr(second, field), found)
    elif isinstance(first, list):
        if len(first) != len(second):
            found.append((first, second))
        else:
            for a, b in zip(first, second):
                differences(a, b, found)
    elif first != second:
        found.append((first, second))


def text_only(name: str, found_functions: dict[str, ast.FunctionDef]) -> bool:
    """Whether the mutant changes nothing but a string, or replaces a whole message by None."""
    original = found_functions.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    mutant = found_functions.get(name)
    if original is None or mutant is None:
        return False
    found: list = []
    differences(original, mutant, found)

    def message(node: object) -> bool:
        if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            return True
        if isinstance(node, ast.IfExp):  # a part said only in some cases: f", fc being {name!r}" if name else ""
            return message(node.body) and message(node.orelse)
        return isinstance(node, ast.BinOp) and all(message(side) for side in (node.left, node.right))

    return bool(found) and all(
        (isinstance(a, str) and isinstance(b, str))
        or (message(a) and isinstance(b, ast.Constant) and b.value is None)
        for a, b in found
    )


def module_of(name: str) -> str:
    return name.split(".x_")[0].split(".xǁ")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list the survivors that are not message text")
    args = parser.parse_args()
    found_functions = functions()
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for name, status in statuses().items():
        row = table[module_of(name)]
        row["mutants"] += 1
        if status == "survived":
            if text_only(name, found_functions):
                row["text"] += 1
            else:
                row["survived"] += 1
                survivors.append(name)
        else:
            row[status] += 1
    print(f"{'module':38} {'mutants':>7} {'killed':>7} {'survived':>8} {'text':>5} {'no tests':>8} "
          f"{'unrun':>6} {'score':>7}")
    total: collections.Counter = collections.Counter()
    for module in sorted(table):
        row = table[module]
        total.update(row)
        print(line(module, row))
    print(line("the core", total))
    if args.survivors:
        print("\n".join(["", "survivors that are not message text:", *sorted(survivors)]))


def line(label: str, row: collections.Counter) -> str:
    """Killed over the mutants run, message text left aside (timeouts count as killed)."""
    killed = row["killed"] + row["timeout"]
    judged = killed + row["survived"] + row["no tests"]
    score = f"{100 * killed / judged:.1f} %" if judged else "-"
    return (f"{label:38} {row['mutants']:>7} {killed:>7} {row['survived']:>8} {row['text']:>5} "
            f"{row['no tests']:>8} {row['not checked']:>6} {score:>7}")


if __name__ == "__main__":
    main()
