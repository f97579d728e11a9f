"""``rlhf-rewards demo``: tiny random-weight checkpoints of every preset, scored on CPU, printing the exact input
each model runs and what each number means."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

HELP = "score a few conversations with tiny random-weight checkpoints of every preset (CPU, offline)"

INTRO = """\
Tiny checkpoints of every preset with RANDOM weights, scored on CPU, each fed exactly as its model card does.
They show the mechanics (the exact model input, batching, both orders of a comparison), not quality:
with random weights, a bad answer scoring above the good one is expected.
Mistral's and Llama-3's tokenizers are the real ones; Yi's, Llama-2's and DeBERTa's are small stand-ins
trained on a few sentences (no package ships them): PairRM's reads a letter it never saw as [UNK]."""

DEMO_CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I believe it is Marseille."),
    ([{"role": "system", "content": "You answer in one sentence."},
      {"role": "user", "content": "Why is the sky blue?"}],
     "Sunlight scatters off air molecules, and blue light scatters most.", "Because it is."),
    ([{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7"},
      {"role": "user", "content": "A larger one?"}], "101 is prime.", "100."),
]


def _describe_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return f"user: {prompt}"
    return " | ".join(f"{m['role']}: {m['content']}" for m in prompt)


def _show_input(title: str, text: str) -> None:
    print(f"--- {title} (the token ids it runs, decoded; every special token shown):")
    print(text)
    print("--- end of input")


def demo(out_dir: str | None, presets: list[str] | None = None) -> int:
    """Build a tiny checkpoint of each preset (all by default) under ``out_dir`` (a temporary directory, deleted
    afterwards, when ``None``) and score the demo conversations with each."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .. import list_presets

    names = presets or list_presets()
    unknown = sorted(set(names) - set(list_presets()))
    if unknown:
        raise SystemExit(f"rlhf-rewards demo: unknown preset(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(list_presets())}")
    print(INTRO)
    print("\nConversations, each with a good and a bad answer:")
    for i, (prompt, good, bad) in enumerate(DEMO_CONVERSATIONS, 1):
        print(f"  {i}. {_describe_prompt(prompt)}\n     good: {good}\n     bad:  {bad}")
    if out_dir:
        print(f"\nCheckpoints are written to {out_dir} and kept.")
        _score_all(out_dir, names)
    else:
        with tempfile.TemporaryDirectory(prefix="rlhf-rewards-demo-") as root:
            print(f"\nCheckpoints are written to {root}, deleted at the end (--out DIR keeps them).")
            _score_all(root, names)
    return 0


def _score_all(root: str, names: list[str]) -> None:
    # tiktoken (converting Llama-3's tokenizer.model) caches what it reads in the system's temporary directory unless
    # told otherwise: keep that cache in the demo's own directory, deleted with it
    own_cache = "TIKTOKEN_CACHE_DIR" not in os.environ and "DATA_GYM_CACHE_DIR" not in os.environ
    if own_cache:
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(root, "tiktoken-cache")
    try:
        _score_presets(root, names)
    finally:
        if own_cache:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)


def _score_presets(root: str, names: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from .. import best_of_n, load_reward_model
    from ..presets import get_preset
    from ..testing import make_tiny_checkpoint

    hf_logging.disable_progress_bar()  # the demo's output is the text and the numbers
    prompts = [p for p, _, _ in DEMO_CONVERSATIONS]
    good = [g for _, g, _ in DEMO_CONVERSATIONS]
    bad = [b for _, _, b in DEMO_CONVERSATIONS]
    for name in names:
        preset = get_preset(name)
        model = preset.hub_ids[0] if preset.hub_ids else "any sequence-classification reward model"
        print(f"\n=== {name}: {model} ({preset.kind}), tiny random checkpoint")
        rm = load_reward_model(make_tiny_checkpoint(name, os.path.join(root, name)), preset=name, device="cpu")
        scored = list(range(len(prompts)))  # the conversations the model can read
        if rm.kind == "scalar":
            _show_input("what the model reads for conversation 1 with the good answer",
                        rm.format(prompts[0], good[0], tokens=True))
            print("reward (the model's own scale; higher means better):")
            for i, (rg, rb) in enumerate(zip(rm.score(prompts, good), rm.score(prompts, bad)), 1):
                print(f"  conversation {i}: good answer {rg:+.4f}   bad answer {rb:+.4f}")
        elif rm.kind == "process":
            _show_input("what the model reads for conversation 1 with the good answer (one step)",
                        rm.format(prompts[0], good[0], tokens=True))
            print("step rewards (each in [0, 1]; one step per answer here) and the reward, their minimum:")
            scored.clear()
            for i, (sg, sb) in enumerate(zip(rm.score_steps_samples(prompts, good),
                                             rm.score_steps_samples(prompts, bad)), 1):
                refused = sg if isinstance(sg, ValueError) else sb if isinstance(sb, ValueError) else None
                if refused is not None:  # e.g. Math-Shepherd reads one question: no system message, no turns
                    print(f"  conversation {i}: not scored: {refused}")
                    continue
                scored.append(i - 1)
                print(f"  conversation {i}: good answer {min(sg):+.4f}   bad answer {min(sb):+.4f}")
        else:
            _show_input("what the model reads for conversation 1, order A = good answer, B = bad answer",
                        rm.format(prompts[0], good[0], bad[0], tokens=True)[0])
            print("P(good answer better than bad answer), both orders averaged:")
            for i, p in enumerate(rm.compare(prompts, good, bad), 1):
                print(f"  conversation {i}: {p:.4f}")
        chosen = dict(zip(scored, best_of_n(rm, [prompts[k] for k in scored], [[bad[k], good[k]] for k in scored])))
        print("best of n, candidates [0] = bad answer, [1] = good answer; index chosen per conversation "
              f"(None: not scored): {[chosen.get(k) for k in range(len(prompts))]}")
        print("stats:\n  " + rm.stats.summary().replace("\n", "\n  "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR",
                        help="write the tiny checkpoints here and keep them (default: a temporary directory, deleted "
                             "at the end)")
    parser.add_argument("--presets", metavar="NAMES", type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                        help="comma-separated presets to run (default: all; see rlhf-rewards presets)")


def run(args: argparse.Namespace) -> int:
    return demo(args.out, args.presets)
