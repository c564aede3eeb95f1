"""The command line, end to end on the embedded model, and every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camlens.methods
from helpers import SAMPLES, one_line_error, run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One real run: the sample cat with all five methods, as a user would type it."""
    out = tmp_path_factory.mktemp("full") / "out"
    process = subprocess.run(
        [sys.executable, "-m", "camlens", "explain", str(SAMPLES / "chelsea.png"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    return process, out


def test_end_to_end_all_five_methods(full_run):
    process, out = full_run
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    folder = out / "chelsea"
    manifest = json.loads((out / "manifest.json").read_text())
    methods = ["cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam"]
    assert manifest["methods"] == methods
    image = manifest["images"][0]
    top = image["predictions"][0]
    for method in methods:
        overlay = folder / f"{method}_1_{top['name'].replace(' ', '-')}.png"
        assert overlay.exists()
        width, height = Image.open(overlay).size
        assert width == 262 and height > 262  # the 300 * 224 / 256 square the model sees, and a caption
        assert method in image["timings"]
    figure = Image.open(folder / "comparison.png")
    assert figure.width > 5 * figure.height / 2  # one row: the photo and five methods
    maps = np.load(folder / "maps.npz")
    for method in methods:
        assert maps[f"{method}/maps"].shape == (1, 224, 224)
        assert maps[f"{method}/raw/features"].shape == (1, 7, 7)
        assert 0 <= maps[f"{method}/maps"].min() and maps[f"{method}/maps"].max() <= 1
    assert maps["targets"].tolist() == [top["class"]]
    for name in ("tiger cat", "chelsea.png"):
        assert name in process.stdout  # the summary table


def test_manifest_content(full_run):
    _, out = full_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "efficientnet_lite0"
    assert manifest["model"]["classes"] == 1000
    assert manifest["model"]["preprocess"]["size"] == 224
    assert manifest["target_layers"] == ["features"] and manifest["default_layer"] is True
    assert manifest["targets"] == {"top_k": 1}
    assert manifest["options"]["smoothgradcam++"]["seed"] == 0
    assert manifest["options"]["scorecam"]["score"] == "probability"
    assert manifest["versions"]["torch"] == torch.__version__
    image = manifest["images"][0]
    assert image["status"] == "ok" and image["size"] == [451, 300]
    predictions = image["predictions"]
    assert len(predictions) == 5
    assert predictions[0]["name"] in {"tiger cat", "tabby", "Egyptian cat"}
    assert predictions[0]["probability"] >= predictions[1]["probability"] > 0.1
    assert image["targets"] == predictions[:1]
    assert manifest["summary"] == {"ok": 1, "failed": 0, "skipped": 0, "kept": 0,
                                   "seconds": manifest["summary"]["seconds"]}


def test_class_and_top_k(tmp_path, capsys):
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--class", "Cup", "--out", tmp_path], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["images"][0]["targets"][0]["class"] == 968
    assert manifest["targets"] == {"class": 968}
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam++", "--top-k", "3", "--out", tmp_path], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    targets = manifest["images"][0]["targets"]
    assert [t["name"] for t in targets][0] == "espresso" and len(targets) == 3
    assert len(list((tmp_path / "coffee").glob("gradcam++_*.png"))) == 3
    assert np.load(tmp_path / "coffee" / "maps.npz")["gradcam++/maps"].shape == (3, 224, 224)


def make_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    paths = {}
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (16, 12, 48, 36))
    paths["alpha"] = folder / "alpha.png"
    rgba.save(paths["alpha"])
    paths["grey"] = folder / "grey.png"
    Image.open(SAMPLES / "cameraman.png").save(paths["grey"])
    paths["tiny"] = folder / "tiny.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(paths["tiny"])
    paths["corrupt"] = folder / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    png = (SAMPLES / "chelsea.png").read_bytes()
    paths["truncated"] = folder / "truncated.png"
    paths["truncated"].write_bytes(png[: len(png) // 2])
    paths["notes"] = folder / "notes.txt"
    paths["notes"].write_text("not an image")
    return paths


def test_bad_and_odd_inputs_are_reported_and_the_rest_processed(tmp_path, capsys):
    paths = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    missing = tmp_path / "missing.jpg"
    code, stdout, err = run(["explain", tmp_path / "in", missing, "-m", "gradcam", "--out", out], capsys)
    assert code == 1
    assert "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    status = {Path(entry["input"]).name: entry for entry in manifest["images"]}
    for ok in ("alpha.png", "grey.png", "tiny.png"):
        assert status[ok]["status"] == "ok", status[ok]
        assert (out / Path(ok).stem / "comparison.png").exists()
    assert status["grey.png"]["predictions"][0]["name"] == "tripod"
    assert "corrupt or truncated" in status["truncated.png"]["error"] or "truncated" in status["truncated.png"]["error"]
    assert status["corrupt.jpg"]["status"] == "failed"
    assert status["missing.jpg"]["error"].endswith("no such file")
    for failed in ("corrupt", "truncated", "missing"):
        assert not (out / failed).exists()  # no half-written output
    assert manifest["skipped"] == [str(paths["notes"])]
    assert manifest["summary"]["ok"] == 3 and manifest["summary"]["failed"] == 3
    assert f"failed: {missing}: no such file" in err
    assert "skipped (not an image or array file)" in err
    assert sorted(p.name for p in out.glob(".*")) == [".camlens-lock", ".camlens-run.json"]  # no staging left


def test_alpha_is_composited_on_white():
    from camlens.io import load_image

    image = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 255, 255))
    path = Path(__file__).parent / "_alpha_tmp.png"
    try:
        image.save(path)
        assert [load_image(path).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]
    finally:
        path.unlink()


def test_huge_image(tmp_path, capsys):
    path = tmp_path / "huge.png"
    Image.new("RGB", (10000, 10000), (120, 30, 200)).save(path, compress_level=1)
    code, _, err = run(["explain", path, "-m", "cam", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["images"][0]["size"] == [10000, 10000]


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["-m", "gradcm"], 1, "unknown method 'gradcm'; did you mean gradcam"),
        (["--target-layer", "featurs"], 1, "unknown layer 'featurs'; closest: features"),
        (["--target-layer", "_fc"], 1, "outputs a tensor of shape (2, 1000), not a feature map"),
        (["--class", "1000"], 1, "class 1000 is out of range: the model has 1000 classes (valid: 0 to 999)"),
        (["--class", "espreso"], 1, "unknown class 'espreso'; did you mean 'espresso'"),
        (["--class", "cup", "--top-k", "2"], 1, "give --class or --top-k, not both"),
        (["--top-k", "0"], 2, "0 is not in the range x>=1"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], 1, "available"
         if not torch.cuda.is_available() else "unknown device"),
        (["--model", "resnet51"], 1, "unknown model 'resnet51'"),
        (["--frobnicate"], 2, "No such option '--frobnicate'"),
    ],
)
def test_user_errors_are_one_line(args, code, text, tmp_path, capsys):
    got, _, err = run(["explain", SAMPLES / "coffee.png", "--out", tmp_path, *args], capsys)
    one_line_error(got, err, code, text)
    assert not (tmp_path / "manifest.json").exists()


def test_output_directory_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # One cheap method: on a busy machine the five methods' plan (said above 30 s) would come first.
    got, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--out", blocker / "out"], capsys)
    one_line_error(got, err, 1, "cannot write to output directory")


def test_directory_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    got, _, err = run(["explain", tmp_path / "empty", "--out", tmp_path / "out"], capsys)
    one_line_error(got, err, 1, "the directory has no image or array files")


def test_methods_and_layers_commands(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    # Every registered method, once, in the registry's order.
    assert [line.split()[0] for line in lines] == list(camlens.methods.METHODS)
    assert {"cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam"} <= set(camlens.methods.METHODS)
    code, out, _ = run(["layers"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if " features " in line)
    assert "1280x7x7" in row and "default target layer" in row
    assert "_blocks.15" in out and "_conv_stem" in out
    code, out, _ = run(["layers", "--input-size", "320"], capsys)
    assert "1280x10x10" in out


def test_console_script_installed():
    script = Path(sys.executable).parent / "camlens"
    assert script.exists() or shutil.which("camlens")
