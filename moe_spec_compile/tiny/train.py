"""Train the bundled tiny MoE target and its dense draft on the Python standard library, on the CPU.

stdlib source -> byte-level BPE (tokenizers) -> Qwen3-MoE target (32 experts, top-4) and Qwen3 dense draft
-> fp16 safetensors + tokenizer + stats.json under moe_spec_compile/tiny/ -> MODEL_CARD.md (card.py)

    python -m moe_spec_compile.tiny.train --out moe_spec_compile/tiny [--minutes-target 11 --minutes-draft 4]

Deterministic: fixed seeds, a fixed batch order, 2 threads. Training stops at a step count (not a clock):
the step counts were sized so that both models train in under 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import read, split

VOCAB = 2048
SEQ = 128
TARGET = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=32, num_experts_per_tok=4,
              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=2048,
              tie_word_embeddings=True, router_aux_loss_coef=0.001, output_router_logits=True, rope_theta=10000.0,
              eos_token_id=0, pad_token_id=0, bos_token_id=0)
DRAFT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
             rope_theta=10000.0, eos_token_id=0, pad_token_id=0, bos_token_id=0)


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, steps: int, seed: int):
    rng = random.Random(seed)
    n = stream.numel() - SEQ - 1
    for _ in range(steps):
        starts = [rng.randrange(n) for _ in range(batch)]
        yield torch.stack([stream[s : s + SEQ + 1] for s in starts])


def train(model, stream, steps: int, batch: int, lr: float, seed: int, log) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for step, x in enumerate(batches(stream, batch, steps, seed)):
        out = model(input_ids=x[:, :-1], use_cache=False)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, windows: int = 64) -> float:
    total, count = 0.0, 0
    for i in range(windows):
        s = (i * (stream.numel() - SEQ - 1)) // windows
        x = stream[s : s + SEQ + 1][None]
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        total += torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        count += SEQ
    return total / count


def unigram_loss(train_stream: torch.Tensor, heldout: torch.Tensor) -> float:
    counts = torch.bincount(train_stream, minlength=VOCAB).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return -logp[heldout].mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_spec_compile.tiny.train")
    p.add_argument("--out", default=str(Path(__file__).parent))
    p.add_argument("--target-steps", type=int, default=1200)
    p.add_argument("--draft-steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    log = lambda msg: print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    train_files, held_files = split()
    train_texts, held_texts = read(train_files), read(held_files)
    log(f"corpus: {len(train_files)} train files, {len(held_files)} held-out files")
    tok = train_tokenizer(train_texts)
    tok.save(str(out / "tokenizer.json"))
    train_stream, held_stream = encode(tok, train_texts), encode(tok, held_texts)
    log(f"tokens: {train_stream.numel()} train, {held_stream.numel()} held-out")
    (out / "heldout_sample.txt").write_text("\n".join(held_texts)[:24000], encoding="utf-8")

    stats = {"vocab": VOCAB, "seq": SEQ, "batch": args.batch, "seed": args.seed,
             "train_files": len(train_files), "heldout_files": len(held_files),
             "train_tokens": train_stream.numel(), "heldout_tokens": held_stream.numel(),
             "unigram_heldout_loss": unigram_loss(train_stream, held_stream)}
    for name, cls, cfg, steps, lr in (("target", transformers.Qwen3MoeConfig, TARGET, args.target_steps, 3e-3),
                                      ("draft", transformers.Qwen3Config, DRAFT, args.draft_steps, 3e-3)):
        torch.manual_seed(args.seed)
        config = cls(**cfg)
        model = transformers.AutoModelForCausalLM.from_config(config)
        t0 = time.time()
        losses = train(model, train_stream, steps, args.batch, lr, args.seed + (name == "draft"), log)
        stats[f"{name}_train_seconds"] = round(time.time() - t0, 1)
        stats[f"{name}_final_train_loss"] = sum(losses[-50:]) / len(losses[-50:])
        stats[f"{name}_heldout_loss"] = heldout_loss(model, held_stream)
        stats[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        stats[f"{name}_steps"] = steps
        model.config.output_router_logits = False
        model.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        log(f"{name}: held-out loss {stats[f'{name}_heldout_loss']:.3f} "
            f"(unigram {stats['unigram_heldout_loss']:.3f}) in {stats[f'{name}_train_seconds']} s")
    stats["total_seconds"] = round(time.time() - t_start, 1)
    stats["command"] = "python -m moe_spec_compile.tiny.train " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
