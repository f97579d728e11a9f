"""The model cards' own procedures for the families added after the seeds, written step by step from each card and
its hub repository's code, one conversation (or one solution) per forward pass, reading their weights from the
checkpoint's files with plain transformers and torch (nothing from the package's backends). The test suite checks
the package against them (``tests/test_armorm.py``, ``test_inform.py``, ``test_nemotron.py``, ``test_skywork.py``,
``test_process_rewards.py``, ``test_rlhflow_prm.py``, ``test_math_shepherd.py``); the benchmark times them and
``benchmarks.gpu_check`` compares on a device. Each takes ``device`` and ``dtype`` (default: the CPU, float32)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaModel, LlamaPreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model)

Messages = list[dict]
CPU = torch.device("cpu")


def conversation(prompt: Messages, completion: str) -> Messages:
    """The card's conversation: the prompt's messages, then the completion as the assistant's turn."""
    return [dict(m) for m in prompt] + [{"role": "assistant", "content": completion}]


# -- ArmoRM --------------------------------------------------------------------------------------------------------

ARMORM_HEADER = [128009, 128006, 78191, 128007, 271]  # <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n


class CardArmoRM:
    """ArmoRM's card for ONE conversation, from its demo code and the remote code's forward
    (``LlamaForRewardModelWithGating``), its head weights read from ``model.safetensors``."""

    def __init__(self, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None):
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(directory)
        with open(os.path.join(directory, "config.json")) as f:
            self.config = json.load(f)
        self.device = device
        self.weights = {k: v.to(device, dtype) for k, v in load_file(os.path.join(directory, "model.safetensors"))
                        .items()}
        self.backbone = LlamaModel(LlamaConfig.from_pretrained(directory)).eval()
        self.backbone.load_state_dict({k[len("model."):]: v for k, v in self.weights.items()
                                       if k.startswith("model.")})
        self.backbone.to(device, dtype)

    def input_ids(self, messages: Messages) -> torch.Tensor:
        return self.tokenizer.apply_chat_template(messages, return_tensors="pt")["input_ids"]

    @torch.inference_mode()
    def __call__(self, messages: Messages, gate_at: str = "pattern") -> tuple[float, list[float]]:
        """``(score, the 19 objective rewards)``; ``gate_at="last"`` reads the gate at the last token instead (a
        wrong reading, to show a check has teeth)."""
        input_ids = self.input_ids(messages).to(self.device)
        hidden = self.backbone(input_ids).last_hidden_state
        # regression at the token before the first pad id (argmax - 1, modulo the length)
        length = input_ids.shape[-1]
        at = (torch.eq(input_ids, self.config["pad_token_id"]).int().argmax(-1) - 1) % length
        rewards = hidden[torch.arange(1, device=at.device), at] @ self.weights["regression_layer.weight"].T
        # the gate at the start of the last occurrence of the assistant-header pattern
        ids = input_ids[0].tolist()
        width = len(ARMORM_HEADER)
        starts = [j for j in range(length - width, -1, -1) if ids[j:j + width] == ARMORM_HEADER]
        x = hidden[:, starts[0] if gate_at == "pattern" else length - 1]
        n_hidden = self.config.get("gating_n_hidden", 3)
        for k in range(n_hidden + 1):
            x = x @ self.weights[f"gating.layers.{k}.weight"].T + self.weights[f"gating.layers.{k}.bias"]
            if k < n_hidden:
                x = torch.relu(x)
        gate = torch.softmax(x / self.config.get("gating_temperature", 10), dim=1)
        gate = gate * self.weights["gating.logit_scale"][0]
        score = torch.sum(gate * (rewards @ self.weights["reward_transform_matrix"]), dim=1)
        return score.item(), rewards[0].float().tolist()


# -- INF-ORM -------------------------------------------------------------------------------------------------------


