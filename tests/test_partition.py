import numpy as np
import pytest

from edge_runtime.learning.partition import parse_partition, partition


@pytest.fixture
def labels():
    return np.random.default_rng(1).integers(0, 10, size=2000)


def test_iid_covers_every_sample_once(labels):
    parts = partition(labels, 4, "iid", seed=3)
    allids = np.concatenate(parts)
    assert sorted(allids.tolist()) == list(range(len(labels)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_is_seeded_and_disjoint(labels):
    a = partition(labels, 5, "dirichlet:0.5", seed=7)
    b = partition(labels, 5, "dirichlet:0.5", seed=7)
    c = partition(labels, 5, "dirichlet:0.5", seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    allids = np.concatenate(a)
    assert len(allids) == len(set(allids.tolist())) == len(labels)
    assert min(map(len, a)) >= 10


def test_small_alpha_is_skewed_large_alpha_is_not(labels):
    overall = np.bincount(labels, minlength=10) / len(labels)

    def skew(parts):  # mean total-variation distance of a device's labels from the whole
        return np.mean([
            0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - overall).sum()
            for p in parts
        ])

    assert skew(partition(labels, 4, "dirichlet:0.1", 0)) > 0.5
    assert skew(partition(labels, 4, "dirichlet:100", 0)) < 0.1


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:x", "iid:3", "shards"])
def test_bad_specs_name_the_problem(bad):
    with pytest.raises(ValueError, match="bad partition"):
        parse_partition(bad)
