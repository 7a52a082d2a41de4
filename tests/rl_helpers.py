"""A reward for RL runs in tests: the conversation hashed to [0, 1). A random model's answers differ, so every
group's rewards spread and every step has advantages (an env's own reward is 0 for nearly all of them)."""

import zlib


def hash_reward(messages, env) -> float:
    return zlib.crc32(repr(messages).encode()) / 2**32
