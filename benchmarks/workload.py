"""The benchmark's workload and models: scales, seeded conversations and pairwise groups, texts written to target
lengths in each tokenizer's tokens, and randomly initialised models of each preset's architecture."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from rlhf_rewards.backends.base import RewardModel
from rlhf_rewards.conversation import Message
from rlhf_rewards.testing.files import update_config

NEW_FAMILIES = {"armorm": ("armorm-llama3-8b",), "nemotron": ("nemotron-reward",), "inf-orm": ("inf-orm-llama3.1-70b",),
                "skywork": ("skywork-reward-v2",), "prm": ("qwen2.5-math-prm", "rlhflow-prm", "math-shepherd")}
"""The families added after the seeds (a multi-objective head, a first-token score, INF-ORM's head, Skywork-V2's
classifier, process models) and their presets; their cards are in :mod:`benchmarks.cards`."""
FAMILY_PRESETS = tuple(p for presets in NEW_FAMILIES.values() for p in presets)

# -- sizes and scales ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """A benchmark model's dimensions: the preset's architecture at this size (``vocab`` the real vocabulary)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: Optional[int] = None  # None: the tiny checkpoint's own (its tokenizer's, which is the real one)


@dataclass(frozen=True)
class Scale:
    """How much one run does.

    Attributes:
        conversations: scalar workload size (and the pool the pairwise groups' prompts come from).
        prompt_median, response_median, max_tokens: the log-normal lengths in tokens, each cut at ``max_tokens``.
        group_size: completions per prompt in pairwise groups.
        short_groups: groups of the pair-PM's second against-baseline workload: one single-turn context of
            ~``short_context`` tokens per group, completions and baseline of ~``short_response`` tokens.
        pair_pm_groups, pairrm_groups: groups (against baseline, round robin) for each pairwise model. The
            pair-preference model is the slow one (about a millisecond per token: Llama-3's vocabulary and MLP
            width): its round robin runs ours only; the other methods would add minutes.
        sizes: per preset, its model's dimensions.
        budgets: ``max_batch_tokens`` values for the budget sweep (first scalar preset): peak memory in the tuned
            process, time in a plain one.
        warm_heap_gb: memory each measuring process faults in before timing (see :func:`_child_setup`).
        plain_presets: how many scalar presets (first ones) also run ours and the floor in a plain process.
        family_conversations, process_conversations: how many of the conversations the families added after the
            seeds score (process models: the first user turn and the response's lines as steps; their cards run one
            forward per step, or per solution over the full vocabulary, so they get fewer).
    """

    conversations: int
    prompt_median: int
    response_median: int
    max_tokens: int
    group_size: int
    pair_pm_groups: tuple[int, int]
    short_groups: int
    short_context: int
    short_response: int
    pairrm_groups: tuple[int, int]
    sizes: dict[str, ModelSize]
    budgets: tuple[int, ...]
    warm_heap_gb: float
    plain_presets: int
    family_conversations: int = 64
    process_conversations: int = 16


FULL = Scale(
    conversations=256, prompt_median=150, response_median=300, max_tokens=1500, group_size=8,
    pair_pm_groups=(2, 1), short_groups=4, short_context=150, short_response=300, pairrm_groups=(8, 2),
    sizes={
        # GQA and MLP ratios of the real models: Mistral-7B 32/8 heads, MLP 3.5x; Yi-34B 56/8, 2.86x; Llama-2-7B
        # 32/32, 2.69x. Vocabularies: Ray2333's 32001 (Mistral + [PAD]), Yi's 64000, Llama-2's 32000.
        "ray2333-mistral-7b": ModelSize(128, 2, 4, 1, 448, 32001),
        "starling-rm-34b": ModelSize(128, 2, 4, 1, 368, 64000),
        "starling-rm-7b-alpha": ModelSize(128, 2, 4, 4, 344, 32000),
        "sequence-classifier": ModelSize(128, 2, 4, 1, 448, 32000),
        # Llama-3-8B's vocabulary, MLP width and (a bit more than) its depth, hidden size 16: the LM head is 6.9% of
        # the FLOPs per token (Llama-3-8B: 7.0%), attention at 800 tokens ~4% (Llama-3-8B: ~3%)
        "rlhflow-pair-pm-llama3-8b": ModelSize(16, 40, 2, 1, 14336, 128256),
        # DeBERTa-v3-large's head size (64) and MLP ratio (4x), its vocabulary (128100)
        "pairrm": ModelSize(128, 2, 2, 2, 512, 128100),
        # the families added after the seeds: Llama-3/3.1-8B/70B's GQA (8 key/value heads of 64) and MLP ratio 3.5,
        # Qwen2.5-Math-7B's (4 of 28, ratio 5.3), Mistral-7B's; the real vocabularies
        **{preset: ModelSize(128, 2, 4, 1, 448) for preset in ("armorm-llama3-8b", "inf-orm-llama3.1-70b",
                                                                "nemotron-reward", "skywork-reward-v2",
                                                                "rlhflow-prm", "math-shepherd")},
        "qwen2.5-math-prm": ModelSize(128, 2, 4, 1, 680),
    },
    budgets=(2048, 4096, 8192, 16384),
    warm_heap_gb=1.0,
    plain_presets=4,
)
"""The full benchmark: minutes on two CPU cores."""

