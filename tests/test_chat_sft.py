"""Chat fine-tuning data against transformers: the tokens `--loss-on assistant` counts equal
`apply_chat_template(..., return_assistant_tokens_mask=True)` on templates with
{% generation %} marks, and so do the ones found by rendering prefixes of the same templates
without marks; train.eval's assistant-token loss equals a transformers model's on the same
rendered tokens within 1e-5. Templates: Mistral's [INST] (our default for a bare
tokenizer.model, on the real Mistral-7B sentencepiece model) and SmolLM2-135M-Instruct's ChatML,
with and without a system prompt. Then a run on conversations as a user types it, and the
errors bad conversations give."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from convert import from_torch
from mistral_jax.text.chat_template import MISTRAL_V01_TEMPLATE
from mistral_jax.text.tokenizer import Tokenizer
from tests.fetch import byte_level_bpe, fetch_wheel_member
from tests.reference import hf_model
from train import eval as eval_cli
from train import finetune
from train.input import chat, default

ROOT = Path(__file__).resolve().parents[1]
ASSISTANT = "{{- message['content'] + eos_token }}"
MISTRAL_MARKED = MISTRAL_V01_TEMPLATE.replace(
    ASSISTANT, "{% generation %}" + ASSISTANT + "{% endgeneration %}")
# SmolLM2-135M-Instruct's chat_template (the tokenizer.chat_template of its GGUF, which
# tests/test_gguf.py reads), and the same with the assistant's text and <|im_end|> marked
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_MARKED = SMOLLM2.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}")
SPECIALS = {"mistral": {"bos_token": "<s>", "eos_token": "</s>"},
            "chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}}


def turn(role, content):
    return {"role": role, "content": content}


SYSTEM = turn("system", "You answer in one line. ✅")
CHATS = {
    "one_turn": [turn("user", "What is a lawyer?"),
                 turn("assistant", "One skilled in circumvention of the law.")],
    "multi_turn": [turn("user", "Define bore."), turn("assistant", "A person who talks."),
                   turn("user", "And absurdity?"),
                   turn("assistant", "  A statement manifestly inconsistent 🚀  ")],
    "ends_with_user": [turn("user", "Hi"), turn("assistant", "Hello! 👋"),
                       turn("user", "Tell me more.")],
}
CONVERSATIONS = [*CHATS.values(), *[[SYSTEM, *c] for c in CHATS.values()]]
IDS = [*CHATS, *[f"system_{k}" for k in CHATS]]


def tokenizer_dir(path: Path, source: Path, template: str, kind: str) -> Path:
    """A tokenizer folder transformers loads: `source`'s tokenizer file and `template`."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, path / ("tokenizer.json" if source.suffix == ".json" else
                                "tokenizer.model"))
    config = {**SPECIALS[kind], "unk_token": "<unk>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def theirs_mask(hf_tokenizer, messages):
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def assert_masks_match(hf_tokenizer, ours_marked, ours_plain, messages):
    ids, mask = theirs_mask(hf_tokenizer, messages)
    assert any(mask)
    for ours in (ours_marked, ours_plain):
        got = chat.encode(ours, messages)
        assert got.ids.tolist() == ids
        assert got.counted.tolist() == mask, [
            ours.id_to_piece(i) for i, c in zip(ids, mask, strict=True) if c]


@pytest.fixture(scope="module")
def sp_path():
    return fetch_wheel_member("mistral-common", "mistral_common/data/tokenizer.model.v1")


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=IDS)
def test_mistral_mask_is_transformers(sp_path, tmp_path, messages):
    """The real Mistral-7B tokenizer.model: sentencepiece's offsets map the spans to tokens as
    transformers' fast tokenizer does; a bare tokenizer.model's default template is the plain
    one."""
    path = tokenizer_dir(tmp_path / "marked", sp_path, MISTRAL_MARKED, "mistral")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    marked = Tokenizer.from_dir(path)
    bare = Tokenizer.from_file(sp_path)
    assert bare.chat_template is None
    assert_masks_match(hf, marked, bare, messages)
    counted = chat.encode(bare, messages).counted
    eos = [i for i, t in enumerate(chat.encode(bare, messages).ids) if t == bare.eos_id]
    assert eos and all(counted[eos])  # each assistant turn's </s>


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json with Mistral's and ChatML's special tokens."""
    texts = default.entries(default.CORPUS.read_text()[:40000])
    texts += [m["content"] for c in CONVERSATIONS for m in c] * 3 + ["system user assistant"]
    bpe = byte_level_bpe(texts, 600, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(str(path))
    return path


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=IDS)
@pytest.mark.parametrize("kind, marked, plain", [("chatml", SMOLLM2_MARKED, SMOLLM2),
                                                 ("mistral", MISTRAL_MARKED,
                                                  MISTRAL_V01_TEMPLATE)], ids=["chatml", "inst"])
def test_bpe_mask_is_transformers(bpe_file, tmp_path, messages, kind, marked, plain):
    """ChatML counts the assistant's text and <|im_end|>, not the newline after it."""
    hf = transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir(tmp_path / "marked", bpe_file, marked, kind))
    ours = [Tokenizer.from_dir(tokenizer_dir(tmp_path / name, bpe_file, t, kind))
            for name, t in (("ours_marked", marked), ("plain", plain))]
    assert_masks_match(hf, *ours, messages)


