"""Chat templates without a system role (Gemma): the system text folds into the first user turn,
and the shared sequence written piecewise equals the template's own rendering."""

from __future__ import annotations

import copy

import pytest

from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.template import TurnTemplate

# Gemma 3's template, shortened: the system text becomes the first user turn's prefix
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# Gemma 2's: a system message is an error
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


@pytest.fixture()
def gemma_lm(tiny_lm, request):
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.chat_template = request.param
    lm = copy.copy(tiny_lm)
    lm.tokenizer = tokenizer
    return lm


@pytest.mark.parametrize("gemma_lm", [GEMMA3, GEMMA2], indirect=True, ids=["gemma3", "gemma2"])
def test_system_text_folds_into_the_first_user_turn(gemma_lm):
    tok = gemma_lm.tokenizer
    template = TurnTemplate.from_tokenizer(tok)
    assert template.system_in_user_turn
    seq = SharedSequence(gemma_lm, template)
    seq.add_message(Speaker.SYSTEM, "Be brief.")
    seq.add_message(Speaker.USER, "Hi there")
    seq.add_message(Speaker.AGENT, "Hello")
    seq.add_message(Speaker.USER, "Bye")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Be brief.\n\nHi there"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "Bye"}], tokenize=False)
    assert seq.text() == rendered  # exactly what Gemma expects, one user turn carrying the system text
    assert "<start_of_turn>system" not in seq.text()


@pytest.mark.parametrize("gemma_lm", [GEMMA3], indirect=True, ids=["gemma3"])
def test_folded_template_matches_gemmas_own_rendering_of_a_system_message(gemma_lm):
    tok = gemma_lm.tokenizer
    seq = SharedSequence(gemma_lm, TurnTemplate.from_tokenizer(tok))
    seq.add_message(Speaker.SYSTEM, "Be brief.")
    seq.add_message(Speaker.USER, "Hi there")
    seq.begin_turn(Speaker.AGENT)
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi there"}],
                                       tokenize=False, add_generation_prompt=True)
    assert seq.text() == rendered


def test_templates_with_a_system_role_are_unchanged(tiny_lm):
    assert not TurnTemplate.from_tokenizer(tiny_lm.tokenizer).system_in_user_turn
