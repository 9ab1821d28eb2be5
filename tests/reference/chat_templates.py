#!/usr/bin/python3
"""Expected chat-template renderings, made by Python's jinja2 the way transformers renders chat templates.

Writes tests/Fixtures/chat_templates.json, read by tests/Peft/ChatTemplateTests.cs, which renders the same
templates and conversations with our own Jinja subset (src/Peft/Data/Jinja.cs) and compares byte for byte.

The environment mirrors transformers' apply_chat_template (utils/chat_template_utils.py):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]),
a tojson filter = json.dumps(x, ensure_ascii=False, indent=indent) (no key sorting), a
raise_exception(message) global and a strftime_now(format) global (transformers gives datetime.now(); here the fixed
instant FIXED_NOW, so the fixture is stable). Variables: messages, bos_token, eos_token, add_generation_prompt, and the
other special tokens (pad_token, unk_token) where the template source has them.

Templates:
  - src/Peft/Data/Templates/*.jinja (our built-ins; see the README there for their provenance)
  - llama2: ../shared/assets/llama2-tokenizer/hf-tokenizer-json-genai/tokenizer_config.json "chat_template"
  - phi3:   ../shared/assets/llama-cpp-vocab/ggml-vocab-phi-3.gguf metadata tokenizer.chat_template
  - tests/Fixtures/chat_templates/*.jinja: the real published templates of Llama 3.2, Mistral Nemo, Qwen2.5,
    SmolLM2 and Gemma 2 (source repository, path and commit of each in REAL_TEMPLATES below and in the README
    there). These are also rendered with tool definitions, tool calls and tool results (TOOL_CONVERSATIONS)
    and with a fixed strftime_now / a date_string (DATE_CASES).

Run from the repository root:  python3 tests/reference/chat_templates.py   (Debian python3-jinja2 3.1)
"""
import datetime
import json
import os
import struct

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "..", "shared", "assets")


def gguf_chat_template(path):
    """tokenizer.chat_template of a GGUF v3 file (its own minimal metadata walk)."""
    with open(path, "rb") as f:
        d = f.read()
    assert d[:4] == b"GGUF"
    o = 8
    _, nkv = struct.unpack_from("<QQ", d, o)
    o += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def read_str(o):
        (n,) = struct.unpack_from("<Q", d, o)
        return d[o + 8:o + 8 + n].decode("utf-8"), o + 8 + n

    def skip(t, o):
        if t == 8:
            return read_str(o)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", d, o)
            o += 12
            for _ in range(n):
                o = skip(et, o)
            return o
        return o + sizes[t]

    for _ in range(nkv):
        key, o = read_str(o)
        (t,) = struct.unpack_from("<I", d, o)
        o += 4
        if key == "tokenizer.chat_template":
            return read_str(o)[0]
        o = skip(t, o)
    raise KeyError("no tokenizer.chat_template in " + path)


def environment(with_strftime_now=True):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    if with_strftime_now:
        # transformers: strftime_now(format) = datetime.now().strftime(format); here at FIXED_NOW so the output is stable
        env.globals["strftime_now"] = FIXED_NOW.strftime
    return env


# The real templates (tests/Fixtures/chat_templates/FILE), each with where its text was taken from.
REAL_TEMPLATES = {
    "real-llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                      "ggerganov/llama.cpp@7b5e0803c84435e8005725d8f9ddceb5d1820443:models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "real-mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>",
                          "ggerganov/llama.cpp@7b5e0803c84435e8005725d8f9ddceb5d1820443:models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja"),
    "real-qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>",
                     "0xayman/berkeley-function-calling-leaderboard@aef726b29915cc14a30273cdd8ae9214f4823a80:"
                     "berkeley-function-call-leaderboard/bfcl/model_handler/oss_model/qwen_fc.py (the tokenizer_config.json "
                     "chat_template string quoted in QwenFcHandler._format_prompt)"),
    "real-smollm2": ("HuggingFaceTB-SmolLM2-135M-Instruct.jinja", "<|im_start|>", "<|im_end|>",
                     "huggingface/huggingface.js@0158ec799b68e40a538268c36d138ef4930e5c61:"
                     "packages/ollama-utils/src/chat-template-automap.ts (entry library/smollm2:135m, its GGUF chat template)"),
    "real-gemma2": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>",
                    "ye-NX/llama.cpp@b354d7c9ecb76c97c07098617cdebbdfffa2583e:models/templates/google-gemma-2-2b-it.jinja"),
}


