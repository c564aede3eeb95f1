"""The shared core of the command line: output helpers, the options every command takes,
model and device set-up, and the up-front checks that run before any work."""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click
import torch
from PIL import Image
from rich.console import Console
from torch import Tensor

from .. import timing
from ..accelerate import InferenceCopies
from ..capture import (
    Layout,
    check_finite,
    check_hookable,
    check_scores,
    default_layer_output,
    record,
    resolve_layer,
    resolve_layers,
    token_grid,
)
from ..combine import is_constant
from ..datasets import class_index_lookup, describe_classes, word_matches
from ..detection import check_detections
from ..distributed import Group
from ..errors import CamlensError, first_line
from ..methods import METHODS, get_method
from ..methods.meta import smoothed
from ..models import (
    LoadedModel,
    Preprocess,
    class_names_from_file,
    load_model,
    user_callable,
)
from ..timing import one_time, take_start_up

SEED_METHODS = ("cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam")
MARKER = ".camlens"  # in every output folder camlens made: only those are ever replaced
MAX_INPUT_SIZE = 4096


def console(stream_name: str) -> Console:
    """A rich console on stdout or stderr, wide enough for tables in files and CI logs."""
    stream = getattr(sys, stream_name)
    wide = stream is None or not stream.isatty()
    return Console(file=stream, highlight=False, width=160 if wide else None)


# The rank of this process where it is not the first of a torchrun run (speak_for): it then
# prints its errors only, marked with its rank; the first process says everything else once.
_SILENT_RANK: int | None = None


def speak_for(group: Group) -> Group:
    """Let only the first process of ``group`` print notes, plans and progress; the others print
    nothing but their own errors. Returns ``group``."""
    global _SILENT_RANK
    _SILENT_RANK = None if group.main else group.rank
    return group


def silent() -> bool:
    """Whether this process says nothing but errors (:func:`speak_for`)."""
    return _SILENT_RANK is not None


def echo_error(text: str, every_process: bool = False) -> None:
    """One line on stderr, never wrapped; a closed pipe is not an error worth a traceback.
    ``every_process``: a note of this process's own, said by each process of a run of several."""
    if _SILENT_RANK is not None:
        kind = text.split(": ", 2)[1] if text.startswith("camlens: ") else ""
        if not (kind == "error" or (kind == "note" and every_process)):
            return
        text = f"camlens: {kind} (process {_SILENT_RANK}): {text.split(': ', 2)[2]}"
    try:
        click.echo(text, err=True)
    except (BrokenPipeError, OSError):
        pass


def printable(text: object) -> str:
    """A file name as text that can always be shown (undecodable bytes replaced)."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- shared options -----------------------------------------------------------------------------

class Finite(click.FloatRange):
    """A float option that must be a finite number (within ``min``/``max`` where given): click's
    own float and range types take "nan" and "inf", and a NaN threshold passes every comparison."""

    name = "number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = Finite()

def model_options(command: Callable) -> Callable:
    options = [
        click.option("--model", "model_spec", default="efficientnet_lite0", show_default=True,
                     help="A registered model, a torch.export archive (.pt2), or package.module:factory."),
        click.option("--weights", type=click.Path(dir_okay=False), help="State dict for a factory model (loaded with weights_only=True)."),
        click.option("--input-size", type=click.IntRange(1, MAX_INPUT_SIZE), help="Side of the square model input (default: the model's, else 224)."),
        click.option("--resize", type=click.IntRange(1, 2 * MAX_INPUT_SIZE), help="Shorter side before the centre crop (default: input size x 8/7)."),
        click.option("--mean", type=(FINITE, FINITE, FINITE), help="Per-channel mean of the normalisation (RGB, on [0, 1] pixels)."),
        click.option("--std", type=(FINITE, FINITE, FINITE), help="Per-channel standard deviation of the normalisation."),
        click.option("--class-names", type=click.Path(dir_okay=False), help="Class names: a text file (one per line) or a JSON list."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


ALL = "all"  # -m all: every registered method
METHODS_HELP = (f"A method (repeatable; default: all five, {', '.join(SEED_METHODS)}; '{ALL}': every method). "
                "See `camlens methods`.")


def takes_option(method: str, option: str) -> bool:
    """Whether the method's constructor takes the keyword ``option`` (batch_size, seed, ...)."""
    return option in inspect.signature(METHODS[method]).parameters


def _taking(option: str, leaving: Sequence[str] = ()) -> str:
    """The display names of the methods whose constructor takes ``option``, in words, but those
    of ``leaving`` (registry names)."""
    names = [cls.display_name for name, cls in METHODS.items() if takes_option(name, option) and name not in leaving]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


# The methods that --batch-size reaches, besides the first two.
BATCHED = "Score-CAM and Smooth Grad-CAM++. The same for " + _taking("batch_size", ("scorecam", "smoothgradcam++"))
SEEDED = _taking("seed")  # the methods that --seed reaches


