"""From preferences to rewards: transforms of P(a better than b), rewards within a group of completions, best-of-n
and ranking. Works with any model: pairwise models compare; scalar models are compared through their scores.

Ties: a preference of exactly 0.5 is a tie. It maps to the transform's midpoint (0 for ``"logodds"`` and
``"centered"``, 0.5 for ``"probability"``); in a knockout the current holder keeps its place; in rankings the
earlier candidate comes first. Two identical completion strings are a tie without running the model: within one
prompt's candidates or group, each distinct text is compared (or scored) once, so duplicates get exactly equal
values and keep their index order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

from .conversation import (CompletionInput, Message, PromptInput, Sample, check_same_length, normalize_completion,
                           normalize_prompt)
from .errors import SampleError, raise_first
from .groups import check_group_size, group_bounds
from .transforms import Transform, apply_transform, logit, sigmoid

GroupMode = Literal["round-robin", "anchor"]


def _prepared(model, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]
              ) -> list[Union[Sample, SampleError]]:
    """Per completion its :class:`~rlhf_rewards.conversation.Sample` as ``model`` reads it (its
    ``parse_templates`` rule: templated prompts parsed, end-of-turn markers stripped) or its error; a model of the
    caller's own without :meth:`~rlhf_rewards.backends.base.RewardModel.prepare` gets the inputs validated as they
    are."""
    prepare = getattr(model, "prepare", None)
    if prepare is not None:
        return prepare(prompts, completions)
    check_same_length(prompts=prompts, completions=completions)
    out: list[Union[Sample, SampleError]] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            out.append(Sample(normalize_prompt(prompt, f"prompts[{i}]"),
                              normalize_completion(completion, f"completions[{i}]")))
        except ValueError as err:
            out.append(SampleError(i, str(err)))
    return out


def _preference_samples(model, items: Sequence[tuple[list[Message], str, str]]
                        ) -> list[Union[float, SampleError]]:
    """``P(a better than b)`` or the :class:`SampleError` (no location) per validated ``(messages, a, b)``: a
    pairwise model's comparison; for a scalar model, the Bradley-Terry probability ``sigmoid(r(a) - r(b))``."""
    if getattr(model, "run", None) is None:
        # a model of the caller's own with only the public methods: its errors raise
        messages, a, b = [m for m, _, _ in items], [x for _, x, _ in items], [y for _, _, y in items]
        return preferences(model, messages, a, b)
    if model.kind == "pairwise":
        return model.run([Sample(m, a, b) for m, a, b in items])
    # each distinct (prompt, text) is scored once: a group's round robin names every text n - 1 times
    index: dict[tuple[int, str], int] = {}
    unique: list[Sample] = []
    for m, a, b in items:
        for text in (a, b):
            if (id(m), text) not in index:
                index[id(m), text] = len(unique)
                unique.append(Sample(m, text))
    rewards = model.run(unique)
    out: list[Union[float, SampleError]] = []
    for m, a, b in items:
        ra, rb = rewards[index[id(m), a]], rewards[index[id(m), b]]
        bad = next((r for r in (ra, rb) if isinstance(r, SampleError)), None)
        out.append(type(bad)(len(out), str(bad), "pair" if bad.about != "prompt" else "prompt") if bad
                   else sigmoid(ra - rb))
    return out


@dataclass
class _Group:
    """One prompt's members reduced to their distinct completion texts: ``first[u]`` is the index of distinct
    text ``u``'s first member, ``of[i]`` the distinct text of member ``i``, ``count[u]`` how many members share it."""

    prompt: PromptInput
    members: Sequence[CompletionInput]
    first: list[int]
    of: list[int]
    count: list[int]

    @classmethod
    def of_members(cls, prompt: PromptInput, members: Sequence[CompletionInput], where: str, offset: int = 0
                   ) -> "_Group":
        """The group of ``members``; member ``i`` is named ``where[offset + i]`` in errors."""
        index: dict[str, int] = {}
        first, of, count = [], [], []
        for i, member in enumerate(members):
            u = index.setdefault(normalize_completion(member, f"{where}[{offset + i}]"), len(first))
            if u == len(first):
                first.append(i)
                count.append(0)
            of.append(u)
            count[u] += 1
        return cls(prompt, members, first, of, count)

    def distinct(self) -> list[CompletionInput]:
        return [self.members[i] for i in self.first]


def _scores_once(model, groups: Sequence[_Group]) -> list[list[float]]:
    """A scalar model's score of each distinct completion of each group, every one computed once (in one call), so
    members with the same text get exactly the same score whatever the batch composition."""
    flat_p = [g.prompt for g in groups for _ in g.first]
    flat_c = [c for g in groups for c in g.distinct()]
    scores = model.score(flat_p, flat_c) if flat_c else []
    out, start = [], 0
    for g in groups:
        out.append(list(scores[start:start + len(g.first)]))
        start += len(g.first)
    return out


def _distinct_pairs(groups: Sequence[_Group], mode: GroupMode) -> list[tuple[int, int, int]]:
    """``(group, u, v)`` for the distinct texts each group compares: every pair ``u < v`` ("round-robin"), or each
    text against the anchor's (member 0's) text ("anchor")."""
    if mode not in ("round-robin", "anchor"):
        raise ValueError(f"unknown group mode {mode!r}; expected 'round-robin' or 'anchor'")
    pairs = []
    for g, group in enumerate(groups):
        n = len(group.first)
        if mode == "round-robin":
            pairs += [(g, u, v) for u in range(n) for v in range(u + 1, n)]
        else:
            pairs += [(g, u, group.of[0]) for u in range(n) if u != group.of[0]]
    return pairs


def preferences(model, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                completions_b: Sequence[CompletionInput]) -> list[float]:
    """``P(a better than b)`` from any model: a pairwise model's ``compare``; for a scalar model, the
    Bradley-Terry probability ``sigmoid(r(a) - r(b))`` of its scores."""
    if model.kind == "pairwise":
        return model.compare(prompts, completions_a, completions_b)
    check_same_length(prompts=prompts, completions_a=completions_a, completions_b=completions_b)
    rewards = model.score(list(prompts) + list(prompts), list(completions_a) + list(completions_b))
    n = len(prompts)
    return [sigmoid(ra - rb) for ra, rb in zip(rewards[:n], rewards[n:])]


def rewards_within_groups(model, prompts: Sequence[list[Message]], groups: Sequence[Sequence[str]], *,
                          mode: GroupMode = "round-robin", transform: Transform = "logodds"
                          ) -> list[Union[float, SampleError]]:
    """:func:`group_rewards` on validated inputs (each group's messages and its completion texts, groups of any
    size), per completion (flattened) its reward or the :class:`SampleError` saying why it has none.

    Each distinct text of a group is compared once; its duplicates are ties with it and get exactly its reward. A
    comparison that cannot be made (e.g. two pair-PM responses too long together) is left out of both members'
    means; a member left with no comparison, in a group that has other members, has no reward: its error is the
    reason of its first failed comparison.
    """
    tie = apply_transform([0.5], transform)[0]
    distinct = [_Group.of_members(messages, texts, "completions") for messages, texts in zip(prompts, groups)]
    pairs = _distinct_pairs(distinct, mode)
    items = [(distinct[g].prompt, distinct[g].members[distinct[g].first[u]], distinct[g].members[distinct[g].first[v]])
             for g, u, v in pairs]
    session = getattr(model, "session", None)
    with session("group comparison") if session is not None else contextlib.nullcontext():
        probs = _preference_samples(model, items) if items else []
    ok = [(pair, p) for pair, p in zip(pairs, probs) if not isinstance(p, SampleError)]
    forward = apply_transform([p for _, p in ok], transform)
    backward = apply_transform([1.0 - p for _, p in ok], transform)
    # per distinct text u: the sum of its rewards against member opponents and their number (round robin: its own
    # duplicates are ties), and how many real comparisons succeeded
    total = [[tie * (n - 1) if mode == "round-robin" else 0.0 for n in grp.count] for grp in distinct]
    weight = [[n - 1 if mode == "round-robin" else 0 for n in grp.count] for grp in distinct]
    made = [[0] * len(grp.count) for grp in distinct]
    for ((g, u, v), _), f, b in zip(ok, forward, backward):
        count = distinct[g].count
        made[g][u] += 1
        if mode == "anchor":
            total[g][u], weight[g][u] = f, 1
            continue
        made[g][v] += 1
        total[g][u] += f * count[v]
        weight[g][u] += count[v]
        total[g][v] += b * count[u]
        weight[g][v] += count[u]
    failed: dict[tuple[int, int], SampleError] = {}
    for (g, u, v), p in zip(pairs, probs):
        if isinstance(p, SampleError):
            failed.setdefault((g, u), p)
            if mode == "round-robin" or p.about == "prompt":
                failed.setdefault((g, v), p)
    out: list[Union[float, SampleError]] = []
    for g, grp in enumerate(distinct):
        for u in grp.of:
            k = len(out)
            if not made[g][u] and (g, u) in failed:
                out.append(type(failed[g, u])(k, str(failed[g, u]), failed[g, u].about))
            else:
                out.append(total[g][u] / weight[g][u] if weight[g][u] else tie)
    return out


