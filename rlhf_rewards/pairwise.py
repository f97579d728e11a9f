"""From preferences to rewards: transforms of P(a better than b), rewards within a group of completions, best-of-n
and ranking. Works with any model: pairwise models compare; scalar models are compared through their scores.

Ties: a preference of exactly 0.5 is a tie. It maps to the transform's midpoint (0 for ``"logodds"`` and
``"centered"``, 0.5 for ``"probability"``); in a knockout the current holder keeps its place; in rankings the
earlier candidate comes first. Two identical completion strings are a tie without running the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Literal, Union

from .backends.base import raise_first
from .chat_parsing import completion_text
from .conversation import (CompletionInput, Message, PromptInput, SampleError, check_same_length, normalize_completion,
                           normalize_prompt)

Transform = Literal["probability", "centered", "logodds"]

LOGODDS_BOUND = 10.0
"""``"logodds"`` rewards are clipped to ``[-LOGODDS_BOUND, LOGODDS_BOUND]`` (P within about 4.5e-5 of 0 or 1), so a
saturated preference cannot dominate a batch of advantages."""

GroupMode = Literal["round-robin", "anchor"]


def apply_transform(probabilities: Sequence[float], transform: Transform = "logodds", *,
                    bound: float = LOGODDS_BOUND) -> list[float]:
    """Turn preferences ``P`` into rewards.

    ``"probability"``: ``P`` in [0, 1]; ``"centered"``: ``2P - 1`` in [-1, 1]; ``"logodds"`` (default):
    ``log(P / (1 - P))`` clipped to ``[-bound, bound]``, the Bradley-Terry reward difference implied by ``P``.
    """
    if transform == "probability":
        return [float(p) for p in probabilities]
    if transform == "centered":
        return [2.0 * p - 1.0 for p in probabilities]
    if transform == "logodds":
        out = []
        for p in probabilities:
            if p <= 0.0:
                out.append(-bound)
            elif p >= 1.0:
                out.append(bound)
            else:
                out.append(max(-bound, min(bound, math.log(p) - math.log1p(-p))))
        return out
    raise ValueError(f"unknown transform {transform!r}; expected 'probability', 'centered' or 'logodds'")


def _prompt_of(model, prompt: PromptInput, where: str) -> tuple[list[Message], str]:
    """The prompt's messages and chat format as ``model`` reads them (its ``parse_templates`` rule); any other
    object with ``kind`` and ``compare``/``score`` gets the prompt validated as it is."""
    parse = getattr(model, "_prompt", None)
    return parse(prompt, where) if parse is not None else (normalize_prompt(prompt, where), "plain")


def _group_messages(model, prompts: Sequence[PromptInput], group_size: int) -> list[list[Message]]:
    """Each group's prompt as messages, every prompt validated (and parsed, when the model parses templated
    prompts) once; raises unless each group's prompts are the same conversation."""
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} completions do not split into groups of {group_size}")
    groups = []
    for start in range(0, len(prompts), group_size):
        first = _prompt_of(model, prompts[start], f"prompts[{start}]")[0]
        for k in range(start + 1, start + group_size):
            if _prompt_of(model, prompts[k], f"prompts[{k}]")[0] != first:
                raise ValueError(f"prompts[{k}] differs from prompts[{start}], the first of its group of "
                                 f"{group_size}: a group's completions must answer the same prompt")
        groups.append(first)
    return groups


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, x))))


def _preference_samples(model, items: Sequence[tuple[list[Message], str, str]]
                        ) -> list[Union[float, SampleError]]:
    """``P(a better than b)`` or the :class:`SampleError` (no location) per validated ``(messages, a, b)``: a
    pairwise model's comparison; for a scalar model, the Bradley-Terry probability ``sigmoid(r(a) - r(b))``."""
    n = len(items)
    if not hasattr(model, "_compare_prepared" if model.kind == "pairwise" else "_score_prepared"):
        # a model of the caller's own with only the public methods: its errors raise
        messages, a, b = [m for m, _, _ in items], [x for _, x, _ in items], [y for _, _, y in items]
        return preferences(model, messages, a, b)
    if model.kind == "pairwise":
        return model._compare_prepared(items)
    rewards = model._score_prepared([(m, a, None) for m, a, _ in items] + [(m, b, None) for m, _, b in items])
    out: list[Union[float, SampleError]] = []
    for k in range(n):
        ra, rb = rewards[k], rewards[n + k]
        bad = next((r for r in (ra, rb) if isinstance(r, SampleError)), None)
        out.append(SampleError(k, str(bad), "pair" if bad.about != "prompt" else "prompt") if bad
                   else _sigmoid(ra - rb))
    return out


