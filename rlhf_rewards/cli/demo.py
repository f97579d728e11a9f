"""``rlhf-rewards demo``: tiny random checkpoints of every preset, scored on CPU, printing the exact text each model
reads."""

from __future__ import annotations

import argparse
import os
import tempfile

HELP = "score a few conversations with tiny checkpoints of every preset (CPU)"

DEMO_CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I believe it is Marseille."),
    ([{"role": "system", "content": "You answer in one sentence."},
      {"role": "user", "content": "Why is the sky blue?"}],
     "Sunlight scatters off air molecules, and blue light scatters most.", "Because it is."),
    ([{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
      {"role": "user", "content": "A larger one?"}], "101 is prime.", "100."),
]


def demo(out_dir: str | None) -> int:
    """Build a tiny checkpoint of every preset and score the demo conversations with each, printing the exact
    text each model reads. The checkpoints are random, so the numbers show the mechanics, not quality."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from .. import best_of_n, list_presets, load_reward_model
    from ..testing import make_tiny_checkpoint

    hf_logging.disable_progress_bar()  # the demo's output is the text and the numbers
    root = out_dir or tempfile.mkdtemp(prefix="rlhf-rewards-demo-")
    prompts = [p for p, _, _ in DEMO_CONVERSATIONS]
    good = [g for _, g, _ in DEMO_CONVERSATIONS]
    bad = [b for _, _, b in DEMO_CONVERSATIONS]
    for name in list_presets():
        path = make_tiny_checkpoint(name, os.path.join(root, name))
        rm = load_reward_model(path, preset=name, device="cpu")
        print(f"=== {name} ({rm.kind}) tiny checkpoint at {path}")
        if rm.kind == "scalar":
            print("--- model input for the first conversation:")
            print(rm.format(prompts[0], good[0]))
            for p, g, b, rg, rb in zip(prompts, good, bad, rm.score(prompts, good), rm.score(prompts, bad)):
                print(f"reward(good)={rg:+.4f}  reward(bad)={rb:+.4f}")
        else:
            print("--- model input for the first conversation, order (A, B):")
            print(rm.format(prompts[0], good[0], bad[0])[0])
            for p in rm.compare(prompts, good, bad):
                print(f"P(good better than bad)={p:.4f}")
        print(f"best of n for each prompt: {best_of_n(rm, prompts, [[b, g] for g, b in zip(good, bad)])}")
        print(f"stats: {rm.stats.as_dict()}\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="where to write the tiny checkpoints (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    return demo(args.out)