class CardORM(LlamaPreTrainedModel):
    """INF-ORM's class as its card describes it: LlamaModel + Linear-ReLU-Linear, pooled one before the first pad id
    (modulo the length)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, 1))
        self.post_init()

    def forward(self, input_ids):
        logits = self.score(self.model(input_ids).last_hidden_state)
        at = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        return logits[torch.arange(input_ids.shape[0], device=at.device), at]


class InformCard:
    """INF-ORM's card: ``apply_chat_template(conversation, tokenize=True, return_tensors="pt")``, one forward,
    ``[0][0]``."""

    def __init__(self, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None):
        self.orm = CardORM.from_pretrained(directory, dtype=dtype, num_labels=1).eval().to(device)
        self.tokenizer = tokenizer if tokenizer is not None else PreTrainedTokenizerFast.from_pretrained(directory)
        self.device = device

    def __call__(self, messages: Messages) -> float:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt", return_dict=False)
        with torch.no_grad():
            return self.orm(ids.to(self.device))[0][0].item()


# -- Nemotron --------------------------------------------------------------------------------------------------------


class NemotronCard:
    """Nemotron's card: ``apply_chat_template([user, assistant], tokenize=True, add_generation_prompt=False,
    return_tensors="pt", return_dict=True)``, ``generate(max_new_tokens=1, return_dict_in_generate=True,
    output_scores=True)`` with the repository's generation config, the reward ``scores[0][0][0]``."""

    def __init__(self, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None):
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval().to(device)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(directory)
        self.device = device

    def __call__(self, messages: Messages) -> tuple[float, torch.Tensor]:
        """``(reward, the raw logits at the first generated position)`` (the logits to choose cut-offs with)."""
        tokenized = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                                       return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = self.model.generate(tokenized["input_ids"].to(self.device),
                                      attention_mask=tokenized["attention_mask"].to(self.device), max_new_tokens=1,
                                      return_dict_in_generate=True, output_scores=True, output_logits=True)
        return out["scores"][0][0][0].item(), out["logits"][0][0]


# -- Skywork -------------------------------------------------------------------------------------------------------


class SkyworkCard:
    """Skywork's cards, one conversation at a time: V2 (``preset="skywork-reward-v2"``) renders the template as text,
    strips a leading BOS string, then tokenizes; v0.x tokenizes in the template call. Both read ``logits[0][0]``."""

    def __init__(self, path: str, preset: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None):
        self.preset = preset
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device)
        self.model.eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, messages: Messages) -> float:
        tok = self.tokenizer
        if self.preset == "skywork-reward-v2":
            text = tok.apply_chat_template(messages, tokenize=False)
            if tok.bos_token is not None and text.startswith(tok.bos_token):
                text = text[len(tok.bos_token):]
            return self.model(**tok(text, return_tensors="pt").to(self.device)).logits[0][0].item()
        # Skywork-Reward v0.x's card (transformers 5 needs return_dict=False for the tensor the card got)
        ids = tok.apply_chat_template(messages, tokenize=True, return_tensors="pt", return_dict=False)
        return self.model(ids.to(self.device)).logits[0][0].item()


