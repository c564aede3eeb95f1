"""``camlens layers`` and ``camlens methods``: what can be explained, and how."""

from __future__ import annotations

import math

import click
import torch
from click.core import ParameterSource
from rich.table import Table
from rich.text import Text

from ..capture import (
    TokenGrid,
    check_hookable,
    default_layer,
    input_kind,
    input_spatial,
    trace_outputs,
)
from ..errors import CamlensError
from ..io import load_array
from ..methods import METHODS, list_methods
from .common import (
    console,
    echo_error,
    first_line,
    model_options,
    open_model,
    output_given,
    probe,
)

EXAMPLE_HELP = ("For a model of signals, volumes or clips: a .npy or .npz array of the shape it takes (C, L), "
                "(C, D, H, W), whose shape (not values) the model is traced with.")


def example_shape(example: str | None, loaded) -> tuple[int, ...] | None:
    """The shape (C, *positions) of ``--example``; without it, a model whose first convolution is
    not 2-D is refused (it takes no photo)."""
    if example is not None:
        return load_array(example).shape
    spatial = input_spatial(loaded.module)
    if spatial not in (None, 2):
        raise CamlensError(f"the model takes {input_kind(spatial)} (its first convolution is {spatial}-D), not "
                           "photos: give --example FILE.npy, an input of the shape it takes")
    return None


@click.command(short_help="Hookable layers, their output shapes, the default target layer.")
@click.option("--example", type=click.Path(dir_okay=False), help=EXAMPLE_HELP)
@model_options
def layers(example: str | None, **model_args) -> None:
    """List the hookable layers with their output shapes; mark the default target layer."""
    loaded = open_model(**model_args)
    check_hookable(loaded.module)
    size = loaded.preprocess.size
    given = example_shape(example, loaded) or (3, size, size)
    described = "x".join(map(str, given))
    try:
        trace = trace_outputs(loaded.module, torch.zeros(1, *given))
    except Exception as error:
        hint = "check --input-size" if example is None else "check the array's shape"
        raise CamlensError(f"the model fails on a 1x{described} input ({first_line(error)}); {hint}") from None
    shapes: dict[str, str] = {}
    traced: dict[str, object] = {}
    for name, shape in trace:
        shapes.setdefault(name, shape if isinstance(shape, str) else "x".join(map(str, shape[1:])))
        traced.setdefault(name, shape)
    refusal = found = None
    try:
        found = default_layer(loaded.module, torch.zeros(1, *given), output_given())
    except CamlensError as error:
        refusal = str(error)
    # Text, not markup: a model named package.module:factory would otherwise show an emoji.
    table = Table(title=Text(f"{loaded.name}: input {described}"), title_justify="left")
    positions = {2: "C x L", 3: "C x H x W", 4: "C x D x H x W"}[len(given)]
    for column in ("layer", "type", f"output ({positions})", "note"):
        table.add_column(column)
    for name, module in loaded.module.named_modules():
        if name in shapes:
            note = _token_note(traced[name], size) if len(given) == 3 else ""
            if found is not None and name == found.name:
                note = "default target layer" + (f", read as {found.layout.describe()}" if found.layout else "")
            table.add_row(name, type(module).__name__, shapes[name], note)
    console("stdout").print(table)
    if found is None:
        echo_error(f"no default target layer: {refusal}")
    else:
        read = f", read as {found.layout.describe()}" if found.layout else ""
        echo_error(f"default target layer: {found.name}{read}: {found.why}")


def _token_note(shape: object, size: int) -> str:
    """For a layer that outputs tokens (3-D; batch of one, first or second), how --reshape
    tokens reads it: the prefix and grid it infers."""
    if isinstance(shape, str) or len(shape) != 3 or 1 not in shape[:2]:
        return ""
    length = shape[1] if shape[0] == 1 else shape[0]
    order = "" if shape[0] == 1 else ", (L, N, D)"
    try:
        prefix, h, w = TokenGrid().layout(length, (size, size))
    except CamlensError:
        return f"tokens{order}: name it with --reshape tokens:P:HxW"
    return f"tokens{order}: --reshape tokens reads {prefix} + {h}x{w}"


@click.command(short_help="The methods and their cost per image, counted on a model.")
@click.option("--costs", is_flag=True,
              help="Count each method's passes per image on the model at hand (the embedded one by default), at its "
                   "default target layer or --target-layer. Implied by --model and --target-layer.")
@click.option("--target-layer", metavar="NAME", help="The layer to count the costs at (default: the default layer).")
@click.option("--example", type=click.Path(dir_okay=False), help=EXAMPLE_HELP)
@model_options
def methods(costs: bool, target_layer: str | None, example: str | None, **model_args) -> None:
    """The methods, one line each, with their cost per image; with --costs (or --model), the passes
    each one makes per image on that model, counted at its target layer."""
    summaries = list_methods()
    width = max(map(len, summaries))
    for name, summary in summaries.items():
        click.echo(f"{name:<{width}} {summary}")
    context = click.get_current_context()
    named = (target_layer is not None or example is not None
             or context.get_parameter_source("model_spec") is not ParameterSource.DEFAULT)
    if costs or named:
        _costs(target_layer, example, model_args)


def _costs(target_layer: str | None, example: str | None, model_args: dict) -> None:
    """The table of what each method costs per image on the model, at the layer, default options."""
    loaded = open_model(**model_args)
    found = probe(loaded, target_layer, example_shape(example, loaded))
    channels, *where = (int(side) for side in found.activation.shape[1:])
    # Costs count positions as height x width: a signal's or a volume's, all in one line of them.
    height, width = where if len(where) == 2 else (math.prod(where), 1)
    read = f", read as {found.layout.describe()}" if found.layout is not None else ""
    title = (f"{loaded.name}: passes per image at layer {found.layer}{read} ({channels:,} channels, "
             f"{'x'.join(map(str, where))}), default options")
    table = Table(title=Text(title), title_justify="left")
    for column, justify in (("method", "left"), ("forwards", "right"), ("backwards", "right"),
                            ("passes after the layer", "right"), ("note", "left")):
        table.add_column(column, justify=justify)
    for name, cls in METHODS.items():
        cost = cls(loaded.module, target_layer=found.layer, reshape=found.layout).cost(channels, height, width)
        bound = "≤ " if cost.at_most else ""
        table.add_row(name, f"{bound if not cost.after else ''}{cost.forwards:,}", f"{cost.backwards:,}",
                      f"{bound}{cost.after:,}" if cost.after else "", cost.note)
    console("stdout").print(table)
    echo_error("forwards: passes of the whole model, batched where a method batches them; passes after the layer: of "
               "the layers after the target layer (of the whole model where camlens cannot cut it there), batched")

