"""Small statistics helpers."""


def mean(values):
    return sum(values) / len(values)


def median(values):
    """The middle value of `values` (the mean of the two middle ones for an even count)."""
    values = list(values)
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    return (values[middle - 1] + values[middle]) / 2
