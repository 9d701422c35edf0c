"""The reference GPT computes what megatron-core's GPTModel computes, over the whole config product."""
import itertools

import pytest
import torch

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT

PRODUCT = list(itertools.product(
    ["LayerNorm", "RMSNorm"], [False, True], ["mha", "gqa"], ["learned_absolute", "rope"],
    [False, True], [False, True]))


def tiny_config(norm, swiglu, attn, pos, untied, bias, **extra) -> ModelConfig:
    return ModelConfig.from_dict({**dict(
        num_layers=2, hidden_size=64, num_attention_heads=4,
        num_query_groups=2 if attn == "gqa" else None, ffn_hidden_size=96, padded_vocab_size=128,
        max_position_embeddings=32, normalization=norm, swiglu=swiglu, position_embedding_type=pos,
        untie_embeddings_and_output_weights=untied, add_bias_linear=bias, rotary_percent=0.5 if pos == "rope" else 1.0),
        **extra})


@pytest.mark.parametrize("norm,swiglu,attn,pos,untied,bias", PRODUCT,
                         ids=["-".join(map(str, p)) for p in PRODUCT])
def test_reference_matches_megatron_core(mcore, norm, swiglu, attn, pos, untied, bias):
    assert_parity(mcore, tiny_config(norm, swiglu, attn, pos, untied, bias))


MLA = dict(multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8,
           v_head_dim=12, qk_layernorm=True)
FEATURES = {  # beyond the product: what Hugging Face families bring
    "qk-layernorm-rms (Qwen3)": ("RMSNorm", True, "gqa", "rope", True, False, dict(qk_layernorm=True)),
    "qk-layernorm-ln": ("LayerNorm", False, "mha", "rope", False, True, dict(qk_layernorm=True)),
    "openai-gelu (GPT-2)": ("LayerNorm", False, "mha", "learned_absolute", False, True, dict(openai_gelu=True)),
    "head-dim-not-hidden-over-heads": ("RMSNorm", True, "gqa", "rope", True, False,
                                       dict(kv_channels=32, qk_layernorm=True)),
    # Mixture-of-Experts: top-2 of 4 (softmax over the two), every layer; Mixtral-like
    "moe-top2-swiglu": ("RMSNorm", True, "gqa", "rope", True, False,
                        dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)),
    # softmax before top-k, dense and MoE layers mixed, GELU experts with biases
    "moe-pre-softmax-mixed-bias": ("LayerNorm", False, "mha", "learned_absolute", False, True,
                                   dict(num_moe_experts=3, moe_router_topk=2, moe_layer_freq=2,
                                        moe_router_pre_softmax=True)),
    "moe-top1": ("RMSNorm", True, "mha", "rope", True, False, dict(num_moe_experts=2, moe_router_topk=1,
                                                                  moe_router_pre_softmax=True)),
    # a shared expert beside the routed ones, its output gated by sigmoid(x · gate_weight) (Qwen2-MoE)
    "moe-shared-expert-gated": ("RMSNorm", True, "gqa", "rope", True, False,
                                dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                     moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=80,
                                     moe_shared_expert_gate=True)),
    "moe-shared-expert-mixed-gelu": ("LayerNorm", False, "mha", "learned_absolute", False, False,
                                     dict(num_moe_experts=2, moe_router_topk=2, moe_layer_freq=2,
                                          moe_shared_expert_intermediate_size=64)),
    # DeepSeek-V3's router: sigmoid scores chosen with an expert bias, in the best 2 of 4 groups,
    # normalised and scaled; a shared expert; a dense first layer (first_k_dense_replace)
    "moe-deepseek-v3-routing": ("RMSNorm", True, "gqa", "rope", True, False,
                                dict(num_layers=3, num_moe_experts=8, moe_router_topk=4, moe_ffn_hidden_size=24,
                                     moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                     moe_router_num_groups=4, moe_router_group_topk=2,
                                     moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=48,
                                     moe_layer_freq=[0, 1, 1])),
    "moe-sigmoid-top1-scaled": ("RMSNorm", True, "mha", "rope", True, False,
                                dict(num_moe_experts=4, moe_router_topk=1, moe_router_score_function="sigmoid",
                                     moe_router_topk_scaling_factor=1.5)),
    # multi-latent attention (DeepSeek-V2/V3): q and KV latents with their norms, decoupled rope on
    # interleaved pairs; without a q latent and with YaRN's mscale in the softmax (V2-Lite); with
    # DeepSeek-V3's routing and shared expert after a dense first layer
    "mla-q-latent": ("RMSNorm", True, "mha", "rope", True, False, dict(MLA, rotary_percent=1.0)),
    "mla-no-q-latent-yarn": ("RMSNorm", True, "mha", "rope", False, False,
                             dict(MLA, rotary_percent=1.0, q_lora_rank=None, use_yarn=True,
                                  yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=8,
                                  yarn_mscale=1.0, yarn_mscale_all_dim=0.8)),
    "mla-deepseek-v3-moe": ("RMSNorm", True, "mha", "rope", True, False,
                            dict(MLA, rotary_percent=1.0, num_layers=3, num_moe_experts=8, moe_router_topk=4,
                                 moe_ffn_hidden_size=24, moe_router_score_function="sigmoid",
                                 moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                                 moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=48,
                                 moe_layer_freq=[0, 1, 1])),
    "moe-softmax-groups": ("RMSNorm", True, "mha", "rope", True, False,
                           dict(num_moe_experts=6, moe_router_topk=2, moe_router_pre_softmax=True,
                                moe_router_num_groups=3, moe_router_group_topk=1)),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_reference_matches_megatron_core_features(mcore, feature):
    *combo, extra = FEATURES[feature]
    if feature == "mla-no-q-latent-yarn" and mcore.version() >= (0, 19):
        pytest.skip("megatron-core 0.19 fuses a norm into linear_q_proj when qk_layernorm has no q latent (a norm "
                    "DeepSeek-V2-Lite does not have), which only Transformer Engine builds; 0.16 is the oracle here")
    assert_parity(mcore, tiny_config(*combo, **extra))


def assert_parity(mcore, cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    theirs = mcore.build_gpt(cfg).eval()
    with torch.no_grad():  # perturb every parameter so norms and biases are not at their trivial init
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in theirs.named_buffers():  # DeepSeek's routing bias: large enough to change choices
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    sd = {k: v for k, v in theirs.state_dict().items() if not k.endswith("_extra_state")}
    ours = GPT(cfg).eval()
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    tokens = torch.randint(0, cfg.padded_vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mcore.forward(theirs, tokens)
        got = ours(tokens)
    assert got.shape == expected.shape == (2, 24, cfg.padded_vocab_size)
    assert (got - expected).abs().max().item() <= 1e-5


def test_reference_loads_back_into_megatron(mcore):
    """Names match in both directions: our state dict loads strictly into megatron-core."""
    cfg = tiny_config("RMSNorm", True, "gqa", "rope", True, False)
    torch.manual_seed(0)  # the weights of both models' own random init
    ours = GPT(cfg)
    theirs = mcore.build_gpt(cfg)
    mcore.load_strict(theirs, ours.state_dict(), fill_extra_state=True)
    tokens = torch.randint(0, cfg.padded_vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), mcore.forward(theirs, tokens), atol=1e-5, rtol=0)
