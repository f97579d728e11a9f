"""RewardFunction: TRL's reward-function contract, re-templating of policy-formatted prompts, pairing modes, metrics,
pickling, and one optimisation step of each real TRL trainer on the CPU with a tiny policy.

Every expected reward comes from calling the reward model directly (``rm.score`` / ``rm.compare``) and, for pairwise
models, from the transform written out here, never from the RewardFunction itself.
"""

from __future__ import annotations

import logging
import math
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.trainer.utils import get_callable_name

from rlhf_rewards import RewardFunction, load_reward_model
from rlhf_rewards.testing.policy import make_tiny_policy

from cases import CONVERSATIONS
from test_chat_parsing import ROUND_TRIP_CASES, conversations, render

SCALAR = "starling-rm-34b"
PAIR_PM = "rlhflow-pair-pm-llama3-8b"


def logodds(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    """``loaded(preset)``: that preset's tiny reward model on the CPU, loaded once per module."""
    models = {}

    def get(preset: str):
        if preset not in models:
            models[preset] = load_reward_model(tiny_dir(preset), preset=preset, device="cpu")
        return models[preset]

    return get


@pytest.fixture(scope="module")
def rm(loaded):
    return loaded(SCALAR)


@pytest.fixture(scope="module")
def pair_pm(loaded):
    return loaded(PAIR_PM)


@pytest.fixture(scope="module")
def pairrm(loaded):
    return loaded("pairrm")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return make_tiny_policy(str(tmp_path_factory.mktemp("policy")))


class MetricSink:
    """Stands in for TRL's ``log_metric``: keeps the last value of each name."""

    def __init__(self):
        self.values: dict[str, float] = {}

    def __call__(self, name: str, value: float) -> None:
        self.values[name] = value


def trl_call(fn: RewardFunction, prompts, completions, **columns):
    """Call ``fn`` as GRPOTrainer does: keywords, completion ids, dataset columns and the trainer's extras."""
    sink = MetricSink()
    rewards = fn(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * len(prompts),
                 trainer_state=None, log_extra=lambda column, values: None, log_metric=sink, **columns)
    return rewards, sink.values


# -- the contract ------------------------------------------------------------------------------------------------

def test_scalar_rewards_are_the_models_scores(rm):
    prompts = [p for p, _ in CONVERSATIONS]
    completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for _, c in CONVERSATIONS]
    fn = RewardFunction(rm)
    rewards, metrics = trl_call(fn, prompts, completions, unrelated_column=list(range(len(prompts))))
    assert all(isinstance(r, float) for r in rewards)
    assert rewards == pytest.approx(rm.score(prompts, completions), abs=1e-6)
    assert fn.__name__ == get_callable_name(fn) == "reward_starling_rm_34b"
    assert get_callable_name(RewardFunction(rm, name="helpfulness")) == "helpfulness"
    assert metrics[f"{fn.__name__}/unscored_rate"] == 0.0
    assert metrics[f"{fn.__name__}/seconds"] > 0


def test_scalar_baseline_column_subtracts_the_references_score(rm):
    prompts = ["Name a colour.", "What is 2+2?"]
    completions, references = ["Blue.", "Four."], ["Red.", "4"]
    rewards, _ = trl_call(RewardFunction(rm, baseline_column="reference"), prompts, completions,
                          reference=references)
    own, base = rm.score(prompts, completions), rm.score(prompts, references)
    assert rewards == pytest.approx([a - b for a, b in zip(own, base)], abs=1e-6)


def _retemplating_params() -> list:
    return [pytest.param(template, family, expected, extra, id="-".join([template, *map(str, extra.values())]))
            for template, family, _, expected, extra in ROUND_TRIP_CASES]


