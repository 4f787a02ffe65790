"""mistral_jax.text.chat_template against transformers' apply_chat_template: the real Mistral-7B
sentencepiece model (from the mistral-common wheel) with Mistral-7B-Instruct-v0.1's chat
templates, and a small byte-level BPE tokenizer.json trained here with a ChatML template (as
SmolLM2 and Qwen use)."""

import json
import random
import shutil

import jinja2
import pytest
import sentencepiece as spm
import transformers

from mistral_jax.text.chat_template import encode_chat, render
from mistral_jax.text.tokenizer import Tokenizer
from tests.fetch import byte_level_bpe, fetch_wheel_member

# Mistral-7B-Instruct-v0.1's tokenizer_config.json chat_template, early 2024 (our default's format)
V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")
# ... and its later revision, with a system message and spaces around [INST] (shared by Mixtral)
V01_LATER_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must \
alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception \
of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are terse.\nAnswer in one line, en français. ✅"}
CHATS = {
    "one_turn": [user("What is your favourite condiment?")],
    "multi_turn": [user("What is your favourite condiment?"),
                   assistant("Lemon juice: it adds just the right zest!"),
                   user("Do you have mayonnaise recipes?")],
    "non_ascii_emoji": [user("Привет! 你好，世界。Ça va? 🚀🔥"),
                        assistant("नमस्ते 👨‍👩‍👧‍👦 🏳️‍🌈 — مرحبا"), user("日本語で 😂 お願いします 𝔘")],
    "spaces_and_specials": [user("  two leading spaces\n\tand a tab  "), assistant(" x  y "),
                            user("literal </s> and <s> and <unk> in the text")],
    "ends_with_assistant": [user("Hi"), assistant("Hello! 👋")],
}
GEN = pytest.mark.parametrize("gen", [True, False], ids=["gen_prompt", "no_gen_prompt"])
CHAT = pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())


def with_system(chat, merge=False):
    """`chat` after SYSTEM, or (merge) with SYSTEM prepended to its first message's content."""
    if not merge:
        return [SYSTEM, *chat]
    return [{**chat[0], "content": SYSTEM["content"] + "\n\n" + chat[0]["content"]}, *chat[1:]]


def hf_ids(hf, messages, gen, template=None):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                 chat_template=template)
    return list(out if isinstance(out, list) else out["input_ids"])  # 5.x: a BatchEncoding


def hf_text(hf, messages, gen, template=None):
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                  chat_template=template)


@pytest.fixture(scope="module")
def sp_path():
    return fetch_wheel_member("mistral-common", "mistral_common/data/tokenizer.model.v1")


@pytest.fixture(scope="module")
def mistral(sp_path, tmp_path_factory):
    """A tokenizer.model dir with Mistral-7B-Instruct-v0.1's template: (ours, transformers')."""
    path = tmp_path_factory.mktemp("mistral_instruct")
    shutil.copy(sp_path, path / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "chat_template": V01_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(path), path


@pytest.fixture(scope="module")
def hf_mistral(mistral):
    hf = transformers.AutoTokenizer.from_pretrained(mistral[1])
    assert len(hf) == 32000 and hf.chat_template == V01_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def bare(sp_path):
    """The tokenizer.model alone: no tokenizer_config.json, so no chat template."""
    return Tokenizer.from_file(sp_path)


@CHAT
@GEN
def test_mistral_template_matches_transformers(mistral, hf_mistral, chat, gen):
    ours = mistral[0]
    assert ours.chat_template == V01_TEMPLATE
    assert render(ours, chat, add_generation_prompt=gen) == hf_text(hf_mistral, chat, gen)
    assert encode_chat(ours, chat, add_generation_prompt=gen) == hf_ids(hf_mistral, chat, gen)
    # the later revision, which takes a system message
    for msgs in (chat, with_system(chat)):
        kw = {"add_generation_prompt": gen, "template": V01_LATER_TEMPLATE}
        assert encode_chat(ours, msgs, **kw) == hf_ids(hf_mistral, msgs, gen, V01_LATER_TEMPLATE)


@CHAT
@GEN
def test_default_template_is_mistral_v01(bare, hf_mistral, chat, gen):
    assert bare.chat_template is None
    assert render(bare, chat) == hf_text(hf_mistral, chat, gen)
    assert encode_chat(bare, chat, add_generation_prompt=gen) == hf_ids(hf_mistral, chat, gen)
    # a system message goes before the first user message, after which comes a blank line
    ids = encode_chat(bare, with_system(chat), add_generation_prompt=gen)
    assert ids == hf_ids(hf_mistral, with_system(chat, merge=True), gen)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):  # v0.1 has no system role
        hf_text(hf_mistral, with_system(chat), gen)


def test_default_gives_mistral_common_ids(bare):
    """mistral-common's v1 encoding of one user turn (ids from Mistral's cookbook,
    concept-deep-dive/tokenization/chat_templates.md); the later template adds a "▁" (28705)."""
    expected = [1, 733, 16289, 28793, 2188, 2928, 733, 28748, 16289, 28793]
    assert encode_chat(bare, [user("user message")]) == expected
    later = encode_chat(bare, [user("user message")], template=V01_LATER_TEMPLATE)
    assert later == [1, 28705, *expected[1:]]


