"""GRPO with Starling-RM-34B as the reward, the reward model on its own GPU.

    python examples/grpo_starling.py                      # policy on cuda:0, Starling-RM-34B (bf16, ~70 GB) on cuda:1
    python examples/grpo_starling.py --quantization 8bit  # the reward model in ~36 GB
    python examples/grpo_starling.py --tiny               # CPU smoke run with tiny random checkpoints

Several training processes, each with its own reward GPU (ranks 0-3 train on cuda:0-3, score on cuda:4-7):

    accelerate launch --num_processes 4 examples/grpo_starling.py --reward-device 'cuda:{local_rank+4}'
"""

import argparse
import tempfile

from datasets import Dataset, load_dataset
from trl import GRPOConfig, GRPOTrainer

from rlhf_rewards import RewardFunction, load_reward_model

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="run on the CPU with tiny random checkpoints")
parser.add_argument("--reward-device", default="cuda:1")
parser.add_argument("--quantization", choices=["8bit", "4bit"])
args = parser.parse_args()

if args.tiny:
    from rlhf_rewards.testing import make_tiny_checkpoint
    from rlhf_rewards.testing.policy import make_tiny_policy

    workdir = tempfile.TemporaryDirectory()  # removed when the script ends
    policy = make_tiny_policy(f"{workdir.name}/policy")
    reward_path = make_tiny_checkpoint("starling-rm-34b", f"{workdir.name}/starling")
    device = "cpu"
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Write a short poem about the sea."}],
                                            [{"role": "user", "content": "What is 17 times 23?"}]]})
    config = GRPOConfig(output_dir=f"{workdir.name}/out", use_cpu=True, bf16=False, max_completion_length=8,
                        num_generations=2, per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                        report_to="none")
else:
    policy, reward_path, device = "Qwen/Qwen2.5-0.5B-Instruct", "Nexusflow/Starling-RM-34B", args.reward_device
    dataset = load_dataset("trl-lib/ultrafeedback-prompt", split="train")  # conversational prompts
    config = GRPOConfig(output_dir="grpo-starling", bf16=True, max_completion_length=512, num_generations=8,
                        per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=1e-6,
                        max_steps=500)

# The reward model stays on its device; TRL only sees a plain callable and never moves it.
reward_model = load_reward_model(reward_path, device=device, quantization=args.quantization)
reward_fn = RewardFunction(reward_model)

trainer = GRPOTrainer(model=policy, reward_funcs=reward_fn, args=config, train_dataset=dataset)
trainer.train()

# the function's truncation rate and scoring time are logged next to TRL's reward statistics
name = reward_fn.__name__
last = [h for h in trainer.state.log_history if f"rewards/{name}/mean" in h][-1]
print(f"step {last['step']}: mean reward {last[f'rewards/{name}/mean']:.4f}, "
      f"truncation rate {last[f'{name}/truncation_rate']:.3f}, scoring {last[f'{name}/seconds']:.3f} s")
