"""Conversations shared by the tests."""

CONVERSATIONS = [
    # (prompt, completion): single turn, multi-turn, system prompt, empty completion, unicode and newlines
    ("Hello!", "Hi, how can I help you?"),
    ("What is 2+2?", ""),
    ([{"role": "user", "content": "Name a colour."},
      {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another one, please."}], "Green, like grass."),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.\n\nShort waves scatter more."),
    ("Écris une phrase en français, s'il te plaît.", "  Voilà : « le café est chaud » ✓"),
    ("Count: 1 2 3", [{"role": "assistant", "content": "4 5 6"}]),
]


def mixed_texts(fragments, corpus: str, n: int, *, seed: int, longest_slice: int, most_parts: int) -> list[str]:
    """``n`` random texts: 30% slices of ``corpus``, the rest runs of ``fragments`` (deterministic for ``seed``)."""
    import random

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.3:
            start = rng.randrange(len(corpus))
            texts.append(corpus[start:start + rng.randint(1, longest_slice)])
        else:
            texts.append("".join(rng.choice(fragments) for _ in range(rng.randint(1, most_parts))))
    return texts


def sentencepiece_stretches(sp, specials: dict, text: str) -> list[int]:
    """What the models were trained on: sentencepiece ``sp`` on each stretch of ``text`` between the ``specials``
    (``{token: id}``, longest match first), each special its own id."""
    import re

    ids = []
    pattern = "(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids
