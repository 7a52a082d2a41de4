import pytest
from stats import median


@pytest.mark.parametrize("values, expected", [([3, 1, 2], 2), ([4, 1, 3, 2], 2.5), ([7], 7), ([5, 5, 1], 5),
                                              ([10, -2, 3.5, 0], 1.75)])
def test_median_unsorted(values, expected):
    assert median(values) == expected


def test_median_leaves_input_alone():
    values = [3, 1, 2]
    median(values)
    assert values == [3, 1, 2]