# -- Qwen2.5-Math-PRM ------------------------------------------------------------------------------------------------

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class CardPRM(nn.Module):
    """``Qwen2ForProcessRewardModel`` as the card's remote code describes it: a Qwen2 backbone and a score head
    Linear(H, H), ReLU, Linear(H, 2) applied at every position."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def forward(self, input_ids):
        return (self.score(self.model(input_ids=input_ids).last_hidden_state),)


class QwenPRMCard:
    """Qwen2.5-Math-PRM's card for one (question, steps): its messages, chat template, ``encode``, a full forward,
    and ``make_step_rewards`` (softmax, masked at the ``<extra_0>`` positions, label 1's probability).
    ``load_result``: the weights the checkpoint lacked and those it had beyond the module (both empty when whole)."""

    def __init__(self, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None):
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(directory)
        self.model = CardPRM(Qwen2Config.from_pretrained(directory)).eval()
        self.load_result = self.model.load_state_dict(load_file(f"{directory}/model.safetensors"), strict=False)
        self.model.to(device, dtype)
        self.device = device

    @staticmethod
    def make_step_rewards(logits: torch.Tensor, token_masks: torch.Tensor) -> list[list[float]]:
        probabilities = F.softmax(logits, dim=-1) * token_masks.unsqueeze(-1)
        out = []
        for i in range(probabilities.size(0)):
            sample = probabilities[i]
            out.append(sample[sample != 0].view(-1, 2)[:, 1].float().cpu().tolist())
        return out

    @torch.no_grad()
    def __call__(self, question: str, steps: Sequence[str], system: str = QWEN_MATH_SYSTEM) -> list[float]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_ids = self.tokenizer.encode(text, return_tensors="pt").to(self.device)
        outputs = self.model(input_ids=input_ids)
        step_sep_id = self.tokenizer.encode("<extra_0>")[0]
        return self.make_step_rewards(outputs[0], input_ids == step_sep_id)[0]


# -- RLHFlow PRM -----------------------------------------------------------------------------------------------------


class RLHFlowPRMCard:
    """RLHFlow's PRM card for one (question, answer), step by step (math-rm/prm_evaluate.py's ``select_sample``):
    the growing conversation of user steps each answered "+", ``apply_chat_template``, a full-vocabulary forward,
    ``logits[:, -3, candidate_tokens]``, softmax, P("+")."""

    def __init__(self, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None):
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, question: str, answer: Union[str, Sequence[str]], separator: str = "\n\n",
                 system: Optional[str] = None) -> list[float]:
        tokenizer, model = self.tokenizer, self.model
        plus_tag_id = tokenizer.encode("+")[-1]
        minus_tag_id = tokenizer.encode("-")[-1]
        candidate_tokens = [plus_tag_id, minus_tag_id]
        ans_list = answer.split(separator) if isinstance(answer, str) else list(answer)
        ans_list = [j.strip() for j in ans_list]
        messages = [] if system is None else [{"role": "system", "content": system}]
        single_step_score = []
        for k in range(len(ans_list)):
            text = question + " " + ans_list[0] if k == 0 else ans_list[k]
            messages.append({"content": text, "role": "user"})
            messages.append({"content": "+", "role": "assistant"})
            # return_dict=False: transformers 5 returns a BatchEncoding by default, the card's transformers 4 ids
            input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=False)
            logits = model(input_ids.to(self.device)).logits[:, -3, candidate_tokens]
            scores = logits.softmax(dim=-1)[:, 0]
            single_step_score.append(scores[0].item())
        return single_step_score


# -- Math-Shepherd ---------------------------------------------------------------------------------------------------


def tagged(steps: Sequence[str]) -> str:
    """Math-Shepherd's output for ``steps``: each followed by " ки", on consecutive lines."""
    return "\n".join(f"{step} ки" for step in steps)


class MathShepherdCard:
    """Math-Shepherd's card for one question and its tagged output: ``f"{question} {output}"``, the ids transformers
    4's sentencepiece tokenizer gave (BOS, then sentencepiece's ids of the text), a full ``MistralForCausalLM``
    forward, ``logits[:, :, candidate_tokens].softmax(-1)[:, :, 0]`` at the positions of ``step_tag_id``.
    ``candidate_tokens``, ``step_tag_id``: as the card computes them from its tokenizer."""

    def __init__(self, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32):
        import sentencepiece

        from rlhf_rewards.testing.tokenizers import mistral_tokenizer_model

        self.sp = sentencepiece.SentencePieceProcessor(model_file=mistral_tokenizer_model())
        good_token, bad_token, step_tag = "+", "-", "ки"
        self.candidate_tokens = self.encode(f"{good_token} {bad_token}")[1:]
        self.step_tag_id = self.encode(f"{step_tag}")[-1]
        from transformers import MistralForCausalLM

        self.model = MistralForCausalLM.from_pretrained(directory, dtype=dtype).eval().to(device)
        self.device = device

    def encode(self, text: str) -> list[int]:
        return [self.sp.bos_id()] + self.sp.encode(text)

    @torch.no_grad()
    def __call__(self, question: str, output: str) -> list[float]:
        input_for_prm = f"{question} {output}"
        input_id = torch.tensor([self.encode(input_for_prm)], device=self.device)
        logits = self.model(input_id).logits[:, :, self.candidate_tokens]
        scores = logits.softmax(dim=-1)[:, :, 0]
        return scores[input_id == self.step_tag_id].float().tolist()