SMOKE = Scale(
    conversations=8, prompt_median=15, response_median=30, max_tokens=150, group_size=3,
    pair_pm_groups=(1, 1), short_groups=2, short_context=15, short_response=30, pairrm_groups=(2, 1),
    sizes={
        "ray2333-mistral-7b": ModelSize(16, 1, 2, 1, 32, 32001),
        "starling-rm-34b": ModelSize(16, 1, 2, 1, 32, 64000),
        "starling-rm-7b-alpha": ModelSize(16, 1, 2, 2, 32, 32000),
        "sequence-classifier": ModelSize(16, 1, 2, 1, 32, 32000),
        "rlhflow-pair-pm-llama3-8b": ModelSize(16, 1, 2, 1, 32, 128256),
        "pairrm": ModelSize(16, 1, 2, 2, 32, 128100),
        **{preset: ModelSize(16, 1, 2, 1, 32) for preset in FAMILY_PRESETS},
    },
    budgets=(),
    warm_heap_gb=0.0,
    plain_presets=1,
    family_conversations=4,
    process_conversations=3,
)
"""The smoke benchmark: every method on a few tiny inputs, seconds."""

SCALAR_PRESETS = ("ray2333-mistral-7b", "starling-rm-34b", "starling-rm-7b-alpha", "sequence-classifier")
FAMILIES = ("scalar", "pair-pm", "pairrm", *NEW_FAMILIES)
LLAMA3_8B = ModelSize(4096, 32, 32, 8, 14336, 128256)


def lm_head_share(size: ModelSize) -> float:
    """The LM head's share of a Llama model's matmul FLOPs per token (attention scores left out): the head is
    ``vocab x hidden``, each layer ``2 h^2`` (q, o) ``+ 2 h kv`` (k, v) ``+ 3 h ff`` (MLP) weights."""
    head_dim = size.hidden // size.heads
    layer = 2 * size.hidden ** 2 + 2 * size.hidden * size.kv_heads * head_dim + 3 * size.hidden * size.intermediate
    head = size.vocab * size.hidden
    return head / (head + size.layers * layer)


# -- workload ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text of about ``tokens`` tokens whose words come from the random stream ``seed``."""

    tokens: int
    seed: int


@dataclass(frozen=True)
class Conversation:
    """A prompt (optional system text, then user/assistant/.../user turns) and a response."""

    system: Optional[Text]
    turns: tuple[Text, ...]
    response: Text


@dataclass(frozen=True)
class Group:
    """A GRPO-like group: one conversation's prompt, its completions and a baseline completion."""

    prompt: Conversation
    completions: tuple[Text, ...]
    baseline: Text


