"""PairRM (``llm-blender/PairRM`` and ``llm-blender/PairRM-hf``), natively, without llm-blender.

PairRM reads one prompt ("source") and two responses ("candidates") side by side in a DeBERTa-v3-large encoder:

    [CLS] <|source|> source [SEP] [CLS] <|candidate1|> cand1 [SEP] [CLS] <|candidate2|> cand2 [SEP]

and scores them from the encoder's last hidden state at the three marker tokens:
``left = head(cat(h_source, h_cand1))``, ``right = head(cat(h_source, h_cand2))``,
``logit = mean over tasks of (left - right)``; ``logit > 0`` means candidate 1 is better.

Input building follows llm-blender's collator (the path its default ``Blender.compare`` takes):

* each text has any literal ``[SEP]`` replaced by a space (the collator does this so the separator stays unique);
* the source is ``<|source|>`` + source, tokenized with ``[CLS] .. [SEP]`` and cut from the right to
  ``source_max_length`` tokens (1224), special tokens included;
* each candidate is ``<|candidate1|>`` or ``<|candidate2|>`` + candidate, cut from the right to
  ``(max_length - len(source ids)) // 2`` tokens (``max_length`` 2048: at least 412 each);
* the three parts are concatenated, padding only at the end.

The candidate budget is per comparison, as llm-blender computes it with ``batch_size=1`` and as the PairRM-hf card's
``tokenize_pair`` does. (llm-blender's collator with larger batches uses the longest source of the batch, so its
budgets depend on the batch; here a comparison's result never does.)

Probabilities: llm-blender's default compare runs both orders and returns ``logit_AB - logit_BA`` (``> 0``: A is
better; exactly 0 is "not better", i.e. a tie). Here ``P(A better) = sigmoid((logit_AB - logit_BA) / 2)``, the sigmoid
of the mean of the two orders' log-odds for A (``logit_AB`` and ``-logit_BA``), so ``P > 0.5`` exactly when
llm-blender says A is better (up to float64 rounding of differences below ~1e-16) and ``P == 0.5`` is its tie. Per
order: ``p_ab = sigmoid(logit_AB)``, ``p_ba = sigmoid(-logit_BA)``.

Conversations (llm-blender's ``compare_conversations`` rule): leading system messages are folded into the first user
message as ``"{system}\\n\\n{user}"`` (PairRM has no system role). One user turn: the source is that text as is and the
candidate is the completion as is (llm-blender's ``compare``). Several user turns: the source is
``CONVERSATION_INSTRUCTION`` followed, without a separator, by the lines ``"USER: {u_k}\\nAssistant: <Response {k}>"``
joined by ``"\\n"``; each candidate is ``"<Response {k}>: {a_k}"`` lines joined by ``"\\n"`` for every assistant turn,
the prompt's earlier assistant turns first and the completion last.

Checkpoints: the -hf layout (a DeBERTa-v2 ``config.json`` with PairRM's fields, ``model.safetensors``, the tokenizer
files) and llm-blender's own layout (``config.json`` is llm-blender's ranker config naming the base model, usually
``microsoft/deberta-v3-large``, whose config and tokenizer llm-blender loads and extends with the four marker tokens).
Both store the weights under the same names (``pretrained_model.*``, ``head_layer.*``) and load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import DebertaV2Config, DebertaV2Model, DebertaV2PreTrainedModel

from ..batching import pad_right, run_batched
from ..control_text import MARK, ControlText
from ..conversation import CompletionInput, Message, PromptInput
from ..errors import NonFiniteRewardError, SampleError, nonfinite, raise_first
from ..transforms import sigmoid
from ..rendering import check_alternation, fold_system
from .pairwise_base import PairwiseRewardModel


SOURCE_PREFIX = "<|source|>"
CANDIDATE1_PREFIX = "<|candidate1|>"
CANDIDATE2_PREFIX = "<|candidate2|>"
CANDIDATE_PREFIX = "<|candidate|>"
MARKERS = (SOURCE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX, CANDIDATE_PREFIX)
"""The marker tokens in the order llm-blender adds them to DeBERTa-v3's tokenizer (ids 128001-128004 in PairRM)."""

SOURCE_MAX_LENGTH = 1224
"""The card's source budget in tokens, ``[CLS]``, marker and ``[SEP]`` included."""
CANDIDATE_MAX_LENGTH = 412
"""The card's least candidate budget in tokens; a shorter source leaves each candidate half of what it does not use."""

