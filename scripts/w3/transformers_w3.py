"""W3's transformers side: prefill and decode of a GGUF model (dequantized by transformers),
2 threads. Prints one line per measurement and the process's peak RSS.

Usage: python transformers_w3.py MODEL.gguf fp32|bf16 prefill|1|8

prefill: 256 random tokens (seed 0), best of 5 forwards, with all positions' logits and with
the last one's only (`logits_to_keep=1`, what a generation's prefill needs; W3 compares
against this one). 1|8: 64 greedy decode steps after a 256-token prefill at that batch size,
best of 2.
"""
import os, sys, time, resource
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
gguf, dtype_name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
m = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf), dtype=dtype
).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (1, 256), generator=g)
with torch.inference_mode():
    if mode == "prefill":
        for keep, name in [(0, "all logits"), (1, "last only")]:
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                m(ids, logits_to_keep=keep, use_cache=True)
                best = min(best, time.perf_counter() - t)
            print(f"{dtype_name} prefill 256 ({name}): {256 / best:.1f} tok/s")
    else:
        b = int(mode)
        x = ids.repeat(b, 1)
        best = 1e9
        for _ in range(2):
            out = m(x, logits_to_keep=1, use_cache=True)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(64):
                out = m(nxt, past_key_values=pkv, use_cache=True)
                pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            best = min(best, time.perf_counter() - t)
        print(f"{dtype_name} decode batch {b} after 256: {64 * b / best:.1f} tok/s")
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
