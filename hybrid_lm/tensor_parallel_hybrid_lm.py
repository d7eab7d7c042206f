"""The one tensor-parallel style hybrid_lm adds to transformers' registry: a parameter sharded on its first dim.

The Mamba mixer is sharded by channel of d_inner (see `HybridLMConfig.base_model_tp_plan`). Every per-channel tensor
but one is a Linear weight, a bias or a 1-D/2-D parameter that transformers' `colwise` style shards on its channel
dim; the conv1d weight, (d_inner, 1, d_conv), is 3-D, and `colwise` shards a weight on its second-to-last dim. No
built-in style of every supported release shards dim 0 of a 3-D parameter and nothing else (the expert-parallel
`grouped_gemm` did up to 5.24; 5.25 calls it with arguments it does not take), so this one is registered under its
own name. It only wraps the parameter as a DTensor sharded on dim 0: transformers loads each rank's slice from
that placement, and the mixer reads the local shard (`modeling_hybrid_lm._module_tensors`).
"""

import torch
from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer

CHANNEL_SHARD = "hybrid_lm_channel_shard"


class ChannelShard(TensorParallelLayer):
    """Param-only style: the parameter becomes a DTensor with placement Shard(0); no forward hooks."""

    def shard_param(self, module, param, mesh, **_):  # later releases pass config / mesh_manager: not needed here
        from torch.distributed.tensor import Shard, distribute_tensor

        meta = module._parameters.get(param)
        if meta is None:
            return
        module._parameters[param] = torch.nn.Parameter(
            distribute_tensor(meta, mesh, [Shard(0)], src_data_rank=None), requires_grad=meta.requires_grad
        )


if torch.distributed.is_available():
    ALL_PARALLEL_STYLES.register(CHANNEL_SHARD, ChannelShard())
