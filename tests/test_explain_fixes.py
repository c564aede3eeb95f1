"""Regression tests for issue 7 on `camlens explain`: CAM on layers it cannot explain, --fc,
JPEG decoding shared with the Python API, the locked and merged output folder, error labels,
the figures and the help."""

from __future__ import annotations

import ast
import errno
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from camlens.cli.common import prepare, run_options
from camlens.errors import CamlensError
from camlens.io import expand_inputs, load_image
from camlens.models import Preprocess, efficientnet_lite0
from helpers import SAMPLES, one_line_error, run

explain_module = importlib.import_module("camlens.cli.explain")  # `camlens.cli.explain` is also the command
TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"

MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """features -> global average pool -> fc. With ``aux``, a second nn.Linear with the same
    inputs comes last, so that CAM's own search picks it, and it is not the classifier."""

    def __init__(self, aux=False):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU()
        )
        self.fc = nn.Linear(8, 4)
        if aux:
            self.aux = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def plain():
    return Net()


def two_heads():
    return Net(aux=True)
'''
TINY = ["--model", "explain_fixes_models:plain", "--input-size", "32"]


@pytest.fixture
def tiny_models(tmp_path, monkeypatch):
    (tmp_path / "explain_fixes_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "explain_fixes_models", raising=False)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# -- 1. CAM where it does not fit; --fc ---------------------------------------------------------

def test_default_methods_skip_cam_with_a_note(tiny_models, photo, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["explain", photo, *TINY, "--target-layer", "features.1", "--out", out], capsys)
    assert code == 0, err
    data = manifest(out)
    assert data["methods"] == ["gradcam", "gradcam++", "smoothgradcam++", "scorecam"]
    reason = data["skipped_methods"]["cam"]
    assert reason.endswith("but the model has no nn.Linear with 6 inputs (the channels of layer 'features.1')")
    assert "CAM skipped: CAM needs a head" in " ".join(stdout.split())  # the summary table's note
    assert not list((out / "photo").glob("cam_*"))
    assert not any(key.startswith("cam/") for key in np.load(out / "photo" / "maps.npz").files)


def test_the_readme_earlier_layer_command_skips_cam():
    """`camlens explain photo.jpg --target-layer _blocks.14`: the checks before any work."""
    skipped = {}
    model_args = dict(model_spec="efficientnet_lite0", weights=None, input_size=None, resize=None, mean=None,
                      std=None, class_names=None)
    chosen, *_ = prepare((), "out", "cpu", "_blocks.14", model_args, on_skip=skipped.__setitem__)
    assert chosen == ["gradcam", "gradcam++", "smoothgradcam++", "scorecam"]
    assert list(skipped) == ["cam"] and "layer '_blocks.14'" in skipped["cam"]


def test_cam_asked_for_keeps_its_error(tiny_models, photo, tmp_path, capsys):
    code, _, err = run(["explain", photo, *TINY, "-m", "cam", "-m", "gradcam", "--target-layer", "features.1",
                        "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, 1, "CAM needs a head")
    assert "(--fc)" in err
    assert not (tmp_path / "out").exists()


def test_fc_names_the_classifier(tiny_models, photo, tmp_path, capsys):
    two_heads = ["--model", "explain_fixes_models:two_heads", "--input-size", "32"]
    out = tmp_path / "out"
    code, _, err = run(["explain", photo, *two_heads, "-m", "cam", "--out", out], capsys)
    one_line_error(code, err, 1, "is not fc(global average pool")  # found alone: `aux`, the wrong one
    code, _, err = run(["explain", photo, *two_heads, "-m", "cam", "--fc", "fc", "--out", out], capsys)
    assert code == 0, err
    data = manifest(out)
    assert data["options"]["cam"]["fc"] == "fc"

    # CAM by hand: ReLU(sum_k W_fc[c, k] A^k), upsampled bilinearly, scaled to [0, 1].
    from explain_fixes_models import two_heads as build

    model = build().eval()
    settings = data["model"]["preprocess"]
    preprocess = Preprocess(size=settings["size"], resize=settings["resize"], mean=tuple(settings["mean"]),
                            std=tuple(settings["std"]), interpolation=settings["interpolation"])
    x = preprocess(Image.open(photo).convert("RGB"))[None]
    with torch.no_grad():
        activation = model.features(x)[0]
        target = int(model(x).argmax())
    raw = torch.relu(torch.einsum("k,khw->hw", model.fc.weight[target].detach(), activation))
    up = F.interpolate(raw[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expected = (up - up.min()) / (up.max() - up.min())
    maps = np.load(out / "photo" / "maps.npz")
    layer = data["target_layers"][0]
    assert data["images"][0]["targets"][0]["class"] == target
    np.testing.assert_allclose(maps[f"cam/raw/{layer}"][0], raw.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps["cam/maps"][0], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "args, text",
    [
        (["-m", "gradcam", "--fc", "fc"], "--fc names CAM's classifier, but CAM is not among the methods"),
        (["-m", "cam", "--fc", "fcc"], "--fc fcc: unknown layer 'fcc'"),
        (["-m", "cam", "--fc", "features"], "--fc features: fc must be an nn.Linear (or a linear layer of an exported model), not Sequential"),
    ],
)
def test_fc_errors_are_one_line(args, text, tiny_models, photo, tmp_path, capsys):
    code, _, err = run(["explain", photo, *TINY, *args, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, 1, text)


# -- 2. no test asserts wall-clock time ---------------------------------------------------------

TIME_WORDS = re.compile(r"\b(timings?|seconds|elapsed|duration|wall|perf_counter|monotonic|time)\b")


def upper_time_bounds(source: str) -> list[int]:
    """Lines of asserts that bound a time from above (``t < 60``, ``60 >= t``): what a loaded
    machine can fail. A time checked to be positive or equal to an injected clock is no such bound."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assert):
            continue
        for compare in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            sides = [compare.left, *compare.comparators]
            for left, op, right in zip(sides, compare.ops, sides[1:]):
                timed = left if isinstance(op, (ast.Lt, ast.LtE)) else right if isinstance(op, (ast.Gt, ast.GtE)) else None
                if timed is not None and TIME_WORDS.search(ast.unparse(timed)):
                    lines.append(node.lineno)
    return lines


def test_no_test_asserts_wall_clock_time():
    offenders = [f"{path.name}:{line}" for path in sorted(TESTS.glob("*.py")) for line in upper_time_bounds(path.read_text())]
    assert offenders == []


def test_the_wall_clock_guard_catches_upper_bounds_only():
    upper = ['timings["total"] < 60', "5.0 >= elapsed", 'x == 1 and seconds["total"] <= limit']
    assert upper_time_bounds("\n".join(f"assert {bound}" for bound in upper)) == [1, 2, 3]
    not_upper = ['seconds["figures"] > 0', '0 < seconds["maps"]', "count < 3"]
    assert upper_time_bounds("\n".join(f"assert {check}" for check in not_upper)) == []


# -- 5. the command line and the Python API see the same pixels ---------------------------------

def detailed_jpeg(path: Path, size: tuple[int, int]) -> Path:
    """A photo at ``size`` with fine detail added, so that a reduced decode would show."""
    photo = Image.open(SAMPLES / "chelsea.png").convert("RGB").resize(size, Image.Resampling.LANCZOS)
    noise = np.random.default_rng(0).normal(0, 12, (size[1], size[0], 1))
    Image.fromarray(np.clip(np.asarray(photo) + noise, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def test_jpegs_are_decoded_in_full(tmp_path):
    path = detailed_jpeg(tmp_path / "big.jpg", (1200, 1024))  # 4 x the resize target on its shorter side
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(Image.open(path).convert("RGB")))


def odd_images(folder: Path) -> list[Path]:
    """A JPEG stored sideways with an EXIF orientation, and greyscale, RGBA and palette PNGs."""
    rocket = Image.open(SAMPLES / "rocket.jpg").convert("RGB")
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # viewers turn it 90 degrees clockwise
    rocket.transpose(Image.Transpose.ROTATE_90).save(folder / "sideways.jpg", exif=exif, quality=95)
    chelsea = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    rgba.save(folder / "rgba.png")
    chelsea.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    return [folder / "sideways.jpg", SAMPLES / "cameraman.png", folder / "rgba.png", folder / "palette.png"]


def test_command_line_and_python_api_agree(tmp_path, capsys):
    paths = [SAMPLES / "rocket.jpg", detailed_jpeg(tmp_path / "portrait.jpg", (512, 600)), *odd_images(tmp_path)]
    out = tmp_path / "out"
    # The model itself, as the check below runs it; the inference copy is checked in test_accelerate.py.
    code, _, err = run(["explain", *paths, "-m", "cam", "--device", "cpu", "--no-optimize", "--out", out], capsys)
    assert code == 0, err
    model = efficientnet_lite0()
    for path, entry in zip(paths, manifest(out)["images"]):
        with torch.no_grad():  # the image as Pillow opens it: model.preprocess takes any mode
            probabilities = model(model.preprocess(Image.open(path))[None]).softmax(dim=1)[0]
        top = probabilities.topk(5)
        assert [p["class"] for p in entry["predictions"]] == top.indices.tolist()
        np.testing.assert_allclose([p["probability"] for p in entry["predictions"]], top.values.numpy(), atol=1e-6)


# -- 9. one run at a time per output folder; earlier folders listed; leftovers of killed runs --

def test_a_second_run_into_a_locked_folder_is_refused(tiny_models, photo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(out / ".camlens-lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(["explain", photo, *TINY, "-m", "gradcam", "--out", out], capsys)
    finally:
        holder.kill()
        holder.communicate()
    one_line_error(code, err, 1, f"another camlens run is writing to {out}")
    assert [p.name for p in out.iterdir()] == [".camlens-lock"]
    code, _, err = run(["explain", photo, *TINY, "-m", "gradcam", "--out", out], capsys)
    assert code == 0, err  # the holder was killed: its lock went with it


def test_sequential_runs_keep_and_list_earlier_folders(tiny_models, photo, tmp_path, capsys):
    out = tmp_path / "out"
    other = tmp_path / "other.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    assert run(["explain", photo, *TINY, "-m", "gradcam", "--out", out], capsys)[0] == 0
    code, stdout, err = run(["explain", other, *TINY, "-m", "gradcam++", "--out", out], capsys)
    assert code == 0, err
    data = manifest(out)
    assert [i["output"] for i in data["images"]] == ["other"]
    assert [k["output"] for k in data["kept"]] == ["photo"] and data["summary"]["kept"] == 1
    kept = data["kept"][0]
    assert kept["input"] == str(photo) and kept["status"] == "ok"
    assert kept["run"]["methods"] == ["gradcam"] and kept["run"]["target_layers"] == data["target_layers"]
    assert kept["files"]["overlays"]["gradcam"] == [p.name for p in (out / "photo").glob("gradcam_*.png")]
    assert "1 folder(s) of earlier runs kept" in " ".join(stdout.split())
    # Explained again, the image's folder is replaced and listed with this run, not as kept.
    assert run(["explain", photo, *TINY, "-m", "scorecam", "--out", out], capsys)[0] == 0
    data = manifest(out)
    assert [i["output"] for i in data["images"]] == ["photo"] and [k["output"] for k in data["kept"]] == ["other"]
    listed = {i["output"] for i in data["images"]} | {k["output"] for k in data["kept"]}
    assert listed == {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_another_image_of_the_same_name_never_replaces_a_folder(tiny_models, photo, tmp_path, capsys):
    out = tmp_path / "out"
    namesake = tmp_path / "elsewhere" / Path(photo).name
    namesake.parent.mkdir()
    Image.open(photo).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(namesake)
    assert run(["explain", photo, *TINY, "-m", "gradcam", "--out", out], capsys)[0] == 0
    first = (out / "photo" / "maps.npz").read_bytes()
    assert run(["explain", namesake, *TINY, "-m", "gradcam", "--out", out], capsys)[0] == 0
    data = manifest(out)
    assert [i["output"] for i in data["images"]] == ["photo-2"] and [k["output"] for k in data["kept"]] == ["photo"]
    assert data["kept"][0]["input"] == str(photo) and (out / "photo" / "maps.npz").read_bytes() == first
    # The same file again reuses its own folder.
    assert run(["explain", namesake, *TINY, "-m", "gradcam", "--out", out], capsys)[0] == 0
    assert [i["output"] for i in manifest(out)["images"]] == ["photo-2"]


def test_leftovers_of_killed_runs_are_removed(tiny_models, photo, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".camlens-staging-dead" / "sub").mkdir(parents=True)
    (out / ".camlens-staging-dead" / "maps.npz").write_bytes(b"half")
    (out / ".camlens-old-dead" / "old").mkdir(parents=True)
    (out / ".manifest.json.dead.json").write_text("{")
    (out / ".camlens-partial-summary.json.dead.json").write_text("{")
    (out / ".mine").write_text("the user's own hidden file")
    code, _, err = run(["explain", photo, *TINY, "-m", "gradcam", "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob(".*")) == [".camlens-lock", ".camlens-run.json", ".mine"]


# -- 10. error labels ---------------------------------------------------------------------------

def test_error_labels_say_what_happened(tmp_path, monkeypatch):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "gone.jpg")
    locked = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    original = Image.open

    def refuse(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
    expected = {
        loop: f"{loop}: cannot be read (Too many levels of symbolic links)",
        dangling: f"{dangling}: broken symbolic link",
        locked: f"{locked}: cannot be read (Permission denied)",
        tmp_path / "missing.jpg": f"{tmp_path / 'missing.jpg'}: no such file",
    }
    for path, message in expected.items():
        with pytest.raises(CamlensError) as raised:
            load_image(path)
        assert str(raised.value) == message


def test_an_unreadable_directory_is_reported_and_the_rest_processed(tiny_models, photo, tmp_path, monkeypatch,
                                                                     capsys):
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "a.png").write_bytes(photo.read_bytes())
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.png").write_bytes(photo.read_bytes())
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")  # an entry that cannot be read: reported, not ignored
    iterdir = Path.iterdir

    def refuse(self):
        if self == closed:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    files, skipped, unreadable = expand_inputs([closed, folder])
    assert files == [folder / "b.png", folder / "loop.jpg"] and skipped == []
    assert unreadable == {closed: f"{closed}: cannot be read (Permission denied)"}
    out = tmp_path / "out"
    code, _, err = run(["explain", closed, folder, *TINY, "-m", "gradcam", "--out", out], capsys)
    assert code == 1
    assert f"failed: {closed}: cannot be read (Permission denied)" in err
    assert f"failed: {folder / 'loop.jpg'}: cannot be read" in err
    status = {Path(i["input"]).name: i["status"] for i in manifest(out)["images"]}
    assert status == {"closed": "failed", "b.png": "ok", "loop.jpg": "failed"}


def test_a_failed_write_is_not_blamed_on_the_image(tiny_models, photo, tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    out = tmp_path / "out"
    code, _, err = run(["explain", photo, *TINY, "-m", "gradcam", "--out", out], capsys)
    assert code == 1
    assert f"failed: {photo}: cannot write its outputs in {out} (No space left on device)" in err
    assert "corrupt" not in err


# -- 11. figures --------------------------------------------------------------------------------

def saturated(image: Image.Image) -> int:
    """Pixels of a strong, pure colour: only a jet colour bar has them in a figure of grey photos."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 150).sum())


@pytest.fixture
def grey_photo(tmp_path) -> Path:
    path = tmp_path / "grey.png"
    ramp = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (40, 1))
    Image.fromarray(ramp).convert("RGB").save(path)
    return path


def test_figure_title_colour_bar_captions_and_colour_map(tiny_models, grey_photo, tmp_path, monkeypatch, capsys):
    drawn = {}
    figure = explain_module.comparison_figure

    def spy(rows, path, title=None, colormap="jet"):
        drawn.update(rows=rows, title=title, colormap=colormap)
        figure(rows, path, title=title, colormap=colormap)

    monkeypatch.setattr(explain_module, "comparison_figure", spy)
    from explain_fixes_models import plain

    with torch.no_grad():  # the least probable class: surely not the top-1
        chosen = int(plain()(Preprocess(size=32, resize=37)(load_image(grey_photo))[None]).argmin())
    out = tmp_path / "out"
    code, stdout, err = run(["explain", grey_photo, *TINY, "-m", "gradcam", "--class", chosen, "--out", out], capsys)
    assert code == 0, err
    data = manifest(out)
    top, target = data["images"][0]["predictions"][0], data["images"][0]["targets"][0]
    assert target["class"] == chosen and top["class"] != chosen
    layer, explained = data["target_layers"][0], f"class {chosen} ({target['probability']:.2f})"
    assert drawn["title"] == (f"grey.png, layer {layer}\nexplained: {explained}, "
                              f"chosen with --class; top-1: {top['name']} ({top['probability']:.2f})")
    assert [panel.title for panel in drawn["rows"][0]] == [f"input\n{explained}", f"Grad-CAM\n{explained}"]
    header = next(line for line in stdout.splitlines() if "┃ image" in line)
    assert "explained class" in header and "top-1" in header
    row = next(line for line in stdout.splitlines() if "grey.png" in line)
    assert f"class {chosen}" in row and f"{top['name']} ({top['probability']:.2f})" in row
    # The colour bar: a map blended half and half over a grey photo is never a strong colour,
    # so the strong colours in the figure are the bar's.
    assert all(saturated(panel.image) == 0 for panel in drawn["rows"][0])
    assert saturated(Image.open(out / "grey" / "comparison.png")) > 1000
    # The overlay image: the blended map as in the figure, and a caption strip below it.
    overlay = Image.open(out / "grey" / f"gradcam_1_class-{chosen}.png")
    picture = drawn["rows"][0][1].image
    assert overlay.width == picture.width and overlay.height > picture.height
    assert np.array_equal(np.asarray(overlay)[: picture.height], np.asarray(picture))
    strip = np.asarray(overlay)[picture.height:]
    assert (strip < 100).any() and (strip == 255).mean() > 0.5  # dark text on white

    code, _, err = run(["explain", grey_photo, *TINY, "-m", "gradcam", "--colormap", "gray", "--no-caption",
                        "--out", out], capsys)
    assert code == 0, err
    assert drawn["colormap"] == "gray" and manifest(out)["render"] == {"colormap": "gray", "captions": False}
    overlay = Image.open(next((out / "grey").glob("gradcam_1_*.png")))
    assert overlay.size == drawn["rows"][0][1].image.size  # no caption
    assert saturated(overlay) == 0 and saturated(Image.open(out / "grey" / "comparison.png")) == 0


def test_unknown_colour_map_is_one_line(tmp_path, capsys):
    code, _, err = run(["explain", SAMPLES / "coffee.png", "--colormap", "jett", "--out", tmp_path], capsys)
    one_line_error(code, err, 1, "unknown colour map 'jett'; did you mean jet")


# -- 14. help and documented numbers ------------------------------------------------------------

def test_explain_help_says_only_what_applies(capsys):
    code, out, _ = run(["explain", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for jargon in ("seed methods", "metrics", "sanity", "re-initialis"):
        assert jargon not in text
    assert "default: all five, cam, gradcam, gradcam++, smoothgradcam++, scorecam" in text
    assert "Inputs per forward pass of Score-CAM and Smooth Grad-CAM++." in text
    assert "--fc" in text and "--colormap" in text and "--no-caption" in text


def test_run_options_take_each_command_s_help():
    @click.command()
    @run_options(seed_help="Seed of the noise and of the re-initialised weights.")
    def command(device, batch_size, seed):
        pass

    text = " ".join(command.get_help(click.Context(command)).split())
    assert "Seed of the noise and of the re-initialised weights." in text
    assert "Inputs per forward pass of Score-CAM and Smooth Grad-CAM++." in text


def test_documented_predictions_match_the_program():
    """samples/README.md and the README state the embedded model's predictions on the samples."""
    model = efficientnet_lite0()
    names = model.class_names
    actual = {}
    for photo in ("chelsea.png", "coffee.png", "rocket.jpg", "cameraman.png"):
        with torch.no_grad():
            probabilities = model(model.preprocess(load_image(SAMPLES / photo))[None]).softmax(dim=1)[0]
        actual[photo.split(".")[0]] = {names[i]: f"{float(probabilities[i]):.2f}" for i in probabilities.topk(3).indices}
    stated_in = {SAMPLES / "README.md": "predicts for them", README: "the sample photos give:"}
    for document, start in stated_in.items():
        text = document.read_text()
        paragraph = text[text.index(start):].split("\n\n")[0]
        for photo, predictions in actual.items():
            sentence = re.search(rf"{photo}[^,:]*[,:] (.*?)(;|\.\s|\.$)", paragraph, flags=re.S).group(1)
            stated = re.findall(r"([A-Za-z][A-Za-z ]*?) (0\.\d\d)", sentence)
            assert stated, (document.name, sentence)
            for name, value in stated:
                assert predictions.get(name.strip()) == value, (document.name, photo, name, value, predictions)
