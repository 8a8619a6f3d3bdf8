"""Synthetic `llama` models with experts, as Mixtral's (see ``tools.synth_moe``):
``mixtral-tiny`` (tests) and ``mixtral-8x7b`` (Mixtral-8x7B's shape)."""
from pocketlm.tools.synth_moe import builder, tiny

ARCH = "llama"
PRESETS = {
    "mixtral-tiny": tiny(n_ff=64, eps=1e-5),
    "mixtral-8x7b": tiny(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128,
                         n_ff=14336, n_expert=8, n_expert_used=2, n_ctx=32768, rope_base=1e6,
                         eps=1e-5),
}
build = builder(ARCH)
