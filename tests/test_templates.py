"""Chat templates: the tokenizer's own or a named one, never a silent guess; BOS where the tokenizer wants it
and the template lacks it; the plain template's generation stops at the next user turn."""

import copy
import hashlib

import pytest
from tokenizers.processors import TemplateProcessing

from steer_heal.errors import UserError
from steer_heal.generate import StopAt, cut, generate
from steer_heal.tokens import CHATML, PLAIN, USER_TURN, chat, stop_strings, use_template


@pytest.fixture
def tok(tiny):
    return copy.deepcopy(tiny[1])


def with_bos(tok):
    """tok with a BOS that a plain encode adds (as Gemma's and Llama's tokenizers do)."""
    tok.bos_token = "<|endoftext|>"
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def test_own_template_is_kept_and_recorded(tok):
    info = use_template(tok, "auto", "tiny")
    assert tok.chat_template == CHATML and stop_strings(tok) == ()
    assert info == {"name": "auto", "sha256": hashlib.sha256(CHATML.encode()).hexdigest(), "bos": "none"}


def test_no_template_is_refused_naming_the_flag(tok):
    tok.chat_template = None
    with pytest.raises(UserError, match="has no chat template") as e:
        use_template(tok, "auto", "base-model")
    assert "--chat-template plain" in str(e.value) and "\n" not in str(e.value)
    assert use_template(tok, "plain")["name"] == "plain"
    assert chat(tok, "Is lying wrong?", "Be terse.") == "Be terse.\n\nUser: Is lying wrong?\nAssistant:"
    assert stop_strings(tok) == (USER_TURN,)


def test_template_from_a_file_or_a_dict(tok, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}>")
    assert use_template(tok, str(f))["name"] == str(f) and chat(tok, "Hi", "S") == "[system] S [user] Hi >"
    with pytest.raises(UserError, match="not auto, chatml, plain or an existing Jinja file"):
        use_template(tok, str(tmp_path / "missing.jinja"))
    tok.chat_template = {"default": PLAIN, "tool_use": CHATML}
    use_template(tok, "auto")
    assert tok.chat_template == PLAIN


def test_a_template_refusing_the_system_turn_fails_early(tok):
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="System role not supported.*--chat-template plain"):
        use_template(tok, "auto", "gemma-2-it")


def test_bos_prepended_once_when_the_tokenizer_wants_it(tok):
    tok = with_bos(tok)
    assert use_template(tok, "plain")["bos"] == "prepended"
    text = chat(tok, "Hi", "S")
    assert text == "<|endoftext|>S\n\nUser: Hi\nAssistant:" and stop_strings(tok) == (USER_TURN,)
    assert tok(text, add_special_tokens=False)["input_ids"].count(tok.bos_token_id) == 1
    assert use_template(tok, "auto")["bos"] == "in template"  # idempotent: no second BOS
    assert chat(tok, "Hi", "S") == text


def test_stop_at_the_next_user_turn(tiny, tok):
    assert cut(" Yes.\nUser: and you?", (USER_TURN,)) == " Yes." and cut("no stop", (USER_TURN,)) == "no stop"
    ids = tok(["Yes.\nUser:", "Yes. User"], add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    assert StopAt(tok, (USER_TURN,), 0)(ids, None).tolist() == [True, False]
    assert StopAt(tok, (USER_TURN,), ids.shape[1])(ids, None).tolist() == [False, False]  # the prompt never counts


def test_generation_stops_where_the_stop_string_appears(tiny, tok, monkeypatch):
    """Greedy and sampled alike: a row ends at its stop string and is cut before it."""
    import steer_heal.generate as G

    model = tiny[0]
    tried = 0
    for greedy in (True, False):
        free = generate(model, tok, ["Hi", "Is it fair?"], max_new_tokens=24, seeds=None if greedy else [1, 2])
        if len(free[0]) < 9:  # the tiny random model's greedy row can end at once: nothing to cut
            continue
        tried += 1
        stop = free[0][6:9]  # three characters the unstopped first row does write
        monkeypatch.setattr(G, "stop_strings", lambda t, s=stop: (s,))
        got = generate(model, tok, ["Hi", "Is it fair?"], max_new_tokens=24, seeds=None if greedy else [1, 2])
        monkeypatch.undo()
        assert got[0] == free[0].split(stop, 1)[0].strip() and stop not in got[0]
        assert got[1] == free[1].split(stop, 1)[0].strip()
    assert tried
