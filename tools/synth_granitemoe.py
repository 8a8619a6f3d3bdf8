"""Synthetic `granitemoe` models (see ``tools.synth_moe``): ``granitemoe-tiny`` (tests) and
``granitemoe-3b-a800m`` (granite-3.1-3b-a800m's shape and multipliers)."""
from pocketlm.tools.synth_moe import builder, tiny

ARCH = "granitemoe"
_MUP = dict(embedding_scale=12.0, residual_scale=0.22, attention_scale=0.015625, logit_scale=6.0)
PRESETS = {
    "granitemoe-tiny": tiny(n_ff=64, **dict(_MUP, attention_scale=0.125, residual_scale=0.5,
                                            embedding_scale=4.0)),
    "granitemoe-3b-a800m": tiny(n_layer=32, n_embd=1536, n_head=24, n_head_kv=8, head_dim=64,
                                n_ff=512, n_expert=40, n_expert_used=8, n_ctx=4096, **_MUP),
}
build = builder(ARCH)
