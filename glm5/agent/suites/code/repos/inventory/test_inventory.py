from inventory import Inventory


def test_add():
    inv = Inventory()
    inv.add("a", 2)
    inv.add("a", 3)
    assert inv.total() == 5