def group_rewards(model, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], group_size: int,
                  *, mode: GroupMode = "round-robin", transform: Transform = "logodds") -> list[float]:
    """Rewards of consecutive groups of ``group_size`` completions of one prompt (GRPO/RLOO's layout).

    ``"round-robin"``: each completion's reward is the mean of ``transform(P(it beats k))`` over the other members
    ``k`` of its group; ``n(n-1)/2`` comparisons per group (each in both orders). ``"anchor"``: linear cost, each
    completion is compared with its group's first completion (the anchor), whose own reward is the tie value.
    ``group_size`` is a whole number, at least 2 (``ValueError`` otherwise). Members with the same text are a tie
    with each other and get exactly the same reward: each distinct text is compared (or, for scalar models, scored)
    once. Raises ``ValueError`` naming the first completion that cannot be scored (see
    :func:`rewards_within_groups` for per-completion errors).
    """
    check_group_size(group_size)
    samples = raise_first(_prepared(model, prompts, completions))
    bounds = group_bounds([s.messages for s in samples], group_size)
    results = rewards_within_groups(model, [samples[start].messages for start, _ in bounds],
                                    [[samples[i].completion for i in range(start, end)] for start, end in bounds],
                                    mode=mode, transform=transform)
    return raise_first([r.at(k, f"completions[{k}]") if isinstance(r, SampleError) else r
                        for k, r in enumerate(results)])


def _check_candidates(prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]]
                      ) -> list[_Group]:
    check_same_length(prompts=prompts, candidates=candidates)
    for i, cands in enumerate(candidates):
        if isinstance(cands, str) or not isinstance(cands, Sequence) or len(cands) == 0:
            raise ValueError(f"candidates[{i}]: expected a non-empty list of completions")
    return [_Group.of_members(p, cands, f"candidates[{i}]") for i, (p, cands) in enumerate(zip(prompts, candidates))]


def best_of_n(model, prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]]) -> list[int]:
    """Index of the best candidate for each prompt.

    Scalar models: the argmax of the scores (the lowest index among equal scores). Pairwise models: a knockout
    tournament, one comparison (in both orders) per distinct candidate after the first, batched across prompts round
    by round; a challenger replaces the holder only when ``P(challenger better) > 0.5``, so ties keep the earlier
    candidate. Candidates with the same text are computed once and count as the first of them.
    """
    groups = _check_candidates(prompts, candidates)
    if not groups:
        return []
    if model.kind != "pairwise":  # scalar and process models score each candidate
        return [g.first[max(range(len(s)), key=lambda u: (s[u], -u))]
                for g, s in zip(groups, _scores_once(model, groups))]
    return knockout(model, prompts, candidates)


