"""Few-shot linear evaluation's arithmetic: regularised least squares on frozen features (ViT paper, section 4.1).

Both stages use it: transfer's few-shot runs (``pipeline.transfer.fewshot``) and the probes pretraining runs every
``eval.every_steps`` (``pipeline.pretrain.evaluation``). Only numpy: features come in, accuracies go out; which
model made the features and how the images were read is the caller's business.

For k shots, k training images per class are drawn, their features are standardised (with the statistics of
those few images) and a ridge regression maps them to {-1, 1}^K targets in closed form; the predicted class is
the arg-max of the K outputs.

Choices, following big_vision's ``evaluators/fewshot_lsr.py``:
- several seeds, each drawing a different set of shots; we report mean and std over seeds;
- the bias is not regularised (big_vision approximates that with a large constant feature; we centre instead,
  which is exact: with zero-mean features the unregularised bias is the mean target);
- the regulariser: big_vision fixes it (2**10). We pick it from a small grid on a held-out labelled split when
  one is given (the benchmark's minival), which matters for our small feature widths, and otherwise use the fixed
  value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# big_vision's fixed regulariser, used when there is no held-out split to choose one on.
DEFAULT_L2 = 2.0**10
# Search grid for the regulariser (spans "almost unregularised" to "mostly the prior").
DEFAULT_L2_GRID: tuple[float, ...] = tuple(2.0**e for e in range(-6, 13, 2))
# Features with (almost) no spread over the few shots would be divided by ~0 when standardised.
_STD_EPS = 1e-5


@dataclass(frozen=True)
class LinearProbe:
    """A linear classifier in the original feature space: ``scores = x @ weight + bias``."""

    weight: np.ndarray  # [D, K]
    bias: np.ndarray  # [K]

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x).argmax(axis=1)


def signed_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Targets in {-1, 1}^K: +1 for the labelled class, -1 elsewhere."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]")
    targets = -np.ones((labels.shape[0], num_classes), dtype=np.float64)
    targets[np.arange(labels.shape[0]), labels] = 1.0
    return targets


def fit_lsr(features: np.ndarray, labels: np.ndarray, *, num_classes: int, l2: float) -> LinearProbe:
    """Closed-form ridge regression from standardised features to {-1, 1}^K; returns it in raw feature space."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(labels):
        raise ValueError(f"features must be [N, D] with N = len(labels); got {x.shape} and {len(labels)} labels")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    y = signed_one_hot(labels, num_classes)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + _STD_EPS
    z = (x - mean) / std
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    n, d = z.shape
    # Solve in whichever of the primal [D, D] / dual [N, N] systems is smaller; both give the same ridge solution.
    if n >= d:
        w = np.linalg.solve(z.T @ z + l2 * np.eye(d), z.T @ yc)
    else:
        w = z.T @ np.linalg.solve(z @ z.T + l2 * np.eye(n), yc)
    # Fold the standardisation into the weights so callers can score raw features.
    weight = w / std[:, None]
    bias = y_mean - mean @ weight
    return LinearProbe(weight=weight, bias=bias)


