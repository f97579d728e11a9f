"""Best-of-n sampling judged by RLHFlow's pairwise preference model.

    python examples/best_of_n_pair_pm.py          # policy on cuda:0, the preference model (bf16, ~16 GB) on cuda:1
    python examples/best_of_n_pair_pm.py --tiny   # CPU smoke run with tiny random checkpoints

The policy samples n answers per prompt. best_of_n runs a knockout (n - 1 comparisons per prompt, each in both
orders); group_rewards gives every answer its mean log-odds of beating the others, the reward GRPO would see.
"""

import argparse
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_rewards import best_of_n, group_rewards, load_reward_model

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="run on the CPU with tiny random checkpoints")
parser.add_argument("--reward-device", default="cuda:1")
parser.add_argument("-n", type=int, default=4, help="answers sampled per prompt")
args = parser.parse_args()

if args.tiny:
    from rlhf_rewards.testing import make_tiny_checkpoint
    from rlhf_rewards.testing.policy import make_tiny_policy

    workdir = tempfile.TemporaryDirectory()  # removed when the script ends
    policy_path = make_tiny_policy(f"{workdir.name}/policy")
    reward_path = make_tiny_checkpoint("rlhflow-pair-pm-llama3-8b", f"{workdir.name}/pair-pm")
    policy_device, reward_device, max_new_tokens = "cpu", "cpu", 8
else:
    policy_path, reward_path = "Qwen/Qwen2.5-0.5B-Instruct", "RLHFlow/pair-preference-model-LLaMA3-8B"
    policy_device, reward_device, max_new_tokens = "cuda:0", args.reward_device, 512

prompts = [[{"role": "user", "content": "Write a short poem about the sea."}],
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 17 times 23?"}]]

tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(policy_path).to(policy_device)
inputs = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_tensors="pt",
                                       return_dict=True).to(policy_device)
outputs = policy.generate(**inputs, do_sample=True, num_return_sequences=args.n, max_new_tokens=max_new_tokens)
texts = tokenizer.batch_decode(outputs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
candidates = [texts[i * args.n:(i + 1) * args.n] for i in range(len(prompts))]

judge = load_reward_model(reward_path, device=reward_device)
best = best_of_n(judge, prompts, candidates)
rewards = group_rewards(judge, [p for p in prompts for _ in range(args.n)], texts, args.n)
for i, prompt in enumerate(prompts):
    print(f"prompt {prompt[-1]['content']!r}: best answer {best[i]}")
    for j, answer in enumerate(candidates[i]):
        print(f"  reward {rewards[i * args.n + j]:+.4f}  {answer!r}")
