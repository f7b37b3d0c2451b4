"""Train the EAGLE-3 head of the bundled tiny MoE target on the Python standard library, on the CPU.

stdlib train split (as train.py) -> shipped tokenizer -> per batch: the fp32 target's aux features and logits (no grad)
-> training-time test unrolled over TTT steps -> sum_k 0.8^k CE(head || target on the draft vocabulary) -> AdamW
-> fp16 EAGLE / SpecForge checkpoint (config.json + model.safetensors) + train_stats.json

    python -m moe_spec_compile.tiny.train_eagle --out moe_spec_compile/tiny/eagle3 [--steps 1400 --ttt 4]

Deterministic: fixed seeds, train.py's batch order (same sampler, its own seed), 2 threads; it stops at a step count.
The step count was sized by a measured short run: 1.05 s per step (batch 16 x 128, 4 TTT steps, the target's forward
included; 12 steps, load average 0.1) on 2 idle cores, so the default 1400 steps take about 24.5 minutes, plus about
20 s of data and evaluation (the limit is 30).
Under contention the wall time is longer; train_stats.json records the time and the load average.

The head: hidden 256 (the target's; its token embedding is the target's, not shipped), 4 / 2 heads of 64, SwiGLU 512,
draft vocabulary = the DRAFT_VOCAB most frequent tokens of the training split (97.8% of the training tokens; the
file is 2.6 MB in fp16). Aux layers: hidden_states indices (1, 3, 5) = the inputs of layers 1, 3 and 5 (eagle3.py
says which index means what), not the default (2, L // 2, L - 3) = (2, 3, 3) for L = 6, which repeats layer 3 and
leaves the deep half of the network out: (1, 3, 5) spreads three distinct layers evenly and ends at the input of the
last layer, the deepest feature every engine captures as a layer input (hidden_states[6] has the final norm applied).
They are written into config.json (eagle_config.eagle_aux_hidden_state_layer_ids = [0, 2, 4], SpecForge's
output-of-layer-i meaning), so every loader that follows the SpecForge convention finds them.

Training-time test, as SpecForge trains EAGLE-3 (core/eagle3.py, modeling/draft/llama3_eagle.py): window x_0..x_T,
target features f_t and logits l_t. Step 0 at index t feeds (f_t, x_{t+1}) at position t and learns the target's
distribution of l_{t+1}; step k feeds the head's own step k-1 output at the same index t with the teacher-forced
token x_{t+k+1}, at position t + k, and learns l_{t+k+1}. Step k's query at t attends step 0's keys j <= t (causal)
and its own chain's keys of steps 1..k at index t (SpecForge's cache_hidden layout: the diagonal of each later block;
SpecForge's older code also shrank step 0's causal mask by one diagonal per step, which EAGLE issue #247 questions;
SpecForge's current sdpa and flex paths keep it causal, and so does this). Positions: t + k, as the chain sits at
inference and as SpecForge's older code and speculators do (SpecForge issue #414: its current sdpa path lost the
+ k). Loss at step k: cross-entropy of the head's draft
distribution against softmax(l restricted to the draft vocabulary), over the positions whose target argmax is in the
draft vocabulary (SpecForge's position mask), weighted 0.8^k.
Run as a script it restarts itself with OMP_WAIT_POLICY=PASSIVE (unless set), as train.py does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

from ..eagle3 import Eagle3Config, Eagle3Head, target_features
from . import HERE, load_tiny
from .corpus import read, split
from .train import SEQ, batches, encode, run_script, write_stats

DRAFT_VOCAB = 1536
INTERMEDIATE = 512
AUX_LAYER_IDS = (1, 3, 5)
STEP_WEIGHT = 0.8


def draft_vocabulary(stream: torch.Tensor, vocab: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [size], t2d [vocab]) for the `size` most frequent ids of `stream` (ties: the lower id), draft ids in
    ascending target-id order, so target id = draft id + d2t[draft id]."""
    counts = torch.bincount(stream, minlength=vocab)
    keep = counts.argsort(descending=True, stable=True)[:size].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[keep] = True
    return keep - torch.arange(size), t2d


class StepCache:
    """The TTT steps' keys and values, concatenated along the slot axis: step k's block is slots [kT, (k+1)T)."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, keys, values, layer_idx):
        self.keys = keys if self.keys is None else torch.cat((self.keys, keys), dim=2)
        self.values = values if self.values is None else torch.cat((self.values, values), dim=2)
        return self.keys, self.values


def ttt_mask(n: int, step: int, device=None) -> torch.Tensor:
    """[1, 1, n, (step+1) n] bool: query t sees step 0's slots j <= t and slot t of each later block."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * step, dim=1)[None, None]