def test_parse_special_matches_transformers(bare, hf_mistral, sp_path):
    """Random texts around <s>, </s>, <unk>: each piece between special tokens is encoded as
    sentencepiece encodes it alone (with its "▁" prefix), as transformers' conversion does."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    atoms = ["<s>", "</s>", "<unk>", " ", "  ", "\n", "\t", "[INST]", "héllo", "🚀", "word", "<s",
             "s>", "<", ">", "你好", "▁", " [/INST] ", "\r\n", "<<s>>"]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8)))
        ids = hf_mistral(text, add_special_tokens=False)["input_ids"]
        assert bare.encode_text(text, parse_special=True) == ids, text
        assert bare.encode(text, parse_special=True) == [1, *ids]
        assert bare.encode(text) == [1, *sp.encode(text)]  # parse_special=False: unchanged
    assert bare.encode_text("a<s>b</s><unk>", parse_special=True) == [
        *sp.encode("a"), 1, *sp.encode("b"), 2, 0]


# --- a Hugging Face tokenizer.json (byte-level BPE trained here) with a ChatML template ---------


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    texts = [m["content"] for chat in CHATS.values() for m in chat] + [SYSTEM["content"]]
    bpe = byte_level_bpe(texts * 3 + ["user assistant system"] * 5, 600,
                         ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path = tmp_path_factory.mktemp("chatml")
    bpe.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|im_end|>", "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@CHAT
@GEN
@pytest.mark.parametrize("system", [False, True], ids=["", "system"])
def test_chatml_matches_transformers(chatml_dir, chat, gen, system):
    ours = Tokenizer.from_dir(chatml_dir)
    hf = transformers.AutoTokenizer.from_pretrained(chatml_dir)
    msgs = with_system(chat) if system else chat
    assert render(ours, msgs, add_generation_prompt=gen) == hf_text(hf, msgs, gen)
    ids = encode_chat(ours, msgs, add_generation_prompt=gen)
    assert ids == hf_ids(hf, msgs, gen)
    assert ids.count(ours.piece_to_id("<|im_start|>")) == len(msgs) + gen


def test_template_file_and_named_templates(chatml_dir, tmp_path):
    """chat_template.jinja (newer transformers save the template there) wins over the config's;
    a list of named templates gives the one named "default"."""
    shutil.copy(chatml_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "ignored"}')
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == hf.chat_template == CHATML
    assert encode_chat(ours, CHATS["multi_turn"]) == hf_ids(hf, CHATS["multi_turn"], True)
    assert Tokenizer.from_dir(ours.save(tmp_path / "saved")[0].parent).chat_template == CHATML
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    one = CHATS["one_turn"]
    assert render(Tokenizer.from_dir(tmp_path), one) == render(ours, one)


def test_jinja_environment_matches_transformers(hf_mistral, mistral):
    """tojson (no HTML escaping, non-ASCII kept), loop controls, strftime_now, special tokens."""
    template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{{ m | tojson }}|{{ m['content'] | tojson(indent=1) }}\n{% endfor %}"
                "{{ strftime_now('%Y') }} {{ bos_token }}{{ eos_token }}{{ unk_token }} "
                "{{ pad_token is defined }} {{ tools is none }} {{ add_generation_prompt }}")
    msgs = [user("<b>&'\" 🚀 ü"), assistant("ok"), user("never shown")]
    assert render(mistral[0], msgs, template=template) == hf_text(hf_mistral, msgs, True, template)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [None, V01_TEMPLATE], ids=["default", "official"])
def test_role_errors(bare, mistral, template):
    tok = bare if template is None else mistral[0]
    for msgs, why in [([user("a"), user("b")], "Conversation roles must alternate"),
                      ([assistant("a")], "Conversation roles must alternate"),
                      ([user("a"), {"role": "tool", "content": "b"}], "Only user and assistant")]:
        with pytest.raises(ValueError, match=why):
            encode_chat(tok, msgs)


def test_malformed_messages(bare):
    for messages, where in [([], "non-empty list"), (user("hi"), "non-empty list"),
                            ("hi", "non-empty list"), ([{"role": "user"}], r"messages\[0\]"),
                            ([user("a"), "b"], r"messages\[1\]"),
                            ([user("a"), {"role": "assistant", "content": None}], r"messages\[1\]"),
                            ([user("a"), {"role": 1, "content": "b"}], r"messages\[1\]"),
                            ([user(["a", "list"])], r"messages\[0\]")]:
        with pytest.raises(ValueError, match=where) as err:
            render(bare, messages)
        assert "\n" not in str(err.value)


def test_bad_template(bare):
    with pytest.raises(ValueError, match="chat template error: TemplateSyntaxError"):
        render(bare, [user("hi")], template="{% if %}")
    with pytest.raises(ValueError, match="^boom$"):
        render(bare, [user("hi")], template="{{ raise_exception('boom') }}")


def test_hf_tokenizer_without_template(chatml_dir, tmp_path):
    shutil.copy(chatml_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.kind == "hf" and tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template.*template=") as err:
        encode_chat(tok, [user("hi")])
    assert "\n" not in str(err.value)
    assert render(tok, [user("hi")], template=CHATML) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
