"""Byte-level BPE tokenizer with GLM-5's special tokens: train, save, load (any `tokenizer.json`).

    from glm5.tokenizer import Tokenizer, train_tokenizer, default_tokenizer
    tok = default_tokenizer()                       # 4096 ids, built from Python's own sources, cached
    ids = tok.encode("hello <think>")               # ordinary text: never a special id
    ids = tok.encode("<|user|>hi", allow_special=True)   # special-token strings become their ids
    tok = Tokenizer.from_pretrained("path/to/GLM-5")     # GLM-5's own tokenizer.json: specials by name

    glm5 tokenizer train --input a.txt b.txt --vocab-size 8192 --out tok/

Layout of a tokenizer we train: ids 0..255 are the 256 byte symbols (so any text encodes, nothing is
unknown), then the learned merges, then the GLM-5 special tokens appended in SPECIAL_TOKENS order, so
`<|endoftext|>` is `vocab_size - 17` and `</tool_response>` is `vocab_size - 1`. GLM-5's released
tokenizer puts the same names elsewhere (`<|endoftext|>` 154820, `<|user|>` 154827, `<|observation|>`
154829); nothing here assumes an id: every special is looked up by its name.

Uses only the `tokenizers` library; imported lazily so `glm5 --help` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from glm5.common import cache_dir

# GLM-5's chat-format tokens; each is one id and never the result of encoding ordinary text.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
)
# Generation stops at any of these: the end of text, or the model handing the turn to the user or a tool.
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
PAD_TOKEN = "<|endoftext|>"

# Splits text into words before BPE: letters with one leading non-letter, numbers in groups of up to
# three digits, punctuation runs, newlines, other whitespace (the GPT-4 family's split, which GLM-4 and
# GLM-5 also use). Merges never cross these pieces.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULT_VOCAB_SIZE = 4096
# The default corpus: at most this many bytes of the standard library. ~3 MB trains in a few seconds
# on two cores and still learns English words (docstrings, pydoc's topics) as well as code.
DEFAULT_CORPUS_BYTES = 3_000_000
# Bump when the way the default tokenizer is built changes, so stale caches are not reused.
DEFAULT_BUILD_VERSION = 1


class Tokenizer:
    """A `tokenizers.Tokenizer` plus GLM-5's special tokens, found by name.

    Two copies of the underlying tokenizer are kept: one matches special-token strings in the input
    (used with `allow_special=True`), the other encodes them as plain bytes, which is what makes
    `encode(user_text)` safe against prompt injection of `<|assistant|>` and friends.
    """

    def __init__(self, backend, *, chat_template: str | None = None):
        import tokenizers

        self.backend = backend  # specials in the input become their ids
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True  # specials in the input are just text
        self.chat_template = chat_template
        self.special_tokens: dict[str, int] = {}
        for name in SPECIAL_TOKENS:
            token_id = backend.token_to_id(name)
            if token_id is not None:
                self.special_tokens[name] = token_id

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in it become their ids only with allow_special."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        backend = self.backend if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """`encode` on many texts at once (the Rust side runs them in parallel)."""
        backend = self.backend if allow_special else self._plain
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- special tokens -------------------------------------------------------------------------
    def special_token_id(self, name: str) -> int:
        """The id of a GLM-5 special token such as "<|user|>"; KeyError if this tokenizer lacks it."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(
                f"tokenizer has no special token {name!r}; it has {sorted(self.special_tokens) or 'none'}"
            ) from None

    @property
    def vocab_size(self) -> int:
        """Number of ids in use, added tokens included (a model's embedding needs at least this many)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: `<|endoftext|>`, `<|user|>`, `<|observation|>` (those present)."""
        return [self.special_tokens[name] for name in EOS_TOKENS if name in self.special_tokens]

    @property
    def pad_token_id(self) -> int | None:
        return self.special_tokens.get(PAD_TOKEN)

    # ---- files ----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the GLM-5 chat template) to `directory`.

        transformers' `AutoTokenizer.from_pretrained(directory)` loads the result.
        """
        from glm5.chat.template import GLM5_CHAT_TEMPLATE

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        added = {
            str(token_id): {"content": name, "special": True, "lstrip": False, "rstrip": False,
                            "normalized": False, "single_word": False}
            for name, token_id in sorted(self.special_tokens.items(), key=lambda item: item[1])
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "eos_token": "<|endoftext|>" if "<|endoftext|>" in self.special_tokens else None,
            "pad_token": PAD_TOKEN if PAD_TOKEN in self.special_tokens else None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": self.chat_template or GLM5_CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json`, or a directory holding one (and maybe a `tokenizer_config.json`)."""
        import tokenizers

        path = Path(path)
        tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        chat_template = None
        config_path = tokenizer_json.parent / "tokenizer_config.json"
        if config_path.is_file():
            template = json.loads(config_path.read_text()).get("chat_template")
            chat_template = template if isinstance(template, str) else None
        template_path = tokenizer_json.parent / "chat_template.jinja"  # newer hub layout keeps it apart
        if chat_template is None and template_path.is_file():
            chat_template = template_path.read_text()
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"{tokenizer_json}: not a valid tokenizer.json ({err})") from None
        return cls(backend, chat_template=chat_template)

    from_pretrained = from_file

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"


