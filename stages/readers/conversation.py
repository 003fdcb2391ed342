"""The text of a sample as turns: what a trainer learns from, read from a shard record.

Torch-free: the training side and the exports both read a record's conversation through it.
"""
from __future__ import annotations

DEFAULT_PROMPT = "What is in the image?"  # the question of classification rows (label only)
IMAGE_PLACEHOLDER = "<image>"  # LLaVA's mark for the image in a human turn
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def sample_turns(conversations, prompt: str | None, answer: str | None, label: str | None) -> list[tuple[str, str]]:
    """The (question, answer) exchanges of a sample, in order; questions without the `<image>`
    placeholder (an adapter puts the image where its model wants it).

    A LLaVA conversation gives every human -> gpt exchange. As LLaVA's own preprocessing does, a
    conversation opening with a gpt turn loses that turn; consecutive turns of one role are
    joined with a newline; a last question without an answer has nothing to learn and is left
    out. Without a conversation: the prompt and answer; classification rows answer
    DEFAULT_PROMPT (or their prompt) with the label."""
    turns, question, reply = [], None, None
    for turn in conversations or []:
        role, value = turn.get("from"), turn.get("value") or ""
        if role in USER_ROLES:
            if reply is not None:
                turns.append((question, reply))
                question, reply = None, None
            value = _without_placeholder(value)
            question = value if question is None else f"{question}\n{value}"
        elif role in ASSISTANT_ROLES and question is not None:
            reply = value if reply is None else f"{reply}\n{value}"
    if question is not None and reply is not None:
        turns.append((question, reply))
    if not turns:
        if answer is None and label is not None:
            prompt, answer = prompt or DEFAULT_PROMPT, str(label)
        if answer is not None:
            turns = [(_without_placeholder(prompt or ""), answer)]
    return [(q, a.replace(IMAGE_PLACEHOLDER, "")) for q, a in turns]  # one image, placed by the adapter


def _without_placeholder(question: str) -> str:
    # LLaVA moves "<image>" to the front of its turn and strips what it leaves: same text here.
    return question.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in question else question
