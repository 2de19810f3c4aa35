"""web_demo.py, the browser chat: the page in a real headless Chromium, served by `python web_demo.py` on a tiny
ChatGLM3 checkpoint (a LoRA adapter fine-tuned by train.py on data/tools.jsonl, so that greedy decoding makes the
tool call the data teaches; Stop on the tiny base checkpoint, whose answers run longer, served through
tests/held_web_demo.py so that the answer waits for Stop), compared with the model's own chat() and with predict.py
--query.

The browser tests need Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver)
and selenium; .ci/run installs them, elsewhere these tests skip and say why."""
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port

pytest.importorskip("gradio", reason="gradio is not installed (requirements.txt)")

import predict  # noqa: E402
import web_demo  # noqa: E402
from inference import load_for_inference  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")
MAX_NEW_TOKENS = 64  # the page's setting (--max_new_tokens) and the reference answers'
TOOL_SAMPLES = [json.loads(line)["conversations"]
                for line in (ROOT / "data/tools.jsonl").read_text(encoding="utf-8").splitlines()]
LORA_MODULES = "query_key_value,dense_h_to_4h,dense_4h_to_h,dense"


@pytest.fixture(scope="module")
def tool_adapter(tiny_dirs, tmp_path_factory):
    """A LoRA adapter trained by train.py (one rank, gloo) on data/tools.jsonl until greedy decoding makes each
    sample's tool call, then gives its answer to the observation (the simplest honest way to get a call out of a
    tiny random model)."""
    out = tmp_path_factory.mktemp("tool-lora")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, str(ROOT / "train.py"), "--mode", "glm3", "--model_name_or_path", tiny_dirs["glm3"],
               "--output_dir", str(out), "--train_type", "lora", "--lora_dim", "8", "--lora_alpha", "32",
               "--lora_module_name", LORA_MODULES, "--train_path", str(ROOT / "data/tools.jsonl"),
               "--max_len", "512", "--max_src_len", "480", "--per_device_train_batch_size", "2",
               "--learning_rate", "1e-2", "--num_train_epochs", "40", "--warmup_ratio", "0", "--weight_decay", "0",
               "--show_loss_step", "10", "--save_model_step", "1000", "--save_total_limit", "1"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(out / "epoch-40-step-40")


@pytest.fixture(scope="module")
def reference(tool_adapter):
    """(model, tokenizer) loaded as predict.py loads them: the answers the page must give."""
    return load_for_inference("glm3", tool_adapter)


def greedy(model, tokenizer, query, history=(), role="user"):
    return model.chat(tokenizer, query, history=list(history), role=role, do_sample=False,
                      max_new_tokens=MAX_NEW_TOKENS)


def as_shown(response) -> str:
    """chat()'s response as the page shows it: a text as it is; a tool call ({"name", "content", "parameters"}) as
    its name and its parameters as JSON, after a mark (the arguments predict.py's terminal chat shows)."""
    if isinstance(response, str):
        return response
    return f"{web_demo.CALL_MARK}{response['name']} {json.dumps(response['parameters'], ensure_ascii=False)}"


def displayable(answer) -> bool:
    """A text answer the page shows verbatim. The tiny model's greedy answers are often noise holding control
    characters (a tab, NUL, \\x13), which the browser turns into spaces or drops, so a page showing exactly chat()'s
    answer would still differ from it in the DOM's text; a tool call changes form at its end (the arguments are
    shown as JSON once they read), so its stream is not a growing prefix of it."""
    return isinstance(answer, str) and answer != "" and answer.isprintable()


# (first question, second question): the first pair whose greedy answers (the second with and without the first
# in the history) are displayable texts is the one typed into the page; which pair that is depends on the tiny
# adapter's random weights, so a few are offered.
CONVERSATIONS = [("发动机水温高怎么办？", "那风扇呢？"), ("轮胎气压多少合适？", "还有呢？"),
                 ("轮胎气压多少合适？", "轮胎气压多少合适？"), ("讲个故事吧。", "为什么？"), ("你好", "那风扇呢？")]