# ---- training -----------------------------------------------------------------------------------
def _new_byte_level_bpe():
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    files_or_iterator: Iterable[str] | str | os.PathLike,
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Train byte-level BPE so that the vocabulary, GLM-5 specials included, has `vocab_size` ids.

    `files_or_iterator` is a path or a list/tuple of paths (each must exist), or any other iterable
    (a generator, an iterator) of text strings.
    The result has fewer ids only when the text runs out of pairs to merge.
    """
    from tokenizers import pre_tokenizers, trainers

    merge_budget = vocab_size - len(SPECIAL_TOKENS)
    if merge_budget < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} specials), got {vocab_size}")
    backend = _new_byte_level_bpe()
    # Specials are added after training, not given to the trainer: that way they take the last ids, and
    # no learned merge can ever produce one of them.
    trainer = trainers.BpeTrainer(
        vocab_size=merge_budget,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)):  # file paths
        missing = [str(f) for f in files_or_iterator if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"no such file: {missing[0]}")
        backend.train([str(f) for f in files_or_iterator], trainer)
    else:  # any other iterable yields the text itself
        backend.train_from_iterator(files_or_iterator, trainer)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = Tokenizer(backend)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


# ---- the default tokenizer ----------------------------------------------------------------------
def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[str]:
    """Text that ships with every Python: pydoc's topic help (English prose) then stdlib sources.

    Files are taken in sorted path order up to `max_bytes`, so the same Python gives the same text.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prose = stdlib / "pydoc_data" / "topics.py"
    sources = sorted(p for p in stdlib.rglob("*.py")
                     if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    texts, total = [], 0
    for path in ([prose] if prose.is_file() else []) + sources:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text[: max_bytes - total]
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"found only {total} bytes of text under {stdlib}; cannot build the default tokenizer")
    return texts


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The tokenizer used when none is given: BPE on Python's own sources, `vocab_size` ids in total.

    Built once (a few seconds) and cached under `cache_dir()/tokenizer-<hash>/`; the hash covers the
    corpus text itself, so another Python version builds its own instead of reusing a different one.
    A model trained with it should save it next to its checkpoint (`Tokenizer.save`).
    Repeated calls in one process return the same object.
    """
    return _load_or_build_default(vocab_size, str(cache_dir()))


@lru_cache(maxsize=4)
def _load_or_build_default(vocab_size: int, cache_root: str) -> Tokenizer:
    texts = default_corpus()
    digest = hashlib.sha256(f"v{DEFAULT_BUILD_VERSION}:{vocab_size}:".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
    target = Path(cache_root) / f"tokenizer-{vocab_size}-{digest.hexdigest()[:16]}"
    if (target / "tokenizer.json").is_file():
        return Tokenizer.from_file(target)
    tokenizer = train_tokenizer(iter(texts), vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise RuntimeError(f"default corpus yields only {tokenizer.vocab_size} ids, wanted {vocab_size}")
    # write next to the target, then rename: a concurrent builder never sees a half-written directory
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}"
    tokenizer.save(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process won the race; its result is identical
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


# ---- CLI ----------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add `glm5 tokenizer ...` to the `glm5` command."""
    parser = subparsers.add_parser("tokenizer", help="train or inspect a byte-level BPE tokenizer")
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = commands.add_parser("train", help="train BPE on local text files and save it as tokenizer.json")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files to learn from")
    train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                       help=f"total ids including the {len(SPECIAL_TOKENS)} GLM-5 specials (default {DEFAULT_VOCAB_SIZE})")
    train.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json and tokenizer_config.json")
    train.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    train.set_defaults(func=_cli_train)
    encode = commands.add_parser("encode", help="print the token ids of a text (specials matched)")
    encode.add_argument("text", help="text to encode; special-token strings such as <|user|> become their ids")
    encode.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its directory (default: the built-in one)")
    encode.set_defaults(func=_cli_encode)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _cli_train(args) -> int:
    for f in args.input:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--input {f}: " + ("a folder, not a file" if Path(f).is_dir() else "no such file"))
    if not any(Path(f).stat().st_size for f in args.input):
        raise ValueError(f"no text in {', '.join(args.input)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if (out / "tokenizer.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a tokenizer.json; pass --overwrite or choose another --out (nothing was overwritten)")
    print(f"training {args.vocab_size} ids on {', '.join(args.input)} ...", flush=True)
    try:
        tokenizer = train_tokenizer(args.input, args.vocab_size)
    except ValueError:
        raise
    except Exception as err:  # the tokenizers library raises a bare Exception (e.g. for text that is not UTF-8)
        raise ValueError(f"cannot train on {', '.join(args.input)}: {err}") from None
    tokenizer.save(out)
    note = f" (only {tokenizer.vocab_size} of {args.vocab_size}: the text ran out of pairs to merge)" if tokenizer.vocab_size < args.vocab_size else ""
    print(f"trained {tokenizer.vocab_size} ids ({len(tokenizer.special_tokens)} special){note} -> {out}")
    return 0


def _cli_encode(args) -> int:
    tokenizer = Tokenizer.from_file(args.tokenizer) if args.tokenizer else default_tokenizer()
    ids = tokenizer.encode(args.text, allow_special=True)
    print(" ".join(map(str, ids)))
    return 0
