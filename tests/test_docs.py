"""The documentation says what the code does: the per-flag pages (docs/cli/) are the parsers' own, every relative link
and #anchor in README.md and docs/ resolves, and every command the docs give for our scripts parses with their
parsers (every flag exists, every value is accepted), the serving recipes' flags agreeing with the commands they
serve the output of."""
import argparse
import contextlib
import io
import re
import shlex
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs" / "cli"))
import generate  # noqa: E402  (docs/cli/generate.py)
import merge_lora  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
import web_demo  # noqa: E402
from utils import HelpFormatter  # noqa: E402

SCRIPTS = {"train.py": train, "predict.py": predict, "merge_lora.py": merge_lora, "web_demo.py": web_demo}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # written by hand (docs/cli/ is generated)


# ------------------------------------------------------------------------------------------------------------------
# the generated flag pages
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", generate.SCRIPTS)
def test_cli_pages_are_the_parsers(script):
    page = ROOT / "docs" / "cli" / f"{script}.md"
    assert page.read_text(encoding="utf-8") == generate.page(script), \
        f"{page.relative_to(ROOT)} differs from {script}.build_parser(); regenerate with: {generate.REGENERATE}"


def test_resume_list_is_the_code():
    """docs/cli/train.md's list of the flags --resume compares is train.RESUME_FIXED, every flag in it."""
    section = (ROOT / "docs/cli/train.md").read_text(encoding="utf-8").split("## Flags that --resume compares")[1]
    items = "\n".join(line for line in section.splitlines() if line.startswith("- "))
    listed = set(re.findall(r"`--(\w+)`", items)) | ({"world_size"} if "the number of ranks" in items else set())
    compared = {flag for flags in train.RESUME_FIXED.values() for flag in flags}
    assert listed == compared
    assert "lora_dropout" not in compared and {"quantization_bit", "sequence_parallel_size"} <= compared


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_default(name):
    """Every optional flag with a default states it in --help (the HelpFormatter adds it where the help has none)."""
    parser = SCRIPTS[name].build_parser()
    formatter = HelpFormatter(prog=name)
    for action in parser._actions:
        if action.option_strings and not action.required and action.default not in (None, "", argparse.SUPPRESS):
            assert "%(default)s" in formatter._get_help_string(action), action.option_strings
    text = parser.format_help()
    assert "docs/cli/" in text  # the epilog points at the flag page


# ------------------------------------------------------------------------------------------------------------------
# links and anchors
# ------------------------------------------------------------------------------------------------------------------
def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than - and _ dropped, spaces as -; repeats get -1, -2."""
    seen, ids = {}, set()
    for heading in re.findall(r"^#+ (.+)$", without_code(path.read_text(encoding="utf-8")), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return ids


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


# ------------------------------------------------------------------------------------------------------------------
# the commands the docs give
# ------------------------------------------------------------------------------------------------------------------
def shell_texts(text: str) -> list[str]:
    """The command texts of a page: bash blocks, indented blocks and inline code spans, continuation lines joined."""
    texts = re.findall(r"^ *```bash\n(.*?)^ *```", text, flags=re.M | re.S)
    rest = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
    texts += re.findall(r"(?:^(?: {4}).+\n)+", rest, flags=re.M)  # indented code blocks
    texts += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", rest)]
    return [text.replace("\\\n", " ") for text in texts]


def commands() -> list[tuple[str, str, list[str], int]]:
    """(page, script, argv, ranks) for every command line of a guide or a script's docstring (its --help) that runs one
    of our scripts with flags; ranks: deepspeed's --num_gpus, else 1."""
    found = []
    sources = [(str(page.relative_to(ROOT)), page.read_text(encoding="utf-8")) for page in GUIDES]
    sources += [(f"{name} --help", module.__doc__) for name, module in SCRIPTS.items()]  # the docstrings' examples
    for page, source in sources:
        for text in shell_texts(source):
            for line in text.splitlines():
                for part in re.split(r"&&|;|\|", line):
                    try:
                        words = shlex.split(part, comments=True)
                    except ValueError:
                        continue
                    scripts = [i for i, word in enumerate(words) if word in SCRIPTS]
                    if not scripts or words[0] not in ("python", "deepspeed") or "..." in words:
                        continue
                    argv = words[scripts[0] + 1:]
                    launcher = words[:scripts[0]]
                    ranks = int(launcher[launcher.index("--num_gpus") + 1]) if "--num_gpus" in launcher else 1
                    if argv and "--help" not in argv:
                        found.append((page, words[scripts[0]], argv, ranks))
    return found


COMMANDS = commands()


