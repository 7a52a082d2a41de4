import pytest
from inventory import Inventory


def test_remove_some():
    inv = Inventory()
    inv.add("a", 5)
    inv.remove("a", 2)
    assert inv.items["a"] == 3 and inv.total() == 3


def test_remove_too_many_raises_and_keeps_stock():
    inv = Inventory()
    inv.add("a", 1)
    with pytest.raises(ValueError):
        inv.remove("a", 2)
    assert inv.items["a"] == 1


def test_remove_unknown_raises():
    with pytest.raises(ValueError):
        Inventory().remove("zzz", 1)
