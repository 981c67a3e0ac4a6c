"""transformers' bf16 logits against its fp32 ones on the token ids `fedllm bench logits
--ids-out IDS.json` wrote, in that command's terms: rms and largest difference over every
position's logits, and how often the top choice differs. Both from the same GGUF
(dequantized by transformers), 2 threads.

Usage: python transformers_logits.py MODEL.gguf IDS.json
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
gguf, ids_file = sys.argv[1], sys.argv[2]
prompts = [p for p in json.load(open(ids_file)) if p]


def load(dtype):
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf), dtype=dtype
    ).eval()


fp32, bf16 = load(torch.float32), load(torch.bfloat16)
squares, values, largest, differs, positions = 0.0, 0, 0.0, 0, 0
with torch.inference_mode():
    for p in prompts:
        x = torch.tensor([p])
        want = fp32(x).logits[0].float()
        got = bf16(x).logits[0].float()
        d = (got - want).double()
        squares += (d * d).sum().item()
        values += d.numel()
        largest = max(largest, d.abs().max().item())
        differs += (got.argmax(-1) != want.argmax(-1)).sum().item()
        positions += want.shape[0]
print(f"transformers bf16 against fp32, {len(prompts)} texts ({positions} positions)")
print(
    f"rms logit error {(squares / values) ** 0.5:.4f}, max {largest:.3f}, "
    f"top choice differs {differs} / {positions} ({100 * differs / positions:.2f}%)"
)
