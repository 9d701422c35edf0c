"""Run by tests/test_optimizer_state.py under `deepspeed --num_gpus 2` (CPU, gloo): for ZeRO 1, 2 and 3,
a tiny GPT trains 3 steps and saves a DeepSpeed checkpoint, beside DeepSpeed's own account of every
parameter's moments (`safe_get_full_optimizer_state`, gathered over the ranks); then a fresh engine
takes known moments through `train.engine.load_adam` and steps once, beside torch's AdamW stepping
from the same state on the same batch. Rank 0 writes `{out}/z{stage}/...` and `{out}/z{stage}.pt`."""
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as torch_dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT, init_weights
from scalegrow.formats.optimizer import AdamMoments
from scalegrow.train import engine as ds
from scalegrow.train.launch import release_shared_memory

CFG = ModelConfig.from_dict(dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                                 num_query_groups=1, kv_channels=16, normalization="RMSNorm", swiglu=True,
                                 position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                                 add_bias_linear=False, padded_vocab_size=128, vocab_size=128,
                                 max_position_embeddings=64))


def engine_for(stage: int, model: torch.nn.Module):
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.01,
                                                        "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=ds.param_groups(model, 0.01), config=config)
    return engine


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(seed))


def saved_moments(stage: int, out: Path) -> dict:
    model = GPT(CFG)
    init_weights(model, 0)
    engine = engine_for(stage, model)
    for step in range(3):
        tokens = batch(10 * step + torch_dist.get_rank())
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
    engine.save_checkpoint(str(out / f"z{stage}"), tag="t")
    ds.link_optimizer_states(engine)  # without it DeepSpeed cannot give the second param group's moments
    return {key: {n: safe_get_full_optimizer_state(p, key).clone() for n, p in engine.module.named_parameters()}
            for key in ("exp_avg", "exp_avg_sq")}


def loaded_step(stage: int) -> float:
    """Largest difference between the engine's weights after one step from loaded moments and torch's."""
    model, ref = GPT(CFG), GPT(CFG)
    init_weights(model, 1)
    ref.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(5)
    named = dict(ref.named_parameters())
    moments = AdamMoments({n: 0.01 * torch.randn(p.shape, generator=gen) for n, p in named.items()},
                          {n: 1e-4 * torch.rand(p.shape, generator=gen) for n, p in named.items()}, 40)
    engine = engine_for(stage, model)
    ds.load_adam(engine, moments)
    opt = torch.optim.AdamW(ds.param_groups(ref, 0.01), lr=1e-2, betas=(0.9, 0.95))
    for n, p in named.items():
        opt.state[p] = {"step": torch.tensor(40.0), "exp_avg": moments.exp_avg[n].clone(),
                        "exp_avg_sq": moments.exp_avg_sq[n].clone()}
    tokens = [batch(100 + r) for r in range(2)]  # both ranks' micro-batches: the engine averages them
    mine = tokens[torch_dist.get_rank()]
    engine.backward(engine(mine[:, :-1], mine[:, 1:]))
    engine.step()
    loss = sum(ref(t[:, :-1], t[:, 1:]) for t in tokens) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    return max((safe_get_full_fp32_param(p) - named[n]).abs().max().item() for n, p in engine.module.named_parameters())


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    release_shared_memory(torch_dist.get_rank())  # DeepSpeed's CPU all-reduce buffer, unlinked once mapped
    torch.manual_seed(0)
    for stage in (1, 2, 3):
        result = {"saved": saved_moments(stage, out), "loaded_step_diff": loaded_step(stage)}
        if torch_dist.get_rank() == 0:
            torch.save(result, out / f"z{stage}.pt")
    torch_dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[-1]))
