"""Throughput benchmark: our scoring against each model card's own procedure, TRL's built-in reward-model path and
a padding-free floor, on the same inputs, in one run (``python -m benchmarks`` from a source checkout).

What runs:

* Workload: ``conversations`` seeded conversations, single- and multi-turn (some with a system prompt), whose prompt
  and response lengths are log-normal in tokens (medians ~150 and ~300, a tail to 1,500). Pairwise models get
  GRPO-like groups: one conversation's prompt, ``group_size`` completions, each compared with one baseline
  completion ("against baseline") or with each other ("round robin"). Texts are drawn word by word from a fixed
  English word list; each tokenizer gets as many words as make the target length in *its* tokens.
* Models: randomly initialised models of each preset's real architecture and vocabulary size, scaled down so a run
  ends in minutes on two CPU cores (:data:`FULL`). The pair-preference model keeps Llama-3-8B's depth (32 -> 40
  layers), MLP width and vocabulary with a tiny hidden size, so the LM head's share of the FLOPs per token is
  Llama-3-8B's (~7%): that share is what the card's full-vocabulary logits waste.
* Methods, per model: the card's procedure as written (padding to ``max_length``, batch size 1, one order at a time
  with full logits, llm-blender's fixed batches of 4 in input order); TRL 1.16's reward-model path (the whole batch
  right-padded to its longest, one forward); ours (``rm.score`` / ``rm.compare``); the floor (the same token ids as
  ours, each input alone at its exact length, shared prefixes computed once). Each method runs in a child process
  forked from one parent: all start from the same model, inputs and warm allocator (see :func:`_child_setup`).

Numbers in the report, per method:

* ``time``: wall seconds of the whole call, formatting and tokenization included (the floor starts from token ids).
* ``x ours``: that time divided by ours (above 1: slower than ours).
* ``computed/real``: token positions run through the model (padding included, shared prefixes counted once)
  divided by the tokens of the inputs themselves. This one carries over to GPUs.
* ``padded``: padding tokens as a share of the computed positions.
* ``overhead``: share of the time spent outside the model's modules (formatting, tokenization, collation).
* ``peak MB``: the most memory the method had allocated at once (malloc's bytes in use, sampled every 5 ms),
  weights and inputs left out.
* ``max abs diff``: the largest difference from the card's results (float32; for the generic sequence classifier,
  which has no card, from TRL's path); ``-`` where the input text is not the card's (TRL's path renders Ray2333's
  input without the card's double BOS).
"""
