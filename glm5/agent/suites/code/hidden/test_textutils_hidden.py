from textutils import slugify


def test_basic():
    assert slugify("Hello, World!") == "hello-world"


def test_accents_and_spaces():
    assert slugify("  Café  au   lait ") == "cafe-au-lait"


def test_symbols_and_digits():
    assert slugify("GLM-5: 744B params (MoE)") == "glm-5-744b-params-moe"


def test_empty():
    assert slugify("!!!") == ""