def knockout(model, prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]], *,
             worst: bool = False) -> list[int]:
    """Index of the best (or with ``worst=True``, the worst) candidate for each prompt by a knockout tournament of
    pairwise preferences: one comparison (in both orders) per distinct candidate after the first, batched across
    prompts round by round. A challenger replaces the holder only when strictly preferred to it (``worst``: strictly
    dispreferred, ``P < 0.5``), so ties keep the earlier candidate; candidates with the same text count as the first
    of them."""
    groups = _check_candidates(prompts, candidates)
    if not groups:
        return []
    holder = [0] * len(groups)  # a distinct-text index
    for rnd in range(1, max(len(g.first) for g in groups)):
        live = [k for k, g in enumerate(groups) if rnd < len(g.first)]
        probs = model.compare([groups[k].prompt for k in live],
                              [groups[k].members[groups[k].first[rnd]] for k in live],
                              [groups[k].members[groups[k].first[holder[k]]] for k in live])
        for k, p in zip(live, probs):
            if (p < 0.5) if worst else (p > 0.5):
                holder[k] = rnd
    return [g.first[u] for g, u in zip(groups, holder)]


def rank(model, prompts: Sequence[PromptInput], candidates: Sequence[Sequence[CompletionInput]]) -> list[list[int]]:
    """For each prompt, its candidates' indices from best to worst.

    Each candidate's value is the mean, over the other ``n - 1`` candidates, of the log-odds that it beats them:
    ``mean_j log(P(i beats j) / P(j beats i))``. Pairwise models: a full round robin of ``n(n-1)/2`` comparisons
    (each in both orders); for PairRM the log-odds is ``(logit_ij - logit_ji) / 2`` (from ``compare_log_odds``), so
    this is llm-blender's ``rank`` (its ``get_scores_from_cmps`` "max_logits" rule, ``mean_j (M[i, j] - M[j, i])``)
    up to a factor of 2 that does not change the order; for other pairwise models it is the rule that orders by
    reward when ``P`` is Bradley-Terry. Scalar models: Bradley-Terry log-odds are ``r_i - r_j``, so candidates are
    ordered by score. Equal values keep the earlier candidate first; candidates with the same text are computed
    once, get exactly equal values and stay in index order.
    """
    groups = _check_candidates(prompts, candidates)
    if model.kind != "pairwise":
        values = _scores_once(model, groups)
    else:
        pairs = _distinct_pairs(groups, "round-robin")
        log_odds = _log_odds_once(model, groups, pairs)
        values = [[0.0] * len(g.first) for g in groups]
        for (g, u, v), lo in zip(pairs, log_odds):
            values[g][u] += lo * groups[g].count[v]
            values[g][v] -= lo * groups[g].count[u]
        # the mean over the n - 1 opponents (a candidate's duplicates are ties, log-odds 0)
        values = [[t / max(1, len(g.of) - 1) for t in row] for g, row in zip(groups, values)]
    return [sorted(range(len(g.of)), key=lambda i: (-row[g.of[i]], i)) for g, row in zip(groups, values)]


def _log_odds_once(model, groups: Sequence[_Group], pairs: Sequence[tuple[int, int, int]]) -> list[float]:
    """``log(P(u beats v) / P(v beats u))`` for each pair, in one batched call: the model's own
    ``compare_log_odds`` when it has one (exact, never saturated), else the log-odds of its ``compare``."""
    if not pairs:
        return []
    args = ([groups[g].prompt for g, _, _ in pairs], [groups[g].members[groups[g].first[u]] for g, u, _ in pairs],
            [groups[g].members[groups[g].first[v]] for g, _, v in pairs])
    exact = getattr(model, "compare_log_odds", None)
    if exact is not None:
        return list(exact(*args))
    return [logit(p) for p in model.compare(*args)]
