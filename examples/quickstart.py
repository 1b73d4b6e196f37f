"""The three normalizers and SSMax through sasoftmax.attention, and a tiny model that trains with them.

Run: python examples/quickstart.py
"""

import torch

import sasoftmax
from sasoftmax.nn import MultiheadAttention

torch.manual_seed(0)
q, k, v = torch.randn(1, 4, 64, 32), torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)  # GQA: 4 q heads, 2 kv
sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
for normalizer in sasoftmax.NORMALIZERS:
    out = sasoftmax.attention(q, k, v, normalizer=normalizer, causal=True)
    print(f"{normalizer:8s} output norm {out.norm():7.3f}   |out - sdpa|max {(out - sdpa).abs().max():.2e}")
out = sasoftmax.attention(q, k, v, normalizer="sa_norm", causal=True, ssmax=0.43)
print(f"sa_norm + SSMax(s=0.43) output norm {out.norm():7.3f}")

# A one-layer model that learns to copy the previous token, with SA-Softmax and a learnable SSMax scale.
vocab, width = 16, 32
embed, pos = torch.nn.Embedding(vocab, width), torch.nn.Embedding(32, width)
attn = MultiheadAttention(width, 4, normalizer="sa_norm", ssmax=0.43)
head = torch.nn.Linear(width, vocab)
params = [*embed.parameters(), *pos.parameters(), *attn.parameters(), *head.parameters()]
opt = torch.optim.AdamW(params, lr=3e-3)
for step in range(201):
    tokens = torch.randint(0, vocab, (32, 32))
    x = embed(tokens) + pos.weight
    logits = head(x + attn(x, causal=True))
    loss = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, vocab), tokens[:, :-1].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}  (chance {torch.log(torch.tensor(vocab)).item():.3f})")
print("learned SSMax s per head:", [round(s, 3) for s in attn.ssmax.s.tolist()])
