"""``moeforge chat PATH``: talk to a dense or MoE checkpoint, to see that a conversion still makes sense.

One-shot (``--prompt`` or piped stdin) or interactive (a TTY) with the conversation kept between turns.
Replies stream to stdout as they are generated; notes go to stderr so stdout stays pipeable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from moeforge.cli.dtypes import DTYPES
from moeforge.cli.experts_option import add_experts_backend
from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TextStreamer
    from transformers.tokenization_utils_base import BatchEncoding, PreTrainedTokenizerBase

Message = dict[str, str]

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model (one prompt, piped stdin, or an interactive session)",
        description="Chat with a dense or MoE checkpoint using its chat template. Interactive on a terminal: "
        "/reset clears the conversation, /exit or Ctrl-D quits.",
    )
    parser.add_argument("path", help="local HF dir, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", help="one prompt; without it, read stdin (piped) or chat interactively (terminal)")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) means greedy decoding")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature > 0)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--gguf-file", help="GGUF file name inside PATH (a directory or hub id)")
    parser.add_argument("--adapter", help="adapter directory to put on PATH (PATH may also be an adapter directory itself)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the checkpoint to run")
    add_experts_backend(parser)
    parser.set_defaults(func=run)


def build_inputs(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> BatchEncoding:
    """Token ids for the conversation so far, ending where the assistant's reply starts."""
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return cast("BatchEncoding", encoded)  # return_dict=True: the stubs list every return form
    return tokenizer("\n\n".join(m["content"] for m in messages), return_tensors="pt")


def chat_once(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    streamer: TextStreamer | None = None,
) -> str:
    """Generate the assistant's next reply to ``messages`` (greedy when ``temperature`` is 0)."""
    inputs = build_inputs(tokenizer, messages).to(model.device)
    sampling: dict[str, object] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature}
        if top_p is not None:
            sampling["top_p"] = top_p
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        sampling["pad_token_id"] = pad
    import torch
    from transformers import GenerationMixin

    with torch.inference_mode():
        output = cast(GenerationMixin, model).generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    return str(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise MoeforgeError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise MoeforgeError(f"--temperature {args.temperature} must be 0 (greedy) or positive")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MoeforgeError(f"--top-p {args.top_p} must be in (0, 1]")


def _interactive(reply: Callable[[list[Message]], str], system: list[Message]) -> None:
    messages = list(system)
    print("chat: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text == "/exit":
            return
        if text == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text:
            messages.append({"role": "user", "content": text})
            messages.append({"role": "assistant", "content": reply(messages)})


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from moeforge.io.loading import TORCH_DTYPES, load_model

    _check_args(args)
    prompt = args.prompt
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise MoeforgeError("no prompt: pass --prompt TEXT, pipe text on stdin, or run on a terminal")
    model, tokenizer = load_model(
        args.path,
        dtype=TORCH_DTYPES[args.dtype],
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        adapter=args.adapter,
        experts_backend=args.experts_backend,
    )
    if tokenizer is None:
        raise MoeforgeError(f"{args.path} has no tokenizer files: chat needs a checkpoint that ships its tokenizer")
    if not tokenizer.chat_template:
        logger.warning("note: %s has no chat template; sending the conversation as plain text", args.path)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    def reply(messages: list[Message]) -> str:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        return chat_once(model, tokenizer, messages, args.max_new_tokens, args.temperature, args.top_p, streamer)

    system = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        _interactive(reply, system)
    else:
        reply([*system, {"role": "user", "content": prompt}])
    return 0