def method_option(command: Callable) -> Callable:
    return click.option("--method", "-m", "methods", multiple=True, metavar="M", help=METHODS_HELP)(command)


def fc_option(command: Callable) -> Callable:
    """--fc: CAM's classifier, for models where camlens cannot find it alone."""
    return click.option(
        "--fc", metavar="LAYER",
        help="CAM's classifier: the nn.Linear after the global average pooling (default: the last one "
             "whose inputs match the target layer's channels). See `camlens layers`.",
    )(command)


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _set_threads(context: click.Context, parameter: click.Parameter, threads: int | None) -> None:
    if threads is None:
        return
    # More threads than cores never helps, and torch's pool crashes the process (a segmentation
    # fault, no message) when asked for tens of thousands.
    if threads > 4 * cores():
        raise click.BadParameter(f"{threads} is more than 4 x this machine's {cores()} cores; give at most "
                                 f"{4 * cores()} (about {cores()} is fastest)", context, parameter)
    torch.set_num_threads(threads)


def _stacked(options: list[Callable], command: Callable | None) -> Callable:
    """The click options as one decorator: applied to ``command``, or returned when it is None."""
    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate if command is None else decorate(command)


def run_options(
    command: Callable | None = None,
    *,
    batch_size_help: str = f"Inputs per forward pass of {BATCHED}.",
    seed_help: str = f"Seed of the noise of {SEEDED}.",
) -> Callable:
    """--device, --batch-size, --seed and --threads: ``@run_options``, or
    ``@run_options(seed_help=...)`` where they do more in a command than the defaults say.
    --threads sets torch's CPU threads as it is parsed (it reaches no command function)."""
    options = [
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--batch-size", type=click.IntRange(min=1), help=batch_size_help),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help=seed_help),
        click.option("--threads", type=click.IntRange(min=1), expose_value=False, callback=_set_threads,
                     help="Threads for torch's computations (default: torch's own, one per core). On a machine busy with "
                          "other jobs, fewer threads than cores can be many times faster."),
    ]

    return _stacked(options, command)


def _set_reshape(context: click.Context, parameter: click.Parameter, value: str | None) -> None:
    if value is not None:
        try:
            text = value.strip()
            if re.fullmatch(r"[\w.]+:[\w.]+", text) and not text.lower().startswith("tokens"):  # module:function
                context.meta[RESHAPE] = token_grid(user_callable(text, "--reshape"))
            else:
                context.meta[RESHAPE] = token_grid(value)
        except CamlensError as error:
            raise click.BadParameter(str(error)) from None


RESHAPE = "camlens.reshape"  # where --reshape leaves its layout: in the click context's meta
OUTPUT = "camlens.output"  # where --output leaves its selector
MAX_DIRECTIONS = "camlens.max_directions"  # where --max-directions leaves its bound


def _set_max_directions(context: click.Context, parameter: click.Parameter, value: int | None) -> None:
    if value is not None:
        context.meta[MAX_DIRECTIONS] = value


def _set_output(context: click.Context, parameter: click.Parameter, value: str | None) -> None:
    if value is not None:
        if not value.strip():
            raise click.BadParameter("give an index, a key or an attribute name")
        context.meta[OUTPUT] = int(value) if value.lstrip("-").isdigit() else value


def _given(key: str) -> Any:
    """What an option of the running command left in the click context (None when not given): it
    travels there, as --threads does to torch, so that every command that computes maps takes it
    without a parameter of its own."""
    context = click.get_current_context(silent=True)
    return None if context is None else context.meta.get(key)


def output_given() -> int | str | None:
    """The --output of the running command: which of a model's outputs holds the class scores (an
    index of a tuple, a key of a dict, an attribute), as the methods' ``output=``; None when not given."""
    return _given(OUTPUT)


def reshape_given() -> Layout | None:
    """The --reshape of the running command (its layout), None when not given."""
    return _given(RESHAPE)


FOUND_LAYOUT = "camlens.found_layout"  # where the probe leaves the layout of the default layer it found


def layer_layout() -> Layout | None:
    """How the running command reads its target layer: the --reshape given, else the layout the
    probe found for the default layer (a vision transformer's token grid, a channels-last map)."""
    return reshape_given() or _given(FOUND_LAYOUT)


