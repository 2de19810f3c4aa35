"""Chat with a ChatGLM checkpoint in the browser: a gradio page over the same loading and generation as predict.py.

    python web_demo.py --mode glm3 --model_path output-glm3/latest
    # prints the address of the page (http://127.0.0.1:7860/); --host 0.0.0.0 serves it to other machines,
    # --share asks gradio for a public *.gradio.live link (off by default)

The checkpoint is anything predict.py takes (a full or merged model, a LoRA adapter or a P-Tuning prefix on its
base, an official model; --quantization_bit for a 4/8-bit base). The page streams each answer and keeps the
conversation; Stop ends the answer being written (what was written stays), Regenerate answers the last question
again, Clear starts afresh. For glm3/glm4 there is a system prompt and a tools box: the JSON list of function tools
the training data uses ([{"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}]).
A tool call the model makes shows as the call chat() returns, its name and its arguments (as JSON when chat()
could read them, "parameters"; else the text the model wrote), as predict.py's terminal chat shows it; several calls
in one answer show as several calls. The tool's result goes back through the observation box, as an "observation"
message: one result per call, in the order of the calls (the status line says which call's result is due, 1/2, 2/2,
as predict.py's terminal chat asks), and once every call has its result the model answers from them. An observation
where no call waits for one is refused, as the training data refuses it. A call cut by the max new tokens limit (or
by Stop) shows as incomplete and takes no result (Regenerate with a higher limit). The system prompt and tools in the boxes
are put before the conversation each time the model answers.

Greedy answers are exactly chat()'s and predict.py --query's for the same conversation and settings: the page
calls the model's stream_chat() with predict.py's generation settings.
"""

import python_check  # noqa: F401  first: refuses a Python older than 3.10 in one line
import argparse
import json
import logging
import os
import sys
import threading
from types import SimpleNamespace

import torch
from transformers import StoppingCriteria

from inference import CheckpointError
from model.config import resolve_mode
from model import template
from predict import (MAX_NEW_TOKENS, MAX_TEMPERATURE, add_model_flags, add_sampling_flags, check_generation_flags,
                     generation_kwargs, is_utf8, load_model, shown_arguments, tool_list_problem)
from utils import HelpFormatter, add_bool_flag, setup_logging

logger = logging.getLogger("chatglm")

CALL_MARK = "🔧 tool call "  # before a tool call's name and arguments in the chat
INCOMPLETE_MARK = " ✂️ incomplete"  # after a tool call not (yet) written whole: cut by the token limit, or Stop
OBSERVATION_MARK = "🔎 observation "  # before a tool's result sent back as an observation message


EPILOG = ("Every flag with its default and choices: docs/cli/web_demo.md. The guide: docs/inference.md#chat-in-the-"
          "browser.")