def accuracy(probe: LinearProbe, features: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("cannot measure accuracy on an empty split")
    return float((probe.predict(features) == labels).mean())


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` examples of every class, drawn without replacement."""
    labels = np.asarray(labels)
    picked = []
    for cls in range(num_classes):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < shots:
            raise ValueError(
                f"class {cls} has {len(pool)} training examples, fewer than the {shots} shots asked for; "
                "lower the shot count or use a larger training split"
            )
        picked.append(rng.choice(pool, size=shots, replace=False))
    return np.concatenate(picked)


def shot_draws(
    labels: np.ndarray, shots: Iterable[int], num_classes: int, seeds: int
) -> dict[tuple[int, int], np.ndarray]:
    """(seed, k) -> the training indices `fewshot_eval` uses: k per class, seed by seed. Labels < 0 are never
    drawn (examples known to be unusable)."""
    draws = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        for k in sorted({int(k) for k in shots}):
            draws[(seed, k)] = sample_shots(labels, k, num_classes, rng)
    return draws


def drawn_features(
    keys: Sequence[str],
    labels: np.ndarray,
    *,
    shots: Iterable[int],
    num_classes: int,
    seeds: int,
    extract: Callable[[list[str]], dict[str, np.ndarray]],
    max_rounds: int = 10,
) -> tuple[tuple[np.ndarray, np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """Features of only the drawn training examples (at most k x classes x seeds of a split that may hold millions),
    and the draws as indices into them, for `fewshot_eval`.

    ``extract(keys) -> {key: feature}`` may leave some out (images that do not decode): those are never drawn
    again and the draws are redone, so every seed still gets k usable examples per class.
    """
    usable = np.array(labels, dtype=np.int64)
    features: dict[str, np.ndarray] = {}
    for _ in range(max_rounds):
        draws = shot_draws(usable, shots, num_classes, seeds)
        needed = sorted({int(i) for idx in draws.values() for i in idx})
        missing = [keys[i] for i in needed if keys[i] not in features]
        if missing:
            features.update(extract(missing))
            lost = {k for k in missing if k not in features}
            if lost:
                usable[[i for i in needed if keys[i] in lost]] = -1
                continue
        row = {i: r for r, i in enumerate(needed)}
        x = np.stack([features[keys[i]] for i in needed])
        y = np.asarray(labels, dtype=np.int64)[needed]
        return (x, y), {draw: np.array([row[int(i)] for i in idx]) for draw, idx in draws.items()}
    raise ValueError(f"drawn examples kept failing to decode after {max_rounds} rounds: check the training shards")


@dataclass
class FewShotResult:
    """Accuracies per shot count, one per seed, plus the regulariser each seed chose."""

    accuracies: dict[int, list[float]] = field(default_factory=dict)
    l2: dict[int, list[float]] = field(default_factory=dict)

    def mean(self, shots: int) -> float:
        return float(np.mean(self.accuracies[shots]))

    def std(self, shots: int) -> float | None:
        # Sample std over seeds, as for fine-tuning seeds, so the two spreads compare; none for a single seed.
        accs = self.accuracies[shots]
        return float(np.std(accs, ddof=1)) if len(accs) > 1 else None


def fewshot_eval(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    shots: Iterable[int],
    seeds: int = 3,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    l2: float = DEFAULT_L2,
    draws: Mapping[tuple[int, int], np.ndarray] | None = None,
) -> FewShotResult:
    """k-shot linear accuracy on ``test`` for every k in ``shots``, for seeds 0..seeds-1.

    ``train``/``val``/``test`` are (features [N, D], labels [N]). With ``val`` the regulariser is chosen from
    ``l2_grid`` by accuracy on it (per seed and shot count, never looking at ``test``); without, ``l2`` is used.
    ``draws`` ((seed, k) -> indices into ``train``, see `drawn_features`) replaces drawing from ``train``'s labels.
    """
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise ValueError(f"shots must be positive integers, got {shots}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    train_x, train_y = train
    test_x, test_y = test
    draws = draws if draws is not None else shot_draws(train_y, shots, num_classes, seeds)
    result = FewShotResult()
    for seed in range(seeds):
        for k in shots:
            idx = draws[(seed, k)]
            x, y = train_x[idx], train_y[idx]
            chosen = l2
            if val is not None:
                # First-best on ties: the grid is ascending, so ties go to the weaker regulariser.
                scores = [accuracy(fit_lsr(x, y, num_classes=num_classes, l2=c), *val) for c in l2_grid]
                chosen = float(l2_grid[int(np.argmax(scores))])
            probe = fit_lsr(x, y, num_classes=num_classes, l2=chosen)
            result.accuracies.setdefault(k, []).append(accuracy(probe, test_x, test_y))
            result.l2.setdefault(k, []).append(chosen)
    return result


def fewshot_metrics(result: FewShotResult) -> dict[str, float]:
    """Flat metric names for MLflow: ``fewshot_<k>shot`` (mean), ``..._std`` and one value per seed."""
    metrics: dict[str, float] = {}
    for k, accs in result.accuracies.items():
        metrics[f"fewshot_{k}shot"] = result.mean(k)
        std = result.std(k)
        if std is not None:
            metrics[f"fewshot_{k}shot_std"] = std
        for seed, acc in enumerate(accs):
            metrics[f"fewshot_{k}shot_seed{seed}"] = acc
        metrics[f"fewshot_{k}shot_l2"] = float(np.mean(result.l2[k]))
    return metrics
