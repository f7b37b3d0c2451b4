"""Run by tests/test_parallel.py under torchrun (2 processes, gloo, one thread each): one model saved by the test,
loaded by every rank with transformers' parallel plan and once whole, then compared. Each rank writes what it saw
to OUT/rank<r>.json; the test compares ranks and single-process results.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel_worker.py MODEL_DIR MODE OUT
MODE: a layout of moe_spec_compile.distributed ("ep": experts split; "tp": attention sharded, experts replicated;
"tp+ep": both).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import moe_spec_compile as msc
from moe_spec_compile.distributed import distributed_config


def events(rec):
    return [[e.block, e.num_tokens, e.budget, list(e.experts), list(e.loaded)] for e in rec.events]


def main(path: str, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=distributed_config(mode, 2),
                                                 dtype=torch.float32).eval()
    rank = dist.get_rank()
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (1, 14), generator=torch.Generator().manual_seed(0))
    k = model.config.num_experts_per_tok
    budget = k + 1  # C above top-k: a budget that binds (C is clamped to [k, E])
    res = {"rank": rank, "budget": budget, "world": dist.get_world_size(),
           "sharded": sorted(n for n, p in model.named_parameters() if hasattr(p, "device_mesh"))}
    with torch.no_grad():
        ref = whole(ids).logits
        res["explain"] = [[b.name, b.rewritten, b.experts, b.reason, b.parallel]
                          for b in msc.explain(model, ids).blocks]
        opts = {"inner": "eager"}
        compiled = torch.compile(model, backend="moespec", options=opts)
        single = torch.compile(whole, backend="moespec", options=opts)
        res["exact_err"] = (compiled(ids).logits - ref).abs().max().item()
        res["budgeted"] = {}
        for policy in ("substitute", "truncate"):
            with msc.budget(budget, policy=policy):
                with msc.record_experts() as mine:
                    a = compiled(ids).logits
                with msc.record_experts() as one:
                    b = single(ids).logits
            res["budgeted"][policy] = {"err": (a - b).abs().max().item(), "vs_exact": (a - ref).abs().max().item(),
                                       "events": events(mine), "single": events(one)}
    want = whole.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20).tolist()
    res["generate"] = {}
    runs = {"ngram chain 4": dict(tree=4), "compiled, tree 6": dict(tree=6, compile=True, compile_options=opts),
            "auto": dict(tree="auto")}
    if mode == "ep":  # the default inductor path too (once: it compiles for a while on one thread per rank)
        runs["compiled by inductor"] = dict(tree=4, compile=True)
    for name, kw in runs.items():
        dec = msc.SpeculativeDecoder(model, msc.NgramDrafter(), **kw)
        got = dec.generate(ids, max_new_tokens=20, eos_token_id=None).sequences.tolist()
        res["generate"][name] = got == want
    dec = msc.SpeculativeDecoder(model, msc.NgramDrafter(), tree=4)
    res["sampled"] = dec.generate(ids, max_new_tokens=12, do_sample=True, eos_token_id=None).sequences.tolist()
    try:
        dec.generate(ids if rank == 0 else ids.flip(-1), max_new_tokens=4)
        res["mismatch"] = "not refused"
    except ValueError as err:
        res["mismatch"] = str(err)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
