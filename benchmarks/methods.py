"""The methods each model's workload is scored with: the cards' own procedures, TRL's reward-model path,
llm-blender's ``compare``, ours and the padding-free floor."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from rlhf_rewards.conversation import Message
from rlhf_rewards.rendering import fold_system

from .measure import Method, Probe
from .workload import Conversation, Writer

# -- methods: scalar models ----------------------------------------------------------------------------------------


def messages(writer: Writer, conversation: Conversation) -> tuple[list[Message], str]:
    return writer.prompt(conversation), writer.text(conversation.response)


def scalar_methods(rm: Any, writer: Writer, conversations: Sequence[Conversation]) -> list[Method]:
    """Card (Ray2333: chat template, ``padding="max_length"`` with no length limit, batch size 1; Starling: padded
    to 2048, batch size 1, reward before the first pad id), TRL's path (sequence classifiers only: TRL cannot load a
    value-head model), ours and the floor (our token ids, one input at a time, exact length)."""
    pairs = [messages(writer, c) for c in conversations]
    prompts = [p for p, _ in pairs]
    completions = [c for _, c in pairs]
    texts = [rm.format(p, c) for p, c in pairs]
    ids = rm.tokenize(texts)
    items = [(x, *rm._read_position(x)) for x in ids]
    methods = []
    if rm.preset.name == "ray2333-mistral-7b":
        methods.append(Method("card", lambda: _card_ray2333(rm, pairs)))
    elif rm.preset.backend == "value-head":
        methods.append(Method("card", lambda: _card_starling(rm, texts)))
    if rm.preset.backend == "sequence-classification":
        methods.append(Method("TRL", lambda: _trl_reward_model(rm, pairs),
                              card_exact=rm.preset.name == "sequence-classifier"))
    default = rm.packing

    def packing(value: bool) -> Callable[[], None]:
        def prepare() -> None:
            rm.packing = value
        return prepare

    def ours() -> list[float]:
        return rm.score(prompts, completions)

    methods.append(Method("ours", ours, prepare=packing(default)))
    methods.append(Method(f"ours, packing={not default}", ours, prepare=packing(not default)))
    methods.append(Method("floor", lambda: [rm._forward([item])[0] for item in items]))
    return methods


def _conversation(prompt: list[Message], completion: str) -> list[Message]:
    return prompt + [{"role": "assistant", "content": completion}]


@torch.inference_mode()
def _card_ray2333(rm: Any, pairs: Sequence[tuple[list[Message], str]]) -> list[float]:
    """Card 001: ``apply_chat_template(message, tokenize=False)``, then the tokenizer with
    ``padding="max_length", truncation=True`` (Mistral's tokenizer has no length limit, so nothing is padded) and
    one forward per conversation. Mistral v0.2's template has no system role: system text goes into the first user
    turn, as ours does (the card's code would raise)."""
    rewards = []
    for prompt, completion in pairs:
        text = rm.tokenizer.apply_chat_template(fold_system(_conversation(prompt, completion)), tokenize=False)
        tokens = rm.tokenizer(text, padding="max_length", truncation=True, return_tensors="pt").to(rm.device)
        rewards.append(rm.model(tokens["input_ids"], attention_mask=tokens["attention_mask"]).logits.reshape(-1)
                       .item())
    return rewards


@torch.inference_mode()
def _card_starling(rm: Any, texts: Sequence[str]) -> list[float]:
    """The Starling cards' ``get_reward``: every sample tokenized with ``truncation=True, max_length=2048,
    padding="max_length"`` (truncation side left), then batch size 1 through the card's forward: the transformer
    with ``output_hidden_states=True``, the value head at every position, the reward one before the first
    ``PAD_ID`` (Starling-RM-34B: 0; 7B-alpha: the first id of ``tokenizer(pad_token)``, BOS)."""
    tokenizer = copy.copy(rm.tokenizer)
    tokenizer.truncation_side = "left"
    encodings = tokenizer(list(texts), truncation=True, max_length=2048, padding="max_length",
                          return_tensors="pt").to(rm.device)
    rewards = []
    for i in range(len(texts)):
        input_ids = encodings["input_ids"][i:i + 1]
        out = rm.model.transformer(input_ids, attention_mask=encodings["attention_mask"][i:i + 1],
                                   output_hidden_states=True)
        values = rm.model.v_head(out.hidden_states[-1]).squeeze(-1)
        c_inds = (input_ids[0] == rm.card_pad_id).nonzero()
        c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
        rewards.append(values[0, c_ind - 1].item())
    return rewards


@torch.inference_mode()
def _trl_reward_model(rm: Any, pairs: Sequence[tuple[list[Message], str]]) -> list[float]:
    """TRL 1.16's ``_calculate_rewards`` for a ``PreTrainedModel`` reward function: ``apply_chat_template`` of
    prompt + completion, the tokenizer with ``padding=True, padding_side="right", add_special_tokens=False``, the
    whole batch in one forward, ``logits[:, 0]``. TRL raises where the template rejects a system role (Mistral
    v0.2's); those prompts get their system text folded into the first user turn, as ours does, so it can run."""
    from jinja2.exceptions import TemplateError
    from trl.data_utils import apply_chat_template

    texts = []
    for prompt, completion in pairs:
        try:
            texts.append(apply_chat_template({"messages": _conversation(prompt, completion)}, rm.tokenizer)["text"])
        except TemplateError:
            texts.append(apply_chat_template({"messages": fold_system(_conversation(prompt, completion))},
                                             rm.tokenizer)["text"])
    tokenizer, config = copy.copy(rm.tokenizer), rm.model.config.get_text_config()
    if tokenizer.pad_token_id is None:  # TRL's trainer: the reward tokenizer pads with EOS, and the config says so
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                       add_special_tokens=False).to(rm.device)
    saved, config.pad_token_id = config.pad_token_id, tokenizer.pad_token_id
    try:
        return rm.model(**inputs).logits[:, 0].tolist()
    finally:
        config.pad_token_id = saved


# -- methods: the families added after the seeds (cards in benchmarks.cards) ------------------------------------------


def family_samples(rm: Any, writer: Writer, conversations: Sequence[Conversation]) -> list[tuple[list[Message], Any]]:
    """``(prompt, completion)`` per conversation; a process model gets what its cards read: the first user turn
    alone as the question, the response's lines as its steps."""
    if rm.kind != "process":
        return [messages(writer, c) for c in conversations]
    return [([{"role": "user", "content": writer.text(c.turns[0])}], writer.text(c.response).split("\n"))
            for c in conversations]


def backbone_of(rm: Any) -> Any:
    """The transformer whose forward passes count a method's tokens (ArmoRM's sits inside its model)."""
    return getattr(rm, "backbone", None) or rm.model.model


def family_methods(rm: Any, directory: str, samples: Sequence[tuple[list[Message], Any]]) -> list[Method]:
    """The card's procedure (:func:`benchmarks.cards.card_scorer`, its own copy of the weights on ``rm``'s device and
    in its dtype), TRL's path (sequence classifiers), ours (with the other packing choice where the model packs)
    and the floor (ours with a one-token budget: each input alone at its exact length). A process model's results
    are its step rewards, one after another."""
    from .cards import card_scorer

    prompts = [p for p, _ in samples]
    completions = [c for _, c in samples]
    card = card_scorer(rm.preset.name, directory, rm.device, backbone_of(rm).dtype)
    steps = rm.kind == "process"

    def flat(results: Sequence[Any]) -> list[float]:
        return [x for r in results for x in r] if steps else list(results)

    def ours() -> list[float]:
        return flat(rm.score_steps(prompts, completions) if steps else rm.score(prompts, completions))

    default, budget = rm.packing, rm.max_batch_tokens

    def setting(packing: bool, tokens: int) -> Callable[[], None]:
        def prepare() -> None:
            rm.packing, rm.max_batch_tokens = packing, tokens
        return prepare

    methods = [Method("card", lambda: flat([card.score(p, c) for p, c in samples]),
                      probe=Probe(card.backbone, card.heads))]
    if rm.preset.backend == "sequence-classification":
        # TRL reads the card's text, but pools where its own pad choice says: compared with the card in the notes
        methods.append(Method("TRL", lambda: _trl_reward_model(rm, samples), card_exact=False))
    methods.append(Method("ours", ours, prepare=setting(default, budget)))
    if rm.packing_reason != type(rm).packing_reason:  # the backend packs (one that cannot keeps the class's reason)
        methods.append(Method(f"ours, packing={not default}", ours, prepare=setting(not default, budget)))
    methods.append(Method("floor", ours, prepare=setting(False, 1)))
    return methods


# -- methods: the RLHFlow pair-preference model ----------------------------------------------------------------------


PLAIN_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
PAIR_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"


def pair_pm_methods(rm: Any, items: Sequence[tuple[list[Message], str, str]], *, default: bool,
                    ours_only: bool = False, full: bool = True) -> list[Method]:
    """Card 003's loop, ours (with the other packing choice beside it), and with ``full`` the floor: the same token
    ids, shared prefixes once, every other token at batch size 1 (``ours_only``: ours alone). Prefix reuse's own gain
    (``prefix_reuse=False``) was measured before and is left out to keep the run short."""
    prompts, a, b = ([x[k] for x in items] for k in range(3))
    sequences = [ids for p, x, y in items for ids in
                 (rm.tokenizer.encode(text, add_special_tokens=False) for text in rm.format(p, x, y))]

    def floor() -> list[float]:
        logits = rm.logits_ab(sequences)
        return [(rm._slot_probs(*logits[2 * i])[0] + rm._slot_probs(*logits[2 * i + 1])[1]) / 2
                for i in range(len(items))]

    def setting(reuse: bool, batch: Optional[int], packing: bool = default) -> Callable[[], None]:
        def prepare() -> None:
            rm.prefix_reuse, rm.max_batch_size, rm.packing = reuse, batch, packing
        return prepare

    def compare() -> list[float]:
        return rm.compare(prompts, a, b)

    ours = Method("ours", compare, prepare=setting(True, None))
    if ours_only:
        return [ours]
    methods = [Method("card", lambda: _card_pair_pm(rm, items)), ours,
               Method(f"ours, packing={not default}", compare, prepare=setting(True, None, not default))]
    if full:
        methods.append(Method("floor", floor, prepare=setting(True, 1, False)))
    return methods


@torch.inference_mode()
def _card_pair_pm(rm: Any, items: Sequence[tuple[list[Message], str, str]]) -> list[float]:
    """Card 003's loop per comparison: the plain-template context, then for each order the Llama-3 chat template
    with the BOS string removed, ``tokenizer.encode``, the full causal LM (logits at every position) and the
    softmax of the "A"/"B" logits at the last position; the mean of both orders. System text is folded into the
    first user turn, as ours does (the plain template reads roles by position)."""
    import numpy as np

    tokenizer, plain = rm.tokenizer, copy.copy(rm.tokenizer)
    plain.chat_template = PLAIN_TEMPLATE
    id_a, id_b = rm.token_ids
    out = []
    for instruction, chosen, rejected in items:
        context = plain.apply_chat_template(fold_system(instruction), tokenize=False)
        responses = [chosen, rejected]
        probs = []
        for position in (0, 1):
            prompt = PAIR_TEMPLATE.format(context=context, response_A=responses[position],
                                          response_B=responses[1 - position])
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
            input_ids = tokenizer.encode(text.replace(tokenizer.bos_token, ""), return_tensors="pt",
                                         add_special_tokens=False).to(rm.device)
            logits = rm.model(input_ids).logits
            logit_a, logit_b = logits[0, -1, id_a].item(), logits[0, -1, id_b].item()
            z = np.exp(logit_a) + np.exp(logit_b)
            probs.append(np.exp([logit_a, logit_b][position]) / z)
        out.append(float(np.mean(probs)))
    return out


# -- methods: PairRM ---------------------------------------------------------------------------------------------------


def pairrm_methods(rm: Any, items: Sequence[tuple[list[Message], str, str]]) -> list[Method]:
    """llm-blender's ``compare`` (batches of 4 in input order, each padded to its longest, one forward per order),
    ours, and the floor (each row alone)."""
    prompts, a, b = ([x[k] for x in items] for k in range(3))
    rows = [rm.encode(p, x, y) for p, x, y in items]

    @torch.inference_mode()
    def floor() -> list[float]:
        out = []
        for pair in rows:
            logits = [rm.model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item() for r in pair]
            out.append(_sigmoid((logits[0] - logits[-1]) / 2))  # a lone row (identical candidates) serves both
        return out

    return [Method("llm-blender", lambda: _llm_blender_compare(rm, items)),
            Method("ours", lambda: rm.compare(prompts, a, b)),
            Method("floor", floor)]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@torch.inference_mode()
def _llm_blender_compare(rm: Any, items: Sequence[tuple[list[Message], str, str]], batch_size: int = 4
                         ) -> list[float]:
    """llm-blender 0.0.2's ``Blender.compare`` (mode "[A,B]+[B,A]", ``batch_size=4``): its collator tokenizes
    each batch's sources padded to 1224 and candidates to ``412 + unused source budget // 2``, trims columns that
    are padding in every row; ``_full_predict`` then runs the order (A, B) and the order (B, A) as two forwards,
    each row the three parts' tokens followed by all their padding, trimmed to the batch's longest row. Returned
    as ``sigmoid((logit_AB - logit_BA) / 2)``, the same probability ours gives."""
    from rlhf_rewards.backends.pairrm import CANDIDATE_PREFIX, SOURCE_PREFIX, source_and_candidate

    tokenizer, config = rm.tokenizer, rm.model.config
    sep = tokenizer.sep_token
    candidate_budget = (rm.max_length - rm.source_max_length) // 2
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        texts = [(*source_and_candidate(m, x), source_and_candidate(m, y)[1]) for m, x, y in batch]
        src = tokenizer([SOURCE_PREFIX + s.replace(sep, " ") for s, _, _ in texts], max_length=rm.source_max_length,
                        padding="max_length", truncation=True, return_tensors="pt")
        keep = src["attention_mask"].any(dim=0)
        src_ids, src_mask = src["input_ids"][:, keep], src["attention_mask"][:, keep]
        cand = tokenizer([CANDIDATE_PREFIX + c.replace(sep, " ") for _, x, y in texts for c in (x, y)],
                         max_length=candidate_budget + (rm.source_max_length - int(keep.sum())) // 2,
                         padding="max_length", truncation=True, return_tensors="pt")
        keep = cand["attention_mask"].any(dim=0)
        cand_ids = cand["input_ids"][:, keep].reshape(len(batch), 2, -1)
        cand_mask = cand["attention_mask"][:, keep].reshape(len(batch), 2, -1)
        logits = {}
        for first, second in ((0, 1), (1, 0)):
            rows = []
            for i in range(len(batch)):
                one = cand_ids[i, first][cand_mask[i, first].bool()].clone()
                two = cand_ids[i, second][cand_mask[i, second].bool()].clone()
                one[one == config.cand_prefix_id] = config.cand1_prefix_id
                two[two == config.cand_prefix_id] = config.cand2_prefix_id
                rows.append(torch.cat([src_ids[i][src_mask[i].bool()], one, two]))
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = r, 1
            logits[first] = rm.model(ids.to(rm.device), mask.to(rm.device)).tolist()
        out += [_sigmoid((ab - ba) / 2) for ab, ba in zip(logits[0], logits[1])]
    return out

