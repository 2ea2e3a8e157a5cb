"""GTA on a 2-D multi-view task: where is a landmark the query camera cannot see, in its own frame?

A scene has ``K`` landmarks in the plane and ``V`` cameras with random SE(2) poses (heading and
position). Each camera sees 3 landmarks and reports them in its own frame (position + identity);
one query token in camera 0 names a landmark camera 0 does not see, and the model regresses that
landmark's position in camera 0's frame - it must move an observation from another camera's frame
into camera 0's. Two small transformers (2 blocks, dim 64, 4 heads, softmax), the same training:

* ``pose input``: each token's camera pose (cos, sin, x, y) concatenated to its input;
* ``GTA``: no pose input; every attention gets the tokens' camera poses as group elements
  (:mod:`attnlib.functional.gta`: 3 SE(2) blocks of 3x3 homogeneous transforms and rotation blocks
  at frequencies 1, 2, 3 per 16-channel head), so keys and values reach each query in its frame.

Reported: test error over training (learning speed), and the error on the same test scenes after
one global SE(2) transform of the world (a rotation and a shift of 5, beyond the training range of
camera positions) - a change of world frame that leaves every camera-frame quantity, so the answer,
unchanged. GTA is invariant to it by construction; the largest change of its predictions is listed.

    python benchmarks/gta_multiview.py [--steps 3000] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table
from _vision import finish, start

from attnlib.functional.gta import Geometry, angle_so2, pose_blocks
from attnlib.models import TransformerBlock

K, V, SEEN = 6, 3, 3  # landmarks, cameras, landmarks per camera
N = V * SEEN + 1  # observation tokens + the query token
DIM, HEADS = 64, 4


def se2(theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(...,) angles, (..., 2) positions -> (..., 3, 3) homogeneous transforms [R t; 0 1]."""
    c, s = torch.cos(theta), torch.sin(theta)
    out = torch.zeros(*theta.shape, 3, 3)
    out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1] = c, -s, s, c
    out[..., :2, 2] = t
    out[..., 2, 2] = 1.0
    return out


