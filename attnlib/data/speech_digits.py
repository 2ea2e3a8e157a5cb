"""Spoken digit strings synthesised locally with espeak-ng (Debian package ``espeak-ng``).

Each utterance is a random string of ``min_digits``..``max_digits`` digits read as words
("three one four"), spoken by a voice drawn from ``voices`` at a random speed (words per
minute) and pitch. Train, val and test use disjoint digit strings (the test strings are
held out from training). Waveforms (22.05 kHz, espeak-ng's rate) are cached as ``.npz``.

Targets are the digit characters (CTC labels 1..10 for '0'..'9', blank 0), or with
``targets="words"`` the spelled-out text (letters and space, labels 1..27) - the character
error rate is measured on those characters.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlib.data.base import Batch, DataModule, cache_dir, stable_hash

__all__ = ["DEFAULT_VOICES", "SpeechDigitsData", "espeak_available", "synthesize"]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-029",
    "en-us+f3",
    "en-gb+f2",
    "en-us+m3",
    "en-gb-x-rp+f4",
)
_LETTERS = " abcdefghijklmnopqrstuvwxyz"

MISSING = (
    "the speech_digits data synthesises speech with espeak-ng, which was not found on PATH. "
    "Install it from Debian's packages: `sudo apt-get install espeak-ng` (the project's .ci/run does this)."
)


def espeak_available() -> bool:
    """Whether the espeak-ng executable is on PATH."""
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng: -> (float32 samples in [-1, 1], sample rate)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(MISSING)
    res = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {res.stderr.decode(errors='replace').strip()}")
    with wave.open(io.BytesIO(res.stdout)) as w:
        rate = w.getframerate()
        frames = w.readframes(w.getnframes())
    # espeak-ng's --stdout WAV header may leave the frame count open; read what is there
    x = np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    return x, rate


class SpeechDigitsData(DataModule):
    """Synthesised spoken digits for CTC.

    Batches: ``{"wave": (B, T) float, "lengths": (B,) long, "targets": (B, S) long,
    "target_lengths": (B,) long, "text": list[str]}`` (waves zero-padded to the longest).

    Args:
        num_train, num_val, num_test: utterances per split.
        min_digits, max_digits: digits per utterance.
        voices: espeak-ng voices (``name`` or ``name+variant``).
        speed: (min, max) words per minute; pitch: (min, max) espeak pitch 0-99.
        targets: "digits" or "words".
        gain: (min, max) random amplitude scale in training; noise: Gaussian noise std in training.
        workers: parallel espeak-ng processes while synthesising.
        seed, batch_size, eval_batch_size, cache_dir: see :class:`DataModule`.
    """

    task = "ctc"
    name = "speech_digits"

    def __init__(
        self,
        *,
        num_train: int = 3000,
        num_val: int = 200,
        num_test: int = 400,
        min_digits: int = 1,
        max_digits: int = 5,
        voices: list[str] | tuple[str, ...] = DEFAULT_VOICES,
        speed: tuple[int, int] | list[int] = (130, 200),
        pitch: tuple[int, int] | list[int] = (30, 70),
        targets: str = "digits",
        gain: tuple[float, float] | list[float] = (0.5, 1.5),
        noise: float = 0.003,
        workers: int = 4,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if targets not in ("digits", "words"):
            raise ValueError(f"targets must be 'digits' or 'words', got {targets!r}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.min_digits, self.max_digits = min_digits, max_digits
        self.voices = list(voices)
        self.speed, self.pitch = tuple(speed), tuple(pitch)
        self.targets, self.gain, self.noise, self.workers = targets, tuple(gain), float(noise), workers
        self.sample_rate = 22050
        self.data: dict[str, dict[str, Any]] = {}

    # -- generation -------------------------------------------------------------------------

    def _plan(self) -> dict[str, list[tuple[str, str, int, int]]]:
        """(digit string, voice, speed, pitch) per utterance; test/val strings unseen in train."""
        rng = np.random.default_rng(self.seed + 12345)
        used: set[str] = set()
        held: set[str] = set()
        plan: dict[str, list[tuple[str, str, int, int]]] = {}
        for split in ("test", "val", "train"):  # held-out strings are drawn first
            items = []
            while len(items) < self.sizes[split]:
                n = int(rng.integers(self.min_digits, self.max_digits + 1))
                s = "".join(str(d) for d in rng.integers(0, 10, n))
                if split != "train" and s in used:
                    continue
                if split == "train" and s in held:
                    continue
                used.add(s)
                v = self.voices[int(rng.integers(len(self.voices)))]
                items.append(
                    (
                        s,
                        v,
                        int(rng.integers(self.speed[0], self.speed[1] + 1)),
                        int(rng.integers(self.pitch[0], self.pitch[1] + 1)),
                    )
                )
            plan[split] = items
            if split == "val":
                held = set(used)
        return plan

    def setup(self) -> None:
        plan = self._plan()
        key = stable_hash("speech_digits", plan, self.sample_rate)
        path = cache_dir(self.cache_path) / f"speech_digits-{key}.npz"
        if not path.exists():
            if not espeak_available():
                raise RuntimeError(MISSING)
            arrays: dict[str, np.ndarray] = {}
            for split, items in plan.items():
                with ThreadPoolExecutor(max(1, self.workers)) as pool:
                    waves = list(
                        pool.map(
                            lambda it: synthesize(
                                " ".join(WORDS[int(c)] for c in it[0]), voice=it[1], speed=it[2], pitch=it[3]
                            ),
                            items,
                        )
                    )
                rates = {r for _, r in waves}
                if rates != {self.sample_rate}:
                    raise RuntimeError(f"espeak-ng produced sample rates {rates}, expected {self.sample_rate}")
                arrays[f"{split}_wave"] = np.concatenate([w for w, _ in waves]).astype(np.float16)
                arrays[f"{split}_len"] = np.array([len(w) for w, _ in waves], dtype=np.int64)
                arrays[f"{split}_text"] = np.array([it[0] for it in items])
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(path)
        z = np.load(path)
        for split in plan:
            lens = z[f"{split}_len"]
            waves = np.split(z[f"{split}_wave"].astype(np.float32), np.cumsum(lens)[:-1])
            texts = [str(t) for t in z[f"{split}_text"]]
            self.data[split] = {"waves": [torch.from_numpy(w) for w in waves], "text": texts}

    # -- labels ---------------------------------------------------------------------------------

    def vocabulary(self) -> list[str]:
        """Output symbols, index 0 = CTC blank."""
        return ["<blank>", *(str(d) for d in range(10))] if self.targets == "digits" else ["<blank>", *_LETTERS]

    def transcript(self, digits: str) -> str:
        """The target text of a digit string."""
        return digits if self.targets == "digits" else " ".join(WORDS[int(c)] for c in digits)

    def encode(self, text: str) -> list[int]:
        """Target text -> label ids (1-based; 0 is the blank)."""
        table = {c: i for i, c in enumerate(self.vocabulary()) if i > 0}
        return [table[c] for c in text]

    def decode_labels(self, ids: list[int]) -> str:
        """Label ids -> text."""
        voc = self.vocabulary()
        return "".join(voc[i] for i in ids if 0 < i < len(voc))

    # -- batches --------------------------------------------------------------------------------

    def num_train(self) -> int:
        return self.sizes["train"]

    def eval_examples(self, split: str) -> int:
        return self.sizes[split]

    def _batch(self, waves: list[Tensor], digits: list[str]) -> Batch:
        lens = torch.tensor([len(w) for w in waves])
        x = torch.zeros(len(waves), int(lens.max()))
        for i, w in enumerate(waves):
            x[i, : len(w)] = w
        texts = [self.transcript(d) for d in digits]
        ids = [self.encode(t) for t in texts]
        tl = torch.tensor([len(t) for t in ids])
        tg = torch.zeros(len(ids), int(tl.max()), dtype=torch.long)
        for i, t in enumerate(ids):
            tg[i, : len(t)] = torch.tensor(t)
        return {"wave": x, "lengths": lens, "targets": tg, "target_lengths": tl, "text": texts}

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        d = self.data["train"]
        waves = [d["waves"][i] for i in indices.tolist()]
        if gen is not None:
            lo, hi = self.gain
            g = lo + (hi - lo) * torch.rand(len(waves), generator=gen)
            waves = [w * g[i] + self.noise * torch.randn(len(w), generator=gen) for i, w in enumerate(waves)]
        return self._batch(waves, [d["text"][i] for i in indices.tolist()])

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        d = self.data[split]
        return self._batch(d["waves"][start:end], d["text"][start:end])

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocabulary()), "sample_rate": self.sample_rate}
