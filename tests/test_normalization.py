"""Reward normalisation: the arithmetic against numpy and TRL's own GDPO step, ``RewardFunction(normalize=...)``
against raw rewards normalised step by step, where "stats" come from (a calibration file, the checkpoint config's
OpenRLHF mean/std, the file winning), every refusal naming what and where, and the server and remote clients
giving the in-process numbers."""

from __future__ import annotations

import json
import logging
import shutil

import httpx
import numpy as np
import pytest
import torch
from trl.trainer.utils import nanstd

from rlhf_rewards import RemoteRewardFunction, RewardFunction, load_reward_model
from rlhf_rewards.normalization import (CALIBRATION_FORMAT, GROUP_EPS, QUANTILES, normalize_in_groups,
                                        reward_shape, summarize)
from rlhf_rewards.serving import RewardEngine, ServerSettings, build_app

from serving_helpers import ServerThread
from test_serving_contracts import assert_rewards

SCALAR = "sequence-classifier"
PROMPTS = ["What is 2 + 2?"] * 3 + ["Name a colour."] * 3 + ["Say hello."] * 3
COMPLETIONS = ["4", "Four.", "5", "Blue.", "Red, surely.", "Loud", "Hello!", "Hi there, friend.", "Bye"]


def numpy_group_normalized(values, size):
    """GDPO's per-group step, written with numpy: (r - mean) / (sample std + 1e-4) over the group's rewards."""
    out = []
    for start in range(0, len(values), size):
        group = [v for v in values[start:start + size]]
        scored = np.array([v for v in group if v is not None], dtype=np.float64)
        for v in group:
            if v is None:
                out.append(None)
            elif len(scored) < 2 or np.all(scored == scored[0]):
                out.append(0.0)
            else:
                out.append(float((v - scored.mean()) / (scored.std(ddof=1) + 1e-4)))
    return out


def write_calibration(path, model, mean, std, reward=None, preset=None):
    """A calibration file as `rlhf-rewards calibrate` writes it (its fields that normalisation reads)."""
    record = {"format": CALIBRATION_FORMAT, "mean": mean, "std": std,
              "model": {"name_or_path": model.name_or_path, "preset": preset or model.preset.name},
              "reward": reward or reward_shape(model.kind, baseline=False)}
    path.write_text(json.dumps(record))
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_reward_model(tiny_dir(SCALAR), preset=SCALAR, device="cpu")


@pytest.fixture(scope="module")
def config_model(tiny_dir, tmp_path_factory):
    """The tiny checkpoint copied, with OpenRLHF's mean/std written into its config.json as its RM trainer does."""
    path = tmp_path_factory.mktemp("openrlhf") / "rm"
    shutil.copytree(tiny_dir(SCALAR), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "mean": 0.04, "std": 0.02}))
    return load_reward_model(str(path), preset=SCALAR, device="cpu")


# -- the arithmetic -------------------------------------------------------------------------------------------------
def test_group_normalisation_is_numpys_and_trls_gdpo_step():
    rng = np.random.default_rng(0)
    values = [float(v) for v in rng.normal(3.0, 20.0, 12)]
    values[4] = None  # left out of its group's statistics, and stays None
    values[8:12] = [None, None, 2.5, None]  # one reward left in its group: nothing to compare it with
    ours = normalize_in_groups(values, [(0, 4), (4, 8), (8, 12)])
    assert_rewards(ours, numpy_group_normalized(values, 4))
    assert ours[10] == 0.0 and ours[4] is None
    # TRL 1.16 GRPOTrainer, multi_objective_aggregation="normalize_then_sum": NaN for None, nanmean/nanstd per group
    grouped = torch.tensor([np.nan if v is None else v for v in values], dtype=torch.float64).view(-1, 4)
    trl = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    assert GROUP_EPS == 1e-4
    for ours_value, trl_value in zip(ours[:8], trl.view(-1)[:8].tolist()):
        assert (ours_value is None) == np.isnan(trl_value)
        if ours_value is not None:
            assert ours_value == pytest.approx(trl_value, rel=1e-6)  # TRL's Bessel factor is a float32


def test_a_constant_group_gives_zeros():
    assert normalize_in_groups([0.1, 0.1, 0.1, None], [(0, 4)]) == [0.0, 0.0, 0.0, None]


