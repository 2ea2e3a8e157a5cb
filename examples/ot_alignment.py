"""Align the patches of a handwritten digit with the words of its label sentence by optimal transport.

A tiny image-text matcher is trained on scikit-learn's 8x8 digits (no download): the 16 patches
(2x2 pixels + their position) of an image are one set, the words of a sentence such as
"this is the digit seven" the other. The words cross-attend to the patches with attnlib's
``got`` attention - its weights are the optimal-transport plan between word queries and patch
keys - and the model learns which of the ten sentences belongs to the image. The GOT regulariser
(:class:`attnlib.ot.GOTRegularizer`: Wasserstein + Gromov-Wasserstein distance between the word and
patch features of the true pairs) is added to the loss, as in Chen et al. (ICML 2020). (The
``got`` variant can return the same regulariser itself as ``aux_loss``; here it is applied to the
encoder outputs instead.)

After training, the script aligns a held-out digit with its sentence and saves a picture: the
image, the transport plan (words x patches) and the patches each word is transported to. It
also prints the Wasserstein / Gromov-Wasserstein plans of :func:`attnlib.ot.got_distance`.

Run: ``python examples/ot_alignment.py [--steps 300] [--out examples/ot_alignment.png]``
(one to two minutes on a 2-core CPU; prints the held-out matching accuracy, ~80%).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import attnlib
from attnlib import ot

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PREFIX = ["this", "is", "the", "digit"]
VOCAB = {w: i for i, w in enumerate(PREFIX + WORDS)}


def patches(images: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) images in [0, 1] -> (B, 16, 4 + 16): 2x2 pixel patches + one-hot position."""
    b = images.shape[0]
    p = images.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
    pos = torch.eye(16).expand(b, 16, 16)
    return torch.cat([p, pos], -1)


def sentences(labels: torch.Tensor) -> torch.Tensor:
    """(B,) digit labels -> (B, 5) token ids of "this is the digit <word>"."""
    prefix = torch.tensor([VOCAB[w] for w in PREFIX])
    return torch.cat([prefix.expand(len(labels), 4), (labels + len(PREFIX))[:, None]], 1)


class Matcher(nn.Module):
    """Words cross-attend to patches with OT (``got``) attention; a small head scores the digit word."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Sequential(nn.Linear(20, dim), nn.GELU(), nn.Linear(dim, dim))
        self.word = nn.Embedding(len(VOCAB), dim)
        # the GOT regulariser is applied to the encoders below, so the attention's own is off
        self.attn = attnlib.Attention(dim, 1, variant="got", n_iters=10, wd_weight=0.0, gwd_weight=0.0)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 1))

    def encode(self, img: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 8, 8), (B, 5) -> word features (B, 5, dim), patch features (B, 16, dim)."""
        return self.word(tokens), self.patch(patches(img))

    def forward(self, img: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Match score (B,) of each (image, sentence) pair and the alignment weights (B, 5, 16)."""
        w, ctx = self.encode(img, tokens)
        y, extras = self.attn(w, ctx, return_extras=True)
        return self.head(w[:, -1] + y[:, -1]).squeeze(-1), extras.weights[:, 0]


def scores_for_all_words(model: Matcher, img: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) -> (B, 10): the score of "this is the digit <word>" for every word."""
    b = img.shape[0]
    toks = sentences(torch.arange(10).repeat(b))
    return model(img.repeat_interleave(10, 0), toks)[0].view(b, 10)


def main() -> None:
    """Train, align a held-out digit, save the picture."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("ot_alignment.png"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    perm = torch.randperm(len(labels))
    train, test = perm[:1500], perm[1500:]
    model = Matcher()
    got = ot.GOTRegularizer(wd_weight=0.1, gwd_weight=0.1)  # Chen et al.'s VQA weights
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.steps):
        idx = train[torch.randint(len(train), (args.batch,))]
        img, lab = images[idx], labels[idx]
        ce = F.cross_entropy(scores_for_all_words(model, img), lab)  # which sentence is the right one?
        reg = got(*model.encode(img, sentences(lab)))  # align words and patches of the true pairs
        loss = ce + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  matching loss {ce.item():.3f}  GOT regulariser {reg.item():.4f}")
    model.eval()
    with torch.no_grad():
        img, lab = images[test], labels[test]
        pred = scores_for_all_words(model, img).argmax(1)
        print(f"held-out: the true sentence scores highest for {(pred == lab).float().mean().item():.1%} of digits")
        i = int(test[0])
        one = images[i : i + 1]
        _, weights = model(one, sentences(labels[i : i + 1]))
        plan = weights[0]  # (5 words, 16 patches), rows rescaled to sum to 1
        wd, gwd, t_w, _ = ot.got_distance(*model.encode(one, sentences(labels[i : i + 1])), return_plans=True)
    words = [*PREFIX, WORDS[int(labels[i])]]
    print(f"digit {int(labels[i])}: WD(words, patches) = {wd.item():.4f}, GWD = {gwd.item():.4f}")
    print("GOT Wasserstein plan x 16 (words x patches):\n", np.round(t_w[0].numpy() * 16, 2))

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2.2, 1]})
    axes[0].imshow(images[i], cmap="gray_r")
    for c in range(1, 4):
        axes[0].axhline(2 * c - 0.5, color="tab:blue", lw=0.6)
        axes[0].axvline(2 * c - 0.5, color="tab:blue", lw=0.6)
    axes[0].set_title(f"digit {int(labels[i])}: 16 patches")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    im = axes[1].imshow(plan.numpy(), cmap="viridis", aspect="auto")
    axes[1].set_yticks(range(len(words)), words)
    axes[1].set_xticks(range(16), [f"{r},{c}" for r in range(4) for c in range(4)], rotation=90, fontsize=7)
    axes[1].set_xlabel("patch (row, col)")
    axes[1].set_title("got attention = OT plan (rows rescaled to 1)")
    fig.colorbar(im, ax=axes[1], fraction=0.03)
    target = plan[-1].reshape(4, 4).numpy()  # the digit word's row
    axes[2].imshow(images[i], cmap="gray_r")
    axes[2].imshow(np.kron(target, np.ones((2, 2))), cmap="Reds", alpha=0.55)
    axes[2].set_title(f"patches transported to '{words[-1]}'")
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
