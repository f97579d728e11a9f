""":class:`PPORewardAdapter`: a reward model behind the legacy PPO ``reward_model`` contract
(``trl.experimental.utils.get_reward``), for a reward model whose tokenizer differs from the policy's."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ..backends.base import RewardModel
from ..chat_parsing import parse_chat, strip_completion
from ..policy_text import split_policy_text
from ..conversation import Message


class _RewardBackbone(nn.Module):
    """What ``get_reward`` calls as ``getattr(model, model.base_model_prefix)``: takes the policy's tokens and
    returns, as ``last_hidden_state``, the reward of each row broadcast to every position (shape ``(B, L, 1)``)."""

    def __init__(self, adapter: PPORewardAdapter):
        super().__init__()
        self._adapter = [adapter]  # a list keeps the parent out of this module's children (no cycle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any):
        from transformers.modeling_outputs import BaseModelOutput

        rewards = self._adapter[0].rewards_for_tokens(input_ids, attention_mask)
        hidden = rewards.to(input_ids.device)[:, None, None].expand(-1, input_ids.shape[1], 1)
        return BaseModelOutput(last_hidden_state=hidden)


class PPORewardAdapter(nn.Module):
    """A ``reward_model`` for PPO-style trainers that score through ``get_reward(model, query_responses,
    pad_token_id, context_length)`` (TRL's legacy PPOTrainer, ``trl.experimental.utils.get_reward``), for a reward
    model whose tokenizer differs from the policy's.

    ``get_reward`` runs ``model.<base_model_prefix>`` on the policy's token ids and reads ``model.score`` at the
    last response token. This adapter decodes each row's tokens with the policy tokenizer, splits prompt and
    response, re-renders them for the reward model, and returns that reward (the reward model's score, as float32)
    at every position, so the position ``get_reward`` reads holds it. The reward model is not a submodule: moving the
    adapter with ``.to()`` leaves it on its own device.

    Prompt and response are split at :attr:`context_length` when it is set (exact, whatever the response holds),
    else at the policy's chat template: the text must parse as a conversation whose last assistant turn is the
    response, so a response that writes template markup itself raises ``ValueError``.

    Args:
        model: a scalar reward model from :func:`rlhf_rewards.load_reward_model`.
        policy_tokenizer: the tokenizer the policy's token ids come from; its ``pad_token_id`` must be the one
            passed to ``get_reward``.
        context_length: the number of query positions (left-padded) at the start of each row, as passed to
            ``get_reward``; needed for untemplated queries. Set the attribute before each call when it changes.
    """

    base_model_prefix = "reward_backbone"

    def __init__(self, model: RewardModel, policy_tokenizer: Any, *, context_length: Optional[int] = None):
        super().__init__()
        if model.kind != "scalar":
            raise ValueError("PPORewardAdapter needs a scalar reward model; wrap a pairwise one with a baseline in "
                             "RewardFunction instead")
        self.reward_model = model
        self.policy_tokenizer = policy_tokenizer
        self.context_length = context_length
        self.reward_backbone = _RewardBackbone(self)
        self.score = nn.Identity()

    def _real_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """The row's tokens between its left and right padding. ``get_reward`` masks every token equal to the pad
        id and zeroes it; inside the row such a token is real (a policy whose pad token is its EOS writes it after
        every turn), so it is restored."""
        kept = mask.bool().nonzero().flatten()
        if len(kept) == 0:
            return []
        pad = self.policy_tokenizer.pad_token_id
        ids = ids if pad is None else torch.where(mask.bool(), ids, pad)
        return ids[int(kept[0]): int(kept[-1]) + 1].tolist()

    def split(self, row_ids: torch.Tensor, row_mask: torch.Tensor) -> tuple[Union[str, list[Message]], str]:
        """The prompt (messages) and response text of one row of policy tokens."""
        tok = self.policy_tokenizer
        if self.context_length is not None:
            cut = self.context_length
            query = self._real_ids(row_ids[:cut], row_mask[:cut])
            response = self._real_ids(row_ids[cut:], row_mask[cut:])
            messages, fmt = parse_chat(tok.decode(query, skip_special_tokens=False))
            return messages, strip_completion(tok.decode(response, skip_special_tokens=True), fmt)
        text = tok.decode(self._real_ids(row_ids, row_mask), skip_special_tokens=False)
        try:
            return split_policy_text(text, "the row")
        except ValueError as err:
            # e.g. untemplated text, or a response that itself writes template markup such as "<|im_start|>"
            raise ValueError(f"cannot split a row into prompt and response at the policy's chat template ({err}); "
                             "set adapter.context_length to the padded query width") from None

    def rewards_for_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward of each row of policy tokens, as a float32 tensor on the CPU."""
        prompts, responses = [], []
        for row in range(input_ids.shape[0]):
            prompt, response = self.split(input_ids[row].cpu(), attention_mask[row].cpu())
            prompts.append(prompt)
            responses.append(response)
        with self.reward_model.lock:
            rewards = self.reward_model.score(prompts, responses)
        return torch.tensor(rewards, dtype=torch.float32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward of each row (for direct use outside ``get_reward``)."""
        return self.rewards_for_tokens(input_ids, attention_mask)
