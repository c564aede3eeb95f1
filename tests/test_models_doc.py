"""docs/models.md: every Python block runs as written (each in a namespace of its own) and its
assertions hold, on models built from small configurations (transformers is a test-only extra)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_block_runs_as_written(index):
    source = BLOCKS[index]
    if "transformers" in source:
        pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, f"docs/models.md block {index + 1}", "exec"), {"__name__": f"models_doc_{index}"})


def test_the_readme_links_it():
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "docs/models.md" in readme
