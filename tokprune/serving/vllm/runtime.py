"""Checks of the vLLM run a tokprune architecture loads into: the tested release, and a vision tower whose
heads all sit in this process (the signals average over every head)."""

from __future__ import annotations

from tokprune.errors import ServingError
from tokprune.serving.vllm.plan import check_vllm_version


def check_runtime(vllm_config) -> None:
    """Refuse an untested vLLM release and a tensor-parallel vision tower (each rank would see its own
    heads and choose other tokens); `mm_encoder_tp_mode="data"` runs the tower whole on every rank."""
    import vllm
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.models.vision import is_vit_use_data_parallel

    check_vllm_version(vllm.__version__)
    if get_tensor_model_parallel_world_size() > 1 and not is_vit_use_data_parallel():
        raise ServingError(
            "with tensor_parallel_size > 1 every rank holds only some of the vision tower's heads, so the "
            "signals (averaged over all heads) would differ by rank; pass mm_encoder_tp_mode='data' (the tower "
            "runs whole on every rank) to prune under tensor parallelism"
        )
