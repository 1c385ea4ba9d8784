"""How contexts are shown to the model: raw text or the chat template with the answer cue opening the reply."""

import pytest

from dipreg.prompting import PromptFormat

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}<assistant>"


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="[PAD]")
    tok.chat_template = CHAT
    return tok


def test_auto_is_raw_without_a_chat_template(tiny_tokenizer):
    ctx = "Question: Is it wrong to steal? Answer (Yes or No):"
    assert PromptFormat("auto").render(ctx, tiny_tokenizer) == ctx
    assert PromptFormat("auto").add_special_tokens(tiny_tokenizer)


def test_chat_moves_the_answer_cue_into_the_assistant_turn(chat_tokenizer):
    ctx = "Question: Is it wrong to steal? Answer (Yes or No):"
    rendered = PromptFormat("auto").render(ctx, chat_tokenizer)
    assert rendered == "<user>Question: Is it wrong to steal?</user><assistant>Answer:"
    assert not PromptFormat("chat").add_special_tokens(chat_tokenizer)


def test_chat_keeps_multiline_questions_whole(chat_tokenizer):
    ctx = "Statement: Ice is cold.\nIs the statement true or false? Answer:"
    rendered = PromptFormat("chat").render(ctx, chat_tokenizer)
    assert rendered == "<user>Statement: Ice is cold.\nIs the statement true or false?</user><assistant>Answer:"


def test_context_without_a_cue_is_used_whole_as_the_question(chat_tokenizer):
    assert (
        PromptFormat("chat", answer_prefix="A:")
        .render("Is ice cold?", chat_tokenizer)
        .endswith("<user>Is ice cold?</user><assistant>A:")
    )


def test_raw_style_ignores_the_chat_template(chat_tokenizer):
    assert PromptFormat("raw").render("x? Answer:", chat_tokenizer) == "x? Answer:"


def test_chat_style_without_a_template_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        PromptFormat("chat").render("x?", tiny_tokenizer)


def test_unknown_style_is_an_error():
    with pytest.raises(ValueError, match="prompt style"):
        PromptFormat("markdown")  # type: ignore[arg-type]