def build_parser() -> argparse.ArgumentParser:
    """web_demo.py's flags (docs/cli/generate.py writes docs/cli/web_demo.md from them); parse_args checks values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_flags(parser)

    group = parser.add_argument_group("page")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to serve on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=7860, help="port to serve on")
    add_bool_flag(group, "--share", "also ask gradio for a public share link (the page is then reachable by anyone "
                                    "who has the link, for 72 hours)")

    group = parser.add_argument_group("generation (the page's initial settings; each can be changed there)")
    add_sampling_flags(group, not_sampling="greedy search")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(parser, args, "model_path")
    check_generation_flags(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    return args



# ------------------------------------------------------------------------------------------------------------------
# the conversation: chat()'s history format, shown in the page
# ------------------------------------------------------------------------------------------------------------------
class InputError(ValueError):
    """Something typed into the page that cannot be used; shown in the page, the conversation goes on."""


def parse_tools(text: str) -> list | None:
    """The tools box as the list of function tools the training data uses; None when the box is empty."""
    if not text.strip():
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"the tools box is not valid JSON: {e}") from None
    problem = tool_list_problem(tools)
    if problem:
        raise InputError(f"the tools box: {problem}")
    return tools


def system_messages(mode: str, system_prompt: str, tools: list | None) -> list[dict]:
    """The system message that starts the history chat() gets (glm3/glm4), with the tools as the data has them."""
    if mode not in template.MESSAGE_MODES or (not system_prompt.strip() and not tools):
        return []
    message = {"role": "system", "content": system_prompt}
    if tools:
        message["tools"] = tools
    return [message]


def is_call(message: dict) -> bool:
    return message["role"] == "assistant" and bool((message.get("metadata") or "").strip())


def as_call(mode: str, message: dict) -> dict:
    """A tool-call message of the history as chat() returns the call: {"name", "content"}, and "parameters" when
    the arguments read as the mode's call form (template.call_arguments, as in template.process_response), or
    "incomplete" for a call the token limit cut."""
    call = {"name": message["metadata"].strip(), "content": message["content"]}
    if message.get("incomplete"):
        call["incomplete"] = True
        return call
    parameters = template.call_arguments(mode, message["content"])
    if parameters is not None:
        call["parameters"] = parameters
    return call


def call_text(call: dict) -> str:
    """A call as the page shows it: its name, then its arguments as predict.py's terminal chat shows them (a call the
    token limit cut: what was written of it, marked incomplete)."""
    if template.is_incomplete(call):
        return f"{CALL_MARK}{call['name']} {str(call['content']).strip()}".rstrip() + INCOMPLETE_MARK
    return f"{CALL_MARK}{call['name']} {shown_arguments(call)}"


THINKING_TITLE = "思考过程 (thinking)"  # gradio shows a message with a metadata title as a collapsed box


def last_calls(conversation: list[dict]) -> tuple[list[dict], int]:
    """The tool calls of the conversation's last answer (the assistant messages before any trailing observations)
    and how many of them have their result already (the trailing observations, in the order of the calls)."""
    end = len(conversation)
    while end and conversation[end - 1]["role"] == "observation":
        end -= 1
    start = end
    while start and conversation[start - 1]["role"] == "assistant":
        start -= 1
    return [m for m in conversation[start:end] if is_call(m)], len(conversation) - end


def result_due(conversation: list[dict]) -> tuple[int, int, dict] | None:
    """(number, of, call) of the call whose result the observation box takes next (1/2, 2/2 ...), or None; raises
    InputError when the last answer's calls cannot take results (a call the token limit cut)."""
    calls, answered = last_calls(conversation)
    if any(message.get("incomplete") for message in calls):
        raise InputError("the last tool call is incomplete (cut by max new tokens, or by Stop), so it takes no "
                         "result; raise max new tokens and Regenerate")
    if answered >= len(calls):
        return None
    return answered + 1, len(calls), calls[answered]


def status_of(conversation: list[dict]) -> str:
    """The status line after an answer: which call's result is due, or why none can be given."""
    try:
        due = result_due(conversation)
    except InputError as e:
        return f"⚠️ {e}"
    if due is None:
        return ""
    number, total, call = due
    which = f" {number}/{total}" if total > 1 else ""
    return f"waiting for the result of tool call{which} ({call['metadata'].strip()}): type it in the tool result box"


def shown(conversation: list[dict], mode: str) -> list[dict]:
    """The conversation as gradio's chat messages: the user's and the observations on the right, the model's
    answers and tool calls on the left (each call of an answer with several is a message of its own, as it is in
    chat()'s history)."""
    messages = []
    for message in conversation:
        if message["role"] == "user":
            messages.append({"role": "user", "content": message["content"]})
        elif message["role"] == "observation":
            messages.append({"role": "user", "content": OBSERVATION_MARK + message["content"]})
        elif is_call(message):
            messages.append({"role": "assistant", "content": call_text(as_call(mode, message))})
        else:
            if message.get("reasoning_content"):  # GLM-Z1's thinking: a collapsed box of its own, above the answer
                messages.append({"role": "assistant", "content": message["reasoning_content"],
                                 "metadata": {"title": THINKING_TITLE, "status": "done"}})
            messages.append({"role": "assistant", "content": message["content"]})
    return messages


def check_text(text: str) -> None:
    if not is_utf8(text):
        raise InputError("the text is not UTF-8 (it holds characters that cannot be encoded); type it again")