def scenes(b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of scenes: observations, camera poses (camera -> world), target in camera 0's frame."""
    world = torch.rand(b, K, 2, generator=gen) * 4 - 2
    pose = se2(torch.rand(b, V, generator=gen) * 2 * math.pi, torch.rand(b, V, 2, generator=gen) * 2 - 1)
    order = torch.argsort(torch.rand(b, K, generator=gen), 1)
    target = order[:, 0]  # camera 0 sees order[1:4]; camera 1 sees the target; camera 2 any three
    seen = [order[:, 1 : 1 + SEEN]]
    rest = torch.argsort(torch.rand(b, K, generator=gen), 1)
    cam1 = torch.cat([target[:, None], order[:, 1 + SEEN :][:, : SEEN - 1]], 1)
    if cam1.shape[1] < SEEN:
        cam1 = torch.cat([cam1, order[:, 1 : 1 + SEEN - cam1.shape[1]]], 1)
    seen += [cam1, rest[:, :SEEN]]
    ids = torch.stack(seen, 1)  # (B, V, SEEN)
    inv = torch.linalg.inv(pose)  # world -> camera
    wh = torch.cat([world, torch.ones(b, K, 1)], -1)  # homogeneous
    pts = torch.einsum(
        "bvij,bvsj->bvsi", inv, wh.gather(1, ids.flatten(1)[..., None].expand(-1, -1, 3)).view(b, V, SEEN, 3)
    )
    goal = torch.einsum("bij,bj->bi", inv[:, 0], wh[torch.arange(b), target])[:, :2]
    return {"points": pts[..., :2], "ids": ids, "target": target, "pose": pose, "goal": goal}


def tokens(sc: dict[str, torch.Tensor], pose_input: bool) -> torch.Tensor:
    """(B, N, features): [position in its camera's frame (2), landmark one-hot (K), query flag, (pose 4)]."""
    b = sc["points"].shape[0]
    obs = torch.cat(
        [
            sc["points"].reshape(b, V * SEEN, 2),
            F.one_hot(sc["ids"].reshape(b, -1), K).float(),
            torch.zeros(b, V * SEEN, 1),
        ],
        -1,
    )
    query = torch.cat([torch.zeros(b, 1, 2), F.one_hot(sc["target"], K).float()[:, None], torch.ones(b, 1, 1)], -1)
    x = torch.cat([obs, query], 1)
    if pose_input:
        p = sc["pose"]
        cam = torch.stack([p[..., 0, 0], p[..., 1, 0], p[..., 0, 2], p[..., 1, 2]], -1)  # cos, sin, x, y
        per_tok = torch.cat([cam.repeat_interleave(SEEN, 1), cam[:, :1]], 1)
        x = torch.cat([x, per_tok], -1)
    return x


def geometry(sc: dict[str, torch.Tensor]) -> Geometry:
    """Every token's camera pose: 3 SE(2) blocks + rotations at frequencies 1, 2, 3 (15 of 16 channels)."""
    p = sc["pose"]
    views = torch.cat([p.repeat_interleave(SEEN, 1), p[:, :1]], 1)  # (B, N, 3, 3): one "view" per token
    theta = torch.atan2(views[..., 1, 0], views[..., 0, 0])
    return Geometry((pose_blocks(views, 1, 3), angle_so2(theta, (1.0, 2.0, 3.0))))


class Net(nn.Module):
    """Embedding, 2 pre-norm blocks (softmax attention), the query token's 2-D output."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, DIM)
        self.blocks = nn.ModuleList(
            TransformerBlock(DIM, HEADS, {"variant": "softmax"}, mlp_ratio=2.0) for _ in range(2)
        )
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor, geo: Geometry | None) -> torch.Tensor:
        h = self.embed(x)
        kw = {} if geo is None else {"geometry": geo}
        for blk in self.blocks:
            h = blk(h, **kw)
        return self.out(self.norm(h[:, -1]))


def moved(sc: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The same scenes in another world frame: every camera pose left-multiplied by one SE(2) transform."""
    b = sc["pose"].shape[0]
    phi = torch.rand(b, generator=gen) * 2 * math.pi
    shift = torch.stack([torch.cos(phi + 1), torch.sin(phi + 1)], -1) * 5.0
    h = se2(phi, shift)
    return {**sc, "pose": h[:, None] @ sc["pose"]}


def run(method: str, seed: int, steps: int, test: dict, test_moved: dict) -> dict:
    torch.manual_seed(seed)
    gta = method == "gta"
    net = Net(2 + K + 1 + (0 if gta else 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(100 + seed)

    @torch.no_grad()
    def predict(sc: dict) -> torch.Tensor:
        net.eval()
        out = net(tokens(sc, not gta), geometry(sc) if gta else None)
        net.train()
        return out

    curve = {}
    for step in range(1, steps + 1):
        sc = scenes(128, gen)
        loss = F.mse_loss(net(tokens(sc, not gta), geometry(sc) if gta else None), sc["goal"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % (steps // 6) == 0 or step == steps:
            curve[step] = float(F.mse_loss(predict(test), test["goal"]))
    pred, pred_moved = predict(test), predict(test_moved)
    return {
        "seed": seed,
        "test_mse": float(F.mse_loss(pred, test["goal"])),
        "moved_world_mse": float(F.mse_loss(pred_moved, test["goal"])),
        "max_prediction_change": float((pred_moved - pred).abs().max()),
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()
    meta = start()
    torch.set_num_threads(1)
    test = scenes(2000, torch.Generator().manual_seed(12345))
    test_moved = moved(test, torch.Generator().manual_seed(777))
    var = float(test["goal"].var(0).mean())
    seeds = [int(s) for s in args.seeds.split(",")]
    records = {}
    for method in ("pose", "gta"):
        records[method] = []
        for seed in seeds:
            print(f"{method} seed {seed} ...", flush=True)
            r = run(method, seed, args.steps, test, test_moved)
            print(f"  {r}", flush=True)
            records[method].append(r)

    def m(method: str, key: str) -> float:
        return statistics.mean(r[key] for r in records[method])

    steps = sorted(records["pose"][0]["curve"])
    rows = []
    for method, label in (("pose", "pose concatenated to the input"), ("gta", "GTA (SE(2) + rotation blocks)")):
        curve = [f"{statistics.mean(r['curve'][s] for r in records[method]):.4f}" for s in steps]
        rows.append([label, *curve, f"{m(method, 'moved_world_mse'):.4f}", f"{m(method, 'max_prediction_change'):.2e}"])
    md = (
        "# GTA on a 2-D multi-view task (landmark position in the query camera's frame)\n\n<!-- machine -->"
        f"{K} landmarks, {V} cameras with random SE(2) poses (positions in [-1, 1]^2), each seeing {SEEN} landmarks; "
        "the query token (camera 0) asks for a landmark camera 0 does not see. Two blocks, dim 64, 4 heads, softmax; "
        f"AdamW lr 1e-3, batch 128, {args.steps} steps, seeds {seeds} (means). Test: 2000 fixed scenes; the "
        f"variance of the target is {var:.3f} (the error of predicting the mean). Columns: test MSE after the steps "
        "shown; then the MSE on the same scenes after one global SE(2) transform of the world (rotation, shift by 5) "
        "and the largest change of a prediction it causes.\n\n"
        + markdown_table(["model", *(f"MSE @ {s}" for s in steps), "MSE, moved world", "max change"], rows)
        + "\n"
    )
    finish("gta_multiview", meta, {"args": vars(args), "target_variance": var, "records": records}, md)
    print(md)


if __name__ == "__main__":
    main()
