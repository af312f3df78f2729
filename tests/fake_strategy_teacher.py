"""The fake teacher for Orca-2 data: it records the system prompt of every request and answers
by the strategy it recognises there (`FakeTeacher`'s faults and hang included).

    teacher = StrategyTeacher({name: prompt, ...}, reply=lambda strategy, task_prompt: "Answer: 3")
    with teacher:  ... teacher.url ...
    teacher.systems          every system prompt received, in arrival order
    teacher.asked[(strategy, task_prompt)]   valid answers served per strategy and task

`refuse_fields` plays an endpoint without structured outputs (a 400 naming the field), as in
`FakeTeacher`; every request body is in `teacher.bodies`.

`reply` may quote its instructions (a test of the leak check) by looking the prompt up in
`teacher.prompts[strategy]`; a system prompt it does not know is the strategy None.
"""

from __future__ import annotations

import collections
import json
from typing import Callable

from fake_teacher import FakeTeacher


class StrategyTeacher(FakeTeacher):
    def __init__(self, strategies: dict[str, str], reply: Callable[[str | None, str], str],
                 faults: Callable[[str, int], str | None] | None = None, **kwargs):
        super().__init__(score_of=lambda doc: None, faults=faults, **kwargs)
        self.prompts = dict(strategies)
        self._names = {prompt: name for name, prompt in strategies.items()}
        self.reply = reply
        self.systems: list[str | None] = []
        self.asked: collections.Counter = collections.Counter()

    def _handler(self):
        base, teacher = super()._handler(), self

        class Handler(base):
            def _respond(self, request, doc, fault):
                system = next((m["content"] for m in request["messages"] if m["role"] == "system"), None)
                with teacher.lock:
                    teacher.systems.append(system)
                if fault is not None or any(f in request for f in teacher.refuse_fields):
                    return super()._respond(request, doc, fault)  # the fault, or a 400 naming the field
                strategy = teacher._names.get(system)
                text = teacher.reply(strategy, doc)
                body = {"id": "x", "object": "chat.completion", "model": request["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": len(doc.split()) + 10,
                                  "completion_tokens": len(text.split()),
                                  "total_tokens": len(doc.split()) + 10 + len(text.split())}}
                with teacher.lock:
                    teacher.answered[doc] += 1
                    teacher.asked[strategy, doc] += 1
                self._send(200, json.dumps(body).encode())

        return Handler
