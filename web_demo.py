"""Chat with a ChatGLM checkpoint in the browser: a gradio page over the same loading and generation as predict.py.

    python web_demo.py --mode glm3 --model_path output-glm3/epoch-2-step-100
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
message, and the model answers from it. The system prompt and tools in the boxes are put before the conversation
each time the model answers.

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

from inference import CheckpointError, load_for_inference
from model import template
from predict import add_model_flags, generation_kwargs, is_utf8, shown_arguments, tool_list_problem
from utils import add_bool_flag, setup_logging

logger = logging.getLogger("chatglm")

CALL_MARK = "🔧 tool call "  # before a tool call's name and arguments in the chat
OBSERVATION_MARK = "🔎 observation "  # before a tool's result sent back as an observation message


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)

    group = parser.add_argument_group("page")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to serve on (default: this machine only; 0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=7860, help="port to serve on")
    add_bool_flag(group, "--share", "also ask gradio for a public share link (the page is then reachable by anyone "
                                    "who has the link, for 72 hours)")

    group = parser.add_argument_group("generation (the page's initial settings; each can be changed there)")
    group.add_argument("--max_new_tokens", type=int, default=512, help="longest answer in tokens")
    add_bool_flag(group, "--do_sample", "sample with --top_p / --temperature; False: greedy search")
    group.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (when sampling)")
    group.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (when sampling)")
    args = parser.parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        parser.error(f"--max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0 < args.temperature <= MAX_TEMPERATURE:
        parser.error(f"--temperature must be in (0, {MAX_TEMPERATURE}], got {args.temperature}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    return args


MAX_NEW_TOKENS = 8192  # the slider's range
MAX_TEMPERATURE = 2.0


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
    the arguments read as the mode's call form (template.call_arguments, as in template.process_response)."""
    call = {"name": message["metadata"].strip(), "content": message["content"]}
    parameters = template.call_arguments(mode, message["content"])
    if parameters is not None:
        call["parameters"] = parameters
    return call


def call_text(call: dict) -> str:
    """A call as the page shows it: its name, then its arguments as predict.py's terminal chat shows them."""
    return f"{CALL_MARK}{call['name']} {shown_arguments(call)}"


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
            messages.append({"role": "assistant", "content": message["content"]})
    return messages


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
        if not is_utf8(query):
            raise InputError("the text is not UTF-8 (it holds characters that cannot be encoded); type it again")
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
                for history_now in chat.stream(history, text, role, system, gen_kwargs, stop_event):
                    yield shown(history_now, args.mode), history_now, "", gr.skip()
                if stop_event.is_set():
                    yield gr.skip(), gr.skip(), "stopped: the answer so far stays in the conversation", gr.skip()
            except InputError as e:  # the message shows in the page; the conversation and the typed text stay
                yield shown(history, args.mode), history, f"⚠️ {e}", gr.skip()

        def ask(history, text, system_text, tools_text, max_new, temp, p, is_greedy, request: gr.Request):
            yield from answer(history, text, "user", system_text, tools_text, max_new, temp, p, is_greedy, request)

        def observe(history, text, system_text, tools_text, max_new, temp, p, is_greedy, request: gr.Request):
            yield from answer(history, text, "observation", system_text, tools_text, max_new, temp, p, is_greedy,
                              request)

        def again(history, system_text, tools_text, max_new, temp, p, is_greedy, request: gr.Request):
            last = next((i for i in range(len(history) - 1, -1, -1)
                         if history[i]["role"] in ("user", "observation")), None)
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
        model, tokenizer = load_for_inference(args.mode, args.model_path, args.base_model_path, args.device,
                                              args.dtype, args.quantization_bit)
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
    sys.exit(main())
