"""Prompt templates per task, in Reason-RFT's wording.

Every template asks for ``<think>...</think><answer>...</answer>``; a task that is not one of the
built-in three (a user's own, scored by ``reward.function``) gets the problem text as written plus
the same format instruction for a "final answer". ``build_messages`` returns chat
messages for a processor's chat template; ``system_prompt=True`` moves the format instruction into
a system message (the R1-style variant) and leaves the user turn as the bare question.

:func:`render_prompt` is the one place a prompt becomes chat text: training's rollout, the
auxiliary sources, validation, ``ekipl.eval``, CoT-SFT and the over-length check all call it, so
``rollout.system_prompt`` reaches every one of them.
"""

from __future__ import annotations

from .sample import DataError, Sample

FORMAT_TAIL = "Output the thinking process in <think> </think> and {what} in <answer> </answer> tags."

TRANCE_FUNCTIONS = {
    "change_size": ("small", "medium", "large"),
    "change_color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
    "change_material": ("rubber", "metal", "glass"),
    "change_shape": ("cube", "sphere", "cylinder"),
    "change_position": (
        "front",
        "behind",
        "left",
        "right",
        "front_left",
        "front_right",
        "behind_left",
        "behind_right",
    ),
}

TRANCE_INSTRUCTION = (
    "Given the image of the initial state, the image of the final state, and the attributes of the "
    "initial objects, find the transformations that turn the initial state into the final state. The "
    "attributes of the initial objects are a list of tuples ('object_id', 'shape', 'size', 'color', "
    "'material'), one per object in the initial state. Each transformation is one "
    "function call func(obj, value), where obj is the object's index and func is one of:\n"
    + "\n".join(f"- {f}(obj, value), value in {{{', '.join(v)}}}" for f, v in TRANCE_FUNCTIONS.items())
)

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question about images, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


def is_choice(sample: Sample) -> bool:
    return sample.task == "geometry" and sample.answer.strip().upper() in {"A", "B", "C", "D", "E"}


def answer_spec(sample: Sample) -> str:
    if sample.task == "counting":
        return "final answer (number)"
    if sample.task == "geometry":
        if is_choice(sample):
            return "select the correct answer by writing the letter (A, B, C or D)"
        return "final answer (float number or int number)"
    if sample.task == "trance":
        return "the final answer as a comma-separated list of func(obj, value) calls"
    return "final answer"  # a task of the user's own (its reward comes from reward.function)


def user_text(sample: Sample, system_prompt: bool = False) -> str:
    question = sample.problem.strip()
    if sample.task == "trance":
        question = f"{TRANCE_INSTRUCTION}\n{question}"
    if system_prompt:
        return question
    return f"{question} {FORMAT_TAIL.format(what=answer_spec(sample))}"


def build_messages(sample: Sample, system_prompt: bool = False) -> list[dict]:
    content = [{"type": "image"} for _ in sample.image_paths]
    content.append({"type": "text", "text": user_text(sample, system_prompt)})
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return messages


def render_prompt(processor, sample: Sample, system_prompt: bool = False) -> str:
    """``processor``'s chat text for ``sample``, with exactly one placeholder per image (else
    DataError naming the row)."""
    text = processor.apply_chat_template(
        build_messages(sample, system_prompt), add_generation_prompt=True, tokenize=False
    )
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    found = text.count(image_token)
    if found != len(sample.image_paths):
        raise DataError.of(
            sample,
            f"the prompt has {found} image placeholders for {len(sample.image_paths)} images "
            "(does the problem text contain an image token?)",
            "problem",
        )
    return text