class StopOnEvent(StoppingCriteria):
    """A stopping criterion for generate(): ends every sequence once `event` is set (the page's Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Chat:
    """The model behind the page: answers a conversation, streaming, with the settings of the page."""

    def __init__(self, model, tokenizer, mode: str):
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.stops: dict[str, threading.Event] = {}  # per browser session, for Stop

    def stop_event(self, session: str) -> threading.Event:
        return self.stops.setdefault(session, threading.Event())

    def settings(self, max_new_tokens, temperature, top_p, greedy) -> dict:
        """predict.py's generation settings (so that a greedy answer equals predict.py --query's), for chat()."""
        args = SimpleNamespace(max_new_tokens=int(max_new_tokens), do_sample=not greedy, num_beams=1,
                               top_p=float(top_p), temperature=float(temperature))
        if args.do_sample and not (0 < args.top_p <= 1 and args.temperature > 0):
            raise InputError(f"sampling needs top_p in (0, 1] and a positive temperature, got top_p {args.top_p}, "
                             f"temperature {args.temperature}")
        kwargs = generation_kwargs(args, self.tokenizer, self.mode)
        return {k: v for k, v in kwargs.items() if k not in ("eos_token_id", "pad_token_id")}  # chat() adds them

    def stream(self, conversation: list[dict], query: str, role: str, system: list[dict], gen_kwargs: dict,
               stop: threading.Event):
        """Yield the conversation with the answer to `query` (a user question or a tool's observation) so far."""
        check_text(query)
        history = system + conversation
        try:
            template.check_conversation(self.mode, history + [{"role": role, "content": query}])
        except ValueError as e:
            raise InputError(str(e)) from None
        kwargs = dict(gen_kwargs, stopping_criteria=[StopOnEvent(stop)])
        for response, new_history in self.model.stream_chat(self.tokenizer, query, history=history, role=role,
                                                            **kwargs):
            if self.mode in template.MESSAGE_MODES:
                yield new_history[len(system):]
            else:  # glm/glm2 return (query, answer) pairs; the page keeps messages
                yield conversation + [{"role": role, "content": query}, {"role": "assistant", "content": response}]


# ------------------------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------------------------
def build_page(chat: Chat, args, title: str):
    import gradio as gr

    tools_mode = args.mode in template.MESSAGE_MODES
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"### {title}")
        conversation = gr.State([])  # chat()'s history, without the system message
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="conversation", elem_id="chatbot", height=460, render_markdown=False,
                                     feedback_options=None, buttons=["copy", "copy_all"])
                query = gr.Textbox(label="your message", placeholder="Enter sends · Shift+Enter starts a new line",
                                   elem_id="query", lines=1, max_lines=8)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Row(visible=tools_mode):
                    observation = gr.Textbox(label="tool result (sent as an observation message)", scale=4,
                                             elem_id="observation", placeholder='e.g. {"codes": ["P0128"]}')
                    send_observation = gr.Button("Send observation", scale=1, elem_id="send_observation")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                system_prompt = gr.Textbox(label="system prompt", lines=2, visible=tools_mode, elem_id="system")
                tools = gr.Textbox(label='tools (JSON): [{"type": "function", "function": {...}}]', lines=6,
                                   visible=tools_mode, elem_id="tools")
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=args.max_new_tokens, step=1,
                                           label="max new tokens", elem_id="max_new_tokens")
                greedy = gr.Checkbox(value=not args.do_sample, label="greedy (no sampling)", elem_id="greedy")
                temperature = gr.Slider(0.01, MAX_TEMPERATURE, value=args.temperature, step=0.01,
                                        label="temperature", elem_id="temperature")
                top_p = gr.Slider(0.01, 1.0, value=args.top_p, step=0.01, label="top_p", elem_id="top_p")

        settings = [system_prompt, tools, max_new_tokens, temperature, top_p, greedy]

        def answer(history, text, role, system_text, tools_text, max_new, temp, p, is_greedy, request):
            stop_event = chat.stop_event(request.session_hash)
            stop_event.clear()
            try:
                for box, typed in (("system prompt", system_text), ("tools box", tools_text)):
                    if not is_utf8(typed):
                        raise InputError(f"the {box} is not UTF-8 text (it holds characters that cannot be encoded)")
                system = system_messages(args.mode, system_text, parse_tools(tools_text) if tools_mode else None)
                gen_kwargs = chat.settings(max_new, temp, p, is_greedy)
                if not text.strip():
                    raise InputError("nothing to send")
                yield shown(history, args.mode), history, "", ""  # the box empties as the answer starts
                history_now = history
                for history_now in chat.stream(history, text, role, system, gen_kwargs, stop_event):
                    yield shown(history_now, args.mode), history_now, "", gr.skip()
                if stop_event.is_set():
                    yield gr.skip(), gr.skip(), "stopped: the answer so far stays in the conversation", gr.skip()
                elif tools_mode:  # which call's result is due next, if any
                    yield gr.skip(), gr.skip(), status_of(history_now), gr.skip()
            except InputError as e:  # the message shows in the page; the conversation and the typed text stay
                yield shown(history, args.mode), history, f"⚠️ {e}", gr.skip()

        def ask(history, text, system_text, tools_text, max_new, temp, p, is_greedy, request: gr.Request):
            yield from answer(history, text, "user", system_text, tools_text, max_new, temp, p, is_greedy, request)

        def observe(history, text, system_text, tools_text, max_new, temp, p, is_greedy, request: gr.Request):
            """One tool result: kept until every call of the answer has its result (in the order of the calls), the
            last one then sent with the others before it; refused where no call waits for one."""
            try:
                due = result_due(history)
                if due is None:
                    raise InputError("no tool call is waiting for a result (an observation answers the model's tool "
                                     "call); send your message as a question instead")
                if not text.strip():
                    raise InputError("nothing to send")
                check_text(text)
            except InputError as e:
                yield shown(history, args.mode), history, f"⚠️ {e}", gr.skip()
                return
            number, total, _ = due
            if number < total:  # more results are due before the model continues
                history = history + [{"role": "observation", "content": text}]
                yield shown(history, args.mode), history, status_of(history), ""
                return
            yield from answer(history, text, "observation", system_text, tools_text, max_new, temp, p, is_greedy,
                              request)

        def again(history, system_text, tools_text, max_new, temp, p, is_greedy, request: gr.Request):
            # the last question or tool result that was answered (results still being collected are dropped: the
            # calls they answer are written again)
            asked = [i for i, message in enumerate(history) if message["role"] in ("user", "observation")]
            answered = [i for i in asked if i + 1 < len(history) and history[i + 1]["role"] == "assistant"]
            last = (answered or asked or [None])[-1]
            if last is None:
                yield shown(history, args.mode), history, "⚠️ nothing to regenerate yet", gr.skip()
                return
            for outputs in answer(history[:last], history[last]["content"], history[last]["role"], system_text,
                                  tools_text, max_new, temp, p, is_greedy, request):
                yield outputs[:3] + (gr.skip(),)  # the message box keeps what is being typed

        def halt(request: gr.Request):
            chat.stop_event(request.session_hash).set()

        outputs = [chatbot, conversation, status]
        query.submit(ask, [conversation, query, *settings], outputs + [query])
        send.click(ask, [conversation, query, *settings], outputs + [query])
        send_observation.click(observe, [conversation, observation, *settings], outputs + [observation])
        regenerate.click(again, [conversation, *settings], outputs + [query])
        stop.click(halt, None, None, queue=False)
        clear.click(lambda: ([], [], ""), None, outputs, queue=False)
        chatbot.clear(lambda: ([], ""), None, [conversation, status], queue=False)  # the chat's own trash button
    return page


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(rank=0)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the page's server
    try:
        import gradio  # noqa: F401  (fail in one line, before the model loads)
    except ImportError:
        print("web_demo.py: error: gradio is not installed: pip install -r requirements.txt -c constraints.txt",
              file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_model(args)
    except CheckpointError as e:
        print(f"web_demo.py: error: {e}", file=sys.stderr)
        return 2

    title = f"ChatGLM ({args.mode}) · {os.path.basename(os.path.normpath(args.model_path))}"
    page = build_page(Chat(model, tokenizer, args.mode), args, title)
    page.queue(default_concurrency_limit=1)  # one answer at a time: they share the model
    try:
        _, local_url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                              prevent_thread_lock=True, quiet=True)
    except OSError as e:  # the port is taken, the address is not this machine's
        print(f"web_demo.py: error: cannot serve on --host {args.host} --port {args.port}: {e}", file=sys.stderr)
        return 2
    print(f"web_demo.py: chat with {args.model_path} at {local_url}", flush=True)
    if share_url:
        print(f"web_demo.py: public link (--share): {share_url}", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        page.close()
    return 0


if __name__ == "__main__":
    from utils import keep_bitsandbytes_out
    command_line = parse_args()  # (main parses it again) what this process loads decides, before peft is imported
    keep_bitsandbytes_out(command_line.quantization_bit, command_line.model_path)
    sys.exit(main())
