"""From preferences to rewards: transforms of P(a better than b), rewards within a group of completions, best-of-n
and ranking. Works with any model: pairwise models compare; scalar models are compared through their scores.

Ties: a preference of exactly 0.5 is a tie. It maps to the transform's midpoint (0 for ``"logodds"`` and
``"centered"``, 0.5 for ``"probability"``); in a knockout the current holder keeps its place; in rankings the
earlier candidate comes first. Two identical completion strings are a tie without running the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from .conversation import CompletionInput, PromptInput, check_same_length, normalize_completion, normalize_prompt

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


def _check_groups(prompts: Sequence[PromptInput], group_size: int) -> int:
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} completions do not split into groups of {group_size}")
    for start in range(0, len(prompts), group_size):
        first = normalize_prompt(prompts[start], f"prompts[{start}]")
        for k in range(start + 1, start + group_size):
            if normalize_prompt(prompts[k], f"prompts[{k}]") != first:
                raise ValueError(f"prompts[{k}] differs from prompts[{start}], the first of its group of "
                                 f"{group_size}: a group's completions must answer the same prompt")
    return len(prompts) // group_size


def preferences(model, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                completions_b: Sequence[CompletionInput]) -> list[float]:
    """``P(a better than b)`` from any model: a pairwise model's ``compare``; for a scalar model, the
    Bradley-Terry probability ``sigmoid(r(a) - r(b))`` of its scores."""
    if model.kind == "pairwise":
        return model.compare(prompts, completions_a, completions_b)
    check_same_length(prompts=prompts, completions_a=completions_a, completions_b=completions_b)
    rewards = model.score(list(prompts) + list(prompts), list(completions_a) + list(completions_b))
    n = len(prompts)
    return [1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, ra - rb)))) for ra, rb in zip(rewards[:n], rewards[n:])]


def _compare_within(model, prompts: Sequence[PromptInput], groups: Sequence[Sequence[CompletionInput]],
                    mode: GroupMode) -> list[tuple[int, int, float]]:
    """Compare members of each group (``prompts[g]`` with ``groups[g]``) in one batched call; return
    ``(i, j, P(member i beats member j))`` with ``i``, ``j`` indices into the flattened groups."""
    if mode not in ("round-robin", "anchor"):
        raise ValueError(f"unknown group mode {mode!r}; expected 'round-robin' or 'anchor'")
    pa, pb, pp, where = [], [], [], []
    offset = 0
    for prompt, members in zip(prompts, groups):
        n = len(members)
        pairs = ([(i, j) for i in range(n) for j in range(i + 1, n)] if mode == "round-robin"
                 else [(i, 0) for i in range(1, n)])
        for i, j in pairs:
            pp.append(prompt)
            pa.append(members[i])
            pb.append(members[j])
            where.append((offset + i, offset + j))
        offset += n
    probs = preferences(model, pp, pa, pb) if pa else []
    return [(i, j, p) for (i, j), p in zip(where, probs)]


def group_rewards(model, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], group_size: int,
                  *, mode: GroupMode = "round-robin", transform: Transform = "logodds") -> list[float]:
    """Rewards of consecutive groups of ``group_size`` completions of one prompt (GRPO/RLOO's layout).

    ``"round-robin"``: each completion's reward is the mean of ``transform(P(it beats k))`` over the other members
    ``k`` of its group; ``n(n-1)/2`` comparisons per group (each in both orders). ``"anchor"``: linear cost, each
    completion is compared with its group's first completion (the anchor), whose own reward is the tie value.
    A group of one gets the tie value.
    """
    n_groups = _check_groups(prompts, group_size)
    check_same_length(prompts=prompts, completions=completions)
    groups = [completions[g * group_size:(g + 1) * group_size] for g in range(n_groups)]
    results = _compare_within(model, [prompts[g * group_size] for g in range(n_groups)], groups, mode)
    forward = apply_transform([p for _, _, p in results], transform)
    backward = apply_transform([1.0 - p for _, _, p in results], transform)
    totals = [0.0] * len(completions)
    counts = [0] * len(completions)
    for (i, j, _), f, b in zip(results, forward, backward):
        totals[i] += f
        counts[i] += 1
        if mode == "round-robin":
            totals[j] += b
            counts[j] += 1
    tie = apply_transform([0.5], transform)[0]
    return [t / c if c else tie for t, c in zip(totals, counts)]


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
    return knockout(model, prompts, candidates)


def knockout(model, prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]], *,
             worst: bool = False) -> list[int]:
    """Index of the best (or with ``worst=True``, the worst) candidate for each prompt by a knockout tournament of
    preferences: ``n - 1`` comparisons per prompt, batched across prompts round by round. A challenger replaces the
    holder only when strictly preferred to it (``worst``: strictly dispreferred), so ties keep the earlier candidate.
    """
    _check_candidates(prompts, candidates)
    holder = [0] * len(prompts)
    for rnd in range(1, max(len(c) for c in candidates)):
        live = [i for i, c in enumerate(candidates) if rnd < len(c)]
        probs = preferences(model, [prompts[i] for i in live], [candidates[i][rnd] for i in live],
                            [candidates[i][holder[i]] for i in live])
        for i, p in zip(live, probs):
            if (p < 0.5) if worst else (p > 0.5):
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
        for i, j, p in _compare_within(model, prompts, candidates, "round-robin"):
            values[i] += p
            values[j] += 1.0 - p
    order, start = [], 0
    for cands in candidates:
        chunk = values[start:start + len(cands)]
        order.append(sorted(range(len(chunk)), key=lambda k: (-chunk[k], k)))
        start += len(cands)
    return order
