"""Online DPO with PairRM judging the two candidates of each prompt against each other (pairing="halves").

    python examples/online_dpo_pairrm.py          # policy on cuda:0, PairRM (0.4B) on cuda:1
    python examples/online_dpo_pairrm.py --tiny   # CPU smoke run with tiny random checkpoints

OnlineDPOTrainer calls the reward function once per batch with the first candidates of every prompt, then the
second ones; pairing="halves" compares candidate 1 with candidate 2 of the same prompt, in both orders, and gives
them opposite rewards log(P / (1 - P)). The trainer takes the higher one as chosen.
"""

import argparse
import tempfile

from datasets import Dataset, load_dataset
from transformers import AutoTokenizer
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

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
    reward_path = make_tiny_checkpoint("pairrm", f"{workdir.name}/pairrm")
    device = "cpu"
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Write a short poem about the sea."}],
                                            [{"role": "user", "content": "What is 17 times 23?"}]]})
    config = OnlineDPOConfig(output_dir=f"{workdir.name}/out", use_cpu=True, bf16=False, max_new_tokens=8,
                             per_device_train_batch_size=2, max_steps=1, logging_steps=1, report_to="none")
else:
    policy, reward_path, device = "Qwen/Qwen2.5-0.5B-Instruct", "llm-blender/PairRM", args.reward_device
    dataset = load_dataset("trl-lib/ultrafeedback-prompt", split="train")
    config = OnlineDPOConfig(output_dir="online-dpo-pairrm", bf16=True, max_new_tokens=512,
                             per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=5e-7,
                             max_steps=500)

reward_fn = RewardFunction(load_reward_model(reward_path, device=device), pairing="halves")
trainer = OnlineDPOTrainer(model=policy, reward_funcs=reward_fn, args=config, train_dataset=dataset,
                           processing_class=AutoTokenizer.from_pretrained(policy))
trainer.train()

# rewards are antisymmetric within a pair, so their mean is 0; the margin is the mean |reward difference|
last = [h for h in trainer.state.log_history if "objective/scores_margin" in h][-1]
print(f"step {last['step']}: mean reward {last['objective/scores']:.4f}, "
      f"chosen-rejected reward margin {last['objective/scores_margin']:.4f}")
