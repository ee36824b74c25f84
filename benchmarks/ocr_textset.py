"""A labelled text-line set for PP-OCRv4 rec, rendered with Pillow and the DejaVu fonts.

Lines are random words, numbers and punctuation in Latin script (DejaVu has no CJK glyphs; the
rec model's character table covers ASCII). Calibration and evaluation sets use different seeds,
different word pools and different fonts, so the eval set is not the calibration set.
Preprocessing follows rapidocr's ``TextRecognizer.resize_norm_img``: keep aspect ratio at height
48, at most ``width`` wide, scale to [-1, 1], zero-pad on the right. Decoding is CTC greedy over
the model's ``character`` metadata with rapidocr's table layout (blank first, space last).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lepton_cli.evaluate.accuracy import ctc_characters, ctc_greedy_decode, ctc_text, edit_distance  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CALIB_FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
EVAL_FONTS = [
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono-Bold.ttf",
]
CALIB_WORDS = (
    "invoice total amount paid date order number customer account balance due street city "
    "model serial weight price tax item quantity phone email office north south"
).split()
EVAL_WORDS = (
    "receipt subtotal cash change card visa store manager shipping address postal code river "
    "garden window coffee ticket station platform gate flight seat hotel room"
).split()
PUNCT = list(".,:-/#%()")


def _text(rng: np.random.Generator, words: list[str]) -> str:
    parts = []
    for _ in range(rng.integers(1, 4)):
        kind = rng.random()
        if kind < 0.55:
            w = str(rng.choice(words))
            parts.append(w.upper() if rng.random() < 0.2 else w.capitalize() if rng.random() < 0.4 else w)
        elif kind < 0.85:
            parts.append(str(rng.integers(0, 100000)) + (str(rng.choice(PUNCT)) if rng.random() < 0.4 else ""))
        else:
            parts.append(f"{rng.integers(1, 31):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}")
    return " ".join(parts)[:24]


def render_line(text: str, font_path: Path, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(22, 34))
    font = ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    bg = int(rng.integers(170, 256))
    fg = int(rng.integers(0, 90))
    img = Image.new(
        "RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), (bg, bg - int(rng.integers(0, 15)), bg)
    )
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, font=font, fill=(fg, fg, fg + int(rng.integers(0, 40))))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    return img


def preprocess(img: Image.Image, height: int = 48, width: int = 320) -> np.ndarray:
    """rapidocr's resize_norm_img: [3, H, W] float32 in [-1, 1], zero padded on the right."""
    w, h = img.size
    resized_w = min(width, int(math.ceil(height * w / h)))
    arr = np.asarray(img.resize((resized_w, height), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255.0
    arr = (arr - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = arr
    return out


def make_set(count: int, seed: int, role: str, width: int = 320) -> tuple[np.ndarray, list[str]]:
    """(images [count, 3, 48, width], texts) for role "calib" or "eval"."""
    rng = np.random.default_rng(seed)
    fonts = CALIB_FONTS if role == "calib" else EVAL_FONTS
    words = CALIB_WORDS if role == "calib" else EVAL_WORDS
    images, texts = [], []
    for _ in range(count):
        text = _text(rng, words)
        images.append(preprocess(render_line(text, FONT_DIR / str(rng.choice(fonts)), rng), width=width))
        texts.append(text)
    return np.stack(images), texts


def charset(model: onnx.ModelProto) -> list[str]:
    """Class index -> character (PaddleOCR's table; lepton_cli.evaluate.accuracy.ctc_characters)."""
    return ctc_characters(model) or []


def ctc_greedy(probs: np.ndarray, chars: list[str]) -> list[str]:
    """[N, T, C] -> strings: arg-max per step, collapse repeats, drop blanks (the compile's own decode)."""
    return ctc_text(ctc_greedy_decode(probs), chars)


def char_accuracy(predicted: list[str], truth: list[str]) -> float:
    """100 × (1 − total edit distance / total characters)."""
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth))
    return 100.0 * max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truth)))


def render_page(rng: np.random.Generator, fonts: list[str], words: list[str], size: int = 640) -> Image.Image:
    """A page of 6-14 text lines at random positions and sizes (for PP-OCRv4 det)."""
    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (size, size), (bg, bg, bg - int(rng.integers(0, 20))))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(5, 40))
    while y < size - 40:
        font = ImageFont.truetype(str(FONT_DIR / str(rng.choice(fonts))), int(rng.integers(16, 40)))
        fg = int(rng.integers(0, 80))
        draw.text((int(rng.integers(5, size // 3)), y), _text(rng, words), font=font, fill=(fg, fg, fg))
        y += int(rng.integers(35, 80))
    return img


def captured(page: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``page`` as a camera frame reaches an edge device's model: light falling off across the sheet, lens blur and
    sensor noise (no JPEG: at quality 90 and under its 8x8 blocks flatten the noise out of the background again).
    A rendered page is flat to the last grey level, which no camera gives (docs/decisions.md, session 23)."""
    pixels = np.asarray(page, np.float32)
    height, width = pixels.shape[:2]
    angle, falloff = rng.uniform(0.0, 2 * math.pi), rng.uniform(0.0, 0.15)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    ramp = math.cos(angle) * cols + math.sin(angle) * rows
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    lit = Image.fromarray(np.clip(np.round(pixels * (1 - falloff * ramp)[..., None]), 0, 255).astype(np.uint8))
    blurred = np.asarray(lit.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8))), np.float32)
    noisy = blurred + rng.normal(0.0, rng.uniform(1.5, 3.5), blurred.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def make_pages(count: int, seed: int, role: str, size: int = 640, capture: bool = False) -> np.ndarray:
    """[count, 3, size, size] float32, PP-OCR det normalisation (ImageNet mean/std on [0, 1] RGB). ``capture``: each
    page through ``captured``, seeded apart from the layout, so the same seed gives the same text either way."""
    rng = np.random.default_rng(seed)
    fonts = CALIB_FONTS if role == "calib" else EVAL_FONTS
    words = CALIB_WORDS if role == "calib" else EVAL_WORDS
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    pages = []
    for index in range(count):
        page = render_page(rng, fonts, words, size)
        if capture:
            page = captured(page, np.random.default_rng([seed, index]))
        pages.append((np.asarray(page, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std)
    return np.stack(pages).astype(np.float32)


def pixel_f1(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.3) -> float:
    """F1 of the thresholded probability maps (DBNet's binarisation threshold 0.3), candidate vs reference."""
    ref, got = reference > threshold, candidate > threshold
    tp = float(np.sum(ref & got))
    denom = float(np.sum(ref) + np.sum(got))
    return 1.0 if denom == 0 else 2 * tp / denom
