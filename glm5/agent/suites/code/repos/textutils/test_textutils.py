from textutils import words


def test_words():
    assert words("a, b-c") == ["a", "b", "c"]
