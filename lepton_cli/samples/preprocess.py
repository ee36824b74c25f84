"""``--calib FOLDER --preprocess SPEC``: a folder of images as a calibration (or eval) sample set.

SPEC is comma-separated ``key=value`` settings, e.g.
``size=224x224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,order=RGB,layout=NCHW``:
- ``size=HxW``: resize target (default: the model input's static H and W);
- ``scale``: pixel multiplier before mean/std (default 1/255, i.e. pixels in [0, 1]);
- ``mean``/``std``: per channel (one value or one per channel, ``:``-separated), after ``scale``;
- ``order``: ``RGB`` (default) or ``BGR``; a 1-channel input reads images as grayscale;
- ``layout``: ``NCHW`` or ``NHWC`` (default: guessed from which axis of the input has 1 or 3 channels).
Images are decoded one at a time when a feed is asked for (memory stays one image, not the set),
so a large set costs no float32 copy of every image up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from lepton_cli.errors import BadInputError
from lepton_cli.model.shapes import graph_inputs
from lepton_cli.samples.sample_set import SampleSet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    channels: int
    layout: str = "NCHW"
    order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def apply(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB").resize(
                    (self.width, self.height), Image.BILINEAR
                )
                arr = np.asarray(img, dtype=np.float32)
        except Image.DecompressionBombError as exc:  # refused from its header, before it is decoded
            raise BadInputError(f"image {path}: {exc}", "downscale the image, or remove it") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInputError(
                f"image {path} cannot be read ({exc.__class__.__name__})", "remove or replace the file"
            ) from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.order == "BGR":
            arr = arr[:, :, ::-1]
        arr = (arr * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr[None], dtype=np.float32)


def _floats(value: str, key: str, channels: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value.split(":"))
    except ValueError:
        raise BadInputError(
            f"--preprocess {key}={value!r} is not a number list", f"write e.g. {key}=0.5:0.5:0.5"
        ) from None
    if len(values) not in (1, channels):
        raise BadInputError(
            f"--preprocess {key} has {len(values)} values for {channels} channels", f"give 1 or {channels} values"
        )
    return values


def parse_preprocess(spec: str | None, model: onnx.ModelProto) -> tuple[str, Preprocess]:
    """(input name, settings) for the model's one image input."""
    images = [sig for sig in graph_inputs(model) if len(sig.dims) == 4]
    if len(graph_inputs(model)) != 1 or not images:
        raise BadInputError(
            "an image folder as --calib needs a model with one 4-D image input",
            "pass an .npz keyed by input name instead",
        )
    sig = images[0]
    settings: dict[str, str] = {}
    for part in filter(None, (spec or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in {"size", "scale", "mean", "std", "order", "layout"}:
            raise BadInputError(
                f"--preprocess: cannot read {part!r}",
                "use size=HxW, scale=, mean=a:b:c, std=a:b:c, order=RGB|BGR, layout=NCHW|NHWC",
            )
        settings[key.strip()] = value.strip()
    dims = list(sig.dims)
    layout = settings.get("layout", "NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW").upper()
    if layout not in ("NCHW", "NHWC"):
        raise BadInputError(f"--preprocess layout={layout!r}", "use layout=NCHW or layout=NHWC")
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = dims[c_axis] if isinstance(dims[c_axis], int) else 3
    if "size" in settings:
        try:
            height, width = (int(v) for v in settings["size"].lower().split("x"))
        except ValueError:
            height = width = 0
        if height < 1 or width < 1:
            raise BadInputError(f"--preprocess size={settings['size']!r}", "write size=HxW, e.g. size=224x224")
    elif isinstance(dims[h_axis], int) and isinstance(dims[w_axis], int):
        height, width = dims[h_axis], dims[w_axis]
    else:
        raise BadInputError(f"input {sig.name!r} has dynamic height/width {dims}", "give --preprocess size=HxW")
    order = settings.get("order", "RGB").upper()
    if order not in ("RGB", "BGR"):
        raise BadInputError(f"--preprocess order={order!r}", "use order=RGB or order=BGR")
    try:
        scale = float(eval_fraction(settings.get("scale", "1/255")))
    except (ValueError, ZeroDivisionError):
        raise BadInputError(
            f"--preprocess scale={settings['scale']!r} is not a number", "write e.g. scale=1/255 or scale=1"
        ) from None
    return sig.name, Preprocess(
        height,
        width,
        channels,
        layout,
        order,
        scale,
        _floats(settings.get("mean", "0"), "mean", channels),
        _floats(settings.get("std", "1"), "std", channels),
    )


def eval_fraction(text: str) -> float:
    num, sep, den = text.partition("/")
    return float(num) / float(den) if sep else float(num)


class ImageFolderSamples(SampleSet):
    """A SampleSet whose samples are image files, decoded and preprocessed on demand."""

    def __init__(self, path: Path, files: list[Path], name: str, settings: Preprocess):
        super().__init__(path, {}, None, {name: False})
        self.files, self.name, self.settings = files, name, settings

    def __len__(self) -> int:
        return len(self.files)

    def feed(self, index: int) -> dict[str, np.ndarray]:
        return {self.name: self.settings.apply(self.files[index])}

    def feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for index in range(len(self) if limit is None else min(limit, len(self))):
            yield self.feed(index)

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple["ImageFolderSamples", "ImageFolderSamples"]:
        order = np.random.default_rng(seed).permutation(len(self))
        cut = max(1, int(round(len(self) * (1 - holdout_fraction))))
        return tuple(
            ImageFolderSamples(self.path, [self.files[i] for i in np.sort(part)], self.name, self.settings)
            for part in (order[:cut], order[cut:])
        )  # type: ignore[return-value]

    def shapes(self) -> dict[str, list[int]]:
        s = self.settings
        return {
            self.name: [1, s.channels, s.height, s.width] if s.layout == "NCHW" else [1, s.height, s.width, s.channels]
        }


def load_image_folder(
    folder: str | Path, model: onnx.ModelProto, spec: str | None, *, role: str = "--calib"
) -> ImageFolderSamples:
    """Validate the folder and settings now (exit 2 on any problem); decode images later, one at a time."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BadInputError(
            f"{role} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
            "add images or pass an .npz",
        )
    name, settings = parse_preprocess(spec, model)
    sig = next(s for s in graph_inputs(model) if s.name == name)
    want = ImageFolderSamples(folder, files, name, settings).shapes()[name]
    if any(isinstance(d, int) and d != w for axis, (d, w) in enumerate(zip(sig.dims, want)) if axis > 0):
        raise BadInputError(
            f"--preprocess gives {role} images of shape {want}, input {name!r} expects {list(sig.dims)}",
            "set size=HxW and layout to match the model input",
        )
    first = settings.apply(files[0])  # fail now, not mid-pipeline, on a bad first image or settings
    if not np.isfinite(first).all():
        raise BadInputError(f"--preprocess settings give NaN/Inf for {files[0]}", "check std (no zeros) and scale")
    return ImageFolderSamples(folder, files, name, settings)