def templates():
    t = {}
    tdir = os.path.join(ROOT, "src", "Peft", "Data", "Templates")
    specials = {
        "chatml": ("", "<|im_end|>"),
        "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
        "mistral": ("<s>", "</s>"),
        "qwen2.5": ("", "<|im_end|>"),
        "smollm2": ("<|im_start|>", "<|im_end|>"),
        "gemma": ("<bos>", "<eos>"),
    }
    for name, (bos, eos) in specials.items():
        with open(os.path.join(tdir, name + ".jinja"), encoding="utf-8") as f:
            t[name] = {"source": "builtin:" + name, "text": f.read(), "bos": bos, "eos": eos}
    cfg_path = os.path.join(ASSETS, "llama2-tokenizer", "hf-tokenizer-json-genai", "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    t["llama2"] = {"source": "asset:llama2-tokenizer/hf-tokenizer-json-genai/tokenizer_config.json",
                   "text": cfg["chat_template"], "bos": cfg["bos_token"], "eos": cfg["eos_token"]}
    t["phi3"] = {"source": "asset:llama-cpp-vocab/ggml-vocab-phi-3.gguf",
                 "text": gguf_chat_template(os.path.join(ASSETS, "llama-cpp-vocab", "ggml-vocab-phi-3.gguf")),
                 "bos": "<s>", "eos": "<|endoftext|>"}
    rdir = os.path.join(ROOT, "tests", "Fixtures", "chat_templates")
    for name, (fname, bos, eos, source) in REAL_TEMPLATES.items():
        with open(os.path.join(rdir, fname), encoding="utf-8", newline="") as f:
            t[name] = {"source": source, "file": "tests/Fixtures/chat_templates/" + fname, "text": f.read(), "bos": bos, "eos": eos}
    return t


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  And 3+3?\n"}, {"role": "assistant", "content": " 6 \n"}],
    [{"role": "user", "content": "Übersetze: \"quote\" 'single' \\ back\ttab — 你好"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me check."},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"},
     {"role": "assistant", "content": "21 and sunny."}],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    [{"role": "system", "content": "<<SYS>> already here"}, {"role": "user", "content": "x"}],
]


# Conversations in the OpenAI tool-calling format (assistant tool_calls with arguments as a dict, tool results with
# tool_call_id), with the tools passed to the template as `tools`.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "days": {"type": "integer", "minimum": 1}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Local time, 24h \"HH:MM\".", "parameters": {"type": "object", "properties": {}},
    "return": {"type": "string"}}}
TOOL_CONVERSATIONS = [
    {"tools": [WEATHER_TOOL, TIME_TOOL], "messages": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
        {"role": "assistant", "content": "21.5 °C and clear."}]},
    {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Paris and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "callAAAAA", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "callBBBBB", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "callAAAAA", "content": "sunny"},
        {"role": "tool", "tool_call_id": "callBBBBB", "content": "snow"},
        {"role": "assistant", "content": "Paris: sunny. Oslo: snow."},
        {"role": "user", "content": "Thanks!"}]},
    {"tools": None, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "short", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "short", "content": "12:00"}]},
]

# The date a template prints: strftime_now (transformers passes it; here at a fixed instant) or a date_string variable.
FIXED_NOW = datetime.datetime(2024, 9, 3, 14, 5, 9)
DATE_CASES = [
    {"strftime_now": True},
    {"strftime_now": False},
    {"strftime_now": True, "date_string": "01 Jan 2025"},
]