def _length(rng: random.Random, median: int, cap: int) -> int:
    # sigma puts the largest of a few hundred draws near ten times the median for prompts, five times for responses
    sigma = math.log(cap / median) / 2.9
    return max(4, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def make_workload(scale: Scale, seed: int) -> tuple[list[Conversation], list[Group]]:
    """The seeded conversations and pairwise groups (group ``g`` uses conversation ``g``'s prompt)."""
    rng = random.Random(seed)

    def text(tokens: int) -> Text:
        return Text(tokens, rng.getrandbits(32))

    def response() -> Text:
        return text(_length(rng, scale.response_median, scale.max_tokens))

    conversations = []
    for _ in range(scale.conversations):
        prompt_tokens = _length(rng, scale.prompt_median, scale.max_tokens)
        n_turns = 1 if rng.random() < 0.7 else rng.choice((3, 5))  # one exchange, or two or three user turns
        weights = [rng.random() + 0.2 for _ in range(n_turns)]
        turns = tuple(text(max(2, round(prompt_tokens * w / sum(weights)))) for w in weights)
        system = text(rng.randint(10, 40)) if rng.random() < 0.1 else None
        conversations.append(Conversation(system, turns, response()))
    n_groups = max(max(scale.pair_pm_groups), max(scale.pairrm_groups))
    groups = [Group(conversations[g % len(conversations)], tuple(response() for _ in range(scale.group_size)),
                    response()) for g in range(n_groups)]
    return conversations, groups


def short_groups(scale: Scale, seed: int) -> list[Group]:
    """The pair-PM's second group workload: ``scale.short_groups`` one-turn contexts of ``scale.short_context``
    tokens, each with ``scale.group_size`` completions and a baseline of about ``scale.short_response`` tokens (a
    log-normal spread up to twice that)."""
    rng = random.Random(seed + 1)

    def response() -> Text:
        return Text(_length(rng, scale.short_response, 2 * scale.short_response), rng.getrandbits(32))

    return [Group(Conversation(None, (Text(scale.short_context, rng.getrandbits(32)),), response()),
                  tuple(response() for _ in range(scale.group_size)), response()) for _ in range(scale.short_groups)]


def corpus_words() -> list[str]:
    from rlhf_rewards.testing.tokenizers import CORPUS

    return re.findall(r"\S+", CORPUS)


class Writer:
    """Writes workload texts for one tokenizer: words from the tiny tokenizers' training corpus, as many as make
    the target length in this tokenizer's tokens (its tokens per word measured once on a long sample)."""

    def __init__(self, tokenizer: Any, words: Sequence[str]):
        self.words = list(words)
        sample = self._words(Text(0, 12345), 3000)
        self.tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 3000

    def _words(self, text: Text, n: int) -> str:
        rng = random.Random(text.seed)
        out = []
        for k in range(n):
            out.append(rng.choice(self.words))
            if k % 17 == 16:
                out.append("\n")
        return " ".join(out).replace(" \n ", "\n")

    def text(self, text: Text) -> str:
        return self._words(text, max(1, round(text.tokens / self.tokens_per_word)))

    def prompt(self, conversation: Conversation) -> list[Message]:
        messages = [{"role": "system", "content": self.text(conversation.system)}] if conversation.system else []
        for k, turn in enumerate(conversation.turns):
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": self.text(turn)})
        return messages


def comparisons(writer: Writer, groups: Sequence[Group], mode: str) -> list[tuple[list[Message], str, str]]:
    """``(prompt, a, b)`` per comparison: each completion against the baseline, or every pair of completions
    (``i < j``) of each group, in GRPO's order."""
    out = []
    for group in groups:
        prompt = writer.prompt(group.prompt)
        texts = [writer.text(c) for c in group.completions]
        if mode == "baseline":
            base = writer.text(group.baseline)
            out += [(prompt, t, base) for t in texts]
        else:
            out += [(prompt, texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    return out


# -- models --------------------------------------------------------------------------------------------------------


def _model_class(preset: str) -> type[nn.Module]:
    """The module class of ``preset``'s real checkpoint (the tiny checkpoints' own builders know it for the rest)."""
    from transformers import LlamaForCausalLM, MistralForCausalLM

    from rlhf_rewards.backends.armorm import ArmoRMModel
    from rlhf_rewards.backends.pairrm import DebertaV2PairRM
    from rlhf_rewards.backends.qwen_prm import Qwen2ProcessRewardNetwork
    from rlhf_rewards.testing import TINY_CHECKPOINTS

    own = {"pairrm": DebertaV2PairRM, "armorm-llama3-8b": ArmoRMModel, "qwen2.5-math-prm": Qwen2ProcessRewardNetwork,
           "rlhflow-prm": LlamaForCausalLM, "math-shepherd": MistralForCausalLM}
    return own[preset] if preset in own else TINY_CHECKPOINTS[preset].model_class


def write_model(preset: str, size: ModelSize, directory: str, seed: int) -> str:
    """Write a randomly initialised model of ``preset``'s architecture at ``size`` into ``directory`` in the preset's
    file layout (tokenizer files and config keys from :func:`~rlhf_rewards.testing.make_tiny_checkpoint`) and
    return ``directory``."""
    from transformers import AutoConfig

    from rlhf_rewards.testing import make_tiny_checkpoint

    make_tiny_checkpoint(preset, directory, seed=seed)
    config = AutoConfig.from_pretrained(directory)
    dims = dict(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                intermediate_size=size.intermediate)
    if size.vocab is not None:
        dims["vocab_size"] = size.vocab
    if preset != "pairrm":
        dims.update(num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (Gemma-2's alternation) at the new depth
        dims["layer_types"] = [config.layer_types[k % len(config.layer_types)] for k in range(size.layers)]
    for key, value in dims.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(preset)(config).eval()
    for name in os.listdir(directory):  # the tiny weights, in whichever layout the preset ships
        if name.endswith((".safetensors", ".bin")):
            os.remove(os.path.join(directory, name))
    with open(os.path.join(directory, "config.json")) as f:
        keys = {k: v for k, v in json.load(f).items() if k in ("architectures", "auto_map", "rlhf_rewards_preset")}
    model.save_pretrained(directory)
    if keys:
        update_config(directory, **keys)
    return directory


def build_model(preset: str, size: ModelSize, directory: str, seed: int) -> RewardModel:
    """:func:`write_model`, then :func:`~rlhf_rewards.load_reward_model` on the CPU in float32, as users load the
    real one."""
    from rlhf_rewards import load_reward_model

    write_model(preset, size, directory, seed)
    return load_reward_model(directory, preset=preset, device="cpu", dtype=torch.float32)
