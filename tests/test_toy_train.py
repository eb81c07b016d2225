"""The toy's training script: deterministic, and checkpoints that leave the model where it trains."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlavaForConditionalGeneration

from tokprune.toy import train
from tokprune.toy.model import toy_processor


def tiny_run(checkpoint=None):
    """Two steps of each phase on two scenes, validated on four questions (a few seconds on a CPU)."""
    return train.train(
        vision_steps=2, steps=2, batch_size=2, vision_lr=5e-3, lr=2e-3, aux_weight=0.5, per_type=2,
        device="cpu", checkpoint=checkpoint, validation_questions=4, held_out_questions=4,
    )  # fmt: skip


def test_training_is_deterministic_and_checkpoints_the_trained_state(tmp_path):
    first, _, first_acc = tiny_run(checkpoint=tmp_path / "checkpoint")
    second, _, second_acc = tiny_run()
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first_acc == second_acc
    # the checkpoint written at the last log line holds the final weights, and the model trained on
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "checkpoint").state_dict()
    assert saved.keys() == a.keys() and all(torch.equal(saved[k], a[k]) for k in a)
    assert next(first.parameters()).device.type == "cpu"


def test_save_puts_the_model_back_on_its_device(tmp_path, monkeypatch):
    """A model training on a GPU goes to the CPU to be saved, then back to the GPU (not to the CPU it
    was just moved to). Simulated without a GPU: `to` records the moves and the fake parameters follow them."""
    where = {"device": torch.device("cuda", 0)}
    moves: list[torch.device] = []

    def to(device):
        moves.append(torch.device(device))
        where["device"] = torch.device(device)
        return model

    model = SimpleNamespace(
        to=to,
        parameters=lambda: iter([SimpleNamespace(device=where["device"])]),
        save_pretrained=lambda out: moves.append("saved"),
    )
    train.save(model, toy_processor(), tmp_path)
    assert moves == [torch.device("cpu"), "saved", torch.device("cuda", 0)]
    assert (tmp_path / "tokenizer.json").exists()
