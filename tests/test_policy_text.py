"""One reading of what a policy writes, on every entry point: end-of-turn markers, pads and empty responses give
the same rewards through ``group_rewards``, ``best_of_n``, ``RewardFunction`` and the server."""

from __future__ import annotations

import httpx
import pytest

from rlhf_rewards import RewardFunction, best_of_n, group_rewards, load_reward_model
from rlhf_rewards.policy_text import split_policy_text
from rlhf_rewards.serving import RewardEngine, build_app

from serving_helpers import ServerThread

CHATML_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
# the same answer written four ways a policy's decode can leave it, then two other answers, then empty ones
GROUP = ["4<|im_end|>", "4", "4<|im_end|><|endoftext|>", "4<|endoftext|>", "five<|im_end|>", "5", "", "<|im_end|>"]


@pytest.mark.parametrize("text, expected", [
    (CHATML_PROMPT + "4<|im_end|>", "4"),
    ("<pad>" * 3 + CHATML_PROMPT + "4<|im_end|><|endoftext|><|endoftext|>", "4"),
    (CHATML_PROMPT + "<|im_end|>", ""),
    (CHATML_PROMPT, ""),  # the policy stopped at once: the text ends with the generation prompt
])
def test_split_policy_text_reads_markers_pads_and_empty_responses(text, expected):
    messages, response = split_policy_text(text, "query")
    assert messages == [{"role": "user", "content": "What is 2+2?"}]
    assert response == expected


def test_split_policy_text_refuses_a_text_without_a_response():
    with pytest.raises(ValueError, match="ends with a closed user turn"):
        split_policy_text("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "query")


@pytest.fixture(scope="module")
def pairrm(tiny_dir):
    return load_reward_model(tiny_dir("pairrm"), device="cpu")


def test_every_entry_point_reads_a_completion_the_same_way(pairrm):
    n = len(GROUP)
    prompts = [CHATML_PROMPT] * n
    by_helper = group_rewards(pairrm, prompts, GROUP, group_size=n)
    # the four spellings of "4" are one answer, as are "" and a bare end marker: ties with each other
    assert by_helper[0] == by_helper[1] == by_helper[2] == by_helper[3]
    assert by_helper[6] == by_helper[7]
    assert len({round(r, 9) for r in by_helper}) > 1  # and not everything is a tie

    by_function = RewardFunction(pairrm, pairing="group", group_size=n)(prompts, GROUP)
    assert by_function == pytest.approx(by_helper, abs=1e-6)

    # the markers change no decision: the same answer wins as among the bare answers
    bare = ["4", "4", "4", "4", "five", "5", "", ""]
    assert bare[best_of_n(pairrm, [CHATML_PROMPT], [GROUP])[0]] == bare[best_of_n(pairrm, [CHATML_PROMPT], [bare])[0]]
    assert group_rewards(pairrm, prompts, bare, group_size=n) == pytest.approx(by_helper, abs=1e-9)

    with ServerThread(build_app(RewardEngine(pairrm, max_wait_ms=0))) as url:
        answer = httpx.post(url + "/v1/rewards", json={"prompts": prompts, "completions": GROUP,
                                                      "pairing": "group", "group_size": n}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(by_helper, abs=1e-6)


LLAMA31 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
           "Today Date: 26 Jul 2024\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?"
           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")


def test_the_llama31_templates_own_preamble_is_not_a_system_prompt():
    """Llama-3.1's template writes its knowledge cutoff and a date into the system turn of every conversation:
    parsed back as the conversation's system prompt, a reward model of that family would read it twice."""
    assert split_policy_text(LLAMA31.format(system=""), "q") == ([{"role": "user", "content": "What is 2+2?"}], "4")
    messages, _ = split_policy_text(LLAMA31.format(system="Be brief."), "q")
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