def preferences(model, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                completions_b: Sequence[CompletionInput]) -> list[float]:
    """``P(a better than b)`` from any model: a pairwise model's ``compare``; for a scalar model, the
    Bradley-Terry probability ``sigmoid(r(a) - r(b))`` of its scores."""
    if model.kind == "pairwise":
        return model.compare(prompts, completions_a, completions_b)
    check_same_length(prompts=prompts, completions_a=completions_a, completions_b=completions_b)
    rewards = model.score(list(prompts) + list(prompts), list(completions_a) + list(completions_b))
    n = len(prompts)
    return [_sigmoid(ra - rb) for ra, rb in zip(rewards[:n], rewards[n:])]


def _compare_within(model, prompts: Sequence[list[Message]], groups: Sequence[Sequence[str]], mode: GroupMode
                    ) -> list[tuple[int, int, Union[float, SampleError]]]:
    """Compare members of each group (validated ``prompts[g]`` messages with the texts ``groups[g]``) in one
    batched call; return ``(i, j, P(member i beats member j) or why it cannot be had)`` with ``i``, ``j`` indices
    into the flattened groups."""
    if mode not in ("round-robin", "anchor"):
        raise ValueError(f"unknown group mode {mode!r}; expected 'round-robin' or 'anchor'")
    items, where = [], []
    offset = 0
    for messages, members in zip(prompts, groups):
        n = len(members)
        pairs = ([(i, j) for i in range(n) for j in range(i + 1, n)] if mode == "round-robin"
                 else [(i, 0) for i in range(1, n)])
        for i, j in pairs:
            items.append((messages, members[i], members[j]))
            where.append((offset + i, offset + j))
        offset += n
    call = getattr(model, "_call", None)
    with call("group comparison") if call is not None else contextlib.nullcontext():
        probs = _preference_samples(model, items) if items else []
    return [(i, j, p) for (i, j), p in zip(where, probs)]


def rewards_within_groups(model, prompts: Sequence[list[Message]], groups: Sequence[Sequence[str]], *,
                          mode: GroupMode = "round-robin", transform: Transform = "logodds"
                          ) -> list[Union[float, SampleError]]:
    """:func:`group_rewards` on validated inputs (each group's messages and its completion texts, groups of any
    size), per completion (flattened) its reward or the :class:`SampleError` saying why it has none.

    A comparison that cannot be made (e.g. two pair-PM responses too long together) is left out of both members'
    means; a member left with no comparison, in a group that has other members, has no reward: its error is the
    reason of its first failed comparison.
    """
    apply_transform([0.5], transform)
    results = _compare_within(model, prompts, groups, mode)
    ok = [(i, j, p) for i, j, p in results if not isinstance(p, SampleError)]
    forward = apply_transform([p for _, _, p in ok], transform)
    backward = apply_transform([1.0 - p for _, _, p in ok], transform)
    size = sum(len(g) for g in groups)
    totals, counts = [0.0] * size, [0] * size
    for (i, j, _), f, b in zip(ok, forward, backward):
        totals[i] += f
        counts[i] += 1
        if mode == "round-robin":
            totals[j] += b
            counts[j] += 1
    failed: dict[int, SampleError] = {}
    for i, j, p in results:
        if isinstance(p, SampleError):
            failed.setdefault(i, p)
            if mode == "round-robin" or p.about == "prompt":
                failed.setdefault(j, p)
    tie = apply_transform([0.5], transform)[0]
    out: list[Union[float, SampleError]] = []
    for k in range(size):
        if counts[k]:
            out.append(totals[k] / counts[k])
        elif k in failed:
            out.append(SampleError(k, str(failed[k]), failed[k].about))
        else:
            out.append(tie)
    return out


