"""Synthetic `qwen2moe` models (see ``tools.synth_moe``): ``qwen2moe-tiny`` (tests) and
``qwen2moe-a2.7b`` (Qwen1.5-MoE-A2.7B's shape)."""
from pocketlm.tools.synth_moe import builder, tiny

ARCH = "qwen2moe"
PRESETS = {
    "qwen2moe-tiny": tiny(n_ff_shexp=128),
    "qwen2moe-a2.7b": tiny(n_layer=24, n_embd=2048, n_head=16, n_head_kv=16, head_dim=128,
                           n_ff=5632, n_expert=60, n_expert_used=4, n_ff_exp=1408,
                           n_ff_shexp=5632, n_ctx=8192, rope_base=1e6),
}
build = builder(ARCH)
