"""Plan-only growth at real 70B shapes on the meta device: every output shard's keys and shapes,
with nothing allocated and nothing written."""
import resource

import torch

from scalegrow.commands import plan
from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.core.layout import Stages
from scalegrow.formats.megatron import local_key
from scalegrow.formats.options import LayoutOptions, OutputOptions

LLAMA = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", rotary_base=500000,
             untie_embeddings_and_output_weights=True, add_bias_linear=False, kv_channels=128,
             padded_vocab_size=128256, vocab_size=128256, max_position_embeddings=8192)
SRC_8B = ModelConfig.from_dict(dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                     ffn_hidden_size=14336, **LLAMA))
DST_70B = ModelConfig.from_dict(dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                      ffn_hidden_size=28672, **LLAMA))
TP, PP = 8, 4


def test_70b_plan_matches_megatron_shapes(mcore):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    files = plan(SRC_8B, DST_70B, "lemon", OutputOptions(layout=LayoutOptions(tp=TP, pp=PP)))
    # Megatron-LM pads the 128256-token vocabulary to a multiple of 128 x TP8 = 1024: 129024 rows
    dst = DST_70B.replace(padded_vocab_size=129024)
    with torch.device("meta"):  # megatron-core's own model at the target size, unsharded
        full = {k: tuple(v.shape) for k, v in mcore.build_gpt(dst).state_dict().items() if torch.is_tensor(v)}
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 1024 * 1024, f"planning a 70B model grew RSS by {grown_kib / 1024:.0f} MiB"

    assert len(files) == TP * PP
    stages = Stages.build(80, PP)
    assert stages.layers_per_stage == (20, 20, 20, 20)
    tp_axis = {"linear_qkv.weight": 0, "linear_fc1.weight": 0, "word_embeddings.weight": 0,
               "output_layer.weight": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}
    total = 0
    for stage in range(PP):
        first = stages.first_layer(stage)
        expected = {}
        for key, shape in full.items():
            if key.startswith("decoder.layers."):
                index = int(key.split(".")[2])
                if not first <= index < first + 20:
                    continue
            elif key.startswith("embedding.") and stage != 0:
                continue
            elif not key.startswith("embedding.") and stage != PP - 1:
                continue
            axis = next((a for suffix, a in tp_axis.items() if key.endswith(suffix)), None)
            shard = list(shape)
            if axis is not None:
                shard[axis] //= TP
            expected[local_key(key, stages)] = tuple(shard)
        for t in range(TP):
            got = files[f"release/mp_rank_{t:02d}_{stage:03d}/model_optim_rng.pt"]
            assert got == expected
            total += sum(torch.Size(s).numel() for s in got.values())
    replicated = sum(torch.Size(s).numel() for k, s in full.items() if "layernorm" in k) * (TP - 1)
    assert total - replicated == num_parameters(dst)
    assert 69e9 < num_parameters(DST_70B) < 72e9
