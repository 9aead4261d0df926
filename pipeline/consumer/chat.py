"""Chat templates: render a conversation with the Jinja template an artifact ships.

Hugging Face tokenizers keep the template in ``chat_template.jinja`` (transformers >= 4.50) or under
``chat_template`` in ``tokenizer_config.json``. transformers renders it with jinja2's immutable sandbox
plus a few helpers (``raise_exception``, a non-escaping ``tojson``, ``strftime_now``, the
``{% generation %}`` tag); the consumer install has no transformers, so this module sets up the same
jinja2 environment directly (jinja2 is the maintained renderer transformers itself uses). A test checks
that the result equals ``transformers``' ``apply_chat_template`` character for character.

A template is code from whoever published the artifact. The sandbox stops it reaching Python's
internals, not from running forever (nested loops), exhausting memory (``'%999999999d' % 1``) or
recursing without end (a macro calling itself). So it renders in a child process with a wall-time, CPU,
address-space and output bound (:data:`LIMITS`); any of them gives one line, and the parent, which holds
the model, is never at risk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from pipeline.consumer import untrusted
from pipeline.errors import PipelineError

# What rendering one conversation may take: a real template (Qwen3's, Llama 3's tool-calling one) renders
# in milliseconds into a few KB; the child process alone needs ~60 MB.
LIMITS = {"seconds": 5, "memory_bytes": 1 << 30, "output_chars": 1 << 20, "template_bytes": 1 << 20}


def find_template(artifact_dir: str | Path) -> str | None:
    """The chat template the artifact ships, or None."""
    directory = Path(artifact_dir)
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return untrusted.read_text(jinja, "chat template", LIMITS["template_bytes"])
    config = directory / "tokenizer_config.json"
    if config.exists():
        template = untrusted.load_json(config, "tokenizer config").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
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
    cfg = untrusted.load_json(config, "tokenizer config") if config.exists() else {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        if isinstance(value, dict):  # AddedToken serialized
            value = value.get("content")
        if value is not None:
            out[key] = value
    return out


def render(artifact_dir: str | Path, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` ([{"role": ..., "content": ...}]) under the artifact's template,
    rendered in a bounded child process (:data:`LIMITS`)."""
    template = find_template(artifact_dir)
    if template is None:
        raise PipelineError(f"{artifact_dir} ships no chat template (no chat_template.jinja and no chat_template "
                            f"in tokenizer_config.json): generate without --chat, or use an instruct model's artifact")
    request = json.dumps({"template": template, "messages": messages, "add_generation_prompt": add_generation_prompt,
                          "variables": special_tokens(artifact_dir)})
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.consumer.chat"], input=request, capture_output=True,
                              text=True, timeout=LIMITS["seconds"], preexec_fn=_limit_child)
    except subprocess.TimeoutExpired:
        proc = None
    reply = _reply(proc)
    if "text" not in reply:
        raise PipelineError(f"the chat template of {artifact_dir} cannot render this conversation: {reply['error']}")
    return reply["text"]


def _limit_child() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (LIMITS["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (LIMITS["seconds"],) * 2)


def _reply(proc) -> dict:
    if proc is None or proc.returncode in (-9, -24):  # SIGKILL (timeout), SIGXCPU
        return {"error": f"it ran past {LIMITS['seconds']} s (a loop without end?): refused"}
    try:
        reply = json.loads(proc.stdout)
        if isinstance(reply, dict) and isinstance(reply.get("text", reply.get("error")), str):
            return reply
    except json.JSONDecodeError:
        pass
    if "MemoryError" in proc.stderr or proc.returncode != 0:
        return {"error": f"it needed more than {LIMITS['memory_bytes'] >> 20} MiB or failed "
                         f"({(proc.stderr.strip().splitlines() or ['no message'])[-1][:200]}): refused"}
    return {"error": "the renderer gave no answer"}


def _render_bounded(request: dict) -> dict:
    """In the child: render, stopping at the output bound; every failure is an answer, not a traceback."""
    import jinja2

    try:
        chunks, size = [], 0
        stream = _environment().from_string(request["template"]).generate(
            messages=request["messages"], add_generation_prompt=request["add_generation_prompt"],
            **request["variables"])
        for chunk in stream:
            size += len(chunk)
            if size > LIMITS["output_chars"]:
                return {"error": f"it renders more than {LIMITS['output_chars']} characters: refused"}
            chunks.append(chunk)
        return {"text": "".join(chunks)}
    except jinja2.TemplateError as exc:
        return {"error": str(exc)[:300]}
    except RecursionError:
        return {"error": "it recurses without end: refused"}
    except MemoryError:
        return {"error": f"it needed more than {LIMITS['memory_bytes'] >> 20} MiB: refused"}
    except Exception as exc:  # the template's own error (a bad filter argument, 1/0): its message
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_render_bounded(json.loads(sys.stdin.read()))))
