"""Row-level scoring for the dataset commands: each distinct input is scored once per run (so equal texts get
equal rewards and identical chosen/rejected pairs tie exactly), and a row that cannot be scored gets an error
message instead of aborting the run: a failing batch is retried one input at a time to find the inputs at fault."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Optional

from ..conversation import CompletionInput, PromptInput

Result = tuple[Optional[float], Optional[str]]
"""``(value, None)`` for a scored row, ``(None, error message)`` for a row that could not be scored."""


def _key(*parts) -> bytes:
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(), digest_size=16).digest()


def _message(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


class RowScorer:
    """Scores rows with one loaded reward model, remembering every distinct input's value for the run.

    Args:
        model: a loaded reward model (``kind`` ``"scalar"``, ``"pairwise"`` or ``"process"``).
    """

    def __init__(self, model):
        self.model = model
        self._values: dict[bytes, float] = {}
        self._errors: dict[bytes, str] = {}

    def _fill(self, keys: list[bytes], inputs: list, run: Callable[[list], list[float]]) -> None:
        """Compute the values of the ``keys`` not known yet; a batch that fails is split to single inputs."""
        todo = {k: x for k, x in zip(keys, inputs) if k not in self._values and k not in self._errors}
        if not todo:
            return
        try:
            self._values.update(zip(todo, run(list(todo.values()))))
        except Exception as err:  # one bad input must not cost the others their rewards
            if len(todo) == 1:
                self._errors[next(iter(todo))] = _message(err)
                return
            for k, x in todo.items():
                self._fill([k], [x], run)

    def _score(self, rows: Sequence[tuple], read: Callable[..., tuple], run: Callable[[list], list[float]]
               ) -> list[Result]:
        """Validate each row with ``read(*row) -> (what the model reads, input for run)`` (a ``ValueError`` is that
        row's error), then compute the values of the distinct inputs not known yet."""
        keys: list[Optional[bytes]] = []
        errors: list[Optional[str]] = []
        inputs = []
        for row in rows:
            try:
                seen, item = read(*row)
            except ValueError as err:
                keys.append(None)
                errors.append(str(err))
                continue
            keys.append(_key(seen))
            errors.append(None)
            inputs.append(item)
        self._fill([k for k in keys if k is not None], inputs, run)
        return [(None, e) if k is None else (self._values.get(k), self._errors.get(k)) for k, e in zip(keys, errors)]

    def rewards(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]) -> list[Result]:
        """A scalar model's reward for each ``(prompt, completion)`` row."""
        def read(p, c):
            text = self.model.render(p, c)  # control text inside the messages stays text when scored
            return text, text

        with self.model.session("score"):  # one control-text (and truncation) warning per batch of rows
            return self._score(list(zip(prompts, completions)), read, self.model.score_texts)

    def steps(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput]
              ) -> list[tuple[Optional[list[float]], Optional[str]]]:
        """A process model's step rewards for each row (``(None, error message)`` for a row without them)."""
        results = self.model.score_steps_samples(list(prompts), list(completions))
        return [(None, str(r)) if isinstance(r, Exception) else (r, None) for r in results]

    def preferences(self, prompts: Sequence[PromptInput], completions_a: Sequence[CompletionInput],
                    completions_b: Sequence[CompletionInput]) -> list[Result]:
        """A pairwise model's ``P(a better than b)`` for each row (both orders, combined as the model does)."""
        def read(p, a, b):
            return self.model.format(p, a, b), (p, a, b)  # the texts of both orders identify the comparison

        return self._score(list(zip(prompts, completions_a, completions_b)), read,
                           lambda batch: self.model.compare(*(list(col) for col in zip(*batch))))

    def against(self, prompts: Sequence[PromptInput], completions: Sequence[CompletionInput],
                baselines: Optional[Sequence[CompletionInput]], transform: str = "logodds") -> list[Result]:
        """Each row's reward as ``model.score`` defines it: a scalar model's reward (minus its baseline's when
        ``baselines`` is given); a pairwise model's ``transform(P(completion better than baseline))``."""
        from ..transforms import apply_transform

        if self.model.kind == "pairwise":
            if baselines is None:
                raise ValueError("a pairwise model scores a completion against a baseline")
            return [(None, e) if p is None else (apply_transform([p], transform)[0], None)
                    for p, e in self.preferences(prompts, completions, baselines)]
        own = self.rewards(prompts, completions)
        if baselines is None:
            return own
        base = self.rewards(prompts, baselines)
        return [(None, e1 or f"baseline: {e2}") if r1 is None or r2 is None else (r1 - r2, None)
                for (r1, e1), (r2, e2) in zip(own, base)]