def group_rewards(model, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], group_size: int,
                  *, mode: GroupMode = "round-robin", transform: Transform = "logodds") -> list[float]:
    """Rewards of consecutive groups of ``group_size`` completions of one prompt (GRPO/RLOO's layout).

    ``"round-robin"``: each completion's reward is the mean of ``transform(P(it beats k))`` over the other members
    ``k`` of its group; ``n(n-1)/2`` comparisons per group (each in both orders). ``"anchor"``: linear cost, each
    completion is compared with its group's first completion (the anchor), whose own reward is the tie value.
    A group of one gets the tie value. Raises ``ValueError`` naming the first completion that cannot be scored
    (see :func:`rewards_within_groups` for per-completion errors).
    """
    check_same_length(prompts=prompts, completions=completions)
    messages = _group_messages(model, prompts, group_size)
    texts = [normalize_completion(c, f"completions[{i}]") for i, c in enumerate(completions)]
    groups = [texts[g * group_size:(g + 1) * group_size] for g in range(len(messages))]
    results = rewards_within_groups(model, messages, groups, mode=mode, transform=transform)
    return raise_first([r.at(k, f"completions[{k}]") if isinstance(r, SampleError) else r
                        for k, r in enumerate(results)])


def _check_candidates(prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]]) -> None:
    check_same_length(prompts=prompts, candidates=candidates)
    for i, cands in enumerate(candidates):
        if isinstance(cands, str) or not isinstance(cands, Sequence) or len(cands) == 0:
            raise ValueError(f"candidates[{i}]: expected a non-empty list of completions")
        for j, c in enumerate(cands):
            normalize_completion(c, f"candidates[{i}][{j}]")


def best_of_n(model, prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]]) -> list[int]:
    """Index of the best candidate for each prompt.

    Scalar models: the argmax of the scores (the lowest index among equal scores). Pairwise models: a knockout
    tournament, ``n - 1`` comparisons per prompt (each in both orders), batched across prompts round by round;
    a challenger replaces the holder only when ``P(challenger better) > 0.5``, so ties keep the earlier candidate.
    """
    _check_candidates(prompts, candidates)
    if not candidates:
        return []
    if model.kind == "scalar":
        flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
        flat_c = [c for cands in candidates for c in cands]
        scores = model.score(flat_p, flat_c)
        best, start = [], 0
        for cands in candidates:
            chunk = scores[start:start + len(cands)]
            best.append(max(range(len(chunk)), key=lambda k: (chunk[k], -k)))
            start += len(cands)
        return best
    holder = [0] * len(prompts)
    for rnd in range(1, max(len(c) for c in candidates)):
        live = [i for i, c in enumerate(candidates) if rnd < len(c)]
        probs = model.compare([prompts[i] for i in live], [candidates[i][rnd] for i in live],
                              [candidates[i][holder[i]] for i in live])
        for i, p in zip(live, probs):
            if p > 0.5:
                holder[i] = rnd
    return holder


def rank(model, prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]]) -> list[list[int]]:
    """For each prompt, its candidates' indices from best to worst.

    Scalar models: by score. Pairwise models: a full round robin, ``n(n-1)/2`` comparisons per prompt (each in
    both orders), candidates ordered by their summed probability of beating the others. Equal values keep the
    earlier candidate first.
    """
    _check_candidates(prompts, candidates)
    flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
    flat_c = [c for cands in candidates for c in cands]
    if model.kind == "scalar":
        values = model.score(flat_p, flat_c)
    else:
        values = [0.0] * len(flat_c)
        messages, groups = [], []
        for g, (prompt, cands) in enumerate(zip(prompts, candidates)):
            m, fmt = _prompt_of(model, prompt, f"prompts[{g}]")
            messages.append(m)
            groups.append([completion_text(c, fmt, f"candidates[{g}][{k}]") for k, c in enumerate(cands)])
        where = [f"candidates[{g}][{k}]" for g, cands in enumerate(candidates) for k in range(len(cands))]
        for i, j, p in _compare_within(model, messages, groups, "round-robin"):
            if isinstance(p, SampleError):
                raise p.at(i, f"{where[i]} and {where[j]}")
            values[i] += p
            values[j] += 1.0 - p
    order, start = [], 0
    for cands in candidates:
        chunk = values[start:start + len(cands)]
        order.append(sorted(range(len(chunk)), key=lambda k: (-chunk[k], k)))
        start += len(cands)
    return order
