"""Switch a causal LM to SA-Softmax and/or SSMax attention and continue training it.

The SSMax paper (arXiv 2501.19399) reports that switching a model to SSMax during or after pretraining
keeps part of the benefit of training with it from scratch. This script does the switch on any
transformers causal LM and continues training on text, printing the held-out loss before the switch,
right after it, and after training.

    python examples/convert_pretrained.py                      # tiny Llama from a config, offline
    python examples/convert_pretrained.py --model Qwen/Qwen2.5-0.5B --steps 200   # a hub model (online)

Without ``--model``, a tiny random Llama is built from a config and first pretrained for
``--pretrain-steps`` with its own softmax attention, so that there is something to convert; the text
is the source of a Python standard-library module, read as bytes (vocabulary 256). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import textwrap
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sasoftmax.integrations.transformers import convert, from_pretrained


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub name or path of a causal LM (needs the network for hub names); "
                        "default: a tiny Llama built from a config")
    parser.add_argument("--normalizer", default="sa_norm", choices=("softmax", "sa", "sa_norm"))
    parser.add_argument("--ssmax", default="length",
                        help="initial SSMax s: a float, 'length' (1/ln(seq-len): SSMax equals softmax at the "
                        "training length at the start) or 'none' (no SSMax)")
    parser.add_argument("--backend", default="auto", help="sasoftmax backend: auto, eager, cpu or triton")
    parser.add_argument("--text", default=textwrap.__file__, help="a text file to train on (default: textwrap.py)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="training steps after the conversion")
    parser.add_argument("--pretrain-steps", type=int, default=100,
                        help="steps of plain softmax training before converting (tiny model only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save", action="store_true",
                        help="save the converted model and reload it with from_pretrained (checks identical loss)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and the text as one long (N,) tensor of token ids."""
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if args.model is None:
        return tiny_llama(), torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model, torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, count: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len, (count,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, device: str) -> float:
    """Mean next-token loss over consecutive windows of ``tokens``."""
    model.eval()
    usable = (len(tokens) - 1) // seq_len * seq_len
    batch = tokens[:usable].view(-1, seq_len).to(device)
    return model(input_ids=batch, labels=batch).loss.item()


def train(model, tokens, steps: int, args: argparse.Namespace, gen: torch.Generator) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for _ in range(steps):
        batch = windows(tokens, args.seq_len, args.batch_size, gen).to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def ssmax_init(value: str, seq_len: int) -> float | None:
    if value == "none":
        return None
    if value == "length":
        return 1.0 / math.log(seq_len)
    return float(value)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model, tokens = load(args)
    model.to(args.device)
    split = int(len(tokens) * 0.9)
    train_tokens, held_out = tokens[:split], tokens[split:]
    if len(held_out) <= args.seq_len:
        raise SystemExit(f"the text is too short for --seq-len {args.seq_len}")
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(tokens):,} tokens of {args.text}")

    if args.model is None and args.pretrain_steps > 0:
        start = time.time()
        train(model, train_tokens, args.pretrain_steps, args, gen)
        print(f"pretrained {args.pretrain_steps} steps with {model.config._attn_implementation} softmax "
              f"attention ({time.time() - start:.0f} s)")
    before = evaluate(model, held_out, args.seq_len, args.device)

    ssmax = ssmax_init(args.ssmax, args.seq_len)
    convert(model, args.normalizer, ssmax=ssmax, backend=args.backend)
    switched = evaluate(model, held_out, args.seq_len, args.device)

    start = time.time()
    train(model, train_tokens, args.steps, args, gen)
    after = evaluate(model, held_out, args.seq_len, args.device)

    what = args.normalizer + ("" if ssmax is None else f" + SSMax, s init {ssmax:.3f}")
    print(f"held-out loss before conversion: {before:.4f}")
    print(f"held-out loss after conversion ({what}): {switched:.4f}")
    print(f"held-out loss after {args.steps} more training steps ({time.time() - start:.0f} s): {after:.4f}")

    if args.save:
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            reloaded = from_pretrained(path).to(args.device)
            again = evaluate(reloaded, held_out, args.seq_len, args.device)
        print(f"held-out loss of the model saved and reloaded with from_pretrained: {again:.4f}")


if __name__ == "__main__":
    main()