@pytest.mark.parametrize("preset", [SCALAR, "ray2333-mistral-7b"])
@pytest.mark.parametrize("template, family, expected, extra", _retemplating_params())
def test_policy_templated_prompts_score_as_their_conversation(loaded, preset, template, family, expected, extra):
    """A prompt rendered with the policy's chat template (and a completion that kept the policy's end-of-turn
    marker) gets the reward of the conversation it holds, given as messages."""
    scorer = loaded(preset)
    system_ok = any(case[0] == template and case[2] is not None for case in ROUND_TRIP_CASES)
    convs = [m for m in conversations(family).values()
             if m[-1]["role"] == "user" and (system_ok or m[0]["role"] != "system")]
    if preset == "ray2333-mistral-7b":
        # Mistral's template has no place for a system turn after the first user turn, or before a non-user one.
        convs = [m for m in convs if m[0]["role"] != "system" or m[1]["role"] == "user"]
    texts = [render(template, m, True, **extra) for m in convs]
    eos = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>",
           "zephyr": "</s>", "phi3": "<|end|>"}[family]
    completions = [f"Answer {k}." + (eos if k % 2 else "") for k in range(len(convs))]
    rewards, _ = trl_call(RewardFunction(scorer), texts, completions)
    direct = scorer.score([expected(m) for m in convs], [f"Answer {k}." for k in range(len(convs))])
    assert rewards == pytest.approx(direct, abs=1e-6)
    # the templated text taken as one user turn is another input, with another reward
    literal, _ = trl_call(RewardFunction(scorer, parse_templates=False), texts, completions)
    assert all(abs(a - b) > 1e-6 for a, b in zip(literal, direct))


# Both formats need alternating user/assistant turns: Starling-RM-7B-alpha's renderer checks them, Mistral's chat
# template raises.
@pytest.mark.parametrize("preset", ["starling-rm-7b-alpha", "ray2333-mistral-7b"])
def test_unscorable_samples_get_none_and_the_reason_is_logged(loaded, caplog, preset):
    scorer = loaded(preset)
    prompts = [
        "Hello!",
        "<|im_start|>user\nunclosed turn",  # ChatML markup that breaks the template
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],  # roles do not alternate
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "prefill"}],  # no user turn last
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    ]
    completions = ["Hi.", "x", "y", "z", "Because."]
    with caplog.at_level(logging.WARNING, logger="rlhf_rewards.trainers"):
        rewards, metrics = trl_call(RewardFunction(scorer), prompts, completions)
    assert rewards[1:4] == [None, None, None]
    assert [rewards[0], rewards[4]] == pytest.approx(scorer.score([prompts[0], prompts[4]], ["Hi.", "Because."]),
                                                     abs=1e-6)
    log = caplog.text
    assert "3 of 5 samples not scored" in log
    assert "sample 1: prompts[1]" in log and "sample 2: prompts[2]" in log and "sample 3: prompts[3]" in log
    assert "alternate" in log and "user turn" in log
    assert metrics[f"reward_{preset.replace('-', '_')}/unscored_rate"] == pytest.approx(3 / 5)


def test_log_metric_reports_truncation(tiny_dir):
    scorer = load_reward_model(tiny_dir(SCALAR), device="cpu", max_length=24)
    _, metrics = trl_call(RewardFunction(scorer, name="rm"), ["short", "a very long prompt " * 20], ["a", "b"])
    assert metrics["rm/truncation_rate"] == 0.5
    assert 0 <= metrics["rm/padding_share"] < 1


def test_construction_errors(rm, pair_pm):
    with pytest.raises(ValueError, match="pairwise model.*baseline_column=.*pairing='group'.*pairing='halves'"):
        RewardFunction(pair_pm)
    with pytest.raises(ValueError, match="either pairing or baseline_column"):
        RewardFunction(pair_pm, pairing="group", baseline_column="reference")
    with pytest.raises(ValueError, match="pairing must be"):
        RewardFunction(pair_pm, pairing="pairs")
    with pytest.raises(ValueError, match="group_size"):
        RewardFunction(pair_pm, pairing="halves", group_size=2)
    with pytest.raises(ValueError, match="unknown group_mode"):
        RewardFunction(pair_pm, pairing="group", group_mode="swiss")
    with pytest.raises(ValueError, match="unknown transform"):
        RewardFunction(rm, transform="rank")
    with pytest.raises(ValueError, match="'reference' is not among the dataset columns.*'answer'"):
        trl_call(RewardFunction(rm, baseline_column="reference"), ["q"], ["a"], answer=["b"])


