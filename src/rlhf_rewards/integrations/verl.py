"""verl's custom reward function, scored by ``rlhf-rewards serve``: :func:`async_compute_score` (recommended) and
:func:`compute_score`, named in verl's ``custom_reward_function`` (docs/verl.md has the config).

The contract, read from verl's reward loop (volcengine/verl, ``verl/experimental/reward_loop/reward_manager/
naive.py``, ``dapo.py``, ``limited.py``, ``remote.py`` and ``verl/trainer/ppo/reward.py``):

- verl calls the function once per sample, every sample of a batch concurrently, with keyword arguments only:
  ``data_source``, ``solution_str`` (the response decoded with ``skip_special_tokens=True``), ``ground_truth``,
  ``extra_info`` (the dataset row's ``extra_info`` dict), and ``reward_router_address`` / ``reward_model_tokenizer``
  when verl runs a reward model of its own; ``custom_reward_function.reward_kwargs`` are merged into every call. An
  ``async def`` is awaited on the worker's event loop; a plain function runs through ``loop.run_in_executor(None,
  ...)``, so at most the default thread pool's size (``min(32, CPUs + 4)``) of them run at once.
- The prompt is not an argument: it travels in ``extra_info`` (key ``prompt_key``).
- A dict result's ``"score"`` is the reward, placed on the response's last token; every key (``"score"`` too) goes
  into ``reward_extra_info``, which verl stacks over the batch with ``np.array`` using the FIRST sample's keys and
  averages in validation metrics unless the first value is a string. So every sample's dict here has the same keys,
  and its values are numbers, booleans or strings: never ``None`` (``torch.tensor`` of the scores fails) and never
  lists of varying length (``np.array`` of them fails).

Each sample is one request to the server's ``/v1/rewards`` through one
:class:`~rlhf_rewards.serving.client.RemoteRewardFunction` per settings per process (with its retries, deadline,
failover over several URLs and ``None`` rules); the concurrent requests of a batch reach the server together and its
batcher merges them into shared forward passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..reward_options import check_aggregate
from ..serving.client import AsyncRemoteRewardFunction, RemoteRewardFunction
from ..serving.dispatch import Fatal
from .steps import RemoteStepRewards

logger = logging.getLogger(__name__)

URL_ENV = "RLHF_REWARDS_URL"
"""The server URL(s), comma-separated, when ``reward_kwargs`` has no ``url``."""
API_KEY_ENV = "RLHF_REWARDS_API_KEY"
"""The API key when ``reward_kwargs`` has no ``api_key``: the variable ``rlhf-rewards serve`` reads its key from, so
one exported variable serves both."""

_REFERENCE = "reference"  # the column name the client reads a sample's reference response from
_unused_warned: set[str] = set()


@dataclass(frozen=True)
class VerlSettings:
    """One configuration of the reward function (``reward_kwargs`` after defaults and environment), hashable: the
    key of the process's clients.

    Attributes:
        urls: the servers' base URLs; a batch's requests are spread over them.
        api_key: sent as ``Authorization: Bearer``.
        prompt_key: the ``extra_info`` key holding the prompt: text (a plain question, or a conversation rendered
            with the policy's chat template, parsed back) or a list of ``{"role", "content"}`` messages.
        reference_key: the ``extra_info`` key holding a reference response, or ``None``. A pairwise model needs
            it: its score is ``transform(P(response better than reference))``; with a scalar model the score
            becomes ``r(response) - r(reference)``.
        transform: how a pairwise model's preference becomes the score (``"logodds"``, ``"centered"``,
            ``"probability"``).
        aggregate: how a process reward model's step rewards become the score (``None``: the model's own).
        objectives: objective name -> weight for a multi-objective model, as sorted pairs, or ``None``.
        normalize: ``None`` (raw rewards) or ``"stats"``: ``(r - mean) / std`` with the statistics the server was
            started with (``serve --calibration``, or the checkpoint config's OpenRLHF ``mean``/``std``), so that
            the score mixes with rule-based rewards on a common scale. ``"group"`` is refused: verl asks for one
            sample at a time, and its advantage estimator already normalises within groups.
        parse_templates: parse a prompt rendered with a chat template back into messages.
        step_rewards: also return a process reward model's step rewards (one more request per sample, one more
            pass of the model over it).
        unscored_score: the score verl gets for a sample the server could not score (``"scored": False`` beside
            it, and an error logged); ``None`` raises instead, which stops verl's step.
        timeout, max_retries, deadline: as for :class:`~rlhf_rewards.serving.client.RemoteRewardFunction`.
    """

    urls: tuple[str, ...]
    api_key: Optional[str] = None
    prompt_key: str = "prompt"
    reference_key: Optional[str] = None
    transform: str = "logodds"
    aggregate: Optional[str] = None
    objectives: Optional[tuple[tuple[str, float], ...]] = None
    normalize: Optional[str] = None
    parse_templates: bool = True
    step_rewards: bool = False
    unscored_score: Optional[float] = 0.0
    timeout: float = 120.0
    max_retries: int = 5
    deadline: Optional[float] = None

    @classmethod
    def resolve(cls, url: Union[str, Sequence[str], None] = None, api_key: Optional[str] = None,
                objectives: Optional[Mapping[str, float]] = None, **options: Any) -> VerlSettings:
        """Settings from ``reward_kwargs`` (``url`` and ``api_key`` default to :data:`URL_ENV` and
        :data:`API_KEY_ENV`). ``ValueError`` names the setting that is missing or wrong."""
        given = url if url is not None else os.environ.get(URL_ENV)
        urls = given.split(",") if isinstance(given, str) else list(given or ())
        urls = [str(u).strip() for u in urls if str(u).strip()]
        if not urls:
            raise ValueError(f"no reward server URL: set custom_reward_function.reward_kwargs.url (e.g. "
                             f"http://rm-node:8000, or a list of them) or the environment variable {URL_ENV} in the "
                             "reward workers' environment")
        settings = cls(tuple(urls), api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
                       objectives=None if objectives is None else tuple(sorted(dict(objectives).items())),
                       **options)
        for name in ("prompt_key", "reference_key"):
            key = getattr(settings, name)
            if (key is not None or name == "prompt_key") and (not isinstance(key, str) or not key):
                raise ValueError(f"reward_kwargs.{name}: expected the name of an extra_info key, got {key!r}")
        if settings.aggregate is not None:
            check_aggregate(settings.aggregate)
        if settings.normalize not in (None, "stats"):
            raise ValueError(f"reward_kwargs.normalize: expected null or 'stats', got {settings.normalize!r} (verl "
                             "scores one sample per call, so there is no group to normalise within; its advantage "
                             "estimator normalises within groups)")
        score = settings.unscored_score
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            raise ValueError(f"reward_kwargs.unscored_score: expected a finite number (or null to raise), got "
                             f"{score!r}")
        return settings


_clients: dict[tuple[type, VerlSettings], RemoteRewardFunction] = {}
_clients_lock = threading.Lock()


def _client(cls: type[RemoteRewardFunction], settings: VerlSettings) -> RemoteRewardFunction:
    """The process's one client of ``cls`` for ``settings``: every call reuses it (what it learnt of the servers'
    limits, its counters). It holds no connection or event loop between calls, so verl's executor threads and its
    event loop share it."""
    with _clients_lock:
        fn = _clients.get((cls, settings))
        if fn is None:
            options: dict[str, Any] = {"api_key": settings.api_key, "timeout": settings.timeout,
                                       "max_retries": settings.max_retries, "deadline": settings.deadline,
                                       "parse_templates": settings.parse_templates}
            if cls is RemoteRewardFunction:
                options.update(name="verl_reward", transform=settings.transform, aggregate=settings.aggregate,
                               objectives=None if settings.objectives is None else dict(settings.objectives),
                               normalize=settings.normalize,
                               baseline_column=_REFERENCE if settings.reference_key is not None else None)
            fn = _clients[(cls, settings)] = cls(list(settings.urls), **options)
        return fn


def _inputs(settings: VerlSettings, extra_info: Any) -> tuple[Any, dict[str, list[Any]]]:
    """The sample's prompt and its reference column (empty without ``reference_key``) from ``extra_info``. A key
    missing from ``extra_info`` is the dataset's layout, not one bad sample: ``ValueError`` naming it."""
    if not isinstance(extra_info, Mapping):
        raise ValueError(f"extra_info: expected the sample's extra_info dict, holding its prompt under "
                         f"{settings.prompt_key!r}, got {type(extra_info).__name__}")
    prompt = _field(extra_info, settings.prompt_key, "prompt_key", "the prompt: text or a list of chat messages")
    if settings.reference_key is None:
        return prompt, {}
    reference = _field(extra_info, settings.reference_key, "reference_key",
                       "the reference response a pairwise model compares against")
    return prompt, {_REFERENCE: [reference]}


