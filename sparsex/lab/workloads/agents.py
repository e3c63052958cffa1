"""Agent workflows: two agents with different system prompts share three messages.

The shared messages (a tool output, a plan, another agent's message) are
segments behind plain-text labels; they are never a prompt's prefix.
Warm-up: agent A's prompt (its system prompt, the task, the messages in one
order, its instruction). Test: agent B's prompt with another system prompt
and the messages in another order, then B's instruction. When answerable, the
tool output reports a ticket number and B is asked for it. ``num_docs`` is
not used: there are always three shared messages.
"""

from __future__ import annotations

import random

from sparsex.lab.workloads.common import Params, doc_pool, merge, new_order, pick, random_code
from sparsex.lab.workloads.corpus import split_sentences, topic_title
from sparsex.lab.workloads.item import Part
from sparsex.segments import Segment

ROLES = {
    "Planner": "You are the Planner agent. You break the team's task into concrete steps.",
    "Critic": "You are the Critic agent. You look for mistakes and gaps in what the others wrote.",
    "Writer": "You are the Writer agent. You turn the team's material into a clear explanation.",
    "Researcher": "You are the Researcher agent. You check facts against the tool outputs.",
}
INSTRUCTIONS = {
    "Planner": "Revise the plan given the messages above.",
    "Critic": "Point out the weakest step of the plan and explain why.",
    "Writer": "Write the first paragraph of the guide.",
    "Researcher": "List the facts from the tool output that the plan relies on.",
}


def _plan(text: str) -> str:
    steps = split_sentences(text) or [text]
    return "\n".join(f"{j + 1}. {s}" for j, s in enumerate(steps))


def _agent_prompt(
    params: Params, role: str, task: str, messages: list[tuple[str, Segment]], instruction: str
) -> list[Part]:
    markup = params.markup
    parts: list[Part] = [markup.system(ROLES[role]), task]
    for label, seg in messages:
        parts.extend([f"\n\n{label}\n", seg])
    parts.extend([f"\n\n{instruction}", markup.close(), markup.reply()])
    return merge(parts)


def build_agents(
    rng: random.Random, params: Params, seed: int
) -> tuple[list[list[Part]], list[Part], str | None]:
    """One agents item: ``(warmup, prompt, answer)``; the answer is the tool's ticket number."""
    tool, plan, note = pick(rng, doc_pool(params, seed), 3)
    role_a, role_b, role_c = rng.sample(sorted(ROLES), 3)
    tool_text = tool.text
    answer: str | None = None
    if params.answerable:
        answer = random_code(rng)
        tool_text = f"Ticket {answer} was opened for this request. {tool_text}"
    title = topic_title(tool.topic)
    messages = [
        (f'[Tool output: search_docs("{title}")]', Segment(tool_text)),
        ("[Shared plan]", Segment(_plan(plan.text))),
        (f"[Message from the {role_c} agent]", Segment(note.text)),
    ]
    task = f"Task: the team is writing a guide about {title}. Shared messages follow."
    warmup = [_agent_prompt(params, role_a, task, messages, INSTRUCTIONS[role_a])]
    reordered = [messages[j] for j in new_order(rng, 3)]
    if params.answerable:
        instruction = "What is the ticket number reported in the tool output? Reply with the ticket number."
    else:
        instruction = INSTRUCTIONS[role_b]
    return warmup, _agent_prompt(params, role_b, task, reordered, instruction), answer