def engine_options(
    command: Callable | None = None,
    *,
    passes: str = "Score-CAM's masked inputs",
    default: str = "on with --device cpu",
) -> Callable:
    """--optimize/--no-optimize and --compile: how the methods run the model (camlens.accelerate);
    --reshape: how they read a token layer. ``passes``: the forward-only passes of the command
    that --compile speeds up; ``default``: what no flag does, in words."""
    options = [
        click.option("--max-directions", type=click.IntRange(min=1), expose_value=False, callback=_set_max_directions,
                     help="Grad-CAM++ (general): the most third-order passes (channels x positions of the target "
                          "layer) an image may take; more is refused before any is run [default: 50,000]."),
        click.option("--output", metavar="I|KEY", expose_value=False, callback=_set_output,
                     help="For a model that returns several outputs (a tuple, a dict, an object): the one that holds "
                          "the class scores, by index (0), key or attribute name (logits). Default: the only tensor, "
                          "or .logits / ['logits']."),
        click.option("--reshape", metavar="tokens[:P][:HxW]|nhwc|MOD:FUNC", expose_value=False, callback=_set_reshape,
                     help="For a vision transformer: the target layer's tokens (N, L, D) become a grid (N, D, h, w), "
                          "the first P tokens (class, register) left out. 'tokens' infers P and the grid (the largest "
                          "grid of the input's shape that fits); give them when that is wrong. 'nhwc': a channels-last "
                          "map (N, H, W, C). MOD:FUNC: a function of yours from the layer's output to (N, C, h, w), "
                          "as pytorch-grad-cam's reshape_transform. Needs --target-layer: the default layer is read "
                          "as it needs (`camlens layers` shows how)."),
        click.option("--optimize/--no-optimize", default=None,
                     help="Run a verified inference copy of the model (batch norm folded into convolutions, "
                          f"channels-last memory): the same maps up to float rounding, faster [default: {default}]."),
        click.option("--compile", "compile_model", is_flag=True,
                     help=f"Also compile that copy (torch.compile): whole for the forward-only passes ({passes}), "
                          "up to the target layer for the passes that observe it (gradients included). The first "
                          "run compiles once per model and input size, which takes a while; the compiled code is "
                          "cached on disk for the next runs."),
    ]

    return _stacked(options, command)


def _top_channels(context: click.Context, parameter: click.Parameter, value: str | None) -> int | float | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is neither a count of channels nor a fraction") from None


def top_channels_option(command: Callable) -> Callable:
    """--top-channels N|F: Faster Score-CAM, opt-in (ScoreCAM's ``top_channels``)."""
    return click.option(
        "--top-channels", metavar="N|F", callback=_top_channels,
        help="Score-CAM and its variants (SS-CAM, IS-CAM): Faster Score-CAM, an approximation. Forward only the N "
             "channels (an integer), or the fraction F (0 < F <= 1) of the target layer's channels, with the largest "
             "spatial variance; the others weigh 0. Default: every channel (exact).")(command)


def smooth_options(command: Callable) -> Callable:
    """--aug-smooth and --eigen-smooth: the meta-methods around every method (camlens.methods.meta)."""
    return _stacked([
        click.option("--aug-smooth", is_flag=True,
                     help="Average each map over augmented copies of the image, mapped back: flipped or not, input "
                          "values multiplied by 0.9, 1 and 1.1 (pytorch-grad-cam's aug_smooth); 6 times the cost."),
        click.option("--eigen-smooth", is_flag=True,
                     help="Make each raw map the first principal component of the method's weighted activations "
                          "instead of their sum (pytorch-grad-cam's eigen_smooth)."),
    ], command)


def engine_settings(optimize: bool | None, compile_model: bool, device: torch.device,
                    default: bool = True) -> dict[str, bool]:
    """The methods' ``optimize`` and ``compile`` options from --optimize/--no-optimize and
    --compile on ``device`` (the copy is on by default for CPU, where it was measured, unless
    ``default`` is False; the command line owns its model, so the copy, a snapshot, cannot go
    stale)."""
    if compile_model and optimize is False:
        raise CamlensError("--compile compiles the inference copy that --no-optimize turns off: give one of them")
    if compile_model:
        echo_error("camlens: note: --compile: the first forward passes compile the model (up to a minute per model "
                   "and input size on a CPU; cached on disk for the next runs)")
    settings: dict[str, Any] = {
        "optimize": default and device.type == "cpu" if optimize is None else optimize or compile_model,
        "compile": compile_model,
    }
    if (reshape := reshape_given()) is not None:
        settings["reshape"] = reshape.describe()
    return settings


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's inputs: that of its floating-point weights (a model in float16,
    bfloat16 or float64 takes its images so, as the methods give them), else float32."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def class_count(model_args: dict) -> int | None:
    """The number of class names --class-names gives, None without it (read before the model loads)."""
    path = model_args.get("class_names")
    return len(class_names_from_file(path)) if path else None


def first_array_shape(paths: Sequence[Any]) -> tuple[int, ...] | None:
    """The shape (C, *positions) of the first array input that reads, None where none does (the
    images are photos then; an array that does not read is said in its turn)."""
    from ..io import is_array_file, load_array

    for path in paths:
        if is_array_file(path):
            try:
                return load_array(path).shape
            except CamlensError:
                continue
    return None


