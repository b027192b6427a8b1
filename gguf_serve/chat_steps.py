"""One choice's chat steps: the engine's events read once into typed deltas (reasoning text,
content text, a tool call started, its arguments, ended, the finish), which chat, the Responses
API and the Messages API only encode, streamed (`ChatSteps.feed` event by event) and whole
(`answer`: the same steps folded). So every API treats the same generation the same way: calls
spotted, a forced call's arguments streamed as the model writes them, `parallel_tool_calls`
held to, a forced call cut by the token budget answered as the call it began (cut_calls.py).

How the text becomes steps follows the tool plan (tools.ToolPlan):
- no tools: every text is content;
- a forced free-form call (a custom tool): the whole text is its input, streamed;
- a forced call (a named function, or `required`): the grammar makes the text exactly
  `{"name": ..., "arguments": ...}`, so the call starts when its name is written and its
  arguments stream as written (tools.ForcedCallReader); cut before its name, its text is content;
- tools offered: text streams as content until a call may begin (tools.CallSpotter); what is
  held from there is parsed at the end, its calls sent whole, the rest as content.
"""

from __future__ import annotations

import json
import uuid
from typing import NamedTuple

import msgspec

from .events import Event
from .protocol import FunctionCall, ToolCall
from .runs import Choice
from .tools import CallSpotter, ForcedCallReader, ToolPlan


class Reasoning(msgspec.Struct):
    text: str


class Content(msgspec.Struct):
    text: str
    logprobs: list = []  # the engine's TokenLogprob of the tokens this step covers


class CallStarted(msgspec.Struct, kw_only=True):
    id: str
    name: str  # as the model sees it (a namespaced or custom tool's as the API's tool map names it)
    free_form: bool = False  # a forced custom tool's: its arguments are its input's text, not JSON
    whole: bool = False  # parsed at the answer's end: its arguments follow in one piece


class CallArguments(msgspec.Struct):
    text: str


class CallEnded(msgspec.Struct):
    pass


class Finished(msgspec.Struct, kw_only=True):
    reason: str  # chat's finish_reason: stop, length, tool_calls, function_call (legacy), or the engine's
    stop_string: str | None = None  # the stop string that ended it
    context_full: bool = False  # a "length" the context's end forced (events.Event.context_full)


Step = Reasoning | Content | CallStarted | CallArguments | CallEnded | Finished


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatSteps:
    """One choice's events -> its steps, as they come."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        spotted = plan.tools and not plan.forced and not plan.free_form
        self.spotter = CallSpotter(forced=False) if spotted else None
        self.reader = ForcedCallReader() if plan.forced and not plan.free_form else None
        self.held = ""  # a forced call's text before its name: content, if no name is ever written
        self.started = False  # the streamed call (forced or free-form) has started
        self.lead = True  # no argument text sent yet (a forced call's leading blanks are left out, as cut_calls reads them)

    def feed(self, event: Event) -> list[Step]:
        steps: list[Step] = [Reasoning(event.reasoning)] if event.reasoning else []
        text, reason = event.text, event.finish_reason
        if self.plan.free_form:
            if (text or reason) and not self.started:
                self.started = True
                steps.append(CallStarted(id=call_id(), name=self.plan.free_form.name, free_form=True))
            steps += [CallArguments(text)] if text else []
            steps += [Content("", event.logprobs)] if event.logprobs else []
            if reason:
                steps += [CallEnded(), self.finished(event, "length" if reason == "length" else "tool_calls")]
            return steps
        if self.reader is not None:
            return steps + self.forced(event)
        if self.spotter is None:
            steps += [Content(text, event.logprobs)] if text or event.logprobs else []
            return steps + ([self.finished(event, reason)] if reason else [])
        text, message, reason = self.spotter.step(text, reason, self.plan)
        steps += [Content(text, event.logprobs)] if text or event.logprobs else []
        if message is not None:
            calls = message.tool_calls or ([ToolCall(id=call_id(), function=message.function_call)]
                                           if message.function_call else [])
            for call in calls if self.plan.parallel else calls[:1]:
                steps += [CallStarted(id=call.id, name=call.function.name, whole=True),
                          CallArguments(call.function.arguments), CallEnded()]
        return steps + ([self.finished(event, reason)] if reason else [])

    def forced(self, event: Event) -> list[Step]:
        """A forced call's text: the call from the moment its name is written, its arguments as written."""
        steps: list[Step] = []
        if not self.started:
            self.held += event.text
        name, arguments = self.reader.feed(event.text)
        if name is not None:
            self.started = True
            steps.append(CallStarted(id=call_id(), name=name))
        if self.lead:
            arguments = arguments.lstrip()
            self.lead = not arguments
        steps += [CallArguments(arguments)] if arguments else []
        steps += [Content("", event.logprobs)] if event.logprobs else []
        reason = event.finish_reason
        if reason == "length" and not self.started and self.plan.forced != "required":
            self.started = True  # cut before its name was written: the named call, no arguments yet
            steps.append(CallStarted(id=call_id(), name=self.plan.forced))
        if reason and not self.started:  # no call was written (`required` cut before any name): its text
            steps += [Content(self.held)] if self.held else []
        elif reason:
            steps += [CallEnded()]
            reason = "length" if reason == "length" else "function_call" if self.plan.legacy else "tool_calls"
        return steps + ([self.finished(event, reason)] if reason else [])

    @staticmethod
    def finished(event: Event, reason: str) -> Finished:
        return Finished(reason=reason, stop_string=event.stop_string, context_full=event.context_full)


class Answer(NamedTuple):
    """A choice's steps folded into its whole answer."""

    reasoning: str
    content: str | None  # None when it is only calls
    logprobs: list
    calls: list[ToolCall]  # a free-form call's arguments as `{"input": ...}`, the function the model sees
    finished: Finished


def answer(plan: ToolPlan, choice: Choice) -> Answer:
    """A whole choice as its steps folded: the same steps its stream would have sent."""
    event = Event(choice.text, choice.finish_reason, logprobs=choice.logprobs, reasoning=choice.reasoning,
                  stop_string=choice.stop_string, context_full=choice.context_full)
    reasoning, content, logprobs, calls, free_form, finished = "", "", [], [], False, None
    for step in ChatSteps(plan).feed(event):
        if isinstance(step, Reasoning):
            reasoning += step.text
        elif isinstance(step, Content):
            content, logprobs = content + step.text, logprobs + step.logprobs
        elif isinstance(step, CallStarted):
            calls.append(ToolCall(id=step.id, function=FunctionCall(step.name, "")))
            free_form = step.free_form
        elif isinstance(step, CallArguments):
            calls[-1].function.arguments += step.text
        elif isinstance(step, Finished):
            finished = step
    if free_form:
        calls[-1].function.arguments = json.dumps({"input": calls[-1].function.arguments}, ensure_ascii=False)
    return Answer(reasoning, content if content or not calls else None, logprobs, calls, finished)