CONVERSATION_INSTRUCTION = ("Finish the following coversation in each i-th turn by filling in <Response i> with "
                            "your response.")
"""llm-blender's fixed instruction for multi-turn sources, its spelling kept: PairRM was used with this exact text."""

_MIN_PART = 3  # [CLS], the marker and [SEP]: a part shorter than this would lose its marker


class DebertaV2PairRM(DebertaV2PreTrainedModel):
    """PairRM's network: a DeBERTa-v2/v3 encoder (``pretrained_model``) and the pairwise head (``head_layer``).

    Parameter names match both published layouts, so their weights load as they are. The config carries DeBERTa's
    fields plus ``n_tasks`` (head outputs, 1 for PairRM), ``drop_out`` (the head's dropout, inactive in eval),
    ``source_prefix_id``, ``cand1_prefix_id`` and ``cand2_prefix_id`` (the marker token ids).
    """

    base_model_prefix = "pretrained_model"

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        missing = [name for name in ("n_tasks", "drop_out") if getattr(config, name, None) is None]
        if missing:
            raise ValueError(f"a PairRM config needs {', '.join(missing)}")
        hidden = config.hidden_size
        self.pretrained_model = DebertaV2Model(config)
        self.head_layer = nn.Sequential(
            nn.Dropout(config.drop_out),
            nn.Linear(2 * hidden, hidden),
            nn.Tanh(),
            nn.Dropout(config.drop_out),
            nn.Linear(hidden, config.n_tasks),
        )
        self.post_init()

    def marker_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions ``(batch, 3)`` of the first source, candidate1 and candidate2 marker of each row."""
        columns = []
        for name in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id"):
            hits = input_ids == getattr(self.config, name)
            if not bool(hits.any(dim=1).all()):
                raise ValueError(f"a row lacks the marker token {name}={getattr(self.config, name)}")
            columns.append(hits.int().argmax(dim=1))
        return torch.stack(columns, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                marker_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return one logit per row, shape ``(batch,)``: ``> 0`` means candidate 1 is better.

        ``marker_positions`` ``(batch, 3)``: where the source, candidate1 and candidate2 markers sit (found from the
        config's marker ids when omitted, as the original looks them up).
        """
        if marker_positions is None:
            marker_positions = self.marker_positions(input_ids)
        encoder = self.pretrained_model
        # DebertaV2Model.forward keeps every layer's hidden states; only the last one is read here
        embedded = encoder.embeddings(input_ids=input_ids, mask=attention_mask)
        hidden = encoder.encoder(embedded, attention_mask, output_hidden_states=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        source, cand1, cand2 = hidden[rows, marker_positions.to(hidden.device)].unbind(dim=1)
        left = self.head_layer(torch.cat([source, cand1], dim=-1))
        right = self.head_layer(torch.cat([source, cand2], dim=-1))
        return (left - right).mean(dim=-1)


# -- conversations ---------------------------------------------------------------------------------------------------

def source_and_candidate(messages: list[Message], completion: str) -> tuple[str, str]:
    """The source text and candidate text llm-blender builds for ``completion`` answering ``messages`` (see the
    module docstring for the rule); raises ``ValueError`` for roles that do not alternate user/assistant."""
    turns = fold_system(messages)
    if len(turns) == 1:
        return turns[0]["content"], completion
    turns = turns + [{"role": "assistant", "content": completion}]
    check_alternation(turns)
    source = CONVERSATION_INSTRUCTION + "\n".join(
        f"USER: {turns[j]['content']}\nAssistant: <Response {j // 2 + 1}>" for j in range(0, len(turns), 2))
    candidate = "\n".join(f"<Response {j // 2 + 1}>: {turns[j]['content']}" for j in range(1, len(turns), 2))
    return source, candidate


# -- reward model ----------------------------------------------------------------------------------------------------

def check_pairrm_tokenizer(tokenizer: Any, config: DebertaV2Config) -> None:
    """Raise unless ``tokenizer`` maps the markers to the config's ids and normalises text with NFKC as
    PairRM's tokenizer does (transformers 5's ``DebertaV2Tokenizer`` does not: use :func:`load_pairrm_tokenizer`)."""
    for marker, name in ((SOURCE_PREFIX, "source_prefix_id"), (CANDIDATE1_PREFIX, "cand1_prefix_id"),
                         (CANDIDATE2_PREFIX, "cand2_prefix_id")):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if ids != [getattr(config, name)]:
            raise ValueError(f"the tokenizer encodes {marker!r} as {ids}, the model expects "
                             f"[{getattr(config, name)}] ({name}); load it with load_pairrm_tokenizer")
    if tokenizer.pad_token_id is None or tokenizer.sep_token is None:
        raise ValueError("PairRM's tokenizer needs DeBERTa's [PAD] and [SEP] tokens")
    if not normalizes_nfkc(tokenizer):
        raise ValueError("the tokenizer lacks sentencepiece's NFKC normalisation that PairRM's tokenizer applies "
                         "(transformers 5's DebertaV2Tokenizer drops it); load it with load_pairrm_tokenizer")
    if not splits_literal_unk_as_trained(tokenizer):
        raise ValueError("the tokenizer matches a literal '[UNK]' before normalizing, unlike transformers 4's "
                         "DeBERTa-v3 tokenizer PairRM was trained with; load it with load_pairrm_tokenizer")


def normalizes_nfkc(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` reads full-width "Ａ１" as "A1", as NFKC normalisation does."""
    return tokenizer("Ａ１", add_special_tokens=False)["input_ids"] == tokenizer("A1", add_special_tokens=False)[
        "input_ids"]


def splits_literal_unk_as_trained(tokenizer: Any) -> bool:
    """Whether a space before a literal ``"[UNK]"`` becomes its own ``"▁"`` token, as in transformers 4's DeBERTa-v3
    tokenizer, where ``[UNK]`` is a normalized added token (see :func:`load_pairrm_tokenizer`)."""
    ids = tokenizer(f"x {tokenizer.unk_token}", add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[-2:]) == ["▁", tokenizer.unk_token]


@dataclass
class _Comparison:
    """One comparison's model input: its rows (order (A, B), then (B, A) unless both are the same tokens), each
    row's source/candidate1/candidate2 marker positions, and the tokens truncation removed from each row."""

    rows: list[list[int]]
    markers: list[tuple[int, int, int]]
    cut: int


class PairRMRewardModel(PairwiseRewardModel):
    """PairRM as a pairwise reward model: ``compare`` gives ``P(A better) = sigmoid((logit_AB - logit_BA) / 2)``.

    Both orders of every comparison go through the same length-sorted, token-budgeted batched pass, each batch padded
    only to its longest row; each distinct source and candidate is tokenized once.

    Args:
        model: a loaded :class:`DebertaV2PairRM` (see :func:`load_pairrm`).
        tokenizer: PairRM's tokenizer as llm-blender had it (see :func:`load_pairrm_tokenizer`).
        max_length: total tokens per model input (default ``source_max_length + 2 * candidate_max_length``, 2048).
            A smaller total shrinks the source budget in the card's proportion (1224 of 2048).
        source_max_length, candidate_max_length: the budgets (default: the model config's ``source_maxlength`` /
            ``candidate_maxlength`` when it has them, as llm-blender's ranker config does, else the card's 1224/412).
    """

    control_markers = MARKERS
    _control_probe = {"marker": SOURCE_PREFIX}

    def __init__(self, model: nn.Module, *, preset, tokenizer: Any, device: torch.device,
                 max_length: Optional[int] = None, max_batch_tokens: Optional[int] = None,
                 source_max_length: Optional[int] = None, candidate_max_length: Optional[int] = None):
        config = model.config
        source_budget = source_max_length or getattr(config, "source_maxlength", None) or SOURCE_MAX_LENGTH
        candidate_budget = (candidate_max_length or getattr(config, "candidate_maxlength", None)
                            or CANDIDATE_MAX_LENGTH)
        full = source_budget + 2 * candidate_budget
        total = max_length or full
        if total < full:
            source_budget = total * source_budget // full
        if source_budget < _MIN_PART or (total - source_budget) // 2 < _MIN_PART:
            raise ValueError(f"max_length={total} leaves no room for the source and both candidates")
        super().__init__(preset=preset, tokenizer=tokenizer, device=device, max_length=total,
                         max_batch_tokens=max_batch_tokens)
        self.model = model
        self.attn_implementation = getattr(config, "_attn_implementation", None)
        self.source_max_length = source_budget
        self.cand2_id = config.cand2_prefix_id
        check_pairrm_tokenizer(tokenizer, config)
        self.pad_id = tokenizer.pad_token_id
        self.sep_token = tokenizer.sep_token
        # each part is tokenized with [CLS] .. [SEP] added, whatever the preset says of whole texts
        self._control = ControlText(tokenizer, add_special_tokens=True, markers=MARKERS)

    # -- text ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _texts(messages: list[Message], a: str, b: str) -> tuple[str, str, str]:
        """The source text and the two candidate texts of one comparison."""
        try:
            source, a_text = source_and_candidate(messages, a)
            return source, a_text, source_and_candidate(messages, b)[1]
        except ValueError as err:
            raise ValueError(f"pairrm cannot render this conversation: {err}") from None

    def _truncation_rule(self) -> str:
        return (f"the source cut to {self.source_max_length} tokens and each candidate to its share of the rest, "
                "at their ends, as llm-blender truncates")

    def _render_pair(self, messages: list[Message], a: str, b: str) -> list[str]:
        """The model's input for orders (A, B) and (B, A) as text, before tokenization and truncation: the three
        parts, each ``[CLS] marker text [SEP]``, concatenated."""
        source, a, b = self._texts(messages, a, b)

        def part(marker: str, text: str) -> str:
            return f"[CLS]{marker}{self.shown(text).replace(self.sep_token, ' ')}[SEP]"

        src = part(SOURCE_PREFIX, source)
        return [src + part(CANDIDATE1_PREFIX, a) + part(CANDIDATE2_PREFIX, b),
                src + part(CANDIDATE1_PREFIX, b) + part(CANDIDATE2_PREFIX, a)]

    def encode(self, prompt: PromptInput, completion_a: CompletionInput, completion_b: CompletionInput
               ) -> list[list[int]]:
        """The token ids the model reads for orders (A, B) and (B, A), truncated as llm-blender truncates (for
        debugging; identical candidates give one row, which serves both orders)."""
        with self.session("encode"):
            source, a, b = self._texts(*self._one(prompt, completion_a, completion_b, count=True))
            candidates = self._tokenize(CANDIDATE1_PREFIX, [a, b])
            return self._encode(self._tokenize(SOURCE_PREFIX, [source])[source], candidates[a], candidates[b]).rows

    def _tokenize(self, marker: str, texts: Sequence[str]) -> dict[str, list[int]]:
        """``[CLS] marker text [SEP]`` ids of each distinct text, untruncated (cut later so the cut is counted);
        escaped control text (see ``control_text``) is read as text."""
        unique = list(dict.fromkeys(texts))
        guarded = [t for t in unique if self.control_text == "text" and MARK in t]
        plain = [t for t in unique if t not in set(guarded)]
        # the collator replaces the separator's text so each part holds exactly one [SEP] (in both modes)
        encoded = dict(zip(plain, self.tokenizer([marker + t.replace(self.sep_token, " ") for t in plain],
                                                 add_special_tokens=True)["input_ids"])) if plain else {}
        for t in guarded:
            encoded[t] = self._control.content_ids(marker, self._control.restore(t).replace(self.sep_token, " "))
        return encoded

    @staticmethod
    def _cut(ids: list[int], limit: int) -> list[int]:
        """transformers' right truncation of one sequence: the first ``limit - 1`` tokens and the final ``[SEP]``."""
        return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]

    def _encode(self, source_ids: list[int], a_ids: list[int], b_ids: list[int]) -> _Comparison:
        src = self._cut(source_ids, self.source_max_length)
        budget = (self.max_length - len(src)) // 2
        a, b = self._cut(a_ids, budget), self._cut(b_ids, budget)
        cut = len(source_ids) + len(a_ids) + len(b_ids) - len(src) - len(a) - len(b)
        # candidates were tokenized with <|candidate1|> at index 1; the second slot gets <|candidate2|>
        a2, b2 = a[:1] + [self.cand2_id] + a[2:], b[:1] + [self.cand2_id] + b[2:]
        n = len(src)
        if a == b:
            # one row serves both orders: logit_BA == logit_AB, so P is exactly 0.5
            return _Comparison([src + a + b2], [(1, n + 1, n + len(a) + 1)], cut)
        return _Comparison([src + a + b2, src + b + a2],
                           [(1, n + 1, n + len(a) + 1), (1, n + 1, n + len(b) + 1)], cut)

    # -- model -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, batch: list[_Comparison]) -> list[list[float]]:
        rows = [row for c in batch for row in c.rows]
        input_ids, mask = pad_right(rows, self.pad_id, self.device)
        markers = torch.tensor([m for c in batch for m in c.markers], device=self.device)
        logits = self.model(input_ids, mask, markers).float().cpu().tolist()
        out, start = [], 0
        for c in batch:
            out.append(logits[start:start + len(c.rows)])
            start += len(c.rows)
        return out

    def _logits(self, items: list[tuple[list[Message], str, str]]
                ) -> list[Union[tuple[float, float], SampleError]]:
        texts: list[Union[tuple[str, str, str], SampleError]] = []
        for k, (messages, a, b) in enumerate(items):
            try:
                texts.append(self._texts(messages, a, b))
            except ValueError as err:
                texts.append(SampleError(k, str(err)))
        ok = [t for t in texts if not isinstance(t, SampleError)]
        sources = self._tokenize(SOURCE_PREFIX, [s for s, _, _ in ok])
        candidates = self._tokenize(CANDIDATE1_PREFIX, [c for _, a, b in ok for c in (a, b)])
        comparisons = [self._encode(sources[s], candidates[a], candidates[b]) for s, a, b in ok]
        # a comparison's rows share one batch; its cost is their total length, so the budget counts rows x width
        lengths = [sum(len(r) for r in c.rows) for c in comparisons]
        results = iter(run_batched(comparisons, lengths, self._forward, max_batch_tokens=self.max_batch_tokens,
                                   stats=self.stats))
        for c in comparisons:
            self.stats.samples += len(c.rows)
            if c.cut:
                # every row holds the whole (truncated) source and both (truncated) candidates
                self.stats.truncated += len(c.rows)
                self.stats.truncated_tokens += c.cut * len(c.rows)
        out: list[Union[tuple[float, float], SampleError]] = []
        for t in texts:
            if isinstance(t, SampleError):
                out.append(t)
            else:
                r = next(results)
                logits = (r[0], r[-1])  # a lone row serves both orders (identical candidates)
                # sigmoid(inf) is exactly 1: an infinite logit would pass for a certain preference
                bad = next((nonfinite(x) for x in logits if nonfinite(x)), None)
                out.append(logits if bad is None else NonFiniteRewardError(
                    len(out), f"pairrm returned a {bad} logit for this comparison (logit_AB {logits[0]}, "
                              f"logit_BA {logits[1]})", "pair"))
        return out

    def compare_logits(self, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                       completions_b: Sequence[CompletionInput]) -> list[tuple[float, float]]:
        """``(logit_AB, logit_BA)`` per comparison: the model's logit with ``completions_a[i]`` as candidate 1, and
        with ``completions_b[i]`` as candidate 1 (``> 0``: candidate 1 better). llm-blender's
        ``compare(..., return_logits=True)`` is ``logit_AB - logit_BA``."""
        with self.session("compare_logits"):
            items = []
            for messages, a, b in raise_first(self.prepare(prompts, completions_a, completions_b,
                                                           names=("completions_a", "completions_b"))):
                messages, (a, b) = self._guard(messages, [a, b])
                items.append((messages, a, b))
            results = self._logits(items)
            self.stats.nonfinite += sum(isinstance(r, NonFiniteRewardError) for r in results)
            return raise_first([r.at(k, f"prompts[{k}]" if r.about == "prompt"
                                     else f"completions_a[{k}] and completions_b[{k}]")
                                if isinstance(r, SampleError) else r for k, r in enumerate(results)])

    def compare_log_odds(self, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                         completions_b: Sequence[CompletionInput]) -> list[float]:
        """``log(P / (1 - P)) = (logit_AB - logit_BA) / 2`` per comparison, from the logits (never saturated), for
        :func:`rlhf_rewards.pairwise.rank`: half of llm-blender's ``M[A, B] - M[B, A]``."""
        return [(ab - ba) / 2 for ab, ba in self.compare_logits(prompts, completions_a, completions_b)]

    def _compare_both_orders(self, items: list[tuple[list[Message], str, str]]
                             ) -> list[Union[tuple[float, float, float], SampleError]]:
        """``(p_ab, p_ba, p)``: ``sigmoid(logit_AB)``, ``sigmoid(-logit_BA)`` and
        ``sigmoid((logit_AB - logit_BA) / 2)``, each the probability that A is better."""
        return [r if isinstance(r, SampleError) else (sigmoid(r[0]), sigmoid(-r[1]), sigmoid((r[0] - r[1]) / 2))
                for r in self._logits(items)]
