"""A simple evolution strategy for non-differentiable objectives (e.g. a NAMM scorer's task score).

``evolve(module, fitness)``: parameters theta (flattened) start at the module's values; each
generation samples ``population`` candidates ``theta + sigma * eps`` (eps ~ N(0, I)), scores each
with ``fitness()`` (higher is better; the module holds the candidate while it runs), and moves
theta to the mean of the best ``elite_ratio`` fraction (elite mean, learning rate 1). At the end
the module holds the final mean (NAMM's ``prefer_mean_to_best``) or the best candidate seen.

``method="cma"`` runs the NAMM paper's CMA-ES instead (Hansen's ``cma`` package, an optional
dependency: ``pip install cma``): covariance and step-size adaptation, the same population,
initial sigma and mean/best choice; the elite ratio is CMA-ES's own (half the population).
The default ``"elite"`` is the isotropic elite-mean ES above (no covariance or step-size
adaptation), kept for its simplicity and no extra dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

__all__ = ["EvolveResult", "evolve"]


@dataclass
class EvolveResult:
    """Outcome of :func:`evolve`.

    Attributes:
        mean: (P,) final mean parameters; best: (P,) best candidate; best_fitness: its fitness.
        history: per generation ``{"generation", "best", "mean_fitness", "elite_mean"}``.
    """

    mean: Tensor
    best: Tensor
    best_fitness: float
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evolve(
    params: nn.Module | Iterable[nn.Parameter],
    fitness: Callable[[], float],
    *,
    generations: int = 10,
    population: int = 16,
    sigma: float = 0.065,
    elite_ratio: float = 0.5,
    seed: int = 0,
    keep: str = "mean",
    callback: Callable[[dict[str, float]], None] | None = None,
    method: str = "elite",
) -> EvolveResult:
    """Maximise ``fitness()`` over ``params`` with an elite-mean evolution strategy.

    Args:
        params: a module (all its parameters) or parameters, updated in place.
        fitness: evaluates the current parameter values; returns a float, higher is better.
        generations, population, sigma, elite_ratio: ES settings (NAMM: pop 16-32, sigma 0.065, elite 0.5).
        seed: seed of the perturbations (a private generator; global RNG untouched).
        keep: "mean" (final mean, NAMM's default) or "best" (best candidate) left in ``params``.
        callback: called with each generation's history entry.
        method: "elite" (isotropic elite-mean ES) or "cma" (CMA-ES, as the NAMM paper; needs ``cma``).
    """
    plist = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    if not plist:
        raise ValueError("evolve needs at least one parameter")
    if generations < 1 or population < 2 or not 0 < elite_ratio <= 1 or not sigma > 0:
        raise ValueError(
            f"evolve needs generations >= 1, population >= 2, 0 < elite_ratio <= 1, sigma > 0; got "
            f"{generations}, {population}, {elite_ratio}, {sigma}"
        )
    if keep not in ("mean", "best"):
        raise ValueError(f"keep must be 'mean' or 'best', got {keep!r}")
    if method not in ("elite", "cma"):
        raise ValueError(f"evolve method must be 'elite' or 'cma', got {method!r}")
    mean = parameters_to_vector(plist).detach().clone()
    if method == "cma":
        return _evolve_cma(plist, mean, fitness, generations, population, sigma, seed, keep, callback)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_elite = max(1, round(population * elite_ratio))
    best, best_fit = mean.clone(), -float("inf")
    history: list[dict[str, float]] = []
    for g in range(generations):
        eps = torch.randn(population, mean.numel(), generator=gen, dtype=torch.float64).to(mean)
        cands = mean[None] + sigma * eps
        fits = []
        for c in cands:
            vector_to_parameters(c, plist)
            fits.append(float(fitness()))
        f = torch.tensor(fits)
        elite = torch.topk(f, n_elite).indices
        mean = cands[elite].mean(0)
        if float(f.max()) > best_fit:
            best_fit, best = float(f.max()), cands[int(f.argmax())].clone()
        entry = {
            "generation": float(g),
            "best": best_fit,
            "mean_fitness": float(f.mean()),
            "elite_mean": float(f[elite].mean()),
        }
        history.append(entry)
        if callback is not None:
            callback(entry)
    vector_to_parameters(mean if keep == "mean" else best, plist)
    return EvolveResult(mean=mean, best=best, best_fitness=best_fit, history=history)


def _evolve_cma(
    plist: list[nn.Parameter],
    mean: Tensor,
    fitness: Callable[[], float],
    generations: int,
    population: int,
    sigma: float,
    seed: int,
    keep: str,
    callback: Callable[[dict[str, float]], None] | None,
) -> EvolveResult:
    """:func:`evolve` with CMA-ES (the ``cma`` package minimises, so it is given -fitness)."""
    try:
        import cma
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("evolve(method='cma') needs the 'cma' package: pip install cma") from e
    es = cma.CMAEvolutionStrategy(
        mean.double().cpu().numpy(), sigma, {"popsize": population, "seed": seed + 1, "verbose": -9}
    )
    best, best_fit = mean.clone(), -float("inf")
    history: list[dict[str, float]] = []
    for g in range(generations):
        cands = es.ask()
        fits = []
        for c in cands:
            vector_to_parameters(torch.as_tensor(c).to(mean), plist)
            fits.append(float(fitness()))
        es.tell(cands, [-f for f in fits])
        f = torch.tensor(fits)
        if float(f.max()) > best_fit:
            best_fit, best = float(f.max()), torch.as_tensor(cands[int(f.argmax())]).to(mean)
        n_elite = es.sp.weights.mu
        entry = {
            "generation": float(g),
            "best": best_fit,
            "mean_fitness": float(f.mean()),
            "elite_mean": float(torch.topk(f, n_elite).values.mean()),
        }
        history.append(entry)
        if callback is not None:
            callback(entry)
    final = torch.as_tensor(es.mean).to(mean)
    vector_to_parameters(final if keep == "mean" else best, plist)
    return EvolveResult(mean=final, best=best, best_fitness=best_fit, history=history)
