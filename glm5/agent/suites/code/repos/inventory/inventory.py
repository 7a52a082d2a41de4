"""An in-memory stock ledger."""


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, sku, quantity):
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        self.items[sku] = self.items.get(sku, 0) + quantity

    def remove(self, sku, quantity):
        """Take `quantity` of `sku` out; ValueError if there is not enough (the stock is then unchanged)."""
        self.items[sku] = self.items.get(sku, 0) - quantity

    def total(self):
        return sum(self.items.values())