def model_input(loaded: LoadedModel, path: Any, device: torch.device) -> tuple[torch.Tensor, Any, Any]:
    """``(x, image, values)``: the model's input (1, C, *positions) from the file ``path``, with the
    photo it was made from (an image file, preprocessed as the model says) or the array it is (a
    ``.npy`` or ``.npz`` file: a signal, a preprocessed image, a volume or a clip, taken as it is)."""
    from ..io import is_array_file, load_array, load_image

    if is_array_file(path):
        values = load_array(path)
        return torch.from_numpy(values)[None].to(device, input_dtype(loaded.module)), None, values
    image = load_image(path)
    return loaded.preprocess(image).unsqueeze(0).to(device, input_dtype(loaded.module)), image, None


def open_model(
    model_spec: str,
    weights: str | None,
    input_size: int | None,
    resize: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    class_names: str | None,
) -> LoadedModel:
    names = class_names_from_file(class_names) if class_names else None
    loaded = load_model(model_spec, weights=weights, class_names=names)
    if any(value is not None for value in (input_size, resize, mean, std)):
        base = loaded.preprocess
        size = input_size or base.size
        if resize is None:
            # Keep the model's way of framing the image: a crop scales with the input size.
            resize = None if base.resize is None else (base.resize if input_size is None else round(size * 8 / 7))
        loaded.preprocess = Preprocess(size=size, resize=resize, mean=mean or base.mean,
                                       std=std or base.std, interpolation=base.interpolation)
    return loaded


