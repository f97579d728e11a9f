"""Prefix reuse in the pair-preference model (card 003): shared token prefixes run once through the KV cache.

Every result is checked against an oracle that follows the card's own loop (one order at a time, the whole text
tokenized at once, full logits, no cache), and against the same model with ``prefix_reuse`` off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_rewards import group_rewards, load_reward_model
from rlhf_rewards.backends.pair_pm import PairPMRewardModel, build_prefix_tree

PRESET = "rlhflow-pair-pm-llama3-8b"
PLAIN_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
PAIR_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"


class CardOracle:
    """Card 003's loop, written from the card: for each order, the text built and tokenized whole, one forward of
    the full causal LM (every position's logits), softmax over the "A"/"B" logits of the last position."""

    def __init__(self, path: str):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        self.plain = AutoTokenizer.from_pretrained(path, use_fast=True)
        self.plain.chat_template = PLAIN_TEMPLATE
        self.a_id, = self.tokenizer.encode("A", add_special_tokens=False)
        self.b_id, = self.tokenizer.encode("B", add_special_tokens=False)

    def prob(self, instruction, chosen: str, rejected: str) -> float:
        if isinstance(instruction, str):
            instruction = [{"role": "user", "content": instruction}]
        context = self.plain.apply_chat_template(instruction, tokenize=False)
        responses = [chosen, rejected]
        probs = []
        for position in (0, 1):
            prompt = PAIR_TEMPLATE.format(context=context, response_A=responses[position],
                                          response_B=responses[1 - position])
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
            ids = self.tokenizer.encode(text.replace(self.tokenizer.bos_token, ""), return_tensors="pt",
                                        add_special_tokens=False)
            with torch.no_grad():
                logits = self.model(ids).logits[0, -1]
            la, lb = logits[self.a_id].item(), logits[self.b_id].item()
            probs.append(np.exp([la, lb][position]) / (np.exp(la) + np.exp(lb)))
        return float(np.mean(probs))


LONG_PROMPT = [{"role": "user", "content": "Please write a short poem about the sea, the wind and the boats. " * 6},
               {"role": "assistant", "content": "The waves roll in, the gulls call out, the evening light is gold."},
               {"role": "user", "content": "Now make it longer, and rhyme."}]
# Completions that share long stretches and diverge mid-word ("unbelievable" / "unbelief"), start with punctuation
# or spaces that merge with the template's space, and repeat (identical sequences).
GROUP = [
    "The sea is unbelievable tonight, " * 4,
    "The sea is unbelief and wonder, " * 4,
    "'s not a poem, just a line.",
    "  Leading spaces\n\nand blank lines.",
    "The sea is unbelievable tonight, " * 4,
    "",
    "Short.",
    "Numbers 12345 and 3.14 " * 10,
]
BASELINE = "A plain reference answer about the sea and the wind, written once. " * 5


@pytest.fixture(scope="module")
def oracle(path) -> CardOracle:
    return CardOracle(path)


def make(path: str, *, prefix_reuse: bool = True, **kwargs) -> PairPMRewardModel:
    rm = load_reward_model(path, device="cpu", **kwargs)
    rm.prefix_reuse = prefix_reuse
    return rm


@pytest.mark.parametrize("packing", [False, True])
def test_group_against_baseline_matches_the_card(path, oracle, packing):
    rm = make(path, packing=packing)
    assert rm.packing is packing
    ours = rm.compare([LONG_PROMPT] * len(GROUP), GROUP, [BASELINE] * len(GROUP))
    card = [oracle.prob(LONG_PROMPT, c, BASELINE) for c in GROUP]
    assert ours == pytest.approx(card, abs=1e-4)
    # the context and the (baseline, completion) order's baseline ran once: fewer tokens computed than read
    assert rm.stats.computed_tokens < rm.stats.real_tokens


@pytest.mark.parametrize("packing", [False, True])
def test_groups_of_several_prompts_share_their_forward_passes(path, oracle, packing):
    """GRPO batches hold several prompts' groups: each level of shared stretches runs once for all of them, so
    three groups take about as many forward passes as one (not three times as many: the padding cap may split a
    level whose stretches differ in length), and each comparison is still the card's."""
    prompts = ["Name a colour and say why.", "Why is the sea salty?", "Write one line about the wind."]
    group, baseline = GROUP[:4], BASELINE

    def run(chosen: list[str]) -> tuple[list[float], int]:
        rm = make(path, packing=packing, max_batch_tokens=100_000)
        calls = []
        handle = rm.backbone.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            out = rm.compare([p for p in chosen for _ in group], group * len(chosen), [baseline] * len(group) * len(chosen))
        finally:
            handle.remove()
        return out, len(calls)

    one, calls_one = run(prompts[:1])
    three, calls_three = run(prompts)
    assert calls_three < 1.5 * calls_one
    assert three[:len(group)] == pytest.approx(one, abs=1e-5)
    card = [oracle.prob(p, c, baseline) for p in prompts for c in group]
    assert three == pytest.approx(card, abs=1e-4)


def test_round_robin_matches_the_card_and_the_unshared_path(path, oracle):
    prompts, a, b = [], [], []
    for prompt, members in (("Name a colour and say why.", GROUP[:5]), (LONG_PROMPT, GROUP[3:])):
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                prompts.append(prompt)
                a.append(members[i])
                b.append(members[j])
    shared, plain = make(path), make(path, prefix_reuse=False)
    ours = shared.compare(prompts, a, b)
    assert ours == pytest.approx([oracle.prob(p, x, y) for p, x, y in zip(prompts, a, b)], abs=1e-4)
    assert ours == pytest.approx(plain.compare(prompts, a, b), abs=1e-5)
    assert shared.stats.real_tokens == plain.stats.real_tokens
    assert shared.stats.samples == plain.stats.samples
    assert shared.stats.computed_tokens < 0.8 * plain.stats.computed_tokens


def test_group_rewards_with_small_budget_equal_the_unshared_path(path):
    """Budgets small enough that prefixes and suffixes split over many batches; several prompts in one call."""
    prompts = ["Tell me about boats."] * 4 + [LONG_PROMPT] * 4
    completions = GROUP[:4] + GROUP[4:]
    shared, plain = make(path, max_batch_tokens=700), make(path, prefix_reuse=False, max_batch_tokens=700)
    assert group_rewards(shared, prompts, completions, 4) == pytest.approx(
        group_rewards(plain, prompts, completions, 4), abs=1e-4)
    assert shared.stats.batches > 4


def test_batches_stay_within_the_token_budget_counting_the_prefix(path):
    budget = 900
    rm = make(path, max_batch_tokens=budget)
    seen = []

    def record(module, args, kwargs):
        rows, width = kwargs["input_ids"].shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((rows, width + (cache.get_seq_length() if cache is not None else 0)))

    handle = rm.backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        rm.compare([LONG_PROMPT] * len(GROUP), GROUP, [BASELINE] * len(GROUP))
    finally:
        handle.remove()
    assert any(rows > 1 for rows, _ in seen)  # leaves ran batched on a shared cache
    assert all(rows * length <= budget or rows == 1 for rows, length in seen)


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_out_of_memory_in_the_model_splits_and_gives_identical_results(path, prefix_reuse):
    rm = make(path, prefix_reuse=prefix_reuse)
    prompts, baselines = [LONG_PROMPT] * len(GROUP), [BASELINE] * len(GROUP)
    expected = rm.compare(prompts, GROUP, baselines)
    original = rm.backbone.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(*args, **kwargs)

    rm.stats.reset()
    rm.backbone.forward = forward
    try:
        again = rm.compare(prompts, GROUP, baselines)
    finally:
        del rm.backbone.forward
    assert again == pytest.approx(expected, abs=1e-6)
    assert rm.stats.oom_splits > 0


def test_prefix_tree_splits_on_shared_token_ids():
    context = list(range(100, 200))
    base = list(range(500, 600))
    a = [[*context, 1, *base, 2, k, 3] for k in range(4)]
    b = [[*context, 1, *base, 2, 9, k, 3] for k in range(4)]
    root = build_prefix_tree(a + b, min_saved=64)
    (node,) = root.children
    assert (node.start, node.end, node.size) == (0, 101 + 100 + 1, 8)  # context, 1, baseline, 2: ids all share
    assert root.leaves == []
    # inside: the last shared id (2) is followed by k or by 9; the group starting with 9 shares only one more id,
    # (4 - 1) * 1 < 64 tokens saved: not worth its own pass, its members are leaves of the node above
    assert sorted(node.leaves) == list(range(8)) and node.children == []


def test_prefix_tree_keeps_a_token_of_each_sequence_and_folds_short_stretches():
    seqs = [[1, 2, 3], [1, 2, 3, 4], [7, 8]]
    root = build_prefix_tree(seqs, min_saved=1)
    (node,) = root.children
    assert (node.start, node.end) == (0, 2)  # [1, 2, 3] keeps its last token 3 to read its hidden state from
    assert sorted(node.leaves) == [0, 1] and root.leaves == [2]
    # a stretch saving fewer tokens than the threshold is folded into what lies below it
    folded = build_prefix_tree(seqs, min_saved=3)
    assert folded.children == [] and sorted(folded.leaves) == [0, 1, 2]
    deep = [[5] * 10 + [1] + [6] * 50 + [k] for k in range(3)] + [[5] * 10 + [2, 0]]
    tree = build_prefix_tree(deep, min_saved=64)
    # [5] * 10 alone saves 30 tokens (folded); [5] * 10 + [1] + [6] * 50 saves 122: one node from position 0
    (node,) = tree.children
    assert (node.start, node.end, node.size) == (0, 61, 3) and tree.leaves == [3]


def test_sliding_window_models_run_without_prefix_reuse(path):
    from transformers import MistralConfig, MistralForCausalLM

    base = load_reward_model(path, device="cpu")
    config = MistralConfig(vocab_size=len(base.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=64)
    model = MistralForCausalLM(config).eval()
    rm = PairPMRewardModel(model=model, preset=base.preset, tokenizer=base.tokenizer, device=base.device,
                           max_length=base.max_length, max_batch_tokens=None)
    assert not rm.prefix_reuse
