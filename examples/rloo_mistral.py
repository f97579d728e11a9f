"""RLOO with Ray2333's Mistral-7B reward model, the reward model on its own GPU.

    python examples/rloo_mistral.py           # policy on cuda:0, the reward model (fp16, ~15 GB) on cuda:1
    python examples/rloo_mistral.py --tiny    # CPU smoke run with tiny random checkpoints

The policy writes in its own chat template (Qwen's ChatML); the reward model reads each conversation in its own
Mistral [INST] template, rendered by the RewardFunction.
"""

import argparse
import tempfile

from datasets import Dataset, load_dataset
from trl import RLOOConfig, RLOOTrainer

from rlhf_rewards import RewardFunction, load_reward_model

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="run on the CPU with tiny random checkpoints")
parser.add_argument("--reward-device", default="cuda:1")
args = parser.parse_args()

if args.tiny:
    from rlhf_rewards.testing import make_tiny_checkpoint
    from rlhf_rewards.testing.policy import make_tiny_policy

    workdir = tempfile.TemporaryDirectory()  # removed when the script ends
    policy = make_tiny_policy(f"{workdir.name}/policy")
    reward_path = make_tiny_checkpoint("ray2333-mistral-7b", f"{workdir.name}/ray2333")
    device = "cpu"
    dataset = Dataset.from_dict({"prompt": [
        [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one?"}],
    ]})
    config = RLOOConfig(output_dir=f"{workdir.name}/out", use_cpu=True, bf16=False, max_completion_length=8,
                        num_generations=2, per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                        report_to="none")
else:
    policy = "Qwen/Qwen2.5-0.5B-Instruct"
    reward_path, device = "Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback", args.reward_device
    dataset = load_dataset("trl-lib/ultrafeedback-prompt", split="train")
    config = RLOOConfig(output_dir="rloo-mistral-rm", bf16=True, max_completion_length=512, num_generations=4,
                        per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=1e-6,
                        max_steps=500)

reward_fn = RewardFunction(load_reward_model(reward_path, device=device))
trainer = RLOOTrainer(model=policy, reward_funcs=reward_fn, args=config, train_dataset=dataset)
trainer.train()

name = reward_fn.__name__
last = [h for h in trainer.state.log_history if f"rewards/{name}/mean" in h][-1]
print(f"step {last['step']}: mean reward {last[f'rewards/{name}/mean']:.4f} (std {last[f'rewards/{name}/std']:.4f})")
