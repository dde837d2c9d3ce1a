"""Synthetic arithmetic for the causal-LM task kind (tasks/arith.yaml): computed, not collected.

Each row is a question on two 2-digit numbers (sum, difference or product) and its exact answer;
a seeded generator, so the files are reproduced byte for byte by `python generate.py`. Sized for
tests and small CPU runs (400 / 100 / 100 rows), in GSM8K's answer style ("#### <number>").
"""
import json
import random
from pathlib import Path

SIZES = {"train": 400, "validation": 100, "test": 100}
OPS = [("+", lambda a, b: a + b, "the sum of"), ("-", lambda a, b: a - b, "the difference of"),
       ("*", lambda a, b: a * b, "the product of")]


def rows(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        symbol, fn, words = rng.choice(OPS)
        question = f"What is {words} {a} and {b}?"
        if question in seen:  # no question in two splits, or twice in one
            continue
        seen.add(question)
        out.append({"question": question, "answer": f"{a} {symbol} {b} = {fn(a, b)}\n#### {fn(a, b)}"})
    return out


def main() -> None:
    rng, seen = random.Random(20261130), set()
    folder = Path(__file__).parent
    for split, n in SIZES.items():
        with open(folder / f"{split}.jsonl", "w") as fh:
            for row in rows(rng, n, seen):
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
