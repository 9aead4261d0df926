"""Chat templates: render a conversation with the Jinja template an artifact ships.

Hugging Face tokenizers keep the template in ``chat_template.jinja`` (transformers >= 4.50) or under
``chat_template`` in ``tokenizer_config.json``. transformers renders it with jinja2's immutable sandbox
plus a few helpers (``raise_exception``, a non-escaping ``tojson``, ``strftime_now``, the
``{% generation %}`` tag); the consumer install has no transformers, so this module sets up the same
jinja2 environment directly (jinja2 is the maintained renderer transformers itself uses). A test checks
that the result equals ``transformers``' ``apply_chat_template`` character for character.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from pipeline.errors import PipelineError


def find_template(artifact_dir: str | Path) -> str | None:
    """The chat template the artifact ships, or None."""
    directory = Path(artifact_dir)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering
        for inference keeps the body as is, as transformers does when it is not tracking."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def special_tokens(artifact_dir: str | Path) -> dict:
    """bos/eos/pad/unk token strings from tokenizer_config.json, the names templates refer to."""
    config = Path(artifact_dir) / "tokenizer_config.json"
    cfg = json.loads(config.read_text()) if config.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        if isinstance(value, dict):  # AddedToken serialized
            value = value.get("content")
        if value is not None:
            out[key] = value
    return out


def render(artifact_dir: str | Path, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` ([{"role": ..., "content": ...}]) under the artifact's template."""
    import jinja2

    template = find_template(artifact_dir)
    if template is None:
        raise PipelineError(f"{artifact_dir} ships no chat template (no chat_template.jinja and no chat_template "
                            f"in tokenizer_config.json): generate without --chat, or use an instruct model's artifact")
    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens(artifact_dir))
    except jinja2.TemplateError as exc:
        raise PipelineError(f"the chat template of {artifact_dir} cannot render this conversation: {exc}") from None