def _field(extra_info: Mapping[str, Any], key: str, option: str, what: str) -> Any:
    if key not in extra_info:
        raise ValueError(f"extra_info has no {key!r} ({what}; reward_kwargs.{option} names the key). This "
                         f"sample's extra_info holds {sorted(map(str, extra_info))}: add {key!r} to every row's "
                         f"extra_info when preparing the dataset, or set reward_kwargs.{option}")
    value = extra_info[key]
    # a message list read back from parquet through pandas is a numpy object array
    return value.tolist() if not isinstance(value, (str, list, dict)) and hasattr(value, "tolist") else value


def _result(settings: VerlSettings, reward: Optional[float], steps: Optional[list[float]], data_source: Any
            ) -> dict[str, Any]:
    """verl's dict: ``score``, ``scored``, and with ``step_rewards`` the step rewards as JSON text (``"null"``
    when there are none) and their count."""
    scored = reward is not None
    if not scored:
        if settings.unscored_score is None:
            raise RuntimeError(f"the reward server did not score this sample of data_source {data_source!r} (the "
                               "reason is logged above); reward_kwargs.unscored_score is null, so it stops the step")
        logger.error("verl: a sample of data_source %r was not scored (the reason is logged above): verl gets "
                     "score=%r with scored=False", data_source, settings.unscored_score)
    out: dict[str, Any] = {"score": reward if scored else float(settings.unscored_score),  # type: ignore[arg-type]
                           "scored": scored}
    if settings.step_rewards:
        out["step_rewards"] = json.dumps(steps)
        out["num_steps"] = len(steps) if steps is not None else 0
    return out


