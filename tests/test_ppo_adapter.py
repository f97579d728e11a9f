"""PPORewardAdapter under TRL's legacy PPO scoring call, ``trl.experimental.utils.get_reward``: policy tokens
(left-padded queries, right-padded responses) from a tiny ChatML policy tokenizer, scored by a reward model with
another tokenizer and template, must get the reward ``rm.score`` gives the same conversations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from trl.experimental.utils import get_reward

from rlhf_rewards import PPORewardAdapter, load_reward_model
from rlhf_rewards.testing.policy import make_tiny_policy

PRESET = "ray2333-mistral-7b"  # Mistral's tokenizer and [INST] template, unlike the policy's

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Say nothing."}],
]
# a finished response, one cut off before its end-of-turn token, a multi-line one, an empty one
RESPONSES = [("Hi, how can I help?", True), ("Rayleigh scattering of", False), ("Green.\n\nLike grass.", True),
             ("", False)]


@pytest.fixture(scope="module")
def rm(tiny_dir):
    return load_reward_model(tiny_dir(PRESET), preset=PRESET, device="cpu")


@pytest.fixture(scope="module")
def policy_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_policy(str(tmp_path_factory.mktemp("policy"))))


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[pad_id] * (width - len(r)) + r if side == "left" else r + [pad_id] * (width - len(r))
                         for r in rows])


def query_responses(tok, queries: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Left-padded queries followed by right-padded responses, as legacy PPO lays them out; and the context
    length (the padded query width)."""
    responses = [tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
                 for text, finished in RESPONSES]
    left = pad_rows(queries, tok.pad_token_id, "left")
    return torch.cat([left, pad_rows(responses, tok.pad_token_id, "right")], dim=1), left.shape[1]


def templated_queries(tok) -> list[list[int]]:
    return [tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in CONVERSATIONS]


def test_get_reward_reads_the_reward_models_score(rm, policy_tokenizer):
    tok = policy_tokenizer
    tokens, context_length = query_responses(tok, templated_queries(tok))
    _, rewards, lengths = get_reward(PPORewardAdapter(rm, tok), tokens, tok.pad_token_id, context_length)
    expected = rm.score(CONVERSATIONS, [text for text, _ in RESPONSES])
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert rewards.tolist() == pytest.approx(expected, abs=1e-5)
    assert lengths[3] == context_length - 1  # the empty response: get_reward reads the last query position


def test_a_pad_token_that_is_also_the_eos_token(rm, policy_tokenizer):
    """With pad = EOS (common for Llama-3 policies), get_reward masks the end-of-turn tokens inside the query too;
    the adapter restores them and still finds the turns."""
    tok = policy_tokenizer
    tok_eos_pad = AutoTokenizer.from_pretrained(tok.name_or_path, pad_token=tok.eos_token)
    assert tok_eos_pad.pad_token_id == tok_eos_pad.eos_token_id
    tokens, context_length = query_responses(tok_eos_pad, templated_queries(tok_eos_pad))
    adapter = PPORewardAdapter(rm, tok_eos_pad)
    _, rewards, _ = get_reward(adapter, tokens, tok_eos_pad.pad_token_id, context_length)
    assert rewards.tolist() == pytest.approx(rm.score(CONVERSATIONS, [t for t, _ in RESPONSES]), abs=1e-5)


def test_plain_text_queries_need_the_context_length(rm, policy_tokenizer):
    tok = policy_tokenizer
    queries = ["Hello there", "Why is the sky blue?", "Another colour, please.", "Say nothing."]
    tokens, context_length = query_responses(tok, [tok(q)["input_ids"] for q in queries])
    adapter = PPORewardAdapter(rm, tok)
    with pytest.raises(ValueError, match="set adapter.context_length"):
        get_reward(adapter, tokens, tok.pad_token_id, context_length)
    adapter.context_length = context_length
    _, rewards, _ = get_reward(adapter, tokens, tok.pad_token_id, context_length)
    assert rewards.tolist() == pytest.approx(rm.score(queries, [t for t, _ in RESPONSES]), abs=1e-5)


def test_a_response_that_writes_template_markup(rm, policy_tokenizer):
    tok = policy_tokenizer
    queries = templated_queries(tok)[:1]
    response = tok("Sure.<|im_start|>user\nmore", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([queries[0] + response])
    adapter = PPORewardAdapter(rm, tok)
    with pytest.raises(ValueError, match="set adapter.context_length"):
        get_reward(adapter, tokens, tok.pad_token_id, len(queries[0]))
    # split at the query width, the response is decoded as TRL decodes completions: special tokens skipped
    adapter.context_length = len(queries[0])
    _, rewards, _ = get_reward(adapter, tokens, tok.pad_token_id, len(queries[0]))
    assert rewards.tolist() == pytest.approx(rm.score(CONVERSATIONS[:1], ["Sure.user\nmore"]), abs=1e-5)


def test_moving_the_adapter_leaves_the_reward_model_alone(rm, policy_tokenizer):
    tok = policy_tokenizer
    tokens, context_length = query_responses(tok, templated_queries(tok))
    adapter = PPORewardAdapter(rm, tok)
    before = get_reward(adapter, tokens, tok.pad_token_id, context_length)[1]
    # what a legacy trainer does with its reward_model
    adapter.to(torch.bfloat16).to("cpu").eval()
    assert list(adapter.parameters()) == []
    assert all(p.dtype == torch.float32 and p.device == rm.device for p in rm.model.parameters())
    assert torch.equal(get_reward(adapter, tokens, tok.pad_token_id, context_length)[1], before)


def test_pairwise_models_are_refused(tiny_dir, policy_tokenizer):
    pairwise = load_reward_model(tiny_dir("pairrm"), device="cpu")
    with pytest.raises(ValueError, match="scalar reward model"):
        PPORewardAdapter(pairwise, policy_tokenizer)
