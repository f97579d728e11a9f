"""Legacy PPO scoring: trl.experimental.utils.get_reward with a reward model that does not share the policy's tokenizer.

    python examples/ppo_adapter.py          # policy on cuda:0, Ray2333's Mistral reward model on cuda:1
    python examples/ppo_adapter.py --tiny   # CPU smoke run with tiny random checkpoints

TRL 1.16 has no PPOTrainer; PPO loops written for its older versions score with
get_reward(reward_model, query_responses, pad_token_id, context_length), which feeds the POLICY's token ids to the
reward model. PPORewardAdapter takes those ids, decodes them with the policy tokenizer, re-renders each conversation
in the reward model's own template and returns the reward where get_reward reads it.
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.utils import get_reward

from rlhf_rewards import PPORewardAdapter, load_reward_model

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="run on the CPU with tiny random checkpoints")
parser.add_argument("--reward-device", default="cuda:1")
args = parser.parse_args()

if args.tiny:
    from rlhf_rewards.testing import make_tiny_checkpoint
    from rlhf_rewards.testing.policy import make_tiny_policy

    workdir = tempfile.TemporaryDirectory()  # removed when the script ends
    policy_path = make_tiny_policy(f"{workdir.name}/policy")
    reward_path = make_tiny_checkpoint("ray2333-mistral-7b", f"{workdir.name}/ray2333")
    policy_device, reward_device, max_new_tokens = "cpu", "cpu", 8
else:
    policy_path = "Qwen/Qwen2.5-0.5B-Instruct"
    reward_path = "Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback"
    policy_device, reward_device, max_new_tokens = "cuda:0", args.reward_device, 256

prompts = [[{"role": "user", "content": "Write a short poem about the sea."}],
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 17 times 23?"}]]

# PPO's rollout: left-padded queries in the policy's chat template, responses padded after their EOS
tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(policy_path).to(policy_device)
queries = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_tensors="pt",
                                        return_dict=True).to(policy_device)
context_length = queries["input_ids"].shape[1]
with torch.no_grad():
    query_responses = policy.generate(**queries, do_sample=True, max_new_tokens=max_new_tokens)

# The adapter is an nn.Module without parameters: moving it (as PPO trainers do) leaves the reward model on its GPU.
# context_length splits each row into query and response exactly; without it the adapter splits at the policy's
# chat template (enough for trainers that call get_reward themselves, unless a response writes template markup).
reward_model = PPORewardAdapter(load_reward_model(reward_path, device=reward_device), tokenizer,
                                context_length=context_length).to(policy_device)
_, rewards, _ = get_reward(reward_model, query_responses, tokenizer.pad_token_id, context_length)
responses = tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
for prompt, response, reward in zip(prompts, responses, rewards.tolist()):
    print(f"reward {reward:+.4f}  {prompt[-1]['content']!r} -> {response!r}")
