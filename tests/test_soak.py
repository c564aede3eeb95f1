"""benchmarks/soak.py: its loop explains every image (each a different input), reports RSS, and
its verdict is right on synthetic RSS series. A tiny model built here; no timings asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny
from PIL import Image

from camlens.methods import CAMMethod
from camlens.models import LoadedModel, Preprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
_spec = importlib.util.spec_from_file_location("soak", SCRIPT)
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # its dataclass looks its module up there
_spec.loader.exec_module(soak)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (36, 28), dtype=np.uint8)).save(folder / "b.png")  # greyscale
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "c.jpg")
    return folder


@pytest.fixture
def loaded() -> LoadedModel:
    return LoadedModel(make_tiny(dtype=torch.float32), Preprocess(size=16, resize=20), None, "tiny", "test")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[torch.Tensor, object]]:
    """(images, Explanation) of every method call, whichever way the soak makes it."""
    made = []
    original = CAMMethod.__call__

    def recorded(self, images, *args, **kwargs):
        explanation = original(self, images, *args, **kwargs)
        made.append((images.detach().clone(), explanation))
        return explanation

    monkeypatch.setattr(CAMMethod, "__call__", recorded)
    return made


def distinct_images(calls) -> int:
    return len({row.numpy().tobytes() for images, _ in calls for row in images})


def table(output: str) -> list[tuple[int, float, float]]:
    """(images, RSS MiB, held RSS MiB) of the soak's table lines."""
    rows = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].isdigit() and fields[1].replace(".", "", 1).isdigit():
            rows.append((int(fields[0]), float(fields[1]), float(fields[2])))
    return rows


def test_main_reports_rss_every_n_images_and_a_verdict_that_matches_them(photos, loaded, calls, capsys):
    code = soak.main(["--images", "10", "--every", "4", "--warmup", "4", "--batch-size", "2",
                      "--photos", str(photos)], loaded=loaded)
    output = capsys.readouterr().out
    reported = table(output)
    assert [n for n, _, _ in reported] == [0, 4, 8, 10]  # every 4 images and at the end
    # MiB of a process that imported torch; collecting and trimming give memory back, never take more.
    assert all(100 < held <= rss + 1 < 100_000 for _, rss, held in reported)
    # Ten different inputs explained, two per call.
    assert [images.shape[0] for images, _ in calls] == [2] * 5
    assert distinct_images(calls) == 10
    # The verdict printed is the one the reported held series gives, and so is the exit status.
    expected = soak.verdict([(n, held) for n, _, held in reported], 4)
    verdict_line = output.strip().splitlines()[-1]
    assert verdict_line.startswith("PASS" if expected.passed else "FAIL")
    assert soak.percent(expected.worst_deviation) in verdict_line
    assert code == (0 if expected.passed else 1)
    assert "images/s" in output


@pytest.mark.parametrize("api", ["explain", "object"])
def test_scorecam_soak_explains_with_its_channel_subset(photos, loaded, calls, api):
    args = soak.parse_args(["--images", "3", "--every", "1", "--warmup", "1", "--method", "scorecam",
                            "--channels", "2", "--api", api, "--photos", str(photos)])
    samples = soak.soak(loaded, sorted(photos.iterdir()), args, report=lambda line: None)
    assert [s.images for s in samples] == [0, 1, 2, 3]
    assert distinct_images(calls) == 3
    for _, explanation in calls:
        assert explanation.method == "scorecam"
        assert list(explanation.channels.values()) == [[0, 1]]
        (weights,) = explanation.weights.values()
        assert weights.shape[-1] == 8 and not weights[..., 2:].any()


def test_cli_api_runs_camlens_explains_per_image_work(photos, loaded, calls):
    lines: list[str] = []
    args = soak.parse_args(["--images", "2", "--every", "1", "--warmup", "1", "--api", "cli",
                            "--photos", str(photos)])
    samples = soak.soak(loaded, sorted(photos.iterdir()), args, report=lines.append)
    assert [s.images for s in samples] == [0, 1, 2]
    assert table("\n".join(lines)) == [(s.images, round(s.rss, 1), round(s.held, 1)) for s in samples]
    assert distinct_images(calls) == 2


def test_no_trim_judges_rss_as_top_shows_it(photos, loaded, capsys):
    code = soak.main(["--images", "3", "--every", "1", "--warmup", "1", "--no-trim", "--photos", str(photos)],
                     loaded=loaded)
    output = capsys.readouterr().out
    lines = [line.split() for line in output.splitlines()]
    rows = [fields for fields in lines if fields and fields[0].isdigit() and fields[1] != "images"]
    assert [(fields[0], fields[2]) for fields in rows] == [("0", "-"), ("1", "-"), ("2", "-"), ("3", "-")]
    expected = soak.verdict([(int(fields[0]), float(fields[1])) for fields in rows], 1)
    assert output.strip().splitlines()[-1].startswith(("PASS" if expected.passed else "FAIL") + "  memory flat "
                                                      "after warm-up (RSS)")
    assert code == (0 if expected.passed else 1)


def test_verdict_flat_series_passes():
    series = [(0, 250.0), (200, 300.0), (400, 301.0), (600, 299.5), (800, 302.0), (1000, 300.5)]
    result = soak.verdict(series, 200)
    assert result.passed
    assert (result.reference_images, result.reference_mib) == (200, 300.0)
    assert (result.worst_images, result.worst_deviation) == (800, pytest.approx(2 / 300))


def test_verdict_growing_series_fails():
    # 1 MiB per 100 images: 2,000 images of a slow leak end 6 % above the reference.
    series = [(n, 300.0 + n / 100) for n in range(0, 2001, 200)]
    result = soak.verdict(series, 200)
    assert not result.passed
    assert result.reference_mib == 302.0
    assert (result.worst_images, result.worst_deviation) == (2000, pytest.approx(18 / 302))


def test_verdict_ignores_the_warm_up_and_judges_both_directions():
    # Growth during the warm-up is not a leak; the reference is the first report at or after it.
    assert soak.verdict([(0, 100.0), (100, 200.0), (300, 310.0), (500, 320.0)], 200).passed
    assert soak.verdict([(0, 100.0), (100, 200.0), (300, 310.0), (500, 320.0)], 100).passed is False
    # 5 % is the limit, either way.
    assert soak.verdict([(200, 200.0), (400, 210.0)], 200).passed
    assert not soak.verdict([(200, 200.0), (400, 210.2)], 200).passed
    assert not soak.verdict([(200, 200.0), (400, 189.8)], 200).passed
    with pytest.raises(ValueError, match="two RSS samples"):
        soak.verdict([(0, 100.0), (200, 120.0)], 200)


def test_options_that_cannot_apply_are_refused():
    with pytest.raises(SystemExit):
        soak.parse_args(["--api", "cli", "--batch-size", "4"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--images", "200", "--warmup", "200"])
    assert soak.parse_args(["--method", "scorecam"]).channels == soak.SCORECAM_CHANNELS
    assert soak.parse_args([]).channels is None