def _refused(err: Exception) -> ValueError:
    """The server's refusal of the settings, with where verl users set what it names (it speaks of the client's
    and the endpoints' options)."""
    return ValueError(f"{err}\nIn verl these are custom_reward_function.reward_kwargs: reference_key (the extra_info "
                      "key of a pairwise model's reference response, sent as its baseline), transform, aggregate and "
                      "step_rewards (process reward models only), objectives; see docs/verl.md")


def _settings_of(url: Any, api_key: Any, options: dict[str, Any], kwargs: dict[str, Any]) -> VerlSettings:
    unused = sorted(set(kwargs) - _unused_warned)
    if unused:
        _unused_warned.update(unused)
        logger.warning("verl: ignoring keyword arguments rlhf_rewards does not use: %s (if one is meant as a "
                       "reward_kwargs setting, check its spelling in docs/verl.md)", ", ".join(unused))
    return VerlSettings.resolve(url, api_key, **options)


async def async_compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                              extra_info: Optional[Mapping[str, Any]] = None, reward_router_address: Any = None,
                              reward_model_tokenizer: Any = None, *, url: Union[str, Sequence[str], None] = None,
                              api_key: Optional[str] = None, prompt_key: str = "prompt",
                              reference_key: Optional[str] = None, transform: str = "logodds",
                              aggregate: Optional[str] = None, objectives: Optional[Mapping[str, float]] = None,
                              normalize: Optional[str] = None, parse_templates: bool = True,
                              step_rewards: bool = False, unscored_score: Optional[float] = 0.0, timeout: float = 120.0,
                              max_retries: int = 5, deadline: Optional[float] = None,
                              **kwargs: Any) -> dict[str, Any]:
    """verl's reward for one sample, scored by the server at ``url``; awaited by verl's reward loop, so a batch's
    samples reach the server concurrently and are merged into shared forward passes.

    ``data_source``, ``solution_str`` (the response), ``ground_truth``, ``extra_info``, ``reward_router_address``
    and ``reward_model_tokenizer`` are verl's arguments (``ground_truth`` and verl's own reward model are not
    used). The keyword-only arguments are ``custom_reward_function.reward_kwargs``, described in
    :class:`VerlSettings`; other keyword arguments are ignored, with one warning per name.

    Returns:
        ``{"score": float, "scored": bool}``: the reward (a scalar model's score on its logit scale, a pairwise
        model's ``transform(P(response better than reference))``, a process model's aggregated step rewards in
        [0, 1]) and whether the server scored the sample. With ``step_rewards``, also ``"step_rewards"`` (the step
        rewards as JSON text, e.g. ``"[0.93, 0.41]"``, ``"null"`` when there are none) and ``"num_steps"``.

    A sample the server cannot score, or that no server scored before the deadline (after the retries of
    :class:`~rlhf_rewards.serving.client.RemoteRewardFunction`), gets ``unscored_score`` with ``"scored": False``
    and an error logged. Raises ``ValueError`` for a missing URL, a missing ``extra_info`` key or settings the
    server refuses, ``RuntimeError`` for a wrong API key.
    """
    settings = _settings_of(url, api_key, dict(
        prompt_key=prompt_key, reference_key=reference_key, transform=transform, aggregate=aggregate,
        objectives=objectives, normalize=normalize, parse_templates=parse_templates, step_rewards=step_rewards,
        unscored_score=unscored_score, timeout=timeout, max_retries=max_retries, deadline=deadline), kwargs)
    prompt, columns = _inputs(settings, extra_info)
    calls = [AsyncRemoteRewardFunction.__call__(_client(RemoteRewardFunction, settings), [prompt], [solution_str],
                                                **columns)]
    if settings.step_rewards:
        calls.append(AsyncRemoteRewardFunction.__call__(_client(RemoteStepRewards, settings), [prompt],
                                                        [solution_str]))
    try:
        answers = await asyncio.gather(*calls)
    except Fatal as err:
        # what the sync client raises for the same answer
        raise (_refused(err) if err.status == 422 else RuntimeError(str(err))) from None
    return _result(settings, answers[0][0], answers[1][0] if settings.step_rewards else None, data_source)


