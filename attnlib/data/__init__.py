"""Local data for the backbones - nothing is downloaded; everything is generated or read from disk.

* ``digits`` - scikit-learn's bundled 8x8 digit images (ViT).
* ``chars`` - byte-level LM over local text (default: the running Python's stdlib ``.py`` files).
* ``mqar`` - Zoology's multi-query associative recall.
* ``listops`` - the LRA ListOps grammar, length configurable.
* ``speech_digits`` - spoken digit strings synthesised with espeak-ng.
* ``tables`` - random-SCM tables for tabular in-context learning.

:func:`build_data` builds one from a data config (``name`` + keyword arguments).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnlib._config import split_named_config
from attnlib.data.base import DataModule, cache_dir
from attnlib.data.chars import CharsData
from attnlib.data.digits import DigitsData
from attnlib.data.listops import ListOpsData
from attnlib.data.mqar import MQARData
from attnlib.data.speech_digits import SpeechDigitsData
from attnlib.data.tables import TablesData

__all__ = [
    "DATASETS",
    "CharsData",
    "DataModule",
    "DigitsData",
    "ListOpsData",
    "MQARData",
    "SpeechDigitsData",
    "TablesData",
    "build_data",
    "cache_dir",
]

#: Data config name -> class.
DATASETS: dict[str, type[DataModule]] = {
    "digits": DigitsData,
    "chars": CharsData,
    "mqar": MQARData,
    "listops": ListOpsData,
    "speech_digits": SpeechDigitsData,
    "tables": TablesData,
}


def build_data(cfg: Mapping[str, Any] | Any, **overrides: Any) -> DataModule:
    """Build a data module from a config with ``name`` (one of :data:`DATASETS`) and its options."""
    name, kwargs = split_named_config(cfg, DATASETS, what="data")
    kwargs.update(overrides)
    return DATASETS[name](**kwargs)
