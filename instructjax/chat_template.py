"""A model's chat template: found in its tokenizer files and rendered with jinja2 as ``transformers`` does.

An instruct model was fine-tuned on conversations written in its own markup (``<|im_start|>user ...``,
``[INST] ... [/INST]``, ...). ``tokenizer_config.json`` keeps that markup as a jinja2 template under
``chat_template``; newer checkpoints keep it in ``chat_template.jinja`` (or ``chat_template.json``) beside it.
``scripts/prepare_data.py`` renders every prompt through it, so a policy sees prompts in the format it was
trained on, and the jsonl files it writes hold the exact text the model reads.

Rendering follows ``transformers``' ``apply_chat_template``: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter, ``raise_exception`` and
``strftime_now`` globals, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.
The template's own ``raise_exception`` (for example a template that requires alternating roles) becomes a
``ChatTemplateError`` with the template's message.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A template that cannot be read or that refused the messages (its ``raise_exception``)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(path: str | pathlib.Path) -> tuple[str | None, dict[str, str]]:
    """The chat template of the tokenizer at ``path`` (a model directory, a tokenizer directory or a file in
    one) and its special tokens' texts; ``(None, tokens)`` when it has none.

    Looked up in order: ``chat_template.jinja``, ``chat_template.json`` and ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates, of which ``default`` is used)."""
    directory = pathlib.Path(path)
    directory = directory if directory.is_dir() else directory.parent
    config_path = directory / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{config_path}: not valid JSON ({e})") from e
    tokens = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(), tokens
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text()).get("chat_template"), tokens
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{config_path}: field 'chat_template': a list without a 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{config_path}: field 'chat_template': expected a string, got {type(template)}")
    return template, tokens


def render(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """``messages`` (``[{"role": ..., "content": ...}, ...]``) written in the template's markup. With
    ``add_generation_prompt`` the text ends where the assistant's reply begins: a prompt for the policy."""

    def raise_exception(message: str):
        raise ChatTemplateError(f"the chat template refused these messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from e
    variables = {name: "" for name in SPECIAL_TOKENS} | dict(special_tokens or {})
    try:
        return compiled.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from e
