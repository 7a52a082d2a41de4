"""Text helpers."""

import re


def words(text):
    return re.findall(r"[A-Za-z0-9]+", text)


def slugify(text):
    """A URL slug: lower-case ASCII words joined by single hyphens, e.g. "Hello, World!" -> "hello-world".

    Accented letters lose their accents ("Café" -> "cafe"); anything else that is not a letter or digit separates
    words; no leading or trailing hyphen.
    """
    raise NotImplementedError