def test_summary_statistics_are_numpys():
    values = [float(v) for v in np.random.default_rng(1).gamma(2.0, 3.0, 101)]
    got = summarize(values)
    assert got["n"] == 101
    assert got["mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert got["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert (got["min"], got["max"]) == (min(values), max(values))
    assert list(got["quantiles"]) == [str(q) for q in QUANTILES]
    for q, value in got["quantiles"].items():
        assert value == pytest.approx(np.percentile(values, float(q)), rel=1e-12)
    assert summarize([2.0])["std"] is None and summarize([])["mean"] is None


# -- RewardFunction -------------------------------------------------------------------------------------------------
def test_stats_from_a_calibration_file(model, tmp_path, caplog):
    raw = RewardFunction(model)(PROMPTS, COMPLETIONS)
    path = write_calibration(tmp_path / "stats.json", model, mean=0.05, std=0.01)
    with caplog.at_level(logging.INFO, logger="rlhf_rewards.trainers.reward_function"):
        fn = RewardFunction(model, normalize="stats", calibration=path)
    assert f"(r - 0.05) / 0.01 from {path}" in caplog.text  # logged once, at construction
    assert "normalize=stats" in repr(fn) and path in repr(fn)
    assert_rewards(fn(PROMPTS, COMPLETIONS), [(r - 0.05) / 0.01 for r in raw])


def test_stats_from_the_checkpoint_config_and_the_file_takes_precedence(config_model, tmp_path, caplog):
    raw = RewardFunction(config_model)(PROMPTS, COMPLETIONS)
    from_config = RewardFunction(config_model, normalize="stats")
    assert "config.json" in repr(from_config) and "OpenRLHF" in repr(from_config)
    assert_rewards(from_config(PROMPTS, COMPLETIONS), [(r - 0.04) / 0.02 for r in raw])
    path = write_calibration(tmp_path / "stats.json", config_model, mean=0.5, std=4.0)
    with caplog.at_level(logging.INFO, logger="rlhf_rewards.trainers.reward_function"):
        from_file = RewardFunction(config_model, normalize="stats", calibration=path)
    assert "takes precedence over the checkpoint config" in caplog.text
    assert_rewards(from_file(PROMPTS, COMPLETIONS), [(r - 0.5) / 4.0 for r in raw])


def test_group_mode_leaves_unscorable_samples_out(model):
    prompts = list(PROMPTS)
    completions = list(COMPLETIONS)
    completions[4] = None  # unscorable: None in the raw rewards, None after
    raw = RewardFunction(model)(prompts, completions)
    assert raw[4] is None
    for group_size in (3, None):  # None: runs of equal consecutive prompts, the same groups here
        fn = RewardFunction(model, normalize="group", group_size=group_size)
        assert "normalize=group" in repr(fn)
        assert_rewards(fn(prompts, completions), numpy_group_normalized(raw, 3))
    with pytest.raises(ValueError, match="groups of group_size=3"):
        RewardFunction(model, normalize="group", group_size=3)(prompts[:4], completions[:4])


def test_stats_without_any_statistics_names_where_it_looked(model):
    with pytest.raises(ValueError, match=r"no calibration was given .*config\.json has no OpenRLHF mean/std"):
        RewardFunction(model, normalize="stats")


@pytest.mark.parametrize("change, message", [
    ({"preset": "skywork-reward-v2"}, r"describes preset 'skywork-reward-v2' .* loaded model is preset "
                                      r"'sequence-classifier'"),
    ({"model": "/elsewhere/rm"}, r"describes model /elsewhere/rm, but the loaded model is /"),
    ({"reward": reward_shape("scalar", baseline=True)}, r"describes the reward \(kind='scalar', baseline=True\), "
                                                        r"but this function's reward is \(kind='scalar'\)"),
])
def test_statistics_of_another_model_or_reward_are_refused(model, tmp_path, change, message):
    path = write_calibration(tmp_path / "stats.json", model, 0.0, 1.0, reward=change.get("reward"),
                             preset=change.get("preset"))
    if "model" in change:
        record = json.loads(open(path).read())
        record["model"]["name_or_path"] = change["model"]
        (tmp_path / "stats.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message):
        RewardFunction(model, normalize="stats", calibration=path)


@pytest.mark.parametrize("options, message", [
    ({"normalize": "stats", "pairing": "group"}, "does not go with pairing='group'"),
    ({"normalize": "group", "pairing": "halves"}, "does not go with pairing='halves'"),
    ({"normalize": "mean"}, "normalize must be None, 'stats' or 'group'"),
    ({"calibration": "stats.json"}, "only read by normalize='stats'"),
    ({"group_size": 3}, "needs pairing='group' or normalize='group'"),
])
def test_options_that_do_not_go_together_fail_at_construction(model, options, message):
    with pytest.raises(ValueError, match=message):
        RewardFunction(model, **options)


@pytest.mark.parametrize("content, message", [("{", "not valid JSON"), ('{"mean": 0}', "not a calibration file"),
                                              (None, "cannot read")])
def test_a_bad_calibration_file_is_named(model, tmp_path, content, message):
    path = tmp_path / "stats.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}|{message}.*{path}"):
        RewardFunction(model, normalize="stats", calibration=str(path))


def test_a_std_that_is_not_positive_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="std is 0.0"):
        RewardFunction(model, normalize="stats", calibration=write_calibration(tmp_path / "s.json", model, 1.0, 0))