def ttt_unroll(head: Eagle3Head, aux, x, steps: int):
    """Run the head `steps` TTT steps over windows x [B, T+1] with aux [B, T+1, 3Ht] (the target's features).
    Returns the draft logits of each step, [B, T, Vd] each; index t of step k predicts the target at t + k + 1."""
    b, t1 = x.shape
    n = t1 - 1
    h = head.project(aux[:, :n])
    pos = torch.arange(n, device=x.device).expand(b, n)
    cache = StepCache()
    out = []
    for k in range(steps):
        tokens = torch.zeros_like(x[:, :n])
        tokens[:, : n - k] = x[:, k + 1 :]  # x_{t+k+1}; positions past the window are padding, masked from the loss
        logits, h = head(tokens, h, pos + k, ttt_mask(n, k, x.device), cache)
        out.append(logits)
    return out


def step_targets(logits_t, keep: torch.Tensor, k: int, n: int):
    """(target probabilities on the draft vocabulary [B, n, Vd], mask [B, n]) for TTT step k: index t is the target's
    position t + k + 1; the mask keeps in-window positions whose target argmax is in the draft vocabulary."""
    b = logits_t.shape[0]
    lt = logits_t.new_zeros(b, n, logits_t.shape[-1])
    lt[:, : n - k] = logits_t[:, k + 1 :]
    valid = torch.zeros(b, n, dtype=torch.bool, device=lt.device)
    valid[:, : n - k] = True
    in_draft = torch.zeros(logits_t.shape[-1], dtype=torch.bool, device=lt.device)
    in_draft[keep] = True
    mask = valid & in_draft[lt.argmax(-1)]
    return lt[..., keep].float().softmax(-1), mask, lt.argmax(-1), valid


def ttt_loss(head, aux, logits_t, x, steps: int, keep):
    """sum_k 0.8^k mean-over-mask CE(target_p, head); also the per-step losses."""
    n = x.shape[1] - 1
    total, per_step = 0.0, []
    for k, logits in enumerate(ttt_unroll(head, aux, x, steps)):
        p, mask, _, _ = step_targets(logits_t, keep, k, n)
        ce = -(p * logits.float().log_softmax(-1)).sum(-1)
        loss_k = (ce * mask).sum() / mask.sum().clamp(min=1)
        per_step.append(loss_k)
        total = total + STEP_WEIGHT**k * loss_k
    return total, per_step


@torch.no_grad()
def evaluate(head, target, stream: torch.Tensor, steps: int, keep, windows: int = 64) -> dict:
    """Held-out, teacher-forced: per TTT step k, the share of positions where the head's top-1 (mapped to target ids)
    equals the target's top-1 at t + k + 1, over all in-window positions (tokens outside the draft vocabulary count
    as misses), the TTT loss per step, and the share of target top-1 tokens inside the draft vocabulary."""
    same, count, loss, covered = [0] * steps, [0] * steps, [0.0] * steps, 0
    for i in range(windows):
        s = (i * (stream.numel() - SEQ - 1)) // windows
        x = stream[s : s + SEQ + 1][None]
        aux, logits_t = target_features(target, x, head.config.aux_layer_ids, with_logits=True)
        n = SEQ
        for k, logits in enumerate(ttt_unroll(head, aux.float(), x, steps)):
            p, mask, top_t, valid = step_targets(logits_t.float(), keep, k, n)
            pred = head.to_target_ids(logits.argmax(-1))
            same[k] += ((pred == top_t) & valid).sum().item()
            count[k] += valid.sum().item()
            ce = -(p * logits.float().log_softmax(-1)).sum(-1)
            loss[k] += ((ce * mask).sum() / mask.sum().clamp(min=1)).item()
            if k == 0:
                covered += mask.sum().item()
    return {"top1_agreement_per_step": [round(a / c, 4) for a, c in zip(same, count)],
            "loss_per_step": [round(v / windows, 4) for v in loss],
            "target_top1_in_draft_vocab": round(covered / count[0], 4)}


