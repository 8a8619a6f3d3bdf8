"""Synthetic `olmoe` models (see ``tools.synth_moe``): ``olmoe-tiny`` (tests) and
``olmoe-1b-7b`` (OLMoE-1B-7B's shape)."""
from pocketlm.tools.synth_moe import builder, tiny

ARCH = "olmoe"
PRESETS = {
    "olmoe-tiny": tiny(n_head_kv=4, n_ff=64, eps=1e-5),
    "olmoe-1b-7b": tiny(n_layer=16, n_embd=2048, n_head=16, n_head_kv=16, head_dim=128,
                        n_ff=1024, n_expert=64, n_expert_used=8, n_ctx=4096, eps=1e-5),
}
build = builder(ARCH)
