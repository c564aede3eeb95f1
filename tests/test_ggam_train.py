"""train_ggam on tiny data (64 px, 3 classes, no pretrained weights): files, exact resume,
refusals, the saved run, the localisation report, and lam = 0."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import camlens
from camlens.cli import main
from camlens.errors import CamlensError
from camlens.ggam import ggam_efficientnet_lite0, train_ggam
from camlens.metrics import localisation_correct
from camlens.models import LITE_MEAN, LITE_STD, Preprocess, load_model

SIZE = 64
PRE = Preprocess(size=SIZE, resize=SIZE, mean=LITE_MEAN, std=LITE_STD)
NAMES = ["circle", "square", "stripe"]
TINY = dict(pretrained=False, preprocess=PRE, batch_size=4, seed=3)


def make_split(root, per_class, seed, with_boxes=True):
    """Class folders of noisy images, each with a bright patch of the class's colour; its box in boxes.csv."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - 20, 2))
            pixels[y0:y0 + 20, x0:x0 + 20] = 0
            pixels[y0:y0 + 20, x0:x0 + 20, label] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", x0, y0, x0 + 20, y0 + 20))
    if with_boxes:
        with (root / "boxes.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([("path", "xmin", "ymin", "xmax", "ymax"), *rows])
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_split(root / "train", 3, 0), make_split(root / "val", 1, 1)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    train, val = data
    out = tmp_path_factory.mktemp("runs") / "straight"
    calls = []
    result = train_ggam(train, out, epochs=3, val_data=val, val_boxes=val / "boxes.csv",
                        progress=lambda *a: calls.append(a), **TINY)
    return result, calls


def state(path, key="model"):
    loaded = torch.load(path, weights_only=True)
    return loaded[key] if key else loaded


def test_history_files_and_checkpoints(straight):
    result, calls = straight
    out = result.folder
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert calls == [(e, b, 3) for e in (1, 2, 3) for b in (1, 2, 3)]  # 9 images, batches of 4
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert lines == result.history
    with (out / "history.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["val_accuracy"]) for r in table] == [r["val_accuracy"] for r in result.history]
    assert set(table[0]) == {"epoch", "train_ce", "train_ggam", "train_accuracy", "val_accuracy", "val_ce", "seconds"}
    for row in result.history:
        assert row["train_ce"] > 0 and row["train_ggam"] >= 0 and 0 <= row["train_accuracy"] <= 1
        assert row["val_accuracy"] in (0, 1 / 3, 2 / 3, 1)  # 3 validation images
    accuracies = [r["val_accuracy"] for r in result.history]
    assert result.best_epoch == accuracies.index(max(accuracies)) + 1
    assert result.best_val_accuracy == max(accuracies) and result.final_val_accuracy == accuracies[-1]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["history"] == result.history and "optimizer" in last
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["class names"] == NAMES
    assert record["extra"]["best epoch"] == result.best_epoch and record["extra"]["epochs done"] == 3
    assert json.loads((out / "train.json").read_text())["lam"] == 1.0


def test_resume_equals_the_uninterrupted_run(straight, data, tmp_path):
    result, _ = straight
    train, val = data
    out = tmp_path / "resumed"
    first = train_ggam(train, out, epochs=1, val_data=val, val_boxes=val / "boxes.csv", **TINY)
    assert len(first.history) == 1
    resumed = train_ggam(train, out, epochs=3, resume=True, val_data=val, val_boxes=val / "boxes.csv", **TINY)
    for name in ("last.pt", "best.pt"):
        key = "model" if name == "last.pt" else None
        a, b = state(result.folder / name, key), state(out / name, key)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(resumed.history) == strip(result.history)
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    assert resumed.best_epoch == result.best_epoch and resumed.localisation == result.localisation


def test_resume_with_other_settings_is_refused(straight, data):
    result, _ = straight
    train, val = data
    out = result.folder
    before = (out / "last.pt").stat().st_mtime_ns
    common = dict(val_data=val, val_boxes=val / "boxes.csv", **TINY)
    cases = [
        (dict(epochs=3, resume=True, lam=0.5), "cannot resume.*lam \\(1.0 then, 0.5 now\\)"),
        (dict(epochs=3, resume=True, attention="spatial"), "attention"),
        (dict(epochs=3, resume=True, freeze_backbone=True), "freeze backbone \\(False then, True now\\)"),
        (dict(epochs=2, resume=True), "3 epochs are done"),
        (dict(epochs=3), "previous training run; continue it with resume=True"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CamlensError, match=message) as error:
            train_ggam(train, out, **{**common, **kwargs})
        assert "\n" not in str(error.value)
    with pytest.raises(CamlensError, match="validation images"):  # other data
        train_ggam(train, out, epochs=3, resume=True, val_data=train, **TINY)
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_bad_input_is_refused_before_training(data, tmp_path):
    train, val = data
    one = make_split(tmp_path / "one", 2, 0, with_boxes=False)
    for name in NAMES[1:]:
        shutil.rmtree(one / name)
    lonely = make_split(tmp_path / "lonely", 1, 0, with_boxes=False)
    (tmp_path / "empty").mkdir()
    cases = [
        (train, dict(backbone="resnet50"), "unknown backbone 'resnet50'"),
        (train, dict(attention="both-ways"), "attention must be one of both, channel, spatial, none"),
        (train, dict(epochs=0), "epochs must be a positive integer"),
        (train, dict(lr=0.0), "lr must be a finite number > 0"),
        (train, dict(lam=-1.0), "lam must be a finite number >= 0"),
        (train, dict(val_split=1.0), "val_split must be a fraction"),
        (train, dict(device="nonsense"), "device 'nonsense' is not usable"),
        (tmp_path / "missing", {}, "no such dataset"),
        (tmp_path / "empty", {}, "at least two classes, the dataset has 0"),
        (one, {}, "at least two classes, the dataset has 1"),
        (lonely, dict(val_split=0.9), "class\\(es\\) with no training image after the validation split"),
        (lonely, dict(val_split=0.2), "no validation image"),
        (train, dict(class_names=["circle", "square"]), "label\\(s\\) the model does not know: stripe"),
    ]
    for folder, kwargs, message in cases:
        out = tmp_path / "out"
        with pytest.raises(CamlensError, match=message) as error:
            train_ggam(folder, out, **{**TINY, "epochs": 1, **kwargs})
        assert "\n" not in str(error.value)
        assert not out.exists() or not any((out / name).exists() for name in ("train.json", "last.pt", "run.json"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(CamlensError, match="camlens did not write"):
        train_ggam(train, tmp_path / "used", **TINY)
    with pytest.raises(CamlensError, match="no training run to resume"):
        train_ggam(train, tmp_path / "fresh", resume=True, **TINY)


def test_the_finished_run_loads_and_explains(straight, data, tmp_path, capsys):
    result, _ = straight
    loaded = load_model(str(result.folder))
    assert loaded.class_names == NAMES and loaded.preprocess == PRE and not loaded.module.training
    best = state(result.folder / "best.pt", None)
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in best.items())
    image = data[1] / "square" / "0.png"
    try:
        main(["explain", "--model", str(result.folder), str(image), "-m", "gradcam", "--out", str(tmp_path / "x"),
              "--device", "cpu"])
        code = 0
    except SystemExit as done:
        code = done.code
    assert code in (0, None), capsys.readouterr().err
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["status"] == "complete"


def test_an_interrupted_run_does_not_load_and_resumes_exactly(straight, data, tmp_path):
    result, _ = straight
    train, val = data
    out = tmp_path / "stopped"
    common = dict(epochs=3, val_data=val, val_boxes=val / "boxes.csv", **TINY)

    def stop(epoch, batch, batches):
        if epoch == 2 and batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ggam(train, out, progress=stop, **common)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    with pytest.raises(CamlensError, match="did not finish \\(status 'interrupted'\\).*resume=True") as error:
        load_model(str(out))
    assert "\n" not in str(error.value)
    train_ggam(train, out, resume=True, **common)
    a, b = state(result.folder / "last.pt"), state(out / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(str(out)).class_names == NAMES


def test_localisation_report_matches_an_independent_computation(straight, data):
    result, _ = straight
    _, val = data
    report = result.localisation
    assert report == json.loads((result.folder / "localisation.json").read_text())
    model = load_model(str(result.folder)).module
    rows = list(csv.reader((val / "boxes.csv").open()))[1:]
    images = torch.stack([PRE(Image.open(val / path)) for path, *_ in rows])
    labels = [NAMES.index(path.split("/")[0]) for path, *_ in rows]
    boxes = [[tuple(float(v) for v in box)] for _, *box in rows]  # 64 px images: input pixels as they are
    maps = camlens.explain(model, images, "gradcam", targets=labels).maps[:, 0]
    energy = []
    for m, ((x0, y0, x1, y1),) in zip(maps, boxes):
        inside = m[int(y0):int(y1), int(x0):int(x1)].sum()
        energy.append(float(inside / m.sum()) if m.sum() > 0 else 0.0)
    iou, correct = localisation_correct(maps, boxes)
    assert report["images"] == 3
    assert report["energy pointing game"] == pytest.approx(np.mean(energy), abs=1e-6)
    assert report["box iou"] == pytest.approx(float(iou.mean()), abs=1e-9)
    assert report["localisation accuracy (iou >= 0.5)"] == pytest.approx(float(correct.mean()))


def test_no_boxes_no_report_and_a_stratified_split(data, tmp_path):
    train, _ = data
    result = train_ggam(train, tmp_path / "run", epochs=1, val_split=0.34, **TINY)
    assert result.localisation is None and not (tmp_path / "run" / "localisation.json").exists()
    assert result.history[0]["val_accuracy"] in (0, 1 / 3, 2 / 3, 1)  # one image of each class held out


def test_lam_zero_is_plain_cross_entropy_and_lam_matters(data, tmp_path):
    train, val = data
    common = dict(epochs=2, val_data=val, flip=False, **{**TINY, "batch_size": 16})
    zero = train_ggam(train, tmp_path / "zero", lam=0.0, **common)
    one = train_ggam(train, tmp_path / "one", lam=1.0, **common)
    # By hand: the same initial model, one batch of all 9 images per epoch in train_ggam's order
    # (its generator draws a permutation, then the flips), cross-entropy only.
    torch.manual_seed(TINY["seed"])
    model = ggam_efficientnet_lite0(3, pretrained=False, class_names=NAMES, preprocess=PRE)
    x = torch.stack([PRE(Image.open(p)) for name in NAMES for p in sorted((train / name).glob("*.png"))])
    y = torch.arange(3).repeat_interleave(3)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(TINY["seed"])
    model.train()
    for _ in range(2):
        order = torch.randperm(9, generator=generator)
        torch.rand(9, generator=generator)
        optimiser.zero_grad()
        F.cross_entropy(model(x[order]), y[order]).backward()
        optimiser.step()
    trained = state(tmp_path / "zero" / "last.pt")
    assert all(torch.equal(trained[key], value) for key, value in model.state_dict().items())
    other = state(tmp_path / "one" / "last.pt")
    assert not torch.allclose(other["head.attention.0.weight"], trained["head.attention.0.weight"])
    assert zero.history[0]["train_ggam"] == pytest.approx(one.history[0]["train_ggam"])  # same first batch


def test_lam_has_no_effect_without_channel_attention(data, tmp_path):
    train, val = data
    common = dict(epochs=1, val_data=val, attention="spatial", **TINY)
    train_ggam(train, tmp_path / "a", lam=0.0, **common)
    run = train_ggam(train, tmp_path / "b", lam=5.0, **common)
    assert run.history[0]["train_ggam"] == 0
    a, b = state(tmp_path / "a" / "last.pt"), state(tmp_path / "b" / "last.pt")
    assert "head.attention.0.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_frozen_backbone_trains_the_head_on_cached_features(data, tmp_path):
    """freeze_backbone: the backbone keeps its weights; the head is what a plain loop on the
    eval-mode backbone's features gives; the feature cache changes nothing but the cost."""
    train, val = data
    cache: dict = {}
    common = dict(epochs=2, val_data=val, val_boxes=val / "boxes.csv", flip=False, freeze_backbone=True,
                  feature_cache=cache, **{**TINY, "batch_size": 16})
    frozen = train_ggam(train, tmp_path / "frozen", lam=0.0, **common)
    assert len(cache) == 1
    torch.manual_seed(TINY["seed"])
    model = ggam_efficientnet_lite0(3, pretrained=False, class_names=NAMES, preprocess=PRE)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.stack([PRE(Image.open(p)) for name in NAMES for p in sorted((train / name).glob("*.png"))])
    y = torch.arange(3).repeat_interleave(3)
    model.eval()
    with torch.no_grad():
        features = model.backbone(x)
    optimiser = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(TINY["seed"])
    for _ in range(2):
        order = torch.randperm(9, generator=generator)
        torch.rand(9, generator=generator)
        optimiser.zero_grad()
        F.cross_entropy(model.head(features[order]).logits, y[order]).backward()
        optimiser.step()
    trained = state(tmp_path / "frozen" / "last.pt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6)
        if key.startswith("backbone."):
            assert torch.equal(trained[key], initial[key])
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if k.startswith("head."))
    # Through the cache (a hit: no new entry), the same run to the bit.
    again = train_ggam(train, tmp_path / "again", lam=0.0, **common)
    assert len(cache) == 1 and again.history == [
        {**row, "seconds": again_row["seconds"]} for row, again_row in zip(frozen.history, again.history)]
    second = state(tmp_path / "again" / "last.pt")
    assert all(torch.equal(second[k], trained[k]) for k in trained)
    # The head-only localisation report is the whole model's Grad-CAM (explained end to end).
    model = load_model(str(frozen.folder)).module
    rows = list(csv.reader((val / "boxes.csv").open()))[1:]
    images = torch.stack([PRE(Image.open(val / path)) for path, *_ in rows])
    labels = [NAMES.index(path.split("/")[0]) for path, *_ in rows]
    maps = camlens.explain(model, images, "gradcam", targets=labels).maps[:, 0]
    boxes = [[tuple(float(v) for v in box)] for _, *box in rows]
    iou, _ = localisation_correct(maps, boxes)
    energy = [float(m[int(y0):int(y1), int(x0):int(x1)].sum() / m.sum()) if m.sum() > 0 else 0.0
              for m, ((x0, y0, x1, y1),) in zip(maps, boxes)]
    assert frozen.localisation["energy pointing game"] == pytest.approx(np.mean(energy), abs=1e-5)
    assert frozen.localisation["box iou"] == pytest.approx(float(iou.mean()), abs=1e-6)


def test_cub_trains_on_its_official_split_with_its_boxes(tmp_path):
    """A CUB-200-2011 folder: classes.txt's classes in id order, the training split trains,
    the test split validates, bounding_boxes.txt gives the localisation report; no boxes option."""
    from test_datasets_cub import CLASSES, IMAGES, write_cub

    root = write_cub(tmp_path / "CUB_200_2011")
    plans = []
    result = train_ggam(root, tmp_path / "run", epochs=1, on_plan=plans.append, **TINY)
    train_ids = [i for i, (_, is_train, _, _) in IMAGES.items() if is_train]
    assert plans[0].classes == list(CLASSES.values())
    assert (plans[0].training_images, plans[0].validation_images) == (len(train_ids), len(IMAGES) - len(train_ids))
    assert result.localisation["images"] == len(IMAGES) - len(train_ids)
    settings = json.loads((tmp_path / "run" / "train.json").read_text())
    assert settings["val split"] is None and settings["class names"] == list(CLASSES.values())
    assert load_model(str(tmp_path / "run")).class_names == list(CLASSES.values())
    with pytest.raises(CamlensError, match="CUB-200-2011 folder.*bounding_boxes.txt; leave out boxes"):
        train_ggam(root, tmp_path / "other", epochs=1, boxes=root / "bounding_boxes.txt", **TINY)


def test_a_frozen_start_that_fails_leaves_the_folder_reusable(data, tmp_path):
    """An image that opens but does not decode stops the frozen run while it computes the
    features: nothing of a run is left, so the same folder trains once the image is fixed."""
    train, val = data
    copy = tmp_path / "train"
    shutil.copytree(train, copy)
    image = copy / "circle" / "extra.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(image)
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    out = tmp_path / "run"
    common = dict(epochs=1, val_data=val, freeze_backbone=True, **TINY)
    with pytest.raises(CamlensError):
        train_ggam(copy, out, **common)
    assert not [p.name for p in out.iterdir() if not p.name.startswith(".camlens-")]
    image.write_bytes(whole)
    assert train_ggam(copy, out, **common).history[0]["epoch"] == 1


def test_the_feature_cache_sees_an_image_rewritten_in_place(data, tmp_path):
    train, val = data
    copy = tmp_path / "train"
    shutil.copytree(train, copy)
    cache: dict = {}
    common = dict(epochs=1, val_data=val, freeze_backbone=True, feature_cache=cache, **TINY)
    train_ggam(copy, tmp_path / "a", **common)
    image = copy / "square" / "1.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 77, np.uint8)).save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    train_ggam(copy, tmp_path / "b", **common)
    assert len(cache) == 2  # a new entry, not the old image's features
    train_ggam(copy, tmp_path / "c", **{**common, "batch_size": 5})
    assert len(cache) == 3  # another batching: computed again


# -- issue 20, finding 11: the checkpoint and the run record belong together -----------------------

class Killed(BaseException):
    """kill -9 at a chosen point: none of the run's own clean-up runs."""


@pytest.mark.parametrize("where, epoch", [("before best.pt and run.json", 2), ("between best.pt and run.json", 1)])
def test_a_run_killed_between_its_checkpoint_and_its_record_resumes_consistent(straight, data, tmp_path,
                                                                               monkeypatch, where, epoch):
    import camlens.ggam.run as run_module
    import camlens.ggam.train as train_module

    result, _ = straight
    train, val = data
    out = tmp_path / "killed"
    common = dict(val_data=val, val_boxes=val / "boxes.csv", **TINY)
    real_publish, real_write = train_module._publish, run_module.write_atomic
    calls = []

    def publish(*args):
        calls.append(1)
        if len(calls) == epoch and where.startswith("before"):
            raise Killed
        return real_publish(*args)

    def write(target, save):
        if target.name == "run.json" and len(calls) == epoch:
            raise Killed  # best.pt written, run.json not
        return real_write(target, save)

    monkeypatch.setattr(train_module, "_publish", publish)
    monkeypatch.setattr(run_module, "write_atomic", write)
    with pytest.raises(Killed):
        train_ggam(train, out, epochs=3, **common)
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == epoch
    if (out / "run.json").exists():  # run.json never claims more than the checkpoint holds
        assert json.loads((out / "run.json").read_text())["extra"]["epochs done"] == epoch - 1
    if epoch > 1:
        with pytest.raises(CamlensError, match=f"{epoch} epochs are done, epochs=1 asks for fewer"):
            train_ggam(train, out, epochs=1, resume=True, **common)
    resumed = train_ggam(train, out, epochs=3, resume=True, **common)
    assert resumed.best_epoch == result.best_epoch
    record = json.loads((out / "run.json").read_text())
    assert record["extra"]["epochs done"] == 3 and record["extra"]["best epoch"] == result.best_epoch
    for name, key in (("last.pt", "model"), ("best.pt", None)):
        a, b = state(result.folder / name, key), state(out / name, key)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resuming_a_finished_run_with_fewer_epochs_is_refused(straight, data):
    result, _ = straight
    train, val = data
    with pytest.raises(CamlensError, match="3 epochs are done, epochs=2 asks for fewer"):
        train_ggam(train, result.folder, epochs=2, resume=True, val_data=val, val_boxes=val / "boxes.csv", **TINY)


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_damaged_checkpoint_or_model_is_detected(straight, data, tmp_path, name):
    result, _ = straight
    train, val = data
    out = tmp_path / "damaged"
    shutil.copytree(result.folder, out, ignore=shutil.ignore_patterns(".camlens-lock"))
    data_bytes = bytearray((out / name).read_bytes())
    rng = np.random.default_rng(0)
    # 50 bytes flipped inside the tensors' data (past the zip's headers): torch.load takes them silently
    for position in rng.choice(np.arange(len(data_bytes) // 2, len(data_bytes) - 2000), 50, replace=False):
        data_bytes[position] ^= 0xFF
    (out / name).write_bytes(bytes(data_bytes))
    if name == "last.pt":
        with pytest.raises(CamlensError, match="last.pt: damaged"):
            train_ggam(train, out, epochs=4, resume=True, val_data=val, val_boxes=val / "boxes.csv", **TINY)
    else:
        with pytest.raises(CamlensError, match="best.pt: damaged or replaced"):
            load_model(str(out))


def test_images_streamed_by_worker_processes_train_the_same_weights(straight, data, tmp_path):
    """Images are decoded batch by batch; by 2 worker processes ahead of the training, the batches
    and so every weight are those of the run that decodes them itself."""
    train, val = data
    result, _ = straight
    workers = train_ggam(train, tmp_path / "workers", epochs=3, val_data=val, val_boxes=val / "boxes.csv",
                         num_workers=2, **TINY)
    timeless = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert timeless(workers.history) == timeless(result.history)
    mine, theirs = state(tmp_path / "workers" / "last.pt"), state(result.folder / "last.pt")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_image_files_are_decoded_when_read_and_a_bad_one_is_named_in_one_line(data, tmp_path):
    import dataclasses

    from camlens.datasets import load_dataset
    from camlens.ggam.train import ImageFiles

    train, _ = data
    samples = load_dataset(str(train), NAMES, len(NAMES)).samples
    files = ImageFiles(samples, PRE)
    expected = torch.stack([PRE(Image.open(s.path).convert("RGB")) for s in samples])
    assert torch.equal(files[torch.tensor([4, 0])], expected[[4, 0]]) and torch.equal(files[1:3], expected[1:3])
    batches = [torch.tensor([2, 5]), torch.tensor([8])]
    for workers in (0, 2):
        assert [b.shape[0] for b in files.batches(batches, workers)] == [2, 1]
        assert torch.equal(torch.cat(list(files.batches(batches, workers))), expected[[2, 5, 8]])
    broken = tmp_path / "broken.png"
    broken.write_bytes(samples[0].path.read_bytes()[:60])  # a header, then nothing
    files.samples[5] = dataclasses.replace(samples[5], path=broken)
    for workers in (0, 1):
        with pytest.raises(CamlensError) as error:
            list(files.batches(batches, workers))
        assert "\n" not in str(error.value) and str(broken) in str(error.value)
