"""Exported models (issue 21, item 6): a torch.export archive of a CNN gets CAM (its head is pooling
plus a linear layer, unflattened into modules that are not nn.Linear); one of a transformers model,
whose forward returns a Hugging Face output class, loads in a process that never imported
transformers, and is explained with the default layer found; an output class nobody registered gets
one line that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import camlens
from camlens.methods.cam import linear_like
from camlens.models import load_model
from helpers import SAMPLES, run


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def export(model, path, size=16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.randn(2, 3, size, size),), strict=False,
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
    return path


def test_cam_finds_the_linear_head_of_an_exported_cnn(tmp_path):
    model = small()
    loaded = load_model(str(export(model, tmp_path / "small.pt2")))
    head = loaded.module.get_submodule("6")
    assert not isinstance(head, nn.Linear) and linear_like(head)  # an InterpreterModule with weight and bias
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = camlens.explain(loaded.module, images, "cam", targets=[0, 1, 2])
    expected = camlens.explain(model, images, "cam", targets=[0, 1, 2])
    assert got.target_layers == expected.target_layers == ("3",)
    torch.testing.assert_close(got.maps, expected.maps, rtol=1e-5, atol=1e-6)


def test_the_command_line_runs_cam_on_an_exported_cnn(tmp_path, capsys):
    path = export(small(), tmp_path / "small.pt2", size=32)
    code, out, err = run(["explain", SAMPLES / "coffee.png", "--model", path, "--input-size", "32",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "CAM skipped" not in err and "CAM" in out  # was skipped: "no nn.Linear with 8 inputs"


def test_an_embedding_is_no_classifier():
    assert not linear_like(nn.Embedding(10, 8)) and linear_like(nn.Linear(8, 4))
    assert not linear_like(nn.Sequential(nn.Linear(8, 4)))


transformers = pytest.importorskip("transformers")


def tiny_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(config).eval()


def fresh_python(code, cwd, env=None):
    """``code`` in a new interpreter: pytest's already imported transformers, which registers its classes."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | (env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=300)


def test_an_exported_transformers_model_loads_where_transformers_was_never_imported(tmp_path):
    model = tiny_vit()
    path = export(model, tmp_path / "vit.pt2", size=32)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    done = fresh_python(f"""
        import sys, warnings, torch
        warnings.simplefilter("ignore")
        import camlens
        from camlens.models import load_model
        assert "transformers" not in sys.modules
        module = load_model({str(path)!r}).module
        images = torch.load({str(tmp_path / 'images.pt')!r})
        explanation = camlens.explain(module, images, "gradcam")
        torch.save({{"maps": explanation.maps, "layers": explanation.target_layers,
                     "reshape": explanation.options["reshape"]}}, {str(tmp_path / 'got.pt')!r})
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    got = torch.load(tmp_path / "got.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = camlens.explain(model, images, "gradcam")
    assert got["layers"] == expected.target_layers == ("vit.layers.1.layernorm_before",)
    assert got["reshape"] == "tokens:1:4x4"
    torch.testing.assert_close(got["maps"], expected.maps, rtol=1e-5, atol=1e-6)


def test_without_transformers_installed_it_is_one_line_that_says_what_to_do(tmp_path):
    path = export(tiny_vit(), tmp_path / "vit.pt2", size=32)
    done = fresh_python(f"""
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "transformers" else real(name, *a)
        from camlens.cli import main
        sys.argv = ["camlens", "layers", "--model", {str(path)!r}, "--input-size", "32"]
        main()
    """, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"camlens: error: {path}: the exported model returns transformers.modeling_outputs.ImageClassifierOutput, a "
        "class of the transformers package, which is not installed here: pip install transformers, or export a "
        "wrapper whose forward returns the logits tensor"]


def test_an_output_class_nobody_registered_is_one_line(tmp_path):
    (tmp_path / "outputs_here.py").write_text(textwrap.dedent("""
        import dataclasses, torch
        from torch import nn

        @dataclasses.dataclass
        class Scores:
            logits: torch.Tensor

        torch.export.register_dataclass(Scores, serialized_type_name="outputs_here.Scores")

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.fc = nn.Linear(4, 2)
            def forward(self, x):
                return Scores(self.fc(self.conv(x).mean(dim=(2, 3))))
    """))
    made = fresh_python(f"""
        import torch, outputs_here
        program = torch.export.export(outputs_here.Net().eval(), (torch.randn(2, 3, 16, 16),))
        torch.export.save(program, {str(tmp_path / 'net.pt2')!r})
    """, tmp_path)
    assert made.returncode == 0, made.stderr
    done = fresh_python(f"""
        import sys
        from camlens.cli import main
        sys.argv = ["camlens", "layers", "--model", {str(tmp_path / 'net.pt2')!r}, "--input-size", "16"]
        main()
    """, tmp_path / "..")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the exported model returns outputs_here.Scores, a class this process does not know" \
        in lines[0] and "export a wrapper whose forward returns a tensor" in lines[0], done.stderr
