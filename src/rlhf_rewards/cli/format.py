"""``rlhf-rewards format``: the exact text and token ids a reward model reads for one prompt and completion."""

from __future__ import annotations

import argparse
import json

from .common import UsageError, add_model_arguments, check_preset, load_model, reports_usage_errors

HELP = "show the exact text and token ids the model reads (both orders for pairwise models)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt as text (one user turn)")
    prompt.add_argument("--prompt-json", help='the prompt as a JSON list of messages, e.g. '
                                              '\'[{"role": "user", "content": "Hi"}]\'')
    parser.add_argument("--completion", required=True, help="the completion (A for pairwise models)")
    parser.add_argument("--baseline", help="pairwise models: the completion compared with (B)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_model_arguments(parser)


def inputs(model, prompt, completion: str, baseline) -> list[dict]:
    """``{"order", "text", "token_ids", "tokens"}`` for each input the model reads."""
    if model.kind == "pairwise":
        texts = model.format(prompt, completion, baseline)
        rows = model.encode(prompt, completion, baseline)
        orders = ["(A, B)", "(B, A)"] if len(rows) == 2 else ["(A, B) = (B, A)"]
        texts = texts[:len(rows)]
    else:
        texts, rows, orders = [model.format(prompt, completion)], [model.encode(prompt, completion)], [None]
    return [{"order": o, "text": t, "token_ids": ids, "tokens": model.tokenizer.convert_ids_to_tokens(ids)}
            for o, t, ids in zip(orders, texts, rows)]


@reports_usage_errors("format")
def run(args: argparse.Namespace) -> int:
    preset = check_preset(args.model, args.preset)
    if preset.kind == "pairwise" and args.baseline is None:
        raise UsageError(f"{args.model} is a pairwise model ({preset.name}): pass --baseline, the completion it is "
                         "compared with")
    prompt = args.prompt
    if args.prompt_json is not None:
        try:
            prompt = json.loads(args.prompt_json)
        except json.JSONDecodeError as err:
            raise UsageError(f"--prompt-json: not JSON ({err})") from None
    model = load_model(args, args.model, args.preset, args.tokenizer)
    try:
        shown = inputs(model, prompt, args.completion, args.baseline)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps({"model": args.model, "preset": model.preset.name, "kind": model.kind,
                          "attn_implementation": model.attn_implementation, "truncated": model.stats.truncated,
                          "inputs": shown}, ensure_ascii=False))
        return 0
    for item in shown:
        order = f", order {item['order']}" if item["order"] else ""
        print(f"--- text{order} ({len(item['token_ids'])} tokens, between the markers):")
        print(f">>>{item['text']}<<<")
        print("--- token ids:")
        print(item["token_ids"])
        print("--- tokens:")
        print(item["tokens"])
    if model.stats.truncated:
        print(f"--- truncated to max_length={model.max_length}: the ids above are what the model reads")
    return 0