# -- one interface for the benchmark ---------------------------------------------------------------------------------

def _question(prompt: Messages) -> tuple[Optional[str], str]:
    """``(system text or None, the question)`` of a process model's prompt: one user turn, optionally after a
    system turn (what the three PRM cards take)."""
    system = prompt[0]["content"] if prompt[0]["role"] == "system" else None
    users = [m for m in prompt if m["role"] == "user"]
    if len(users) != 1 or len(prompt) != 1 + (system is not None):
        raise ValueError("a process model's card reads one question: one user turn, optionally after a system one")
    return system, users[0]["content"]


@dataclass
class CardScorer:
    """A card's procedure ready to score: ``score(prompt messages, completion)`` gives the card's reward (a scalar
    model) or step rewards (a process model, ``completion`` a list of steps); ``backbone`` and ``heads``: the
    card's own modules, for counting what it runs; ``tokenizer``: the one the card loaded (``None``: the card reads
    no transformers tokenizer), which a card on the same checkpoint in another dtype can take as ``tokenizer=``
    instead of parsing the same files again."""

    score: Callable[[Messages, Any], Union[float, list[float]]]
    backbone: nn.Module
    heads: list[nn.Module]
    tokenizer: Any = None


def card_scorer(preset: str, directory: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                tokenizer: Any = None) -> CardScorer:
    """``preset``'s card procedure on the checkpoint in ``directory``, loaded on ``device`` in ``dtype``;
    ``tokenizer``: a previous card scorer's on the same checkpoint (default: loaded from ``directory``)."""
    if preset == "armorm-llama3-8b":
        armorm = CardArmoRM(directory, device, dtype, tokenizer)
        return CardScorer(lambda prompt, completion: armorm(conversation(prompt, completion))[0], armorm.backbone, [],
                          armorm.tokenizer)
    if preset == "inf-orm-llama3.1-70b":
        inform = InformCard(directory, device, dtype, tokenizer)
        return CardScorer(lambda prompt, completion: inform(conversation(prompt, completion)), inform.orm.model,
                          [inform.orm.score], inform.tokenizer)
    if preset == "nemotron-reward":
        nemotron = NemotronCard(directory, device, dtype, tokenizer)
        return CardScorer(lambda prompt, completion: nemotron(conversation(prompt, completion))[0],
                          nemotron.model.model, [nemotron.model.lm_head], nemotron.tokenizer)
    if preset in ("skywork-reward-v2", "skywork-reward"):
        skywork = SkyworkCard(directory, preset, device, dtype, tokenizer)
        return CardScorer(lambda prompt, completion: skywork(conversation(prompt, completion)), skywork.model.model,
                          [skywork.model.score], skywork.tokenizer)
    if preset == "qwen2.5-math-prm":
        qwen = QwenPRMCard(directory, device, dtype, tokenizer)

        def qwen_steps(prompt: Messages, steps: Sequence[str]) -> list[float]:
            system, question = _question(prompt)
            return qwen(question, steps, QWEN_MATH_SYSTEM if system is None else system)
        return CardScorer(qwen_steps, qwen.model.model, [qwen.model.score], qwen.tokenizer)
    if preset == "rlhflow-prm":
        rlhflow = RLHFlowPRMCard(directory, device, dtype, tokenizer)

        def rlhflow_steps(prompt: Messages, steps: Sequence[str]) -> list[float]:
            system, question = _question(prompt)
            return rlhflow(question, steps, system=system)
        return CardScorer(rlhflow_steps, rlhflow.model.model, [rlhflow.model.lm_head], rlhflow.tokenizer)
    if preset == "math-shepherd":
        shepherd = MathShepherdCard(directory, device, dtype)

        def shepherd_steps(prompt: Messages, steps: Sequence[str]) -> list[float]:
            system, question = _question(prompt)
            if system is not None:
                raise ValueError("Math-Shepherd's card reads a question alone, without a system turn")
            return shepherd(question, tagged(steps))
        return CardScorer(shepherd_steps, shepherd.model.model, [shepherd.model.lm_head])
    raise ValueError(f"no card procedure here for preset {preset!r} (the seeds' are in benchmarks.methods)")