# -- the server and the remote clients ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    """Two servers of the model with a calibration file, and that file."""
    path = write_calibration(tmp_path_factory.mktemp("served") / "stats.json", model, mean=0.06, std=0.015)
    servers = [ServerThread(build_app(RewardEngine(model, calibration=path), ServerSettings())) for _ in range(2)]
    urls = [s.__enter__() for s in servers]
    yield urls, path
    for s in servers:
        s.__exit__(None, None, None)


@pytest.mark.parametrize("options", [{"normalize": "stats"}, {"normalize": "group", "group_size": 3},
                                     {"normalize": "group"}])
def test_remote_and_in_process_give_the_same_numbers(model, served, options):
    urls, path = served
    calibration = {"calibration": path} if options["normalize"] == "stats" else {}
    expected = RewardFunction(model, **options, **calibration)(PROMPTS, COMPLETIONS)
    remote = RemoteRewardFunction(urls, max_shard_size=4, **options)  # groups stay whole across the two servers
    assert "normalize=" in repr(remote)
    assert_rewards(remote(PROMPTS, COMPLETIONS), expected)
    body = {"prompts": PROMPTS, "completions": COMPLETIONS, **options}
    answer = httpx.post(urls[0] + "/v1/score", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert_rewards(answer.json()["rewards"], expected)


def test_the_server_states_its_statistics_and_refuses_another_reward(model, served):
    urls, path = served
    card = httpx.get(urls[0] + "/v1/models", timeout=10).json()["data"][0]["normalization"]
    assert card["modes"] == ["stats", "group"]
    assert (card["stats"]["mean"], card["stats"]["std"], card["stats"]["std_kind"]) == (0.06, 0.015, "sample (n - 1)")
    assert path in card["stats"]["source"]
    body = {"prompts": PROMPTS, "completions": COMPLETIONS, "baselines": COMPLETIONS, "normalize": "stats"}
    answer = httpx.post(urls[0] + "/v1/score", json=body, timeout=60)
    assert answer.status_code == 422 and "baseline=True" in answer.text
    with pytest.raises(ValueError, match="baseline=True"):
        RemoteRewardFunction(urls, baseline_column="ref", normalize="stats")(PROMPTS, COMPLETIONS,
                                                                             ref=COMPLETIONS)


def test_a_server_without_statistics_refuses_stats_requests(model):
    with ServerThread(build_app(RewardEngine(model), ServerSettings())) as url:
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["normalization"]
        assert card == {"modes": ["group"], "stats": None}
        with pytest.raises(ValueError, match="no calibration was given"):
            RemoteRewardFunction(url, normalize="stats")(PROMPTS, COMPLETIONS)


def test_an_engine_refuses_a_calibration_of_another_model(model, tmp_path):
    path = write_calibration(tmp_path / "stats.json", model, 0.0, 1.0, preset="skywork-reward-v2")
    with pytest.raises(ValueError, match="describes preset 'skywork-reward-v2'"):
        RewardEngine(model, calibration=path)