# The stop test's question, on the tiny base checkpoint: the first whose greedy answer runs to MAX_NEW_TOKENS without
# an end token and starts as a text, so that it is still being generated when held_web_demo.py holds it for Stop.
LONG_QUESTIONS = ["方向盘跑偏怎么办？", "轮胎气压多少合适？", "帮我写一份详细的维修报告。", "油耗突然变高了。"]


def visible(texts) -> str:
    """The characters of some answers that the page shows as they are (not control characters, not spaces)."""
    return "".join(c for text in texts for c in text if c.isprintable() and not c.isspace())


@pytest.fixture(scope="module")
def server(tool_adapter):
    """`python web_demo.py` on the adapter, as a user starts it; yields the URL it prints."""
    yield from serve(tool_adapter)


@pytest.fixture(scope="module")
def base_server(tiny_dirs):
    """`python web_demo.py` on the tiny ChatGLM3 base checkpoint, each answer held for Stop (held_web_demo.py)."""
    yield from serve(tiny_dirs["glm3"], script=ROOT / "tests" / "held_web_demo.py")


def serve(model_path, script=ROOT / "web_demo.py", max_new_tokens=MAX_NEW_TOKENS):
    command = [sys.executable, str(script), "--mode", "glm3", "--model_path", model_path,
               "--port", str(free_port()), "--max_new_tokens", str(max_new_tokens)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 300
    url = None
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("web_demo.py: chat with") and " at http://127.0.0.1:" in line:
            url = line.rsplit(" at ", 1)[1].strip()
    if url is None:
        process.kill()
        pytest.fail("web_demo.py printed no URL:\n" + "".join(seen[-30:]))
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def parallel_server(tiny_dirs, tmp_path_factory):
    """`python web_demo.py` on the tiny ChatGLM3 checkpoint over-fitted on test_tool_chat's tool conversations, which
    answers "发动机和变速箱都查一下" with two parallel calls and the results of both with a known answer."""
    from test_tool_chat import overfit_on_tools

    checkpoint = overfit_on_tools("glm3", tiny_dirs["glm3"], tmp_path_factory.mktemp("parallel") / "glm3")
    yield from serve(checkpoint, max_new_tokens=200)  # (two calls in ChatGLM3's form take ~130 tokens here)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by selenium through Debian's chromedriver, with a fresh profile."""
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        pytest.skip(f"no Chromium at {CHROMIUM} / {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver; "
                    f".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The chat page as a user sees it: typing, clicking, reading the messages."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        self.wait_for(lambda: self.find("#query textarea"), "the message box")

    def find(self, css):
        found = self.driver.find_elements(self.by.CSS_SELECTOR, css)
        return found[0] if found else None

    def wait_for(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; the page shows {self.messages()}, "
                             f"status {self.status()!r}")

    def type_into(self, css, text):
        box = self.find(css)
        box.clear()
        box.send_keys(text)

    def click(self, element_id):
        self.find(f"#{element_id}").click()

    def messages(self) -> list[tuple[str, str]]:
        """(user|bot, text) of every message in the chat, the text exactly as the page holds it."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#chatbot [data-testid=user], #chatbot [data-testid=bot]'))"
            ".map(e => [e.dataset.testid, e.querySelector('.message-content').textContent]);")

    def status(self) -> str:
        element = self.find("#status")
        return element.text if element else ""

    def answer(self, count_before, expected, send="send"):
        """Click `send` (or press Enter in the message box), then wait until the chat holds one more message and one
        more answer, equal to `expected`, and nothing is being generated; returns the distinct texts the answer showed
        on the way (the stream)."""
        if send == "Enter":
            from selenium.webdriver.common.keys import Keys

            self.find("#query textarea").send_keys(Keys.ENTER)
        else:
            self.click(send)
        stream = []

        def done():
            messages = self.messages()
            if len(messages) > count_before and messages[-1][0] == "bot":
                if not stream or stream[-1] != messages[-1][1]:
                    stream.append(messages[-1][1])
            return len(messages) == count_before + 2 and messages[-1] == ["bot", expected] and not self.busy()

        self.wait_for(done, f"the answer {expected!r}")
        return stream

    def busy(self) -> bool:
        return bool(self.driver.execute_script(
            "return document.querySelector('#chatbot .generating, #chatbot [data-testid=status-tracker]:not(.hide)')"))


def test_page_streams_chat_answers_with_history_equal_to_chat_and_predict(browser, server, reference, tool_adapter,
                                                                             capsys):
    """Two turns typed into the page: each streamed answer is chat()'s greedy answer for the same history (the second
    turn sees the first), the first is also predict.py --query's; Regenerate gives the last answer again in its
    place, Clear empties the chat and the next question starts a new conversation."""
    model, tokenizer = reference
    for first, second in CONVERSATIONS:
        answer1, history = greedy(model, tokenizer, first)
        answer2, _ = greedy(model, tokenizer, second, history)
        answer3, _ = greedy(model, tokenizer, second)  # after Clear
        if all(map(displayable, (answer1, answer2, answer3))) and answer1 != answer2:
            break  # (answer1 != answer2: so that the second comparison shows the history was used)
    else:
        pytest.fail(f"no question of {CONVERSATIONS} has greedy answers the page can show verbatim")
    page = Page(browser, server)

    page.type_into("#query textarea", first)
    stream = page.answer(0, answer1)
    assert all(answer1.startswith(part.rstrip("\ufffd")) for part in stream), stream
    assert predict.main(["--mode", "glm3", "--model_path", tool_adapter, "--query", first,
                         "--max_new_tokens", str(MAX_NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == answer1 + "\n" and page.messages()[1][1] == answer1
    assert page.find("#query textarea").get_attribute("value") == ""  # the box empties for the next question

    page.type_into("#query textarea", second)
    page.answer(2, answer2, send="Enter")
    assert page.messages() == [["user", first], ["bot", answer1], ["user", second], ["bot", answer2]]

    page.click("regenerate")
    page.wait_for(lambda: page.messages() == [["user", first], ["bot", answer1], ["user", second],
                                              ["bot", answer2]] and not page.busy(), "the regenerated answer")
    page.click("clear")
    page.wait_for(lambda: page.messages() == [], "an empty chat")
    page.type_into("#query textarea", second)
    page.answer(0, answer3)  # no history left


def test_page_tool_call_then_observation(browser, server, reference):
    """With the tools of data/tools.jsonl in the tools box, the user's question gets the tool call chat() makes,
    shown as its name and parameters; the tool's result sent as an observation gets chat()'s answer. A tools box that
    is not JSON and text that is not UTF-8 are named in the page, and the conversation goes on."""
    model, tokenizer = reference
    system, user, call, observation, _ = TOOL_SAMPLES[0]
    page = Page(browser, server)

    page.type_into("#tools textarea", '[{"type": "function", ')  # not JSON
    page.type_into("#query textarea", user["content"])
    page.click("send")
    page.wait_for(lambda: "not valid JSON" in page.status(), "the message about the tools box")
    assert page.messages() == []
    assert page.find("#query textarea").get_attribute("value") == user["content"]  # nothing typed is lost

    page.type_into("#tools textarea", json.dumps(system["tools"], ensure_ascii=False))
    page.type_into("#system textarea", system["content"])
    expected_call, history = greedy(model, tokenizer, user["content"], [system])
    # the call the data teaches, with its arguments read ("parameters"), to show
    assert expected_call == {"name": call["metadata"], "content": expected_call["content"],
                             "parameters": json.loads(call["content"])}
    page.answer(0, as_shown(expected_call))
    page.wait_for(lambda: page.status() == "waiting for the result of tool call (read_fault_codes): type it in the "
                                           "tool result box", "the call's result to be asked for")

    expected_answer, _ = greedy(model, tokenizer, observation["content"], history, role="observation")
    assert displayable(expected_answer), expected_answer  # the answer the data teaches
    page.type_into("#observation textarea", observation["content"])
    page.answer(2, as_shown(expected_answer), send="send_observation")
    assert page.messages()[2] == ["user", web_demo.OBSERVATION_MARK + observation["content"]]
    # refresh docs/web_demo.png (WEB_DEMO_SCREENSHOT=docs/web_demo.png; Debian fonts-noto-cjk and
    # fonts-noto-color-emoji draw the Chinese text and the marks): the call, its result and the answer, nothing else
    if os.environ.get("WEB_DEMO_SCREENSHOT"):
        browser.save_screenshot(os.environ["WEB_DEMO_SCREENSHOT"])

    # text that is not UTF-8 (a lone surrogate, which the browser lets through): named, the conversation stays
    browser.execute_script(
        "const box = document.querySelector('#query textarea');"
        "box.value = 'bad \\ud800 text'; box.dispatchEvent(new Event('input', {bubbles: true}));")
    page.click("send")
    page.wait_for(lambda: "not UTF-8" in page.status(), "the message about the text")
    assert len(page.messages()) == 4


def test_page_collects_one_result_per_parallel_call(browser, parallel_server):
    """Two calls in one answer: the observation box takes the result of call 1/2, keeps it (the model does not
    answer yet), asks for 2/2, and the model answers from both, as predict.py's terminal chat does; an observation
    where no call waits is refused, before the calls and after the answer."""
    from test_tool_chat import CONVERSATIONS, TOOLS

    _, user, engine, gearbox, first, second, answer = CONVERSATIONS[1]
    page = Page(browser, parallel_server)
    page.type_into("#tools textarea", json.dumps(TOOLS, ensure_ascii=False))
    page.type_into("#query textarea", user["content"])
    page.click("send")
    calls = [["bot", f"{web_demo.CALL_MARK}read_fault_codes {call['content']}"] for call in (engine, gearbox)]
    page.wait_for(lambda: page.messages()[1:] == calls and "tool call 1/2 (read_fault_codes)" in page.status()
                  and not page.busy(), "the two calls and the first result to be asked for")
    page.type_into("#observation textarea", first["content"])
    page.click("send_observation")
    page.wait_for(lambda: "tool call 2/2 (read_fault_codes)" in page.status(), "the second result to be asked for")
    assert page.messages()[3:] == [["user", web_demo.OBSERVATION_MARK + first["content"]]]  # no answer yet
    page.type_into("#observation textarea", second["content"])
    page.answer(4, answer["content"], send="send_observation")
    assert page.messages()[3:5] == [["user", web_demo.OBSERVATION_MARK + o["content"]] for o in (first, second)]

    for messages in (6, 0):  # after the answer; after Clear, before any call
        page.type_into("#observation textarea", "{}")
        page.click("send_observation")
        page.wait_for(lambda: "no tool call is waiting for a result" in page.status(), "the observation to be refused")
        assert len(page.messages()) == messages
        page.click("clear")
        page.wait_for(lambda: page.messages() == [] and page.status() == "", "an empty chat")


def test_page_stop_keeps_the_answer_so_far(browser, base_server, tiny_dirs):
    """A question this model answers at length: the answer shows while it is being generated (streaming; the server
    holds it after held_web_demo.HOLD_AFTER tokens until Stop), Stop ends it, what was written stays, and the
    conversation goes on."""
    from selenium.webdriver.common.keys import Keys

    model, tokenizer = load_for_inference("glm3", tiny_dirs["glm3"])
    for question in LONG_QUESTIONS:
        whole = web_demo.shown(greedy(model, tokenizer, question)[1], "glm3")
        shorter = web_demo.shown(model.chat(tokenizer, question, do_sample=False,
                                            max_new_tokens=MAX_NEW_TOKENS - 1)[1], "glm3")
        if whole != shorter and not whole[1]["content"].startswith(web_demo.CALL_MARK):
            break  # one token more gave more: no end token before the limit; and the answer starts as a text
    else:
        pytest.fail(f"no question of {LONG_QUESTIONS} has a greedy answer running to {MAX_NEW_TOKENS} new tokens")
    whole = [message["content"] for message in whole[1:]]
    page = Page(browser, base_server)
    page.type_into("#query textarea", question)
    page.click("send")
    partial = page.wait_for(lambda: page.busy() and len(page.messages()) == 2 and page.messages()[1][1],
                            "part of the answer while it is generated")
    page.click("stop")
    page.wait_for(lambda: not page.busy() and "stopped" in page.status(), "the answer to stop", timeout=30)
    kept = page.messages()
    assert partial and kept[0] == ["user", question] and all(role == "bot" for role, _ in kept[1:])
    assert len(kept) - 1 <= len(whole) and len(visible(t for _, t in kept[1:])) < len(visible(whole))  # cut short
    page.type_into("#query textarea", "谢谢")
    page.find("#query textarea").send_keys(Keys.ENTER)
    # the next answer follows the cut one (held too, so Stop once more): it may be a text or calls
    page.wait_for(lambda: len(page.messages()) > len(kept) + 1 and page.messages()[len(kept)] == ["user", "谢谢"],
                  "the next answer")
    page.click("stop")
    page.wait_for(lambda: not page.busy(), "the next answer to stop", timeout=30)
    assert page.messages()[:len(kept)] == kept  # what was written stays


# ------------------------------------------------------------------------------------------------------------------
# without a browser
# ------------------------------------------------------------------------------------------------------------------
def test_missing_checkpoint_is_one_line_at_start(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "web_demo.py"), "--mode", "glm3", "--model_path",
                             str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"web_demo.py: error: {tmp_path / 'nowhere'}: no such checkpoint "
                                                  f"directory"]


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm4"])
def test_stream_ends_with_chat_answer_and_stop_keeps_a_prefix(mode, tiny_dirs, one_thread):
    """What the page runs (web_demo.Chat.stream) for the other versions: the streamed conversation grows and ends
    with chat()'s greedy answer; a second turn sees the first; Stop during an answer ends it early, keeping what was
    written."""
    model, tokenizer = load_for_inference(mode, tiny_dirs[mode])
    chat = web_demo.Chat(model, tokenizer, mode)
    settings = chat.settings(max_new_tokens=40, temperature=0.8, top_p=0.8, greedy=True)
    never = threading.Event()
    *steps, first = list(chat.stream([], "你好", "user", [], settings, never))
    assert steps and first[-1] == answer_message(mode, model.chat(tokenizer, "你好", do_sample=False,
                                                                  max_new_tokens=40))
    *_, second = list(chat.stream(first, "再说一遍", "user", [], settings, never))
    chat_history = first if mode == "glm4" else [(first[0]["content"], first[1]["content"])]  # chat()'s format
    assert second[-1] == answer_message(mode, model.chat(tokenizer, "再说一遍", history=chat_history, do_sample=False,
                                                         max_new_tokens=40))

    stop = threading.Event()
    stopped = None
    for stopped in chat.stream([], "你好", "user", [], chat.settings(400, 0.8, 0.8, True), stop):
        stop.set()  # the Stop button, clicked while the first tokens show
    full, full_history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=400)
    written, whole = raw_text(stopped[-1]), raw_text(full_history[-1]) if mode == "glm4" else full
    assert len(written) < len(whole) and whole.startswith(written.rstrip("\ufffd"))


def answer_message(mode, chat_result) -> dict:
    """The answer of a chat() result as the page's conversation holds it: glm4's last history message (a text, or a
    call, possibly marked incomplete), glm/glm2's text."""
    response, history = chat_result
    return history[-1] if mode == "glm4" else {"role": "assistant", "content": response}


def raw_text(message: dict) -> str:
    """An answer as generated: a glm4 tool call's name line, then its content (a name cut short: no line end)."""
    if message.get("incomplete") and not message["content"]:
        return message["metadata"]
    return f"{message['metadata']}\n{message['content']}" if message.get("metadata") else message["content"]


def test_bad_page_input_is_named():
    with pytest.raises(web_demo.InputError, match="not valid JSON"):
        web_demo.parse_tools("[{")
    with pytest.raises(web_demo.InputError, match="JSON list"):
        web_demo.parse_tools('{"type": "function"}')
    with pytest.raises(web_demo.InputError, match="the tools box: tool 2 is not"):
        web_demo.parse_tools('[{"type": "function", "function": {"name": "a"}}, {"name": "b"}]')
    assert web_demo.parse_tools("  ") is None
    assert web_demo.system_messages("glm3", "", None) == []
    assert web_demo.system_messages("glm2", "be brief", None) == []  # glm/glm2 have no system prompt


def test_results_are_due_call_by_call_and_incomplete_calls_take_none():
    """The page's bookkeeping of results: one per call of the last answer, in order; none before a call or after
    the answer; a call cut by the token limit shows as incomplete and takes none."""
    call = {"role": "assistant", "metadata": "read_fault_codes", "content": '{"system": "发动机"}'}
    result = {"role": "observation", "content": "{}"}
    question = {"role": "user", "content": "查一下"}
    assert web_demo.result_due([]) is None and web_demo.result_due([question]) is None
    assert web_demo.result_due([question, call, call]) == (1, 2, call)
    assert web_demo.result_due([question, call, call, result]) == (2, 2, call)
    assert web_demo.result_due([question, call, call, result, result]) is None
    assert web_demo.status_of([question, call]) == ("waiting for the result of tool call (read_fault_codes): type "
                                                    "it in the tool result box")
    cut = {"role": "assistant", "metadata": "read_fa", "content": "", "incomplete": True}
    with pytest.raises(web_demo.InputError, match="incomplete"):
        web_demo.result_due([question, call, cut])
    assert web_demo.shown([question, call, cut], "glm4")[2] == {
        "role": "assistant", "content": web_demo.CALL_MARK + "read_fa" + web_demo.INCOMPLETE_MARK}


def test_calls_show_as_chat_returns_them():
    """Several calls in one answer (glm3: split at <|assistant|> by template.process_response, as chat() does) show
    as several calls, each with the arguments chat() read ("parameters") as JSON, or the text the model wrote when
    they do not read."""
    from model import template

    generated = ("read_fault_codes\n```python\ntool_call(system='发动机')\n```<|assistant|>"
                 "read_fault_codes\n```python\ntool_call(system='变速箱')\n```<|assistant|>clear_codes\nnot a call")
    calls, history = template.process_response("glm3", generated, [{"role": "user", "content": "查一下"}])
    assert [call.get("parameters") for call in calls] == [{"system": "发动机"}, {"system": "变速箱"}, None]
    assert web_demo.shown(history, "glm3") == [
        {"role": "user", "content": "查一下"},
        {"role": "assistant", "content": web_demo.CALL_MARK + 'read_fault_codes {"system": "发动机"}'},
        {"role": "assistant", "content": web_demo.CALL_MARK + 'read_fault_codes {"system": "变速箱"}'},
        {"role": "assistant", "content": web_demo.CALL_MARK + "clear_codes not a call"}]


def test_the_sampling_flags_are_predict_pys():
    """web_demo.py's four sampling flags are predict.py's (one add_sampling_flags): the same defaults and help."""
    import argparse

    def sampling_flags(module):
        parser = argparse.ArgumentParser()
        module.add_sampling_flags(parser.add_argument_group(), not_sampling="-")
        return {a.dest: (a.default, a.help) for a in parser._actions if a.dest != "help"}

    expected = sampling_flags(predict)
    assert set(expected) == {"max_new_tokens", "do_sample", "top_p", "temperature"}
    assert sampling_flags(web_demo) == expected
    for module in (predict, web_demo):
        args = module.parse_args(["--mode", "glm3", "--model_path", "-"])
        assert {flag: getattr(args, flag) for flag in expected} == {f: d for f, (d, _) in expected.items()}