# -- pairwise models ---------------------------------------------------------------------------------------------

def test_pairwise_baseline_column(pairrm):
    prompts = ["Name a colour.", [{"role": "user", "content": "What is 2+2?"}]]
    completions = ["Blue, like the sky.", [{"role": "assistant", "content": "4"}]]
    references = ["Red.", [{"role": "assistant", "content": "Four, since 2+2=4."}]]
    fn = RewardFunction(pairrm, baseline_column="reference")
    rewards, metrics = trl_call(fn, prompts, completions, reference=references)
    probs = pairrm.compare(prompts, completions, references)
    assert rewards == pytest.approx([logodds(p) for p in probs], abs=1e-6)
    assert 0 <= metrics["reward_pairrm/order_disagreement_rate"] <= 1
    centered, _ = trl_call(RewardFunction(pairrm, baseline_column="reference", transform="centered"), prompts,
                           completions, reference=references)
    assert centered == pytest.approx([2 * p - 1 for p in probs], abs=1e-6)


GROUP_PROMPTS = ["Write a haiku.", "Name a prime."]
GROUP_COMPLETIONS = [["Waves roll in.", "Gulls call out at dawn.", "Sea."], ["2", "Seven is prime.", "11"]]


@pytest.mark.parametrize("group_size", [None, 3])
def test_group_round_robin(pair_pm, group_size):
    prompts = [p for p in GROUP_PROMPTS for _ in range(3)]
    completions = [c for group in GROUP_COMPLETIONS for c in group]
    fn = RewardFunction(pair_pm, pairing="group", group_size=group_size)
    rewards, _ = trl_call(fn, prompts, completions)
    expected = []
    for prompt, group in zip(GROUP_PROMPTS, GROUP_COMPLETIONS):
        p = {(i, j): pair_pm.compare([prompt], [group[i]], [group[j]])[0] for i in range(3) for j in range(i + 1, 3)}
        for i in range(3):
            wins = [p[i, j] if i < j else 1 - p[j, i] for j in range(3) if j != i]
            expected.append(sum(logodds(w) for w in wins) / len(wins))
    assert rewards == pytest.approx(expected, abs=1e-6)


def test_group_anchor_and_a_scalar_model_in_groups(pair_pm, rm):
    prompts = [p for p in GROUP_PROMPTS for _ in range(3)]
    completions = [c for group in GROUP_COMPLETIONS for c in group]
    rewards, _ = trl_call(RewardFunction(pair_pm, pairing="group", group_mode="anchor"), prompts, completions)
    expected = []
    for prompt, group in zip(GROUP_PROMPTS, GROUP_COMPLETIONS):
        expected += [0.0] + [logodds(pair_pm.compare([prompt], [c], [group[0]])[0]) for c in group[1:]]
    assert rewards == pytest.approx(expected, abs=1e-6)
    # a scalar model in groups: Bradley-Terry log-odds sigmoid(r_i - r_j) -> r_i - r_j, averaged over the others
    rewards, _ = trl_call(RewardFunction(rm, pairing="group"), prompts, completions)
    scores = rm.score(prompts, completions)
    expected = [sum(scores[i] - scores[j] for j in range(g, g + 3) if j != i) / 2
                for g in (0, 3) for i in range(g, g + 3)]
    assert rewards == pytest.approx(expected, abs=1e-6)