def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                  extra_info: Optional[Mapping[str, Any]] = None, reward_router_address: Any = None,
                  reward_model_tokenizer: Any = None, *, url: Union[str, Sequence[str], None] = None,
                  api_key: Optional[str] = None, prompt_key: str = "prompt", reference_key: Optional[str] = None,
                  transform: str = "logodds", aggregate: Optional[str] = None,
                  objectives: Optional[Mapping[str, float]] = None, normalize: Optional[str] = None,
                  parse_templates: bool = True, step_rewards: bool = False,
                  unscored_score: Optional[float] = 0.0, timeout: float = 120.0, max_retries: int = 5,
                  deadline: Optional[float] = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`async_compute_score` as a plain function, for verl's reward managers that take no ``async def``
    (``reward_manager=remote``) and for verl's legacy batch-less managers: same arguments, result and errors. verl
    runs it in a thread pool, so fewer samples reach the server at once than with the async one."""
    settings = _settings_of(url, api_key, dict(
        prompt_key=prompt_key, reference_key=reference_key, transform=transform, aggregate=aggregate,
        objectives=objectives, normalize=normalize, parse_templates=parse_templates, step_rewards=step_rewards,
        unscored_score=unscored_score, timeout=timeout, max_retries=max_retries, deadline=deadline), kwargs)
    prompt, columns = _inputs(settings, extra_info)
    try:
        reward = _client(RemoteRewardFunction, settings)([prompt], [solution_str], **columns)[0]
        steps = _client(RemoteStepRewards, settings)([prompt], [solution_str])[0] if settings.step_rewards else None
    except ValueError as err:  # the server refused the settings (a 422)
        raise _refused(err) from None
    return _result(settings, reward, steps, data_source)