def choose_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise CamlensError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CamlensError("CUDA is not available on this machine: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CamlensError(f"there is no {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps_ok:
        raise CamlensError("MPS is not available on this machine: use --device cpu")
    return device


def resolve_class(value: str, loaded: LoadedModel, classes: int) -> int:
    """A class given as an index or a name: a short name, a full label or one of its synonyms.

    A number names the class of that index, and also the class of that name where the names are
    numbers ("1", "0", "2"): when those differ, it is ambiguous, as evaluate takes a label, and
    ``index=N`` or ``name=TEXT`` says which."""
    text = value.strip()
    kind, _, rest = text.partition("=")
    if kind in ("index", "name") and rest.strip():
        text = rest.strip()
    else:
        kind = None
    names = loaded.class_names
    labels = (loaded.class_labels or names) if names else None
    matches: set[int] = set()
    if kind != "index" and names:
        wanted = text.lower()
        matches = {
            index for index, (name, label) in enumerate(zip(names, labels))
            if wanted in {name.lower(), label.lower(), *(part.strip().lower() for part in label.split(","))}
        }
    if kind != "name" and re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < classes and not matches:
            raise CamlensError(f"class {index} is out of range: the model has {classes} classes (valid: 0 to {classes - 1})")
        if 0 <= index < classes:
            matches.add(index)
    if len(matches) > 1:
        choices = ", ".join(f"{index} ({labels[index]})" for index in sorted(matches))
        if re.fullmatch(r"-?\d+", text):
            raise CamlensError(f"class {value!r} is ambiguous: an index and a class name, of classes {choices}: "
                               f"give --class index={text} or --class name={text}")
        raise CamlensError(f"class {value!r} is ambiguous: give its index, one of {choices}")
    if matches:
        return matches.pop()
    if not names:
        raise CamlensError(f"class {value!r} is a name, but the model has no class names: give an index or --class-names")
    # A word of classes' names or synonyms ("cat": tabby cat, tiger cat, ...): one such class is
    # the one meant; several are listed, for the user to pick by index.
    lookup = class_index_lookup(names, labels)
    found = word_matches(text, lookup)
    if len(found) == 1:
        return found[0]
    if found:
        raise CamlensError(f"class {value!r} names no class, but is a word of {len(found)}: "
                           f"{describe_classes(found, lookup, labels=labels)}; give one by its index (--class {found[0]})")
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise CamlensError(f"unknown class {value!r}{hint}")


def slug(text: str, fallback: str) -> str:
    """A file-name-safe, lower-case form of ``text`` (letters of any script kept), at most 80 characters."""
    cleaned = re.sub(r"[^\w]+", "-", printable(text).lower()).strip("-_")
    return cleaned[:80].rstrip("-_") or fallback



def prepare(methods: Sequence[str], out: str, device: str, target_layer: str | None,
            model_args: dict, fc: str | None = None,
            on_skip: Callable[[str, str], None] | None = None,
            on_layer: Callable[[str], None] | None = None,
            smooth: dict[str, bool] | None = None,
            example: tuple[int, ...] | None = None,
            detector: bool = False) -> tuple[list[str], torch.device, LoadedModel, int]:
    """What every command checks before any work: methods, output, device, model, layer
    (``example``: the shape (C, *positions) of the array inputs, where they are arrays;
    ``detector``: the model is an object detector, its output read by ``--detections``).

    CAM fits only a layer that feeds a global-average-pool + linear head. When the user named
    no method (and no --fc), CAM is left out where it does not fit and ``on_skip(method,
    reason)`` is called (default: a note on stderr); when CAM was asked for, its error stands.
    ``on_layer`` receives the target layer's name, the default one found. With ``-m all``, a
    method that refuses the smoothing asked for (``smooth``: --aug-smooth, --eigen-smooth) is
    left out the same way; named with -m, its error stands.
    """
    every = [isinstance(m, str) and m.strip().lower() == ALL for m in methods]
    everything = any(every)
    named = list(dict.fromkeys(get_method(m).name for m, all_ in zip(methods, every) if not all_))
    chosen = list(METHODS) if everything else named or list(SEED_METHODS)
    if fc is not None and "cam" not in chosen:
        raise CamlensError("--fc names CAM's classifier, but CAM is not among the methods: add -m cam")
    if not out.strip():
        raise CamlensError("--out is empty: name an output directory")
    torch_device = choose_device(device)
    loaded = open_model(**model_args)
    found = probe(loaded, target_layer, example, detector)
    if on_layer is not None:
        on_layer(found.layer)
    if "cam" in chosen and detector:
        reason = "CAM explains classes of a classifier's scores, not a detector's boxes"
        if "cam" in named or fc is not None:
            raise CamlensError(f"{reason}: use the other methods (-m gradcam, -m scorecam, ...)")
        chosen.remove("cam")
        (on_skip or note_skip)("cam", reason)
    if "cam" in chosen and (reason := cam_misfit(loaded, found, fc)) is not None:
        if "cam" in named or fc is not None:
            raise CamlensError(reason)
        chosen.remove("cam")
        # What is wrong, without the library's advice (name fc=, use Grad-CAM): the others run.
        (on_skip or note_skip)("cam", reason.split("; ")[0])
    if smooth and any(smooth.values()):
        for name in [name for name in chosen if name not in named]:
            try:  # construction only: a method refuses a smoothing when it is built
                smoothed(METHODS[name](loaded.module, target_layer=found.layer, reshape=found.layout), **smooth)
            except CamlensError as error:
                chosen.remove(name)
                (on_skip or note_skip)(name, str(error))
    return chosen, torch_device, loaded, found.classes


def note_skip(method: str, reason: str) -> None:
    echo_error(f"camlens: note: {METHODS[method].display_name} skipped: {reason}")


def describe_start_up(start_up: dict[str, float]) -> str | None:
    """The start-up of a run in one line, or None where there was none worth a word."""
    total = sum(start_up.values())
    if total < 0.005:
        return None
    parts = ", ".join(f"{what} {seconds:.2f}" for what, seconds in sorted(start_up.items(), key=lambda kv: -kv[1])
                      if seconds >= 0.005)
    return f"start-up, once per run: {total:.2f} s ({parts}); not in the methods' seconds"


def core_method(method: Any) -> Any:
    """The method object inside its smoothings (--aug-smooth, --eigen-smooth)."""
    from ..methods.base import CAMMethod

    while not isinstance(method, CAMMethod) and getattr(method, "method", None) is not None:
        method = method.method
    return method


def copies_per_image(method: Any) -> int:
    """How many times a smoothed method explains each image: once per augmented copy."""
    from ..methods.base import CAMMethod
    from ..methods.meta import AugmentSmooth

    count = 1
    while not isinstance(method, CAMMethod) and getattr(method, "method", None) is not None:
        if isinstance(method, AugmentSmooth):
            count *= 1 + sum(map(len, method.copies().values()))
        method = method.method
    return count


def _core(objects: dict[str, Any]) -> Any:
    """The method object under the first of ``objects``, or None where there is none."""
    from ..methods.base import CAMMethod

    core = core_method(next(iter(objects.values()), None))
    return core if isinstance(core, CAMMethod) else None


def _gradcam_like(core: Any, compile_model: bool = False) -> Any:
    """A Grad-CAM object that runs as ``core`` does: its model, layers, layout, output and
    inference copy (shared)."""
    gradcam = METHODS["gradcam"](core.model, target_layer=None if core._layers is None else list(core._layers),
                                 optimize=core.optimize, compile=compile_model, output=core.output,
                                 reshape=core.reshape)
    gradcam._copies = core._copies
    return gradcam


def warm_up(objects: dict[str, Any], x: torch.Tensor) -> None:
    """One Grad-CAM pass (a forward and a backward) on ``x`` through the run's model and engine
    (the first method's inference copy, compiled or not), timed as start-up: the copy, the default
    layer's search and PyTorch's first-call set-up of its kernels then count once for the run,
    not in the seconds of whichever method comes first (camlens.timing). Best effort: a model the
    gradient cannot run through is left to the methods."""
    from ..methods.base import nested

    core = _core(objects)
    if core is None:
        return
    with one_time("warming up the model"), nested(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _gradcam_like(core, core.compile)(x)
        except CamlensError:
            pass


def warm_and_plan(objects: dict[str, Any], loaded: LoadedModel, paths: Sequence[Any], device: torch.device,
                  images: int, yes: bool, cheaper: str, extra_forwards: int = 0,
                  per_method: dict[str, int] | None = None, group: Group | None = None) -> dict[str, float]:
    """Warm up on the first of ``paths`` that loads (:func:`warm_up`), plan the run
    (:func:`plan_run`) and say the plan when the run is long (:func:`announce_plan`). Returns the
    start-up seconds spent, by kind (none where no image loads: the run says why, in its turn).
    A run of several processes (``group``) is said once, by the first, shared out; it never asks
    (the others would not wait for the answer)."""
    for path in paths:
        try:
            x = model_input(loaded, path, device)[0]
        except CamlensError:
            continue
        break
    else:
        return {}
    take_start_up()
    warm_up(objects, x)
    with one_time("planning the run"):
        plan = plan_run(objects, x, images, extra_forwards, per_method)
    spent = take_start_up()
    processes = 1 if group is None else group.world
    announce_plan(plan, yes or processes > 1, cheaper, processes)
    return spent


LONG_RUN = 600.0  # seconds: above this estimate, an interactive run asks before it starts (--yes skips)
PLAN_FROM = 30.0  # seconds: a run estimated to take less starts without a plan


@dataclass
class Plan:
    """What a run will cost before it starts: per method, its passes per image
    (:meth:`~camlens.methods.base.CAMMethod.cost`) and seconds, estimated from passes timed on the
    model just now; ``extra``: passes per image and method besides the method's (the metrics')."""

    images: int
    seconds: dict[str, tuple[float, float]]  # method -> (about, at most), for all the images
    passes: dict[str, str]  # method -> its passes per image, in words
    probe: str  # what was timed, in words

    @property
    def about(self) -> float:
        return sum(low for low, _ in self.seconds.values())

    @property
    def at_most(self) -> float:
        return sum(high for _, high in self.seconds.values())


def plan_run(objects: dict[str, Any], x: torch.Tensor, images: int, extra_forwards: int = 0,
             per_method: dict[str, int] | None = None) -> Plan:
    """Estimate a run of ``images`` images like ``x`` (one image, on the model's device) with the
    method ``objects``: a batch of 16 forwards and one Grad-CAM call (a forward and a backward)
    are timed on ``x`` through the first method's engine (after :func:`warm_up`); a method's
    forwards cost the batch's time per row, its backwards Grad-CAM's, and its passes of the layers
    after the target layer at most a forward each (the bound: they are cheaper). ``extra_forwards``:
    passes per image and method besides the method's (the metrics'); ``per_method``: the images
    each method has still to do, where not all (a resumed run)."""
    from ..methods.gradient_free import AblationCAM
    from ..methods.scorecam import ScoreCAM

    core = _core(objects)
    scorer = core.fast_forward(x, batch_size=16)
    batch = x.expand(16, *x.shape[1:]).contiguous()
    with torch.no_grad():
        start = timing.clock()
        scorer(batch)
        row = (timing.clock() - start) / 16
    gradcam = _gradcam_like(core)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = timing.clock()
        try:
            explanation = gradcam(x)
        except CamlensError:
            explanation = None
        grad = max(timing.clock() - start, row)
    layer, live, nonzero = None, None, None
    # How the layer was read: as the method was told, else as the default layer was found (its
    # recorded layout, "tokens:1:14x14" or "nhwc"; a function of the user's is given, never recorded).
    layout = core.reshape if core.reshape is not None or explanation is None else token_grid(
        explanation.options.get("reshape"))
    if explanation is not None:
        name = explanation.target_layers[0]
        # Costs count positions as height x width: a signal's or a volume's, all in one line of them.
        where = explanation.raw[name].shape[2:]
        layer = (explanation.weights[name].shape[2], *(where if len(where) == 2 else (math.prod(where), 1)))
        # The channels Score-CAM forwards (not constant over the map) and Ablation-CAM ablates
        # (not zero everywhere), on this image: far fewer than all of them after a ReLU.
        module = dict(core.model.named_modules())[name]
        with torch.no_grad():
            activation = record(core.model, x, {name: module}, output=core.output, reshape=layout)[1][name]
        live = int((~is_constant(activation, activation.dim() - 2)).sum())
        nonzero = int(activation.flatten(2).ne(0).any(dim=2).sum())
    seconds, passes = {}, {}
    for name, method in objects.items():
        inner, copies = core_method(method), copies_per_image(method)
        channels, height, width = layer or (1, 1, 1)
        if inner._layers is None and explanation is not None:
            # The default layer, named as the Grad-CAM probe found it: a cost can then see the model
            # after it (Grad-CAM++ general's one pass per channel before a global average pool).
            inner = copy.copy(inner)
            inner._layers = resolve_layers(inner.model, list(explanation.target_layers))
            inner.reshape = layout
        if isinstance(inner, ScoreCAM) and live is not None:
            channels = max(live, 1)
        elif isinstance(inner, AblationCAM) and nonzero is not None:
            channels = nonzero
        cost = inner.cost(channels, height, width)
        forwards = cost.forwards - cost.backwards + extra_forwards
        about = copies * (cost.backwards * grad + forwards * row)
        count = images if per_method is None else per_method.get(name, 0)
        seconds[name] = (count * about, count * (about + copies * cost.after * row))
        words = f"{'≤ ' if cost.at_most and not cost.after else ''}{cost.forwards + extra_forwards:,} forward(s)"
        if cost.backwards:
            words += f" + {cost.backwards:,} backward(s)"
        if cost.after:
            words += f" + {'≤ ' if cost.at_most else ''}{cost.after:,} pass(es) after the layer"
        passes[name] = words + (f", x {copies} copies" if copies > 1 else "")
    probe = (f"timed now on the first image: a forward {row * 1000:.1f} ms per image in a batch of 16, Grad-CAM "
             f"{grad * 1000:.0f} ms" + ("" if live is None else f"; {live:,} channels not constant there"))
    return Plan(images, seconds, passes, probe)


def announce_plan(plan: Plan, yes: bool, cheaper: str, processes: int = 1) -> None:
    """Say the plan of a long run before it starts (nothing for a short one). Above
    :data:`LONG_RUN`, an interactive terminal asks to go on (``--yes`` does not ask); a run that
    is not interactive is never held: it says which methods cost most and goes on. The times are
    of one process; ``processes`` share the work."""
    if plan.at_most < PLAN_FROM:
        return
    costly = sorted(plan.seconds, key=lambda m: (-plan.seconds[m][0], -plan.seconds[m][1]))
    shown = [m for m in costly if plan.seconds[m][0] >= 1 or plan.seconds[m][1] >= 10] or costly[:1]
    parts = "; ".join(f"{METHODS[m].display_name}: {plan.passes[m]} per image, {_span(*plan.seconds[m])}"
                      for m in shown)
    if len(shown) < len(costly):
        parts += f"; {len(costly) - len(shown)} other method(s) under a second each"
    shared = f" of one process's work, shared by {processes} processes" if processes > 1 else ""
    echo_error(f"camlens: plan: {plan.images} image(s); {parts}. In all {_span(plan.about, plan.at_most)}{shared} "
               f"({plan.probe})")
    if plan.about < LONG_RUN or yes:
        return
    names = ", ".join(METHODS[m].display_name for m in costly[:2])
    advice = f"the costliest: {names}; {cheaper}"
    if not interactive():
        echo_error(f"camlens: note: a long run ({advice}); it goes on (not interactive)")
        return
    if not click.confirm(f"camlens: this run may take {_duration(plan.about)} ({advice}). Go on?", default=False,
                         err=True):
        raise CamlensError("not started: give --yes to run it without asking, or fewer images or methods")


def interactive() -> bool:
    """Whether someone can answer a question: standard input and error are a terminal."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def yes_option(command: Callable) -> Callable:
    """--yes: start a long run without asking (a run that is not interactive never asks)."""
    return click.option("--yes", "-y", is_flag=True,
                        help=f"Start a run estimated above {LONG_RUN / 60:.0f} minutes without asking (the plan is "
                             "said before any long run; a run that is not interactive never asks).")(command)


def _span(about: float, at_most: float) -> str:
    """``about 2 min``, or ``1 s to 2 min`` where passes after the layer (counted at most as whole
    forwards) leave a range."""
    if at_most > 1.5 * about and _duration(at_most) != _duration(about):
        return f"{_duration(about)} to {_duration(at_most)}"
    return f"about {_duration(about)}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def method_objects(model, methods: Sequence[str], target_layer: str | None, batch_size: int | None,
                   seed: int, fc: str | None = None, engine: dict[str, Any] | None = None,
                   top_channels: int | float | None = None, smooth: dict[str, bool] | None = None) -> dict[str, Any]:
    """The method objects; ``engine``: their ``optimize`` and ``compile`` options;
    ``top_channels``: for the methods that take it (Score-CAM and its variants; refused without
    one of them); ``smooth``: ``aug_smooth`` and
    ``eigen_smooth`` (camlens.methods.meta.smoothed) for every method."""
    takes = {name for name in METHODS if "top_channels" in inspect.signature(METHODS[name]).parameters}
    if top_channels is not None and not takes & set(methods):
        raise CamlensError(f"--top-channels applies to {', '.join(sorted(takes))}: add one of them with -m")
    objects = {}
    shared = InferenceCopies()  # one inference copy of the model for all the methods of a run
    for name in methods:
        options: dict[str, Any] = {"fc": fc} if name == "cam" else {}
        # The engine's record names the layout in words; the methods take the layout itself.
        options.update({key: value for key, value in (engine or {}).items() if key != "reshape"})
        # A layer named (by the user, or sanity's found default) is read as --reshape says, or as
        # the probe found the default; with no layer, each method finds the default and its layout.
        if target_layer is not None and layer_layout() is not None:
            options["reshape"] = layer_layout()
        # --batch-size, --seed and --top-channels reach every method that takes them (its
        # constructor's keywords).
        accepted = inspect.signature(METHODS[name]).parameters
        if "top_channels" in accepted and top_channels is not None:
            options["top_channels"] = top_channels
        if "batch_size" in accepted and batch_size is not None:
            options["batch_size"] = batch_size
        if "seed" in accepted:
            options["seed"] = seed
        if "max_directions" in accepted and _given(MAX_DIRECTIONS) is not None:
            options["max_directions"] = _given(MAX_DIRECTIONS)
        if output_given() is not None:
            options["output"] = output_given()
        method = METHODS[name](model, target_layer=target_layer, **options)
        method._copies = shared
        objects[name] = smoothed(method, **(smooth or {}))
    return objects



@dataclass
class Probe:
    """What one forward pass of a blank grey batch tells about the model."""

    classes: int
    layer: str  # the target layer's name, the default one found
    activation: Tensor  # its output on the blank batch, as a feature map (N, C, h, w)
    logits: Tensor
    layout: Layout | None = None  # how the layer's output becomes that map (--reshape, or found)


def probe(loaded: LoadedModel, target_layer: str | None, example: tuple[int, ...] | None = None,
          detector: bool = False) -> Probe:
    """Check the model, preprocessing and target layer once, on a blank grey photo (or, for
    array inputs, an array of zeros of their shape ``example``: (C, *positions)). A ``detector``'s
    output is detections (N, D, 4 + classes) (:mod:`camlens.detection`), read by ``--detections``.

    A batch of two, because Score-CAM and Smooth Grad-CAM++ forward batches: a model exported
    with a fixed batch size of one fails here rather than on every image. The one forward pass
    also finds the default layer and gives what :func:`cam_misfit` needs.
    """
    check_hookable(loaded.module)
    preprocess = loaded.preprocess
    photo = example is None
    if photo:
        blank = preprocess(Image.new("RGB", (preprocess.size, preprocess.size), (128, 128, 128)))
        what = f"{preprocess.size}x{preprocess.size} input"
    else:
        blank = torch.zeros(example)
        what = f"input of zeros, {'x'.join(map(str, example))} as the first array"
    blank = blank.to(input_dtype(loaded.module))
    example = blank.unsqueeze(0).expand(2, *blank.shape).contiguous()
    layers = dict([resolve_layer(loaded.module, target_layer)]) if target_layer is not None else {}
    reshape = reshape_given()
    if reshape is not None and not layers:
        raise CamlensError("--reshape needs --target-layer: with none, camlens finds the default layer and reads its "
                           "tokens or channels-last map itself (see camlens layers)")
    try:
        if layers:
            output, outputs = record(loaded.module, example, layers, reshape=reshape, output=output_given())
            output = check_detections(output) if detector else check_scores(output, example)  # picked already
            layer, activation = next(iter(outputs.items()))
        else:
            output, found, activation = default_layer_output(loaded.module, example, output_given(), not detector)
            if detector:
                check_detections(output)
            layer, reshape = found.name, found.layout
            if reshape is not None:
                activation = reshape.to_grid(activation, example.shape, layer)[0]
                if (context := click.get_current_context(silent=True)) is not None:
                    context.meta[FOUND_LAYOUT] = reshape
    except CamlensError as error:
        raise CamlensError(f"{error} (checked on a blank {what})") from None
    except Exception as error:
        hint = "check --input-size" if photo else "check the arrays' shape"
        if loaded.source.startswith("torch.export"):
            hint += "; export with a dynamic batch size: dynamic_shapes=({0: torch.export.Dim('batch')},)"
        raise CamlensError(
            f"the model fails on a batch of {'x'.join(map(str, example.shape))} ({first_line(error)}); {hint}"
        ) from None
    check_finite(output, "model outputs on a blank input (check --mean and --std)")
    classes = output.shape[-1] - 4 if detector else output.shape[1]
    if loaded.class_names is not None and len(loaded.class_names) != classes:
        raise CamlensError(f"{len(loaded.class_names)} class names for a model with {classes} classes")
    return Probe(int(classes), layer, activation.detach(), output, reshape)


def cam_misfit(loaded: LoadedModel, found: Probe, fc: str | None) -> str | None:
    """Why CAM cannot explain the probed layer of this model, or None when it can.

    Whether the head suits CAM does not depend on the image: the probe's blank batch tells,
    checked as CAM checks it on every image (its classifier, logits = fc(GAP(layer))).
    """
    try:
        cam = METHODS["cam"](loaded.module, target_layer=found.layer, fc=fc, reshape=found.layout)
    except CamlensError as error:
        raise CamlensError(f"--fc {fc}: {error}") from None
    try:
        with torch.no_grad():
            head = cam.fc if cam.fc is not None else cam._find_fc(found.activation.shape[1], found.layer)
            cam._check_head(head, found.activation, found.logits, found.layer, cam.name_of(head))
    except CamlensError as error:
        # The library's hint names the Python argument; on the command line it is --fc.
        return str(error).replace("(fc=)", "(--fc)")
    return None
