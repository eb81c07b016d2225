"""The toy VQA task (groundwork of the trained toy VLM): deterministic, answerable, processor-consistent."""

import numpy as np
import torch
from PIL import Image

from tokprune.toy import train
from tokprune.toy.model import N_VISUAL, prompt, toy_processor
from tokprune.toy.task import (
    COLORS,
    PAIRS,
    QUESTION_TYPES,
    SHAPES,
    ask,
    draw_scene,
    generate,
    generate_scenes,
    scenes_only,
    vocabulary,
)


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
        elif s.kind == "exists":
            assert (s.answer == "yes") == ((words[3], words[4]) in set(zip(colors, shapes)))
        else:
            raise AssertionError(f"unexpected question kind {s.kind}")
        assert set(s.question.split()) <= set(vocabulary()) and s.answer in vocabulary()
        # objects are drawn in their colour on the pixels they own (a ring's hole is background)
        for color, shape, _, _ in s.objects:
            pixels = s.image[s.owner == 1 + PAIRS.index((color, shape))].astype(int)
            assert len(pixels) > 40 and np.abs(pixels - COLORS[color]).max() < 40


def test_every_question_type_and_answer_occurs():
    samples = generate(500, 1)
    assert {s.kind for s in samples} == set(QUESTION_TYPES) == {"color", "shape", "exists"}
    answers = {s.answer for s in samples}
    assert set(COLORS) <= answers and set(SHAPES) <= answers and {"yes", "no"} <= answers


def test_the_side_question_names_a_unique_object():
    """`ask` keeps the side question (not asked by the shipped task): by colour or by shape, never ambiguous."""
    rng = np.random.default_rng(0)
    named = set()
    for _ in range(200):
        _, objects, _ = draw_scene(rng)
        asked = ask(rng, "left", objects)
        if asked is None:
            continue
        word = asked[0].split()[2]
        attribute = [o[0] for o in objects] if word in COLORS else [o[1] for o in objects]
        assert attribute.count(word) == 1
        x = objects[attribute.index(word)][2]
        assert asked[1] == ("yes" if x < 56 else "no") and abs(x - 56) >= 8
        named.add(word in COLORS)
    assert named == {True, False}


def test_vision_phase_scenes_do_not_depend_on_the_questions():
    a, b = scenes_only(3, 9), scenes_only(3, 9)
    assert all(np.array_equal(x.image, y.image) and x.objects == y.objects for x, y in zip(a, b))
    assert all(s.question == "" and s.owner.shape == (112, 112) for s in a)


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


def test_training_scenes_ask_distinct_questions_the_scene_answers():
    for first, rest in generate_scenes(30, 7, per_type=2):
        questions = [first.question] + [q for q, _ in rest]
        assert len(set(questions)) == len(questions) >= 3
        colors = [o[0] for o in first.objects]
        for q, a in [(first.question, first.answer), *rest]:
            words = q.split()
            if words[:2] == ["what", "shape"]:
                assert a == first.objects[colors.index(words[4])][1] and colors.count(words[4]) == 1
            elif words[:2] == ["is", "there"]:
                assert (a == "yes") == ((words[3], words[4]) in {o[:2] for o in first.objects})