# Small templates exercising the Jinja subset beyond what the model templates use; rendered with
# messages = CONVERSATIONS[1], bos_token "<s>", eos_token "</s>", add_generation_prompt True.
FEATURES = {
    "namespace_loop": "{%- set ns = namespace(n=0, last='') -%}\n{%- for m in messages if m.role != 'system' -%}\n  {%- set ns.n = ns.n + 1 -%}\n  {%- set ns.last = m.role -%}\n{%- endfor -%}\n{{ ns.n }}/{{ ns.last }}/{{ messages|length }}",
    "loop_vars": "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{% if not loop.last %},{% endif %}{% endfor %}",
    "whitespace": "A\n  {% if true %}\n    B {{- ' C ' -}} D\n  {% endif %}\nE {#- comment -#} F\n{% for i in range(3) %}\n{{ i }}\n{% endfor %}\n",
    "filters": "{{ '  x  '|trim }}|{{ messages[0].content|upper }}|{{ [3,1,2]|first }}{{ [3,1,2]|last }}|{{ ['a','b']|join('-') }}|{{ none|default('d') }}|{{ ''|default('e', true) }}|{{ messages|map(attribute='role')|join(',') }}|{{ messages|selectattr('role','equalto','user')|list|length }}|{{ {'b': 1, 'a': [1, 2.5, 'x\"y', none, true]}|tojson }}|{{ {'k': 'v'}|tojson(indent=2) }}|{{ 'abc'|replace('b','B') }}|{{ 3.0 }}|{{ 7 // 2 }}{{ 7 % 3 }}{{ 2 ** 3 }}{{ 7 / 2 }}",
    "strings": "{{ messages[0]['content'][4:8] }}|{{ messages[1:3]|length }}|{{ messages[-1].content.strip() }}|{{ 'a,b,c'.split(',')[1] }}|{{ 'Hello'.startswith('He') }}|{{ 'x' ~ 1 ~ none }}|{{ 'terse' in messages[0].content }}|{{ 'zz' not in 'abc' }}|{{ 'yes' if messages|length > 3 else 'no' }}|{{ messages[9] is defined }}{{ messages[0].nothing is undefined }}{{ none is none }}{{ 'a' is string }}{{ 3 is not string }}",
    "macro_set_block": "{% macro tag(name, body='-') %}<{{ name }}>{{ body }}</{{ name }}>{% endmacro %}{% set inner %}{{ tag('b', 'bold') }}{% endset %}{{ tag('i') }}{{ inner }}{% set a, b = 1, 2 %}{{ a + b }}{% for x in [1, 2, 3, 4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% else %}empty{% endfor %}{% for x in [] %}{{ x }}{% else %}empty{% endfor %}",
    "dict_items": "{% for k, v in {'one': 1, 'two': 2}.items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('role') }}{{ messages[0].get('nope', 'dflt') }}",
}


def main():
    env = environment()
    out = {"generator": "tests/reference/chat_templates.py", "jinja2": jinja2.__version__,
           "templates": templates(), "conversations": CONVERSATIONS, "cases": []}
    for name, t in out["templates"].items():
        tpl = env.from_string(t["text"])
        for ci, conv in enumerate(CONVERSATIONS):
            for gen in (False, True):
                case = {"template": name, "conversation": ci, "add_generation_prompt": gen}
                try:
                    case["expected"] = tpl.render(messages=conv, bos_token=t["bos"], eos_token=t["eos"],
                                                  add_generation_prompt=gen, pad_token="<pad>", unk_token="<unk>", tools=None)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                out["cases"].append(case)
    out["tool_conversations"] = TOOL_CONVERSATIONS
    for name, t in out["templates"].items():
        tpl = env.from_string(t["text"])
        for ci, conv in enumerate(TOOL_CONVERSATIONS):
            for gen in (False, True):
                case = {"template": name, "tool_conversation": ci, "add_generation_prompt": gen}
                try:
                    case["expected"] = tpl.render(messages=conv["messages"], tools=conv["tools"], bos_token=t["bos"], eos_token=t["eos"],
                                                  add_generation_prompt=gen, pad_token="<pad>", unk_token="<unk>")
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                except TypeError as e:
                    # e.g. a template concatenating a tool-call turn's None content: an evaluation error, not raise_exception
                    case["type_error"] = str(e)
                out["cases"].append(case)
    out["fixed_now"] = FIXED_NOW.isoformat()
    out["date_cases"] = []
    for dc in DATE_CASES:
        tpl = environment(dc["strftime_now"]).from_string(out["templates"]["real-llama3.2"]["text"])
        kw = {}
        if "date_string" in dc:
            kw["date_string"] = dc["date_string"]
        out["date_cases"].append(dict(dc, template="real-llama3.2", expected=tpl.render(
            messages=CONVERSATIONS[1], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_generation_prompt=True, **kw)))
    out["features"] = {}
    for name, text in FEATURES.items():
        out["features"][name] = {"text": text, "expected": env.from_string(text).render(
            messages=CONVERSATIONS[1], bos_token="<s>", eos_token="</s>", add_generation_prompt=True)}
    path = os.path.join(ROOT, "tests", "Fixtures", "chat_templates.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"{path}: {len(out['cases'])} cases, {sum('error' in c for c in out['cases'])} raise")


if __name__ == "__main__":
    main()
