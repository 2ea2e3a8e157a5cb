"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) as images for a ViT.

Deterministic stratified split (seed 0 by default): 20% test (360), 10% of the rest val,
the remainder train. Pixels (0..16) are standardised with the training mean/std. Training
augmentation: random translation by up to ``shift`` pixels (zero fill).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib.data.base import Batch, DataModule

__all__ = ["DigitsData"]


class DigitsData(DataModule):
    """Digits images: batches ``{"x": (B, 1, 8, 8) float, "y": (B,) long}``.

    Args:
        test_fraction, val_fraction: split sizes.
        split_seed: seed of the stratified split.
        shift: max random translation in pixels for training (0 = off).
        seed, batch_size, eval_batch_size, cache_dir: see :class:`DataModule`.
    """

    task = "classify"
    name = "digits"

    def __init__(
        self,
        *,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        shift: int = 1,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.test_fraction, self.val_fraction, self.split_seed, self.shift = (
            test_fraction,
            val_fraction,
            split_seed,
            shift,
        )
        self.x: dict[str, Tensor] = {}
        self.y: dict[str, Tensor] = {}

    def setup(self) -> None:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
            raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        x = d.images.astype(np.float32)
        y = d.target.astype(np.int64)
        idx = np.arange(len(y))
        rest, test = train_test_split(idx, test_size=self.test_fraction, random_state=self.split_seed, stratify=y)
        train, val = train_test_split(rest, test_size=self.val_fraction, random_state=self.split_seed, stratify=y[rest])
        mean, std = x[train].mean(), x[train].std()
        for name, sel in (("train", train), ("val", val), ("test", test)):
            self.x[name] = torch.from_numpy((x[np.sort(sel)] - mean) / std).unsqueeze(1)
            self.y[name] = torch.from_numpy(y[np.sort(sel)])
        self._fill = float(-mean / std)  # the value of a blank (0) pixel after standardising

    def num_train(self) -> int:
        self.ensure_setup()
        return len(self.y["train"])

    def eval_examples(self, split: str) -> int:
        self.ensure_setup()
        return len(self.y[split])

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        x = self.x["train"][indices]
        if self.shift > 0 and gen is not None:
            s = self.shift
            b, _, h, w = x.shape
            pad = F.pad(x, (s, s, s, s), value=self._fill)
            dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
            dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
            rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, 1, h, w + 2 * s)
            pad = pad.gather(2, rows)
            cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, 1, h, w)
            x = pad.gather(3, cols)
        return {"x": x, "y": self.y["train"][indices]}

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        return {"x": self.x[split][start:end], "y": self.y[split][start:end]}

    def model_kwargs(self) -> dict[str, Any]:
        return {"img_size": 8, "in_chans": 1, "num_classes": 10}
