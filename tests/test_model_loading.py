"""Loading the models users bring (issue 21): a factory module in the current folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import NET_MODELS, SAMPLES

CAMLENS = Path(sys.executable).parent / "camlens"


def test_a_factory_module_in_the_current_folder_is_found_as_python_m_would(tmp_path):
    """The console script's path starts with its own folder: `--model mymodule:factory` failed with
    "No module named 'mymodule'" although mymodule.py was in the current folder."""
    (tmp_path / "mymodule.py").write_text(NET_MODELS)
    shutil.copy(SAMPLES / "coffee.png", tmp_path / "coffee.png")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(CAMLENS), "explain", "coffee.png", "--model", "mymodule:net", "--input-size", "16",
                           "-m", "gradcam", "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "coffee" / "maps.npz").is_file()
    done = subprocess.run([str(CAMLENS), "explain", "coffee.png", "--model", "elsewhere:net", "--out", "out2"],
                          cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "camlens: error: cannot import 'elsewhere' for --model elsewhere:net: no module 'elsewhere' in the current "
        "folder or on the Python path; run camlens from the folder that holds it, or add that folder to PYTHONPATH"]
