"""The mutual-information estimator (Kolchinsky-Tracey pairwise-distance KDE bound)."""

from __future__ import annotations

import pytest
import torch

from merging.errors import MergingError
from merging.mi import label_entropy, mutual_information, mutual_information_many


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(0))


def test_independent_features_carry_almost_nothing(labels: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(1)
    for d in (1, 4):
        mi = mutual_information(torch.randn(512, d, generator=g), labels)
        assert mi < 0.05 * label_entropy(labels), (d, mi)


def test_a_copy_of_the_labels_carries_nearly_their_entropy(labels: torch.Tensor) -> None:
    onehot = torch.nn.functional.one_hot(labels).float()
    h = label_entropy(labels)
    assert mutual_information(onehot, labels) > 0.95 * h
    # A copy beats noise by a wide margin, and adding noise dimensions to the copy keeps most of it.
    noisy = torch.cat([onehot, 0.1 * torch.randn(512, 2, generator=torch.Generator().manual_seed(2))], 1)
    assert mutual_information(noisy, labels) > 0.9 * h


def test_more_informative_features_score_higher(labels: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(3)
    onehot = torch.nn.functional.one_hot(labels).float()
    weak = onehot + 1.5 * torch.randn(512, 10, generator=g)
    strong = onehot + 0.3 * torch.randn(512, 10, generator=g)
    assert mutual_information(strong, labels) > mutual_information(weak, labels) + 0.2


def test_invariant_to_a_permutation_of_the_samples(labels: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.one_hot(labels).float() + 0.5 * torch.randn(512, 10, generator=g)
    perm = torch.randperm(512, generator=g)
    a = mutual_information(x, labels)
    b = mutual_information(x[perm], labels[perm])
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert a > 0.3  # and the value being compared is not trivially zero


def test_attributes_add_up_and_constant_features_carry_nothing() -> None:
    g = torch.Generator().manual_seed(5)
    y = (torch.rand(400, 2, generator=g) > 0.5).float()
    copy_first = y[:, :1] + 0.01 * torch.randn(400, 1, generator=g)
    both = y + 0.01 * torch.randn(400, 2, generator=g)
    first, second = mutual_information_many(both, [y[:, 0].long(), y[:, 1].long()])
    assert mutual_information(both, y) == pytest.approx(first + second, rel=1e-6)
    assert mutual_information(copy_first, y) == pytest.approx(mutual_information(copy_first, y[:, 0].long()), abs=0.05)
    assert mutual_information(torch.ones(400, 3), y) == 0.0


def test_bad_input_is_a_typed_error() -> None:
    with pytest.raises(MergingError):
        mutual_information(torch.randn(10, 2), torch.zeros(9, dtype=torch.long))
    with pytest.raises(MergingError):
        mutual_information(torch.randn(10, 2), torch.zeros(10, dtype=torch.long), noise=0.0)
