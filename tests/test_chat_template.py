"""Chat templates: the same text as transformers' apply_chat_template, the end-of-turn token, and hostile
templates refused with one line."""

import json

import pytest

import llama4dpo.chat_template as chat_template
from llama4dpo.chat_template import render_chat, turn_end_token
from llama4dpo.errors import UserError
from llama4dpo.tokenizer import HFTokenizer, save_for_transformers

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# SmolLM2's template (ChatML with a default system message), as in its tokenizer_config.json.
SMOLLM2 = """{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}\
{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""

# Llama 3.1 style, multi-line (trim_blocks/lstrip_blocks matter), with raise_exception, tojson and a date.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}{{- tools | tojson(indent=4) }}{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CONVERSATIONS = {
    "system+user": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}],
                    False),
    "multi-turn": ([{"role": "user", "content": "Hi <b>&</b>"}, {"role": "assistant", "content": " Hello! "},
                    {"role": "user", "content": "naïve 日本語 🙂\n\nbye"}], False),
    "generation prompt": ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                           {"role": "assistant", "content": "A."}, {"role": "user", "content": "More?"}], True),
}


@pytest.fixture(scope="module")
def tokenizer_json():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is the answer? Be brief. Hello there, system user assistant"] * 20,
                            trainer=trainer)
    return tok.to_str()


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def pair(request, tokenizer_json, tmp_path_factory):
    """(our HFTokenizer with the template, transformers' tokenizer from its export)."""
    if request.param == "smollm2":
        ours = HFTokenizer(tokenizer_json, bos_token="<|im_start|>", eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", chat_template=SMOLLM2)
    else:
        ours = HFTokenizer(tokenizer_json, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                           chat_template=LLAMA3)
    out = save_for_transformers(ours, tmp_path_factory.mktemp(request.param))
    return ours, transformers.AutoTokenizer.from_pretrained(str(out))


@pytest.mark.parametrize("shape", CONVERSATIONS)
def test_render_equals_transformers(pair, shape):
    ours, theirs = pair
    messages, generation = CONVERSATIONS[shape]
    before = json.dumps(messages)
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation) == expected
    assert render_chat(ours.chat_template, messages, add_generation_prompt=generation, bos_token=ours.bos_token,
                       eos_token=ours.eos_token, pad_token=ours.pad_token) == expected
    # The rendered control tokens encode as control tokens, as transformers tokenizes the chat.
    assert ours.encode(expected) == theirs.encode(expected, add_special_tokens=False)
    assert json.dumps(messages) == before  # the caller's messages are not touched


def test_extra_variables_reach_the_template(pair):
    ours, theirs = pair
    messages, _ = CONVERSATIONS["system+user"]
    tools = [{"name": "add", "description": "a <b> & c", "parameters": {}}]
    kwargs = dict(add_generation_prompt=True, tools=tools, date_string="1 Jan 2025")
    assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, tokenize=False,
                                                                                        **kwargs)


def test_end_of_turn(pair):
    ours, _ = pair
    end = "<|im_end|>" if ours.eos_token == "<|im_end|>" else "<|eot_id|>"
    assert turn_end_token(ours.chat_template, ours.special_tokens, bos_token=ours.bos_token,
                          eos_token=ours.eos_token) == end
    assert ours.stop_ids == [ours.eos_id]  # eos is the turn end in both templates


def test_end_of_turn_beside_eos(tokenizer_json):
    tok = HFTokenizer(tokenizer_json, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                      chat_template=LLAMA3)
    assert tok.stop_ids == sorted([tok.eos_id, tok.encode("<|eot_id|>")[0]])
    plain = HFTokenizer(tokenizer_json, bos_token=None, eos_token="<|end_of_text|>",
                        chat_template="{{ raise_exception('needs a system message') }}")
    assert plain.stop_ids == [plain.eos_id]  # the probe is refused: eos only


def test_transformers_conveniences():
    render = lambda t, **kw: render_chat(t, [{"role": "user", "content": "<&>"}], add_generation_prompt=False,
                                         bos_token=None, eos_token="</s>", **kw)
    assert render("{{ messages | tojson }}") == '[{"role": "user", "content": "<&>"}]'  # no HTML escaping
    assert render("{% generation %}{{ eos_token }}{% endgeneration %}") == "</s>"
    assert render("[{{ bos_token }}]") == "[]"  # a missing special token is undefined, as in transformers
    assert render("{% for i in range(3) %}{% if i == 1 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "0"
    assert render("{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 2 %}{{ ns.n }}{{ dict(a=1) }}") == "2{'a': 1}"
    assert len(render("{{ strftime_now('%Y') }}")) == 4


def test_non_plain_message_data_is_refused():
    with pytest.raises(UserError, match="not plain data"):
        render_chat("{{ messages }}", [{"role": "user", "content": object()}], add_generation_prompt=False,
                    bos_token=None, eos_token=None)


HOSTILE = {
    "mro": "{{ ''.__class__.__mro__ }}",
    "globals": "{{ cycler.__init__.__globals__ }}",
    "subclasses": "{{ dict.mro()[-1].__subclasses__() }}",
    "recursion": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "syntax": "{% for m in messages %}{{ m }",
    "undefined call": "{{ os.system('true') }}",
    "raise": "{{ raise_exception('only user and assistant roles') }}",
    "repetition": "{{ 'x' * 10**12 }}",
    "power": "{{ 2 ** 100000000 }}",
    "doubling string": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}",
    "doubling list": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] %}"
                     "{% endfor %}{{ ns.s }}",
    "captured block": "{% set x %}{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}{% endset %}",
    "padding": "{{ 'x'.center(10**10) }}",
    "filter padding": "{{ 'x' | center(10000000000) }}",
    "format width": "{{ '%0999999999d' % 1 }}",
    "join": "{{ ('x' * 999999).join(['a'] * 100) }}",
    "namespace dunder": "{% set ns = namespace(_x=1) %}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_is_one_line_user_error(name, monkeypatch):
    monkeypatch.setattr(chat_template.limits, "TIME_LIMIT_S", 0.3)  # the loops that write nothing stop on time
    with pytest.raises(UserError) as e:
        render_chat(HOSTILE[name], [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                    bos_token="<s>", eos_token="</s>")
    message = str(e.value)
    assert message.startswith("chat template: ") and "\n" not in message and "Traceback" not in message


def test_hostile_template_in_a_tokenizer(tokenizer_json):
    tok = HFTokenizer(tokenizer_json, bos_token=None, eos_token="<|im_end|>", chat_template=HOSTILE["globals"])
    with pytest.raises(UserError, match="refused by the sandbox"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.stop_ids == [tok.eos_id]
    with pytest.raises(UserError, match="no chat template"):
        HFTokenizer(tokenizer_json, bos_token=None, eos_token="<|im_end|>").apply_chat_template([])