def test_the_main_commands_are_found():
    """The extraction sees the README's path and the guides' recipes (so the parse test below has teeth)."""
    readme = [(script, argv) for page, script, argv, _ in COMMANDS if page == "README.md"]
    assert {script for script, _ in readme} == set(SCRIPTS)
    assert any("--preview_only" in argv for _, argv in readme) and any("--sample_prompts" in argv for _, argv in readme)
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("page,script,argv,ranks", COMMANDS,
                         ids=lambda value: value if isinstance(value, str) else "")
def test_documented_command_parses(page, script, argv, ranks, tmp_path, monkeypatch):
    """Every flag exists and every value parses, as the script's parse_args checks them (files that parse_args
    opens, --sample_prompts, are stood in for; a shipped --ds_file is found by its bare name; the launcher's ranks
    are set as deepspeed sets them)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    for flag, value in zip(argv, argv[1:]):
        if flag == "--sample_prompts":
            (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value).write_text("[]", encoding="utf-8")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            SCRIPTS[script].parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: {script} {shlex.join(argv)}: {stderr.getvalue().strip().splitlines()[-1]}")


def flag_values(script: str, flag: str) -> list[str]:
    return [argv[argv.index(flag) + 1] for _, name, argv, _ in COMMANDS if name == script and flag in argv]


def test_serving_recipes_agree_with_the_commands_they_serve():
    """docs/serving.md: vLLM's --max-lora-rank holds the adapter's rank (train.py's --lora_dim of every command that
    writes the served output directory), and what vLLM and llama.cpp's converter load is a merge_lora.py output of the
    docs."""
    serving = " ".join(shell_texts((ROOT / "docs/serving.md").read_text(encoding="utf-8")))
    words = shlex.split(serving, comments=True)
    served = next(word.split("=", 1)[1] for word in words if word.startswith("mylora="))
    output_dir = served.split("/")[0]
    ranks = [int(argv[argv.index("--lora_dim") + 1]) if "--lora_dim" in argv else train.build_parser().get_default(
        "lora_dim") for _, name, argv, _ in COMMANDS if name == "train.py" and "--output_dir" in argv and
        argv[argv.index("--output_dir") + 1].strip("./") == output_dir]
    assert ranks, f"no train.py command of the docs writes {output_dir}"
    assert int(words[words.index("--max-lora-rank") + 1]) >= max(ranks)
    merged = set(flag_values("merge_lora.py", "--output_dir"))
    assert words[words.index("--model") + 1] in merged
    converted = next(words[i + 1] for i, word in enumerate(words) if word.endswith("convert_hf_to_gguf.py"))
    assert converted in merged


def test_serving_prompt_recipe_runs(tiny_dirs, capsys, monkeypatch):
    """The `python -c` line of the vLLM recipe prints the prompt's token ids with our template."""
    serving = (ROOT / "docs/serving.md").read_text(encoding="utf-8")
    code = re.search(r'python -c "(.+?)" \\', serving).group(1)
    monkeypatch.setattr(sys, "argv", ["-c", str(tiny_dirs["glm3"]), "发动机水温高怎么办？"])
    exec(code, {})
    ids = eval(capsys.readouterr().out)
    assert isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)


# ------------------------------------------------------------------------------------------------------------------
# statements the docs make about the flags
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_lora_default_is_every_block_linear(mode, tiny_dirs):
    """--lora_module_name's default names every Linear layer of a transformer block, in each mode (the README's
    examples rely on it), and LoRA through train.py's set-up wraps exactly those."""
    from model import MODE

    args = train.parse_args(["--mode", mode, "--model_name_or_path", str(tiny_dirs[mode]), "--train_path", "x",
                             "--output_dir", "out"])
    model = MODE[mode].model.from_pretrained(tiny_dirs[mode], dtype=torch.float32)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name}
    assert set(args.lora_module_name.split(",")) == linear
    peft_model = train.apply_train_type(model, args)
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == linear


@pytest.mark.parametrize("bad", [["--max_new_tokens", "8193"], ["--temperature", "2.5"], ["--temperature", "0"],
                                 ["--top_p", "1.5"]])
@pytest.mark.parametrize("name", ["predict.py", "web_demo.py"])
def test_predict_refuses_what_the_page_refuses(name, bad, capsys):
    """predict.py and web_demo.py share the generation limits (the page's sliders): beyond them both stop in one line,
    greedy or not."""
    with pytest.raises(SystemExit) as error:
        SCRIPTS[name].parse_args(["--mode", "glm3", "--model_path", "x", *bad])
    assert error.value.code == 2 and bad[0] in capsys.readouterr().err
    ok = {"--max_new_tokens": str(predict.MAX_NEW_TOKENS), "--temperature": str(predict.MAX_TEMPERATURE),
          "--top_p": "1"}[bad[0]]
    SCRIPTS[name].parse_args(["--mode", "glm3", "--model_path", "x", bad[0], ok])
