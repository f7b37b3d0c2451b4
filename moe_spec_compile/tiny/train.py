"""Train the bundled tiny MoE target and its dense draft on the Python standard library, on the CPU.

stdlib source -> byte-level BPE (tokenizers) -> Qwen3-MoE target (6 layers, hidden 256, 64 fine-grained experts
top-6), then a one-layer Qwen3 dense draft distilled from it -> fp16 safetensors + tokenizer + train_stats.json
under moe_spec_compile/tiny/ -> MODEL_CARD.md (python -m moe_spec_compile.tiny.card)

    python -m moe_spec_compile.tiny.train --out moe_spec_compile/tiny [--target-steps 1500 --draft-steps 1200]

Deterministic: fixed seeds, a fixed batch order, 2 threads. Training stops at a step count (not a clock):
the step counts were sized so that the whole run takes about 40 minutes on 2 idle CPU cores (the limit is 60).
The draft's loss is (1 - a) * cross-entropy + a * KL(target || draft) on the same batches (a = --distill), the
target being the fp16-rounded checkpoint as shipped: a draft that imitates the target gets more of its tokens accepted.
Run as a script it restarts itself with OMP_WAIT_POLICY=PASSIVE (unless set): on cores shared with other work,
OpenMP threads spinning at barriers made training steps up to 10x slower; sleeping does not change the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import heldout_sample, read, split

VOCAB = 2048
SEQ = 128
TARGET = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=32, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=6,
              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=2048,
              tie_word_embeddings=True, router_aux_loss_coef=0.001, output_router_logits=True, rope_theta=10000.0,
              eos_token_id=0, pad_token_id=0, bos_token_id=0)
DRAFT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
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


def train(model, stream, steps: int, batch: int, lr: float, seed: int, log, teacher=None,
          distill: float = 0.0) -> list[float]:
    """AdamW with warm-up and cosine decay; loss = next-token cross-entropy (+ the load-balancing loss of an
    MoE), or (1 - distill) * cross-entropy + distill * KL(teacher || model) when a teacher is given."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for step, x in enumerate(batches(stream, batch, steps, seed)):
        out = model(input_ids=x[:, :-1], use_cache=False)
        logits = out.logits
        logits = logits.reshape(-1, VOCAB).float()
        loss = torch.nn.functional.cross_entropy(logits, x[:, 1:].reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                t_logp = teacher(input_ids=x[:, :-1], use_cache=False).logits.reshape(-1, VOCAB).float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), t_logp, log_target=True, reduction="batchmean")
            loss = (1 - distill) * loss + distill * kl
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


@torch.no_grad()
def top1_agreement(a, b, stream: torch.Tensor, windows: int = 64) -> float:
    """Fraction of held-out positions where models a and b predict the same next token (teacher-forced)."""
    same = 0
    for i in range(windows):
        s = (i * (stream.numel() - SEQ - 1)) // windows
        x = stream[s : s + SEQ][None]
        same += (a(input_ids=x, use_cache=False).logits.argmax(-1) == b(input_ids=x, use_cache=False).logits.argmax(-1)
                 ).sum().item()
    return same / (windows * SEQ)


def unigram_loss(train_stream: torch.Tensor, heldout: torch.Tensor) -> float:
    counts = torch.bincount(train_stream, minlength=VOCAB).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return -logp[heldout].mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_spec_compile.tiny.train")
    p.add_argument("--out", default=str(Path(__file__).parent))
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--draft-steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill", type=float, default=0.8, help="weight of KL(target || draft) in the draft's loss")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log = lambda msg: print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    train_files, held_files = split()
    train_texts, held_texts = read(train_files), read(held_files)
    log(f"corpus: {len(train_files)} train files, {len(held_files)} held-out files")
    tok = train_tokenizer(train_texts)
    tok.save(str(out / "tokenizer.json"))
    train_stream, held_stream = encode(tok, train_texts), encode(tok, held_texts)
    log(f"tokens: {train_stream.numel()} train, {held_stream.numel()} held-out")
    (out / "heldout_sample.txt").write_text(heldout_sample(held_texts), encoding="utf-8")

    stats = {"vocab": VOCAB, "seq": SEQ, "batch": args.batch, "seed": args.seed,
             "train_files": len(train_files), "heldout_files": len(held_files),
             "train_tokens": train_stream.numel(), "heldout_tokens": held_stream.numel(),
             "unigram_heldout_loss": unigram_loss(train_stream, held_stream), "distill": args.distill,
             "python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "tokenizers": __import__("tokenizers").__version__,
             "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    teacher = None
    for name, cls, cfg, steps, lr in (("target", transformers.Qwen3MoeConfig, TARGET, args.target_steps, 3e-3),
                                      ("draft", transformers.Qwen3Config, DRAFT, args.draft_steps, 3e-3)):
        torch.manual_seed(args.seed)
        config = cls(**cfg)
        model = transformers.AutoModelForCausalLM.from_config(config)
        t0 = time.time()
        losses = train(model, train_stream, steps, args.batch, lr, args.seed + (name == "draft"), log,
                       teacher=teacher if args.distill > 0 else None, distill=args.distill)
        stats[f"{name}_train_seconds"] = round(time.time() - t0, 1)
        stats[f"{name}_final_train_loss"] = sum(losses[-50:]) / len(losses[-50:])
        stats[f"{name}_heldout_loss"] = heldout_loss(model, held_stream)
        stats[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        stats[f"{name}_steps"] = steps
        model.config.output_router_logits = False
        model.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        model.float()  # the fp16-rounded weights, as load_tiny() returns them
        if name == "target":
            teacher = model
        else:
            stats["draft_target_top1_agreement"] = top1_agreement(model, teacher, held_stream)
            stats["target_heldout_loss_fp16_weights"] = heldout_loss(teacher, held_stream)
        log(f"{name}: held-out loss {stats[f'{name}_heldout_loss']:.3f} "
            f"(unigram {stats['unigram_heldout_loss']:.3f}) in {stats[f'{name}_train_seconds']} s")
    stats["total_seconds"] = round(time.time() - t_start, 1)
    stats["command"] = "python -m moe_spec_compile.tiny.train " + " ".join(sys.argv[1:] if argv is None else argv)
    write_stats(out, stats, load_start)
    log("done")
    return 0


def write_stats(out: Path, stats: dict, load_start: float | None) -> None:
    """out/train_stats.json, with the 1-minute load average at the start and end when it was read at the start
    (other work on the same cores slows a run down: record how busy they were)."""
    if load_start is not None:
        stats["load_average_1min_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def run_script(main) -> None:
    """Run a training script's main() with OMP_WAIT_POLICY=PASSIVE (unless set): the policy is read when torch loads
    OpenMP, so the process starts again with it set."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    raise SystemExit(main())


if __name__ == "__main__":
    run_script(main)