def test_group_with_an_unscorable_member_compares_the_rest(pair_pm):
    prompts = ["Name a prime."] * 3
    completions = ["2", None, "Seven is prime."]  # a completion TRL could never have decoded
    rewards, _ = trl_call(RewardFunction(pair_pm, pairing="group", group_size=3), prompts, completions)
    p = pair_pm.compare(["Name a prime."], ["2"], ["Seven is prime."])[0]
    assert rewards == pytest.approx([logodds(p), None, logodds(1 - p)], abs=1e-6)


def test_group_errors(pair_pm):
    fn = RewardFunction(pair_pm, pairing="group", group_size=2)
    with pytest.raises(ValueError, match="do not split into groups of group_size=2"):
        trl_call(fn, ["a", "a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"prompts\[1\] differs from prompts\[0\].*multiple of num_generations"):
        trl_call(fn, ["a", "b", "c", "c"], ["x", "y", "z", "w"])


def test_halves_compare_the_two_candidates_of_each_prompt(pairrm, rm):
    prompts = ["Name a colour.", [{"role": "user", "content": "What is 2+2?"}]] * 2
    completions = ["Blue.", "4", "Red, like a rose.", "Four."]
    rewards, _ = trl_call(RewardFunction(pairrm, pairing="halves"), prompts, completions)
    probs = pairrm.compare(prompts[:2], completions[:2], completions[2:])
    assert rewards == pytest.approx([logodds(p) for p in probs] + [logodds(1 - p) for p in probs], abs=1e-6)
    # a scalar model gives its scores, which online DPO compares itself
    rewards, _ = trl_call(RewardFunction(rm, pairing="halves"), prompts, completions)
    assert rewards == pytest.approx(rm.score(prompts, completions), abs=1e-6)
    with pytest.raises(ValueError, match="even number"):
        trl_call(RewardFunction(pairrm, pairing="halves"), prompts[:3], completions[:3])
    with pytest.raises(ValueError, match=r"prompts\[0\] and prompts\[2\] differ"):
        trl_call(RewardFunction(pairrm, pairing="halves"), ["a", "b", "c", "b"], completions)


def test_calls_from_several_threads(rm):
    """AsyncGRPOTrainer scores groups from worker threads; each call still gets its own completions' scores."""
    fn = RewardFunction(rm)
    batches = [([p for p, _ in CONVERSATIONS[k:]], [c for _, c in CONVERSATIONS[k:]]) for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda batch: trl_call(fn, *batch)[0], batches * 3))
    for (prompts, completions), rewards in zip(batches * 3, results):
        assert rewards == pytest.approx(rm.score(prompts, completions), abs=1e-6)


def test_pickle_round_trip(tiny_dir, rm):
    prompts, completions = ["Hello!", "What is 2+2?"], ["Hi.", "4"]
    expected = rm.score(prompts, completions)
    fn = RewardFunction(rm, name="rm")
    copy = pickle.loads(pickle.dumps(fn))
    assert copy.__name__ == "rm" and copy.model is not rm
    assert trl_call(copy, prompts, completions)[0] == pytest.approx(expected, abs=1e-6)
    # built from a path, the function pickles as its loading recipe and reloads the model when unpickled
    lazy = RewardFunction.from_pretrained(tiny_dir(SCALAR), load_kwargs={"device": "cpu"}, name="rm")
    blob = pickle.dumps(lazy)
    assert len(blob) < len(pickle.dumps(fn)) // 10
    assert trl_call(pickle.loads(blob), prompts, completions)[0] == pytest.approx(expected, abs=1e-6)


# -- the real trainers ---------------------------------------------------------------------------------------------

class Spy:
    """A reward function that records what TRL passed to the wrapped RewardFunction and what it returned."""

    def __init__(self, fn: RewardFunction):
        self.fn = fn
        self.__name__ = fn.__name__
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        rewards = self.fn(**kwargs)
        self.calls.append({**kwargs, "rewards": rewards})
        return rewards


def train_one_step(kind: str, policy: str, reward_fn, dataset: Dataset, output_dir, **config):
    """Run one optimisation step of TRL's ``kind`` trainer ("grpo", "rloo", "online-dpo") on the CPU."""
    common = dict(output_dir=str(output_dir), max_steps=1, bf16=False, use_cpu=True, report_to="none",
                  logging_steps=1, save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4)
    if kind == "online-dpo":
        cls, args = OnlineDPOTrainer, OnlineDPOConfig(**{**common, "max_new_tokens": 8, **config})
    else:
        cls, config_cls = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[kind]
        args = config_cls(**{**common, "num_generations": 2, "max_completion_length": 8, **config})
    trainer = cls(model=policy, processing_class=AutoTokenizer.from_pretrained(policy), reward_funcs=reward_fn,
                  args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def check_process_grpo_step(prm, name: str, dataset: Dataset, tmp_path, aggregate=None) -> None:
    """One real GRPO step with a process reward model: TRL got the model's own aggregated rewards for the completions
    it generated, logged their mean, and the step metrics the function reports."""
    from rlhf_rewards.testing.policy import make_tiny_policy

    policy = make_tiny_policy(str(tmp_path / "policy"))
    spy = Spy(RewardFunction(prm, name=name, aggregate=aggregate))
    trainer = train_one_step("grpo", policy, spy, dataset, tmp_path / "out")
    call = spy.calls[0]
    direct = prm.score(call["prompts"], call["completions"], aggregate=aggregate)
    assert call["rewards"] == pytest.approx(direct, abs=1e-6) and None not in call["rewards"]
    log = trainer.state.log_history[0]
    assert log[f"rewards/{name}/mean"] == pytest.approx(sum(direct) / len(direct), abs=1e-5)
    assert log[f"{name}/steps_per_completion"] >= 1 and 0 <= log[f"{name}/mean_step_reward"] <= 1


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_untouched(model, before: dict[str, torch.Tensor], trainer) -> None:
    """The reward model's weights are where they were loaded, unchanged, frozen and unknown to the optimizer."""
    after = model.model.state_dict()
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert value.device == model.device and torch.equal(value, before[name]), name
    assert not any(p.requires_grad for p in model.model.parameters())
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained and not trained & {id(p) for p in model.model.parameters()}


def logged(trainer, name: str) -> float:
    return trainer.state.log_history[0][name]


CHAT_DATASET = Dataset.from_dict({
    "prompt": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
               [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]],
    "reference": [[{"role": "assistant", "content": "Hi!"}], [{"role": "assistant", "content": "Green."}]],
})


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_trainers_with_a_scalar_model(rm, policy, tmp_path, kind):
    spy = Spy(RewardFunction(rm))
    before = snapshot(rm)
    trainer = train_one_step(kind, policy, spy, CHAT_DATASET, tmp_path)
    assert len(spy.calls) == 1
    call = spy.calls[0]
    # the completions table: logged prompts, completions and rewards; the rewards are the model's scores
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert prompts == call["prompts"] and completions == call["completions"] and len(prompts) == 4
    direct = rm.score(prompts, completions)
    assert list(trainer._logs["rewards"][spy.__name__]) == pytest.approx(direct, rel=1e-6, abs=1e-6)
    assert call["rewards"] == pytest.approx(direct, abs=1e-6)
    assert logged(trainer, f"rewards/{spy.__name__}/mean") == pytest.approx(sum(direct) / 4, abs=1e-6)
    assert logged(trainer, f"{spy.__name__}/truncation_rate") == 0.0
    assert f"{spy.__name__}/seconds" in trainer.state.log_history[0]
    assert_untouched(rm, before, trainer)


def test_grpo_with_a_pairwise_model_in_groups(pair_pm, policy, tmp_path):
    spy = Spy(RewardFunction(pair_pm, pairing="group", group_size=3))
    before = snapshot(pair_pm)
    trainer = train_one_step("grpo", policy, spy, CHAT_DATASET, tmp_path, num_generations=3,
                             per_device_train_batch_size=6)
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert prompts == spy.calls[0]["prompts"] and len(prompts) == 6
    expected = []
    for g in (0, 3):
        for i in range(g, g + 3):
            others = [j for j in range(g, g + 3) if j != i]
            probs = pair_pm.compare([prompts[i]] * 2, [completions[i]] * 2, [completions[j] for j in others])
            expected.append(sum(logodds(p) for p in probs) / 2)
    assert list(trainer._logs["rewards"][spy.__name__]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert 0 <= logged(trainer, f"{spy.__name__}/order_disagreement_rate") <= 1
    assert_untouched(pair_pm, before, trainer)


def test_rloo_with_a_pairwise_model_against_a_reference_column(pairrm, policy, tmp_path):
    spy = Spy(RewardFunction(pairrm, baseline_column="reference"))
    before = snapshot(pairrm)
    trainer = train_one_step("rloo", policy, spy, CHAT_DATASET, tmp_path)
    call = spy.calls[0]
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert call["reference"] == [r for r in CHAT_DATASET["reference"] for _ in range(2)]
    probs = pairrm.compare(prompts, completions, call["reference"])
    assert list(trainer._logs["rewards"][spy.__name__]) == pytest.approx([logodds(p) for p in probs], rel=1e-5,
                                                                         abs=1e-6)
    assert_untouched(pairrm, before, trainer)


def test_rloo_with_prompts_already_in_the_policys_chat_template(loaded, policy, tmp_path):
    """A plain-text dataset whose prompts are ChatML text: the reward model reads the conversations in its own
    (Mistral) template, exactly as if the dataset had been conversational."""
    scorer = loaded("ray2333-mistral-7b")
    conversations_ = list(CHAT_DATASET["prompt"])
    tok = AutoTokenizer.from_pretrained(policy)
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations_]
    spy = Spy(RewardFunction(scorer))
    trainer = train_one_step("rloo", policy, spy, Dataset.from_dict({"prompt": texts}), tmp_path)
    completions = list(trainer._logs["completion"])
    assert all(isinstance(c, str) for c in completions) and spy.calls[0]["prompts"] == [t for t in texts
                                                                                         for _ in range(2)]
    direct = scorer.score([m for m in conversations_ for _ in range(2)], completions)
    assert list(trainer._logs["rewards"][spy.__name__]) == pytest.approx(direct, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("preset", ["pairrm", "sequence-classifier"])
def test_online_dpo(loaded, policy, tmp_path, preset):
    model = loaded(preset)
    spy = Spy(RewardFunction(model, pairing="halves") if model.kind == "pairwise" else RewardFunction(model))
    before = snapshot(model)
    trainer = train_one_step("online-dpo", policy, spy, CHAT_DATASET, tmp_path, per_device_train_batch_size=2)
    call = spy.calls[0]
    prompts, completions = call["prompts"], call["completions"]
    # online DPO: the prompts twice, first candidates then second candidates, and no log_metric
    assert prompts == list(CHAT_DATASET["prompt"]) * 2 and "log_metric" not in call
    if model.kind == "pairwise":
        probs = model.compare(prompts[:2], completions[:2], completions[2:])
        direct = [logodds(p) for p in probs] + [logodds(1 - p) for p in probs]
    else:
        direct = model.score(prompts, completions)
    assert call["rewards"] == pytest.approx(direct, abs=1e-6)
    # the trainer's own record of those rewards: their mean, and the mean chosen-minus-rejected margin
    assert logged(trainer, "objective/scores") == pytest.approx(sum(direct) / 4, abs=1e-5)
    margin = sum(abs(direct[i] - direct[i + 2]) for i in range(2)) / 2
    assert logged(trainer, "objective/scores_margin") == pytest.approx(margin, rel=1e-5, abs=1e-6)
    assert_untouched(model, before, trainer)