# --- the loss ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(bpe_file, tmp_path_factory):
    """(transformers' tiny random Mistral over the BPE, our checkpoints of it: one per
    template, each with its tokenizer_config.json)."""
    d = tmp_path_factory.mktemp("chat_model")
    vocab = Tokenizer.from_file(bpe_file).vocab_size
    theirs = hf_model("mistral", d / "hf", vocab_size=vocab, hidden_size=64,
                      num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.1)
    tokenizer_dir(d / "hf", bpe_file, SMOLLM2, "chatml")
    base = from_torch.convert(d / "hf", d / "ckpt")
    ckpts = {}
    for name, template, kind in [("chatml", SMOLLM2, "chatml"), ("inst", MISTRAL_V01_TEMPLATE,
                                                                 "mistral")]:
        ckpts[name] = d / name
        shutil.copytree(base, ckpts[name])
        tokenizer_dir(ckpts[name], bpe_file, template, kind)
    return theirs, ckpts


def transformers_loss(model, hf_tokenizer, conversations, all_tokens=False):
    total, count = 0.0, 0
    for messages in conversations:
        ids, mask = theirs_mask(hf_tokenizer, messages)
        labels = [i if m or all_tokens else -100 for i, m in zip(ids, mask, strict=True)]
        n = sum(label != -100 for label in labels[1:])
        with torch.no_grad():
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
        total += out.loss.item() * n
        count += n
    return total / count, count


@pytest.mark.parametrize("name, kind, marked", [("chatml", "chatml", SMOLLM2_MARKED),
                                                ("inst", "mistral", MISTRAL_MARKED)])
def test_eval_loss_on_assistant_tokens_is_transformers(model, bpe_file, tmp_path, name, kind,
                                                       marked):
    theirs, ckpts = model
    hf = transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir(tmp_path / "tok", bpe_file, marked, kind))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    for loss_on in ("assistant", "all"):
        args = eval_cli.arguments().parse_args(
            [str(ckpts[name]), "--data", str(data), "--seq-len", "128", "--batch-size", "4",
             "--loss-on", loss_on])
        loss, _, count = eval_cli.evaluate(args)
        expected, n = transformers_loss(theirs, hf, CONVERSATIONS, all_tokens=loss_on == "all")
        assert count == n
        assert abs(loss - expected) < 1e-5, (loss_on, loss, expected)


# --- a run as a user types it, and bad conversations ------------------------------------------


def user_env():
    import os

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_a_run_on_conversations_from_the_command_line(model, tmp_path):
    """Three steps on conversations, one of them longer than a row (cut at a user turn, with
    the warning); the run's eval and train.eval on what it wrote agree."""
    _, ckpts = model
    long = [turn("user", "Tell me about the devil."), turn("assistant", "He is " * 40)] * 3
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n"
                                                  for c in [*CONVERSATIONS, long] * 4))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n"
                                                for c in CONVERSATIONS))
    command = (f"{sys.executable} -m train.finetune --init {ckpts['chatml']} --data train.jsonl "
               "--eval-data val.jsonl --out run --steps 3 --batch-size 4 --seq-len 128 "
               "--lr 1e-2 --eval-every 3")
    proc = subprocess.run(command.split(), cwd=tmp_path, env=user_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: the training data: 28 documents, " in proc.stderr
    assert "warning: the training data: 4 of 28 conversations are longer than --seq-len 128 " \
        "and were cut into pieces, at the start of a user turn" in proc.stderr
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    eval_loss = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    args = eval_cli.arguments().parse_args([str(tmp_path / "run" / "final"), "--data",
                                            str(tmp_path / "val.jsonl")])
    assert abs(eval_cli.evaluate(args)[0] - eval_loss) < 1e-5
    assert json.loads((tmp_path / "run" / "run.json").read_text())["loss_on"] == "assistant"


BAD = [  # a second line, and what the error says after "FILE:2: "
    ({"messages": [turn("user", "hi"), {"content": "no role"}]},
     "messages[1] has no string \"role\" (fields: ['content'])"),
    ({"messages": [turn("user", "hi"), turn("bot", "hello")]},
     "messages[1] has the role 'bot'; the roles are system, user, assistant, tool"),
    ({"messages": [turn("system", "be brief"), turn("user", "hi")]},
     "the conversation has no assistant message, so --loss-on assistant counts nothing in it: "
     "add the assistant's reply, or use --loss-on all"),
    ({"messages": [turn("user", "hi"), turn("assistant", "hello"), turn("user", "well?"),
                   turn("tool", "{}")]},  # [INST] has no tool role
     "Only user and assistant roles are supported!"),
    ({"messages": []}, "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects"),
]


@pytest.mark.parametrize("line, message", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_conversations_are_one_line_naming_file_and_line(model, tmp_path, capsys, line,
                                                             message):
    _, ckpts = model
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps(line) + "\n")
    out = tmp_path / "run"
    assert finetune.main(["--init", str(ckpts["inst"]), "--data", str(data), "--out", str(out),
                          "--steps", "1"]) == 2
    assert capsys.readouterr().err == f"error: {data}:2: {message}\n" and not out.exists()
    assert eval_cli.main([str(ckpts["inst"]), "--data", str(data)]) == 1
    assert capsys.readouterr().err == f"error: {data}:2: {message}\n"
