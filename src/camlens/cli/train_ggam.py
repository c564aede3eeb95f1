"""``camlens train-ggam``: train a GGAM classifier into a run folder that ``explain --model`` loads."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.table import Table

from ..charts import training_curves
from ..distributed import join
from ..ggam.train import ATTENTION, BACKBONES, TrainPlan, train_ggam
from ..io import write_atomic
from ..models import LITE_MEAN, LITE_STD, Preprocess, class_names_from_file
from .common import (
    FINITE,
    MAX_INPUT_SIZE,
    Finite,
    choose_device,
    console,
    printable,
    run_options,
    speak_for,
)
from .progress import LogProgress
from .report import html_option, write_html

CURVES = "curves.png"


@click.command("train-ggam", short_help="Train a GGAM classifier on a labelled dataset.")
@click.argument("data")
@click.option("--val-data", type=click.Path(), help="Validation set (default: a stratified --val-split of DATA).")
@click.option("--boxes", type=click.Path(), help="Boxes of DATA: a CSV path,xmin,ymin,xmax,ymax.")
@click.option("--val-boxes", type=click.Path(), help="Boxes of --val-data (they give the localisation report).")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default="efficientnet_lite0", show_default=True)
@click.option("--lambda", "lam", type=FINITE, default=1.0, show_default=True,
              help="Weight of the GGAM loss: CE + lambda x L_GGAM.")
@click.option("--attention", type=click.Choice(list(ATTENTION)), default="both", show_default=True,
              help="The GGAM head's attention (the GGAM loss needs the channel attention).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Epochs in all (with --resume: the total, not more epochs).")
@click.option("--lr", type=FINITE, default=1e-3, show_default=True, help="AdamW's learning rate (constant).")
@run_options(batch_size_help="Images per training step (default 32).",
             seed_help="Seed of the new head, the batches, the flips and the validation split.")
@click.option("--val-split", type=Finite(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each class of DATA held out to validate, without --val-data.")
@click.option("--input-size", type=click.IntRange(1, MAX_INPUT_SIZE), help="Side of the square model input (default 224).")
@click.option("--resize", type=click.IntRange(1, 2 * MAX_INPUT_SIZE), help="Shorter side before the centre crop (default: input size x 8/7).")
@click.option("--class-names", type=click.Path(dir_okay=False), help="Class names and their order: a text file (one per line) or a JSON list.")
@click.option("--out", default="camlens-ggam", show_default=True, help="Run folder (new or empty, unless --resume).")
@click.option("--resume", is_flag=True, help="Continue the run in --out (same settings; --epochs may grow).")
@click.option("--no-pretrained", "pretrained", flag_value=False, default=True,
              help="Start the backbone from random weights instead of the embedded ImageNet ones.")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The model the run keeps: the best epoch by validation accuracy, or the last (when the "
                   "validation set is a test set that must not choose the model).")
@click.option("--freeze-backbone", is_flag=True,
              help="Train the head only, on feature maps computed once (much faster on a CPU; the paper fine-tunes all).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes that decode and preprocess the next batches while the model trains (0: the training "
                   "process, as it goes); the weights do not depend on it.")
@html_option
def train_ggam_command(data, val_data, boxes, val_boxes, backbone, lam, attention, epochs, lr, device, batch_size,
                       seed, val_split, input_size, resize, class_names, out, resume, pretrained,
                       keep, freeze_backbone, num_workers, html) -> None:
    """Train GGAM (CE + lambda x L_GGAM) on DATA: a folder of class folders, a path,label CSV,
    or a CUB-200-2011 folder as distributed (its official split, classes and boxes).

    The run folder keeps the settings, the history (history.csv, curves.png), the last state
    (--resume continues it, also after Ctrl-C) and the best model by validation accuracy, which
    `camlens explain --model RUN_DIR IMAGE` explains once the training finished.
    """
    group = speak_for(join())
    batch_size = batch_size or 32
    names = class_names_from_file(class_names) if class_names else None
    preprocess = None
    if input_size is not None or resize is not None:
        size = input_size or 224
        preprocess = Preprocess(size=size, resize=resize or round(size * 8 / 7), mean=LITE_MEAN, std=LITE_STD)
    torch_device = choose_device(device)
    out_dir = Path(out)
    shown: list[dict] = []  # the history rows printed (on a resume, the epochs done: not printed again)
    with LogProgress() as bar:
        task = None

        def plan(found: TrainPlan) -> None:
            # Every check has passed by now, so a refusal before this line stays one line.
            shown.extend(found.history)
            done = len(found.history)
            batches = -(-found.training_images // batch_size)
            bar.console.print(
                f"train-ggam: {found.training_images} training and {found.validation_images} validation images, "
                f"{len(found.classes)} classes, {epochs} epochs{f' ({done} done, resuming)' if done else ''}, "
                f"{batches} batches of up to {batch_size} per epoch, on {torch_device}"
                f"{f' ({group.world} processes, each its share of every batch)' if group.distributed else ''} "
                f"-> {printable(out_dir)}",
                markup=False, soft_wrap=True)
            if found.frozen_features:
                images = 2 * found.training_images + found.validation_images
                bar.console.print(f"train-ggam: first the frozen backbone's feature maps of {images} images (the "
                                  "training images and their mirror images, then the validation images), computed "
                                  "once", markup=False, soft_wrap=True)

        def report(rows: list[dict]) -> None:
            for row in rows[len(shown):]:
                bar.console.print(
                    f"epoch {row['epoch']}/{epochs}: train CE {row['train_ce']:.4f}, L_GGAM {row['train_ggam']:.4f}, "
                    f"train acc {row['train_accuracy']:.1%}, val acc {row['val_accuracy']:.1%}, "
                    f"{row['seconds']:.1f} s", markup=False, soft_wrap=True)
                shown.append(row)
            write_atomic(out_dir / CURVES, lambda path: training_curves(rows, path))

        def progress(epoch: int, batch: int, total: int) -> None:
            nonlocal task
            if batch == 1:
                if task is not None:
                    bar.remove_task(task)
                task = bar.add_task(f"epoch {epoch}/{epochs}", total=total)
            bar.advance(task)

        try:
            result = train_ggam(data, out_dir, backbone=backbone, lam=lam, attention=attention, epochs=epochs,
                                lr=lr, batch_size=batch_size, seed=seed, val_split=val_split, val_data=val_data,
                                boxes=boxes, val_boxes=val_boxes, resume=resume, device=str(torch_device),
                                pretrained=pretrained, class_names=names, preprocess=preprocess,
                                freeze_backbone=freeze_backbone, keep=keep, num_workers=num_workers,
                                processes=group, progress=progress,
                                on_plan=plan, on_epoch=report,
                                on_finish=(lambda: write_html(out_dir)) if html else None)
        except KeyboardInterrupt:
            if (out_dir / "last.pt").is_file() and group.main:
                bar.stop()
                click.echo(f"camlens: interrupted; the run in {printable(out_dir)} continues with the same command and --resume",
                           err=True)
                sys.exit(130)
            raise
        if task is not None:
            bar.remove_task(task)

    if not group.main:  # the first process says what was trained
        return
    for problem in result.problems:
        console("stderr").print(f"note: {printable(problem)}", markup=False, soft_wrap=True)
    _print_summary(result, out_dir, attention)


def _print_summary(result, out_dir: Path, attention: str) -> None:
    which = "the best epoch by validation accuracy" if result.kept == "best" else "the last epoch (--keep last)"
    epochs = len(result.history)
    table = Table(title=f"camlens train-ggam: {epochs} epoch{'s' if epochs != 1 else ''} -> {printable(out_dir)}",
                  title_justify="left", caption=f"*: {which}, the model kept in the run; "
                                                f"curves in {printable(out_dir / CURVES)}", caption_justify="left")
    for column in ("epoch", "train CE", "L_GGAM", "train acc", "val acc", "val CE", "s"):
        table.add_column(column, justify="right")
    for row in result.history:
        mark = "*" if row["epoch"] == result.best_epoch else ""
        table.add_row(f"{row['epoch']}{mark}", f"{row['train_ce']:.4f}", f"{row['train_ggam']:.4f}",
                      f"{row['train_accuracy']:.1%}", f"{row['val_accuracy']:.1%}", f"{row['val_ce']:.4f}",
                      f"{row['seconds']:.1f}")
    if result.kept == "best":
        lines = [f"best epoch: {result.best_epoch} (validation accuracy {result.best_val_accuracy:.1%}; "
                 f"last epoch {result.final_val_accuracy:.1%})"]
    else:
        top = max(result.history, key=lambda row: row["val_accuracy"])
        lines = [f"kept: the last epoch, {result.best_epoch} (validation accuracy {result.final_val_accuracy:.1%}; "
                 f"highest {top['val_accuracy']:.1%}, epoch {top['epoch']})"]
    report = result.localisation
    if report is not None:
        lines.append(f"localisation (Grad-CAM of the true class, {result.kept} model, {report['images']} validation images "
                     f"with boxes): {_figures(report)}")
        lines.append(f"  blank maps: {report['blank maps']} of {report['images']}"
                     + (f"; over the non-blank ones: {_figures(report['non-blank'])}" if report["non-blank"] else ""))
        if report["blank maps"] * 2 > report["images"] and ATTENTION[attention][1]:  # spatial attention
            lines.append("  most maps are blank: the gradient through the spatial attention T = P / sum P adds a "
                         "negative term to every channel's Grad-CAM weight at the map GGAM attends to; explain a "
                         f"layer below it (camlens layers --model {shlex.quote(printable(out_dir))}) or use -m gradcam++")
    lines.append(f"run folder: {printable(out_dir)}")
    lines.append(f"explain with it: camlens explain --model {shlex.quote(printable(out_dir))} IMAGE")
    stdout = console("stdout")
    try:
        stdout.print(table)
        for line in lines:
            stdout.print(line, markup=False, soft_wrap=True)
    except BrokenPipeError:
        pass


def _figures(report: dict) -> str:
    return (f"energy pointing game {report['energy pointing game']:.3f}, box IoU {report['box iou']:.3f}, "
            f"IoU >= 0.5 {report['localisation accuracy (iou >= 0.5)']:.1%}")
