"""The toy VQA task (groundwork of the trained toy VLM): deterministic, answerable, processor-consistent."""

import numpy as np
import torch
from PIL import Image

from tokprune.toy import train
from tokprune.toy.model import N_VISUAL, prompt, toy_processor
from tokprune.toy.task import COLORS, COUNTS, SHAPES, generate, vocabulary


def test_deterministic_for_a_seed():
    a, b, c = generate(20, 3), generate(20, 3), generate(20, 4)
    assert all(np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_answers_follow_from_the_objects():
    for s in generate(200, 0):
        colors = [o[0] for o in s.objects]
        shapes = [o[1] for o in s.objects]
        words = s.question.split()
        if s.kind == "color":
            assert s.answer == colors[shapes.index(words[4])] and shapes.count(words[4]) == 1
        elif s.kind == "shape":
            assert s.answer == shapes[colors.index(words[4])] and colors.count(words[4]) == 1
        elif s.kind == "count":
            assert s.answer == COUNTS[colors.count(words[2])]
        elif s.kind == "exists":
            assert (s.answer == "yes") == ((words[3], words[4]) in set(zip(colors, shapes)))
        else:
            first = s.objects[[(o[0], o[1]) for o in s.objects].index((words[2], words[3]))]
            second = s.objects[[(o[0], o[1]) for o in s.objects].index((words[7], words[8]))]
            assert (s.answer == "yes") == (first[2] < second[2])
        assert set(s.question.split()) <= set(vocabulary()) and s.answer in vocabulary()
        # objects are drawn in their colour at their centre
        for color, _, cx, cy in s.objects:
            assert np.abs(s.image[cy, cx].astype(int) - COLORS[color]).max() < 40


def test_every_question_type_and_answer_occurs():
    samples = generate(500, 1)
    assert {s.kind for s in samples} == {"color", "shape", "count", "exists", "left"}
    answers = {s.answer for s in samples}
    assert set(COLORS) <= answers and set(SHAPES) <= answers and {"yes", "no", "zero", "one"} <= answers


def test_training_inputs_equal_the_processor_output():
    processor = toy_processor()
    samples = generate(3, 5)
    expected = processor(
        text=[prompt(s.question) for s in samples], images=[Image.fromarray(s.image) for s in samples],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    ours = train.encode(processor, samples, "cpu")
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-6)
    assert (
        int((ours["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == N_VISUAL
    )
