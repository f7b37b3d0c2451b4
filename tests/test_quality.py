"""The quality module on a tiny config-built MoE, and the demo's pieces in quick mode."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moe_spec_compile as msc
from moe_spec_compile.quality import evaluate, greedy_agreement, score_windows
from moe_spec_compile.tiny import HERE


def _tiny_pair():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                      norm_topk_prob=True)
    target = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    dcfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    draft = transformers.AutoModelForCausalLM.from_config(dcfg).eval()
    return target, draft


def test_greedy_agreement():
    a = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])]
    assert greedy_agreement(a, a) == 1.0
    assert greedy_agreement(a, [torch.tensor([1, 2, 0, 4]), torch.tensor([5])]) == pytest.approx(4 / 6)


@torch.no_grad()
def test_score_windows_exact_matches_manual_and_budget_binds():
    target, _ = _tiny_pair()
    tokens = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    exact = score_windows(target, tokens, window=16, options={"inner": "eager"}, max_windows=4)
    loss = acc = 0.0
    for w in range(4):
        x = tokens[w * 16 : w * 16 + 17]
        logits = target(x[None, :-1], use_cache=False).logits[0]
        loss += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        acc += (logits.argmax(-1) == x[1:]).sum().item()
    assert exact.loss == pytest.approx(loss / 64, rel=1e-5) and exact.accuracy == pytest.approx(acc / 64)
    budgeted = score_windows(target, tokens, window=16, budget=3, options={"inner": "eager"}, max_windows=4)
    assert budgeted.experts_per_layer <= 3 < exact.experts_per_layer
    assert budgeted.loss != exact.loss
    assert exact.predictions.shape == (64,) and (budgeted.predictions != exact.predictions).any()


def test_evaluate_rows():
    target, draft = _tiny_pair()
    prompts = [torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    heldout = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(9))
    torch._dynamo.reset()
    rows = evaluate(target, msc.ModelDrafter(draft), prompts, heldout, [3], max_new_tokens=10, max_windows=3,
                    compile_options={"inner": "eager"})
    assert [r.budget for r in rows] == [None, 3]
    exact, budgeted = rows
    assert exact.agreement == 1.0 and exact.heldout_agreement == 1.0 and exact.budget_bound is None
    assert 0.0 <= budgeted.heldout_agreement <= 1.0
    assert 0.0 <= budgeted.agreement <= 1.0 and budgeted.mean_accepted >= 1.0
    assert budgeted.verify_experts_per_layer <= 3 < exact.verify_experts_per_layer
    # exact speculative decoding reproduces the target's greedy output
    from moe_spec_compile.quality import speculative_run
    from moe_spec_compile.speculative import SpeculativeDecoder

    outs, _ = speculative_run(SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft), tree=3), prompts, None, 10)
    for prompt, out in zip(prompts, outs):
        want = target.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                               max_new_tokens=10, do_sample=False, eos_token_id=None)[0, prompt.numel():]
        assert torch.equal(out, want)


@pytest.mark.skipif(not (HERE / "target" / "model.safetensors").exists(), reason="no bundled checkpoints")
def test_demo_quick(tmp_path, capsys):
    from moe_spec_compile.commands.demo import main

    torch._dynamo.reset()
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "held-out acc" in text and "model.layers.2.mlp" in text
    head = next(line for line in text.splitlines() if "x generate" in line)
    assert "x tree=0" in head and head.split()[0] == "row"
    lines = text.splitlines()
    first = lines.index(head) + 2  # after the rule
    names = [line.split()[0] for line in lines[first:lines.index("", first)]]
    e = msc.load_tiny()[0].config.num_experts
    assert names[:5] == ["generate", "tree=0", "exact", f"C={e // 8}", f"C={e // 4}"]  # then auto, where taken
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["budget"] for r in rows] == [None, e // 8, e // 4]  # the quick run's default budgets
    assert rows[1]["verify_experts_per_layer"] <= e // 8 and rows[0]["agreement"] == 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["rows"]}
    assert by_name["tree=0"]["agreement"] == 1.0 and by_name["tree=0"]["mean_accepted"] == 1.0  # greedy, 1 per step
    assert by_name["tree=0"]["speedup_tree0"][0] == 1.0 and by_name["generate"]["speedup_generate"][0] == 1.0
    assert all(len(r["speedup_generate"]) == 3 and len(r["speedup_tree0"]) == 3 for r in summary["rows"])
    assert summary["verdict"].startswith("fastest speculative row:") and "x tree=0's tokens/s" in summary["verdict"]
    png = (tmp_path / "speed_and_quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
