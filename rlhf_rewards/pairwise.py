"""From preferences to rewards: transforms of P(a better than b), rewards within a group of completions, best-of-n
and ranking. Works with any model: pairwise models compare; scalar models are compared through their scores.

Ties: a preference of exactly 0.5 is a tie. It maps to the transform's midpoint (0 for ``"logodds"`` and
``"centered"``, 0.5 for ``"probability"``); in a knockout the current holder keeps its place; in rankings the
earlier candidate comes first. Two identical completion strings are a tie without running the model: within one
prompt's candidates or group, each distinct text is compared (or scored) once, so duplicates get exactly equal
values and keep their index order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, x))))


def _logit(p: float) -> float:
    """``log(p / (1 - p))``; a saturated ``p`` (0 or 1 in float64) gives :data:`_SATURATED` with its sign."""
    if p <= 0.0:
        return -_SATURATED
    if p >= 1.0:
        return _SATURATED
    return math.log(p) - math.log1p(-p)


_SATURATED = 53 * math.log(2.0)
"""The largest log-odds a float64 probability below 1 carries (``1 - P >= 2**-53``); saturated preferences count
as this much in rankings, so ``rank`` never averages infinities."""


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


def _preferences_once(model, groups: Sequence[_Group], pairs: Sequence[tuple[int, int, int]]) -> list[float]:
    """``P(u beats v)`` for each ``(group, u, v)``, each distinct comparison made once in one batched call;
    scalar models: Bradley-Terry of their scores, each distinct text scored once."""
    if model.kind == "scalar":
        scores = _scores_once(model, groups)
        return [_sigmoid(scores[g][u] - scores[g][v]) for g, u, v in pairs]
    if not pairs:
        return []
    return model.compare([groups[g].prompt for g, _, _ in pairs],
                         [groups[g].members[groups[g].first[u]] for g, u, _ in pairs],
                         [groups[g].members[groups[g].first[v]] for g, _, v in pairs])


def group_rewards(model, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput], group_size: int,
                  *, mode: GroupMode = "round-robin", transform: Transform = "logodds") -> list[float]:
    """Rewards of consecutive groups of ``group_size`` completions of one prompt (GRPO/RLOO's layout).

    ``"round-robin"``: each completion's reward is the mean of ``transform(P(it beats k))`` over the other members
    ``k`` of its group; ``n(n-1)/2`` comparisons per group (each in both orders). ``"anchor"``: linear cost, each
    completion is compared with its group's first completion (the anchor), whose own reward is the tie value.
    A group of one gets the tie value. Members with the same text are a tie with each other and get exactly the
    same reward: each distinct text is compared (or, for scalar models, scored) once.
    """
    n_groups = _check_groups(prompts, group_size)
    check_same_length(prompts=prompts, completions=completions)
    groups = [_Group.of_members(prompts[g * group_size], completions[g * group_size:(g + 1) * group_size],
                                "completions", g * group_size) for g in range(n_groups)]
    pairs = _distinct_pairs(groups, mode)
    probs = _preferences_once(model, groups, pairs)
    forward = apply_transform(probs, transform)
    backward = apply_transform([1.0 - p for p in probs], transform)
    tie = apply_transform([0.5], transform)[0]
    # value[g][u]: distinct text u's reward. Round robin: the sum over the other members, each distinct text's
    # preference weighted by its number of members, u's own duplicates being ties; anchor: its one preference.
    value = [[tie * (n - 1) if mode == "round-robin" else tie for n in group.count] for group in groups]
    for (g, u, v), f, b in zip(pairs, forward, backward):
        if mode == "anchor":
            value[g][u] = f
        else:
            value[g][u] += f * groups[g].count[v]
            value[g][v] += b * groups[g].count[u]
    if mode == "round-robin" and group_size > 1:
        value = [[t / (group_size - 1) for t in row] for row in value]
    return [value[g][u] for g, group in enumerate(groups) for u in group.of]


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
    if model.kind == "scalar":
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
    if model.kind == "scalar":
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
    return [_logit(p) for p in model.compare(*args)]
