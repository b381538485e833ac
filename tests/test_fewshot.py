"""Few-shot linear evaluation on synthetic features whose linear solution is known."""

import statistics

import numpy as np
import pytest

from pipeline.linear_probe import (
    DEFAULT_L2,
    DEFAULT_L2_GRID,
    drawn_features,
    fewshot_eval,
    fewshot_metrics,
    fit_lsr,
    sample_shots,
    shot_draws,
    signed_one_hot,
)


def _exactly_linear_problem(n: int, num_classes: int, extra_dims: int, seed: int):
    """Features whose first K-1 columns are affine in the {-1, 1} targets, plus random columns.

    The K-th target is then affine in those columns too (the targets of a row sum to 2 - K), so an exact
    linear solution exists and, with random extra columns, it is unique: weights are known in closed form.
    """
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    targets = signed_one_hot(labels, num_classes)
    scale = rng.uniform(1.0, 4.0, num_classes - 1)
    shift = rng.uniform(-3.0, 3.0, num_classes - 1)
    informative = targets[:, : num_classes - 1] * scale + shift
    features = np.concatenate([informative, rng.normal(size=(n, extra_dims))], axis=1)

    # Expected solution: t_j = (x_j - shift_j) / scale_j for j < K-1 and t_{K-1} = (2 - K) - sum of the others.
    dim = features.shape[1]
    weight = np.zeros((dim, num_classes))
    bias = np.zeros(num_classes)
    for j in range(num_classes - 1):
        weight[j, j] = 1.0 / scale[j]
        bias[j] = -shift[j] / scale[j]
    weight[:, -1] = -weight[:, :-1].sum(axis=1)
    bias[-1] = (2 - num_classes) - bias[:-1].sum()
    return features, labels, weight, bias


def test_lsr_recovers_the_known_linear_map_and_classifies_exactly():
    features, labels, weight, bias = _exactly_linear_problem(n=200, num_classes=4, extra_dims=3, seed=0)
    probe = fit_lsr(features, labels, num_classes=4, l2=1e-9)
    np.testing.assert_allclose(probe.weight, weight, atol=1e-6)
    np.testing.assert_allclose(probe.bias, bias, atol=1e-6)

    # Unseen points from the same map (inverting it on the informative columns): all classified right.
    rng = np.random.default_rng(2)
    test_y = rng.integers(0, 4, 100)
    targets = signed_one_hot(test_y, 4)
    informative = (targets[:, :3] - bias[:3]) / np.diag(weight[:3, :3])
    test_x = np.concatenate([informative, rng.normal(size=(100, 3))], axis=1)
    assert (probe.predict(test_x) == test_y).all()


def test_dual_and_primal_forms_give_the_same_ridge_solution():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 12)
    wide = rng.normal(size=(12, 40))  # N < D: solved in the dual form
    probe = fit_lsr(wide, labels, num_classes=3, l2=0.5)
    # Same problem solved explicitly in the primal form on the standardised features.
    z = (wide - wide.mean(0)) / (wide.std(0) + 1e-5)
    y = signed_one_hot(labels, 3)
    w = np.linalg.solve(z.T @ z + 0.5 * np.eye(40), z.T @ (y - y.mean(0)))
    np.testing.assert_allclose(probe.scores(wide), z @ w + y.mean(0), atol=1e-8)


def test_sample_shots_takes_k_distinct_examples_of_every_class_and_seeds_differ():
    labels = np.repeat(np.arange(5), 20)
    a = sample_shots(labels, 3, 5, np.random.default_rng(0))
    b = sample_shots(labels, 3, 5, np.random.default_rng(1))
    assert len(set(a.tolist())) == 15
    assert np.bincount(labels[a], minlength=5).tolist() == [3] * 5
    assert set(a.tolist()) != set(b.tolist())


def test_too_few_examples_for_the_shot_count_names_the_class():
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has 1 training examples"):
        sample_shots(labels, 2, 2, np.random.default_rng(0))


def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    # Centres spread over every dimension (fixed across splits): standardisation rescales each dimension to unit
    # spread, so a pure-noise dimension would weigh as much as an informative one.
    centres = np.random.default_rng(100).normal(size=(num_classes, dim)) * 10.0
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centres[labels] + rng.normal(scale=spread, size=(len(labels), dim)), labels


def test_separable_clusters_give_perfect_few_shot_accuracy_for_every_seed():
    train = _clusters(30, 5, 16, spread=0.5, seed=0)
    val = _clusters(10, 5, 16, spread=0.5, seed=1)
    test = _clusters(40, 5, 16, spread=0.5, seed=2)
    result = fewshot_eval(train, test, num_classes=5, shots=[1, 5], seeds=3, val=val)
    for k in (1, 5):
        assert result.accuracies[k] == [1.0, 1.0, 1.0]
        assert result.std(k) == 0.0
    metrics = fewshot_metrics(result)
    assert metrics["fewshot_5shot"] == 1.0
    assert metrics["fewshot_1shot_seed2"] == 1.0


