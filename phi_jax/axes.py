"""Logical axis names: the one place they are spelled.

Model code annotates parameters and activations with these names only; `phi_jax.sharding`
maps them onto mesh axes (`data`, `fsdp`, `tensor`) through one rules table, so changing the
parallelism is a config change, never a model change.
"""

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"  # model dim D
HEADS = "heads"  # query heads N
KV_HEADS = "kv_heads"  # key/value heads K (GQA)
HEAD_DIM = "kv"  # per-head dim H
MLP = "mlp"  # MLP hidden dim F
VOCAB = "vocab"
LAYERS = "layers"  # the stacked-layers axis created by nn.scan
NORM = "norm"  # LayerNorm scale/bias: replicated
LORA_RANK = "lora_rank"  # the rank R of a LoRA adapter's A [*in, R] and B [R, *out]: replicated

ALL = (BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS, NORM, LORA_RANK)
