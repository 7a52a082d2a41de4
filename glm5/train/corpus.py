"""The embedded demo corpus: text that ships with Python plus synthetic tool-use conversations. No network.

    from glm5.train.corpus import build_demo_corpus
    corpus = build_demo_corpus(stdlib_bytes=1_500_000, conversations=3000, seed=0)
    corpus.train_texts                                # pretraining documents (stdlib files, rendered chats)
    corpus.train_code, corpus.train_chats             # the same two kinds apart (stratified batches)
    corpus.heldout_texts, corpus.heldout_chats        # held out: stdlib files, rendered chats
    corpus.sft_train, corpus.sft_heldout              # conversations ({"messages", "tools"}) for SFT
    corpus.tasks                                      # eval prompts with the one right tool call each

Stdlib text: pydoc's topic help (English prose) then the library's sources, each file one document (the same
text the default tokenizer learns from, see glm5.tokenizer.default_corpus). Conversations are rendered in
GLM-5's chat format (glm5.chat.render_messages), so pretraining already sees `<tool_call>` and friends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from glm5.chat import render_messages
from glm5.tokenizer import default_corpus
from glm5.train.conversations import make_conversation, make_task


@dataclass
class DemoCorpus:
    train_texts: list[str]
    heldout_texts: list[str]
    heldout_chats: list[str]
    sft_train: list[dict]
    sft_heldout: list[dict]
    tasks: list[dict]
    train_code: list[str] = field(default_factory=list)
    train_chats: list[str] = field(default_factory=list)

    def summary(self) -> str:
        chars = sum(map(len, self.train_texts))
        return (f"{len(self.train_texts)} pretraining documents ({chars / 1e6:.1f} MB), {len(self.heldout_texts)} held out; "
                f"{len(self.sft_train)} SFT conversations, {len(self.sft_heldout)} held out; {len(self.tasks)} eval tasks")


def render_conversation(conversation: dict, with_tools: bool = True) -> str:
    """The chat as text; with_tools=False leaves out the system turn listing the tools (a bare transcript)."""
    return render_messages(conversation["messages"], conversation.get("tools") if with_tools else None,
                           add_generation_prompt=False)


def split_text(text: str, size: int = 4000) -> list[str]:
    """Pieces of about `size` characters, cut at blank lines where there are any."""
    pieces, current = [], ""
    for block in text.split("\n\n"):
        if current and len(current) + len(block) > size:
            pieces.append(current)
            current = ""
        current = current + "\n\n" + block if current else block
    if current:
        pieces.append(current)
    return pieces


def build_demo_corpus(stdlib_bytes: int = 1_500_000, conversations: int = 3000, sft_conversations: int = 2000,
                      tasks: int = 40, heldout_fraction: float = 0.03, seed: int = 0, wide: bool = True,
                      more_calls: int = 2, bare_share: float = 0.5, copy_drills: int = 0) -> DemoCorpus:
    """wide / more_calls: how training chats are drawn (see make_conversation); bare_share: the share of the
    pretraining chats rendered without their ~230-token tools block (a bare transcript of request, reasoning,
    call, result, answer), so pretraining holds several times more requests and calls per token: what a nano
    model needs to learn to copy an argument out of a request. SFT chats and all held-out chats keep the block."""
    rng = random.Random(seed)
    # files differ wildly in size (pydoc's topics alone is ~0.7 MB): cut them into ~4 KB pieces at blank lines
    # so the held-out share is a share of the text, not of the files
    stdlib = [piece for text in default_corpus(stdlib_bytes) for piece in split_text(text) if piece.strip()]
    rng.shuffle(stdlib)
    n_heldout = max(1, int(len(stdlib) * heldout_fraction))
    # training chats draw wide argument values (made-up names, bigger numbers) so copying is the only way to
    # get an argument right; held-out chats and eval tasks keep the real names (see conversations.py)
    chats = [render_conversation(make_conversation(rng, "train", wide=wide, more_calls=more_calls),
                                 with_tools=rng.random() >= bare_share) for _ in range(conversations)]
    chats += [copy_drill(rng) for _ in range(copy_drills)]
    heldout_chats = [render_conversation(make_conversation(rng, "eval")) for _ in range(max(1, int(conversations * heldout_fraction)))]
    train_texts = stdlib[n_heldout:] + chats
    rng.shuffle(train_texts)
    return DemoCorpus(
        train_texts=train_texts,
        heldout_texts=stdlib[:n_heldout],
        heldout_chats=heldout_chats,
        sft_train=[make_conversation(rng, "train", wide=wide, more_calls=more_calls) for _ in range(sft_conversations)],
        sft_heldout=[make_conversation(rng, "eval") for _ in range(max(8, sft_conversations // 20))],
        tasks=[make_task(rng, "eval") for _ in range(tasks)],
        train_code=stdlib[n_heldout:],
        train_chats=chats,
    )


def copy_drill(rng: random.Random) -> str:
    """'list: Kalomi 412 Venrita Oslo ... / again: Kalomi 412 Venrita Oslo ...': a sequence the model can only
    continue by copying what it saw earlier in the document."""
    from glm5.train.conversations import CITIES, made_up_name

    items = [made_up_name(rng) if rng.random() < 0.6 else (str(rng.randint(0, 999)) if rng.random() < 0.5 else rng.choice(CITIES))
             for _ in range(rng.randint(4, 12))]
    return f"list: {' '.join(items)}\nagain: {' '.join(items)}\n"