def test_noisy_features_show_spread_over_seeds_and_more_shots_help():
    train = _clusters(60, 4, 32, spread=6.0, seed=0)
    test = _clusters(100, 4, 32, spread=6.0, seed=1)
    result = fewshot_eval(train, test, num_classes=4, shots=[1, 25], seeds=5)
    assert result.std(1) == pytest.approx(statistics.stdev(result.accuracies[1]))  # sample std, as fine-tuning's
    assert result.mean(25) > result.mean(1)
    single = fewshot_eval(train, test, num_classes=4, shots=[1], seeds=1)
    assert single.std(1) is None and "fewshot_1shot_std" not in fewshot_metrics(single)
    # Each seed's accuracy is the independent ridge solution's, exactly (the fixed regulariser: no val split).
    draws = shot_draws(train[1], [1, 25], 4, 5)
    for k in (1, 25):
        expected = [_ridge_accuracy(train, draws[(seed, k)], test, l2=DEFAULT_L2, num_classes=4) for seed in range(5)]
        assert result.accuracies[k] == expected
    assert len(set(result.accuracies[1])) > 1  # noisy enough that the draws matter


def _ridge_accuracy(train, idx, test, *, l2: float, num_classes: int) -> float:
    """Test accuracy of ridge regression solved independently of fit_lsr: least squares on the augmented system
    [Z 1; sqrt(l2) I 0] [w; b] = [Y; 0] (the bias unregularised), Z the drawn features standardised with their own
    mean and std (+1e-5, as documented), Y in {-1, 1}^K."""
    x, y = train[0][idx], train[1][idx]
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
    z = (x - mean) / std
    targets = -np.ones((len(y), num_classes))
    targets[np.arange(len(y)), y] = 1.0
    d = z.shape[1]
    a = np.block([[z, np.ones((len(y), 1))], [np.sqrt(l2) * np.eye(d), np.zeros((d, 1))]])
    b = np.vstack([targets, np.zeros((d, num_classes))])
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    scores = ((test[0] - mean) / std) @ solution[:d] + solution[d]
    return float((scores.argmax(axis=1) == test[1]).mean())


def test_regulariser_is_chosen_on_the_held_out_split_not_fixed():
    # Overlapping clusters seen through 5 shots: how much to regularise matters, and differently for each draw.
    train = _clusters(40, 4, 8, spread=8.0, seed=0)
    val = _clusters(40, 4, 8, spread=8.0, seed=1)
    test = _clusters(40, 4, 8, spread=8.0, seed=2)
    grid = DEFAULT_L2_GRID
    seeds = 6
    result = fewshot_eval(train, test, num_classes=4, shots=[5], seeds=seeds, val=val, l2_grid=grid)
    draws = shot_draws(train[1], [5], 4, seeds)
    for seed in range(seeds):
        idx = draws[(seed, 5)]
        on_val = [_ridge_accuracy(train, idx, val, l2=c, num_classes=4) for c in grid]
        assert len(set(on_val)) > 1, "the grid values must score differently for the choice to mean anything"
        best = grid[on_val.index(max(on_val))]  # the first best: ties go to the weaker regulariser
        assert result.l2[5][seed] == best
        assert result.accuracies[5][seed] == _ridge_accuracy(train, idx, test, l2=best, num_classes=4)
    # Not one value every seed would get from an implementation that ignored the held-out split.
    assert len(set(result.l2[5])) > 1
    fixed = fewshot_eval(train, test, num_classes=4, shots=[5], seeds=1, l2=7.0)
    assert fixed.l2[5] == [7.0]
    assert fixed.accuracies[5] == [_ridge_accuracy(train, draws[(0, 5)], test, l2=7.0, num_classes=4)]


def test_embedding_only_the_drawn_examples_gives_the_same_result_as_embedding_all():
    train = _clusters(40, 4, 16, spread=3.0, seed=0)
    test = _clusters(50, 4, 16, spread=3.0, seed=1)
    keys = [f"k{i}" for i in range(len(train[1]))]
    asked: list[str] = []

    def extract(wanted):
        asked.extend(wanted)
        return {k: train[0][keys.index(k)] for k in wanted}

    subset, draws = drawn_features(keys, train[1], shots=[1, 5], num_classes=4, seeds=3, extract=extract)
    assert len(asked) == len(set(asked)) == len(subset[1]) <= (1 + 5) * 4 * 3 < len(keys)
    full = fewshot_eval(train, test, num_classes=4, shots=[1, 5], seeds=3)
    drawn = fewshot_eval(subset, test, num_classes=4, shots=[1, 5], seeds=3, draws=draws)
    assert drawn.accuracies == full.accuracies


def test_a_drawn_example_that_does_not_decode_is_replaced_by_another_of_its_class():
    train = _clusters(10, 3, 8, spread=1.0, seed=0)
    keys = [f"k{i}" for i in range(len(train[1]))]
    first = shot_draws(train[1], [2], 3, 1)[(0, 2)]
    broken = keys[int(first[0])]

    def extract(wanted):
        return {k: train[0][keys.index(k)] for k in wanted if k != broken}

    (x, y), draws = drawn_features(keys, train[1], shots=[2], num_classes=3, seeds=1, extract=extract)
    idx = draws[(0, 2)]
    assert sorted(np.bincount(y[idx], minlength=3)) == [2, 2, 2]  # still 2 per class
    assert not any((x[i] == train[0][int(first[0])]).all() for i in idx)
