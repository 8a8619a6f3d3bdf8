"""Synthetic `qwen3moe` models (see ``tools.synth_moe``): ``qwen3moe-tiny`` (tests) and
``qwen3moe-30b-a3b`` (Qwen3-30B-A3B's shape; about 16 GB in Q4_0 with Qwen's 151,936-token
vocabulary)."""
from pocketlm.tools.synth_moe import builder, tiny

ARCH = "qwen3moe"
PRESETS = {
    "qwen3moe-tiny": tiny(),
    "qwen3moe-30b-a3b": tiny(n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
                             n_ff=6144, n_expert=128, n_expert_used=8, n_ff_exp=768,
                             n_ctx=40960, rope_base=1e6),
}
build = builder(ARCH)