def make_head(target, d2t, t2d) -> Eagle3Head:
    tc = target.config
    config = Eagle3Config(hidden_size=tc.hidden_size, target_hidden_size=tc.hidden_size, vocab_size=tc.vocab_size,
                          draft_vocab_size=d2t.numel(), num_attention_heads=tc.num_attention_heads,
                          num_key_value_heads=tc.num_key_value_heads, head_dim=tc.head_dim,
                          intermediate_size=INTERMEDIATE, rms_norm_eps=tc.rms_norm_eps,
                          rope_theta=float(getattr(tc, "rope_theta", None) or tc.rope_parameters["rope_theta"]),
                          aux_layer_ids=AUX_LAYER_IDS)
    head = Eagle3Head(config, embed_tokens=target.get_input_embeddings())
    for p in head.parameters():  # transformers' initialisation: N(0, 0.02) weights, unit norms
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    head.d2t.copy_(d2t)
    head.t2d.copy_(t2d)
    return head


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_spec_compile.tiny.train_eagle")
    p.add_argument("--out", default=str(HERE / "eagle3"))
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--ttt", type=int, default=4, help="training-time test steps unrolled (>= 3)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=64)
    args = p.parse_args(argv)
    if args.ttt < 3:
        p.error("--ttt must be at least 3")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log = lambda msg: print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    target, _, _ = load_tiny()  # fp32, the fp16 checkpoint's weights
    target.requires_grad_(False)
    tok = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    train_files, held_files = split()
    train_stream, held_stream = encode(tok, read(train_files)), encode(tok, read(held_files))
    log(f"tokens: {train_stream.numel()} train, {held_stream.numel()} held-out")
    vocab = target.config.vocab_size
    d2t, t2d = draft_vocabulary(train_stream, vocab, DRAFT_VOCAB)
    keep = torch.arange(DRAFT_VOCAB) + d2t
    coverage = torch.bincount(train_stream, minlength=vocab)[keep].sum().item() / train_stream.numel()

    torch.manual_seed(args.seed)
    head = make_head(target, d2t, t2d)
    opt = torch.optim.AdamW([q for q in head.parameters() if q.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    head.train()
    losses, step_losses = [], []
    t0 = time.time()
    for step, x in enumerate(batches(train_stream, args.batch, args.steps, args.seed + 2)):
        with torch.no_grad():
            aux, logits_t = target_features(target, x, AUX_LAYER_IDS, with_logits=True)
        loss, per_step = ttt_loss(head, aux, logits_t, x, args.ttt, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        step_losses.append([v.item() for v in per_step])
        if step % 50 == 0 or step == args.steps - 1:
            recent = step_losses[-50:]
            means = [sum(r[k] for r in recent) / len(recent) for k in range(args.ttt)]
            log(f"step {step:5d}/{args.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} per TTT step "
                + " ".join(f"{m:.3f}" for m in means) + f" ({(time.time() - t0) / (step + 1):.2f} s/step)")
    train_seconds = time.time() - t0
    head.eval()

    head.to(torch.float16).save_pretrained(out)  # the target's embedding is shared, not saved
    shipped = Eagle3Head.from_pretrained(out, target)  # fp32 from the fp16 file, as users load it
    log("evaluating the shipped (fp16) head on the held-out split")
    held = evaluate(shipped, target, held_stream, args.ttt, keep, args.eval_windows)
    log(f"held-out top-1 agreement per TTT step {held['top1_agreement_per_step']}")

    draft_stats = json.loads((HERE / "train_stats.json").read_text())
    recent = step_losses[-50:]
    stats = {
        "command": "python -m moe_spec_compile.tiny.train_eagle " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {**dataclasses.asdict(shipped.config), "aux_layer_ids": list(shipped.config.aux_layer_ids)},
        "aux_layer_ids_note": "hidden_states indices (1, 3, 5) = the inputs of layers 1, 3, 5 of the 6-layer target;"
                              " config.json stores [0, 2, 4] (SpecForge's output-of-layer-i); the default"
                              " (2, L//2, L-3) = (2, 3, 3) repeats layer 3",
        "params": sum(q.numel() for q in shipped.parameters()),
        "file_bytes": (out / "model.safetensors").stat().st_size,
        "draft_vocab": DRAFT_VOCAB, "draft_vocab_train_token_coverage": round(coverage, 4),
        "steps": args.steps, "ttt_steps": args.ttt, "step_weight": STEP_WEIGHT, "batch": args.batch, "seq": SEQ,
        "lr": args.lr, "seed": args.seed,
        "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / args.steps, 3),
        "first_train_loss": round(losses[0], 4),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "final_train_loss_per_ttt_step": [round(sum(r[k] for r in recent) / len(recent), 4) for k in range(args.ttt)],
        "train_loss_every_50": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4)
                                for i in range(0, len(losses), 50)],
        "heldout_windows": args.eval_windows, **{f"heldout_{k}": v for k, v in held.items()},
        "dense_draft_target_top1_agreement": draft_stats.get("draft_target_top1_agreement"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__, "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "total_seconds": round(time.time() - t_start, 1),
    }
    write_stats(out, stats, load_start)
    log("done")
    return 0


if __name__ == "__main__":
    run_script(main)
