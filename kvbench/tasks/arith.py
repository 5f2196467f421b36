"""``arith``: multi-step arithmetic word problems from our own seeded generator, with exact integer answers.

Example ``i`` of seed ``s`` is always the same problem, so every press and budget sees the same items.
"""

from __future__ import annotations

import random

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "stamps", "cookies")


def make_problem(rng: random.Random) -> tuple[str, int]:
    """One problem: a start quantity, then 2-3 small steps (gain, loss, doubling), the count staying positive.

    Deliberately easy: the embedded 135M model must score above zero for press comparisons to mean anything.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friend = rng.choice([n for n in NAMES if n != name])
    value = rng.randint(3, 15)
    sentences = [f"{name} has {value} {item}."]
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(("gain", "gain", "lose", "double"))
        if op == "lose" and value > 2:
            n = rng.randint(1, min(9, value - 1))
            value -= n
            sentences.append(f"{name} gives {n} {item} to {friend}.")
        elif op == "double" and value <= 20:
            value *= 2
            sentences.append(f"Then the number of {item} {name} has doubles.")
        else:
            n = rng.randint(1, 9)
            value += n
            sentences.append(f"{friend} gives {name} {n} more {item}.")
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), value


def generate_arith(n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` problems of the generator seeded with ``seed``."""
    out = []
    for i in range(n):
        question, answer = make_problem(random.Random(f"arith-{seed}-{i}"))
        out.append({"id": f"arith-{i}", "question": question, "answer": str(answer)})
    return out


GENERATORS = {"arith": generate_arith}
