"""Speculative decoding on the bundled pair: a Qwen3-MoE target (64 fine-grained experts, top-6)
and a one-layer dense draft.

load_tiny() -> SpeculativeDecoder(target compiled with backend="moespec", draft model, dynamic tree, budget 16 = E/4)
-> the continuation and the decoding stats; without a budget the output equals the target's greedy output
"""

import moe_spec_compile as msc

target, draft, tok = msc.load_tiny()  # bundled with the package, loaded offline
prompt = tok("def main(argv):", return_tensors="pt").input_ids

decoder = msc.SpeculativeDecoder(target, drafter=msc.ModelDrafter(draft),
                                 tree=msc.TreeSpec(total_tokens=16, depth=4, top_k=4), budget=16, compile=True,
                                 compile_options={"inner": "eager"})  # eager inner: quick to compile on a CPU
out = decoder.generate(prompt, max_new_tokens=32)
print(tok.decode(out.sequences[0]))
print(out.stats)  # a short table: tokens per verify pass, tokens/s, experts per layer, time per phase

exact = decoder.generate(prompt, max_new_tokens=32, budget=None)  # the same decoder without a budget
greedy = target.generate(prompt, max_new_tokens=32, do_sample=False)  # transformers' own greedy decoding
n = min(exact.sequences.shape[1], greedy.shape[1])
print("exact speculative output == greedy output:", bool((exact.sequences[0, :n] == greedy[0, :n]).all()))
