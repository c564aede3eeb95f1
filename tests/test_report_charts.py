"""The reports' inline charts: series that coincide are named together and drawn so that both
stay visible; series without values are never said to coincide."""

from __future__ import annotations

from camlens.report import sanity, train_ggam


def history(**series):
    epochs = len(next(iter(series.values())))
    return [{"epoch": e + 1, **{k: v[e] for k, v in series.items()}} for e in range(epochs)]


def test_train_ggam_coinciding_series_are_named_together():
    rows = history(train_ce=[2.0, 1.5, 1.2], train_ggam=[2.1, 1.6, 1.3], val_ce=[2.0, 1.5 + 5e-5, 1.2])
    chart = train_ggam._chart(rows, "loss", "loss", best_epoch=3)
    assert chart["together"] == ["train CE = validation CE"]
    widths = [line["width"] for line in chart["lines"]]
    dashes = [line["dash"] for line in chart["lines"]]
    assert len(set(widths)) == 3 and len(set(dashes)) == 3  # each line visible over another


def test_train_ggam_apart_or_missing_series_are_not_together():
    rows = history(train_ce=[2.0, 1.5], train_ggam=[2.1, 1.6], val_ce=[2.0, 1.4])
    assert train_ggam._chart(rows, "loss", "loss", None)["together"] == []
    # no validation split: both validation series missing, never "equal" to each other
    rows = history(train_accuracy=[0.5, 0.6], val_accuracy=[None, None])
    assert train_ggam._chart(rows, "accuracy", "accuracy", None)["together"] == []


def test_sanity_coinciding_methods_are_named_together():
    methods = [{"name": "cam", "display": "CAM", "spearman": [0.2, None, -0.1]},
               {"name": "gradcam", "display": "Grad-CAM", "spearman": [0.2 + 1e-4, None, -0.1]},
               {"name": "gradcam++", "display": "Grad-CAM++", "spearman": [0.9, 0.8, 0.7]}]
    chart = sanity._chart(methods, "spearman", ["trained", "a", "b", "c"], -1.0, 1.0, 0.5)
    assert chart["together"] == ["CAM = Grad-CAM"]
    assert len({(line["width"], line["dash"]) for line in chart["lines"]}) == 3
    # a blank map (None) where the other has a value: not the same
    methods[1]["spearman"] = [0.2, 0.3, -0.1]
    assert sanity._chart(methods, "spearman", ["trained", "a", "b", "c"], -1.0, 1.0, 0.5)["together"] == []
