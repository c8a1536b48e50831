"""The Qwen3.5 chat template (0.8B / 2B / 4B / 9B), written for this package.

:func:`get_chat_template` returns a Jinja template that renders a conversation exactly as the official Qwen3.5
``chat_template.jinja`` does (``reference/chat-tokenizer-processor.md`` §4-§5, and the 35 cases of
``fixtures/chat_renders.jsonl``) when transformers renders it (``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson`` with ``ensure_ascii=False``). What it renders:

- ChatML turns ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; no BOS and no default system prompt. Contents are
  trimmed; list contents concatenate their text parts and the vision placeholders
  ``<|vision_start|><|image_pad|><|vision_end|>`` / ``<|vision_start|><|video_pad|><|vision_end|>`` (with
  ``add_vision_id=True``: ``Picture N: `` / ``Video N: ``, counted over the whole conversation).
- With ``tools``: one system turn holding the ``# Tools`` block (one ``tojson`` line per tool, then the XML
  tool-call instructions), followed by the caller's system text when that is not empty.
- Assistant turns after the last real user query get ``<think>\\n{reasoning}\\n</think>\\n\\n`` (even when the
  reasoning is empty); earlier ones lose their reasoning. Tool calls render as Qwen3-Coder style XML
  (``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``).
- Runs of ``tool`` messages merge into one user turn of ``<tool_response>`` blocks.
- What each assistant turn says (after ``<|im_start|>assistant\\n``, through its ``<|im_end|>``) sits in a
  ``{% generation %}`` block: ``apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`` marks
  those tokens, exactly the ones :mod:`.training_data` labels, and TRL's ``assistant_only_loss=True`` accepts the
  template. The markers change nothing in the rendered text.
- The generation prompt ``<|im_start|>assistant\\n`` plus ``<think>\\n`` (thinking) or ``<think>\\n\\n</think>\\n\\n``
  (not thinking). The 0.8B/2B template thinks only when ``enable_thinking=True`` is passed; the 4B/9B template
  thinks unless ``enable_thinking=False`` is passed. That one test is the only difference between the two.

Why it is ours: the official file ships only with the checkpoints on the Hub, so a package that must work offline, or
with checkpoints converted or saved without it, cannot read it, and the tests need a template that renders with no
download. This one was written from the documented behaviour, not copied, and is checked byte for byte against the
fixture renders; only the fixed strings the model sees (the tool instructions, the special tokens) are, necessarily,
the same.
"""

from __future__ import annotations

from typing import Any

from ..generation.sampling import thinking_by_default
from ..model.presets import SIZES, size_of

__all__ = ["get_chat_template", "thinking_default_for"]

# The one spot where the two templates differ: the test that decides whether the generation prompt opens a thinking
# block. The 0.8B/2B models answer directly unless asked to think; the 4B/9B models think unless asked not to.
# `is true` / `is false` are identity tests (a truthy 1 or "yes" is neither), and a value of None counts as "not
# given" for both, as in the official templates.
_THINKING_TEST = {
    False: "enable_thinking is defined and enable_thinking is true",
    True: "enable_thinking is undefined or enable_thinking is not false",
}
_MARKER = "@THINKING_TEST@"

# A raw string: "\n" inside the Jinja string literals is an escape that Jinja, not Python, turns into a newline.
# Every tag starts with "-" so the indentation between tags never reaches the output; text is emitted only by
# {{- ... }} expressions and by the one block of literal text (the tool instructions) captured with {% set %}.
_TEMPLATE = r"""
{#- Qwen3.5 chat format (transformers_qwen35.chat_template). -#}
{%- set media = namespace(images=0, videos=0) %}

{#- Render a message content (string, list of parts, or nothing) to text.
    count:     advance the picture/video counters. Only the main pass over the messages counts, so the numbers of
               `add_vision_id` run once over the whole conversation.
    in_system: the content of a system message, which may not hold images or videos.
    A part is tested as an image first, then as a video, then as text, with the same membership tests as the
    official template (`'image' in part` is also true for a string part that contains the word). -#}
{%- macro content_text(content, count, in_system=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if 'image' in part or 'image_url' in part or part.type == 'image' %}
                {%- if in_system %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if count %}
                    {%- set media.images = media.images + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ media.images ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in part or part.type == 'video' %}
                {%- if in_system %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if count %}
                    {%- set media.videos = media.videos + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ media.videos ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}
                {{- part.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}

{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}

{#- ---- System turn. With tools it carries the tool list and the call format, then the caller's system text (if
    any, after a blank line); without tools it is the caller's system message as given (even if empty). ---- -#}
{%- set has_system = messages[0].role == 'system' %}
{%- if tools and tools is iterable and tools is not mapping %}
    {%- set tool_format %}
If you choose to call a function ONLY reply in the following format with NO suffix:

<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
<parameter=example_parameter_2>
This is the value for the second parameter
that can span
multiple lines
</parameter>
</function>
</tool_call>

<IMPORTANT>
Reminder:
- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags
- Required parameters MUST be specified
- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after
- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls
</IMPORTANT>
    {%- endset %}
    {{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' ~ tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\n' ~ tool_format }}
    {%- if has_system %}
        {%- set system_text = content_text(messages[0].content, false, true) | trim %}
        {%- if system_text %}
            {{- '\n\n' ~ system_text }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' ~ (content_text(messages[0].content, false, true) | trim) ~ '<|im_end|>\n' }}
{%- endif %}

{#- ---- Where the current request starts: the last user message that is a real query. A user message whose whole
    trimmed text is one <tool_response>...</tool_response> wrapper is a tool result, not a query. Walk backwards and
    stop at the first real query; without one the conversation cannot be rendered. ---- -#}
{%- set request = namespace(searching=true, start=0) %}
{%- for message in messages | reverse %}
    {%- if request.searching and message.role == 'user' %}
        {%- set text = content_text(message.content, false) | trim %}
        {%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
            {%- set request.searching = false %}
            {%- set request.start = (messages | length) - loop.index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if request.searching %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}

{#- ---- The turns. Every content is rendered (and its media counted) before the role is looked at. ---- -#}
{%- for message in messages %}
    {%- set content = content_text(message.content, true) | trim %}
    {%- if message.role == 'system' %}
        {#- already rendered above; it may only be the first message #}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' ~ content ~ '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {#- Reasoning: `reasoning_content` when it is a string. Otherwise an inline <think>...</think> in the content:
            the text before the first </think> (after the last <think> in it) is the reasoning, the text after the
            last </think> the content, each without the newlines next to the tags. -#}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- set reasoning = reasoning | trim %}
        {#- Turns of the current request keep their reasoning, in a think block that is there even when empty;
            earlier turns are history and drop it. -#}
        {%- set think = '<think>\n' ~ reasoning ~ '\n</think>\n\n' if loop.index0 > request.start else '' %}
        {{- '<|im_start|>assistant\n' }}
        {#- What the assistant wrote, through its <|im_end|> (what training/data.py labels): the span that
            apply_chat_template(return_assistant_tokens_mask=True) marks, and TRL's assistant_only_loss trains. -#}
        {%- generation %}
        {{- think ~ content }}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for call in message.tool_calls %}
                {#- OpenAI's {"type": "function", "function": {...}} wrapper or the flat {"name", "arguments"} form #}
                {%- set call = call.function if call.function is defined else call %}
                {#- a blank line after non-empty content, nothing after empty content, one newline between calls #}
                {%- if not loop.first %}
                    {{- '\n' }}
                {%- elif content | trim %}
                    {{- '\n\n' }}
                {%- endif %}
                {#- Names and values are written raw, so text that would end or open a tag of the call (a value
                    holding "</parameter><parameter=admin>", a name holding ">") is refused: read back, it would
                    forge the call. -#}
                {%- if '<' in call.name or '>' in call.name or '\n' in call.name %}
                    {{- raise_exception('Tool call name ' ~ (call.name | tojson) ~ ' contains "<", ">" or a newline, which would break the tool-call format.') }}
                {%- endif %}
                {{- '<tool_call>\n<function=' + call.name + '>\n' }}
                {%- if call.arguments is string %}
                    {{- raise_exception('Tool call arguments are a JSON string (the OpenAI wire format): pass them decoded, json.loads(arguments), or render with the processor (AutoProcessor), which decodes them.') }}
                {%- endif %}
                {%- if call.arguments is defined %}
                    {#- `arguments` must be a mapping (an OpenAI JSON string is refused above), in its own key order.
                        Mappings and lists are JSON; everything else goes through `string`, so strings are raw and
                        Python True / None stay "True" / "None". -#}
                    {%- for name, value in call.arguments | items %}
                        {%- if '<' in name or '>' in name or '\n' in name %}
                            {{- raise_exception('Tool call parameter name ' ~ (name | tojson) ~ ' contains "<", ">" or a newline, which would break the tool-call format.') }}
                        {%- endif %}
                        {%- if value is mapping or (value is sequence and value is not string) %}
                            {%- set text = value | tojson %}
                        {%- else %}
                            {%- set text = value | string %}
                        {%- endif %}
                        {%- if '</parameter>' in text or '<parameter=' in text or '</function>' in text or '<tool_call>' in text or '</tool_call>' in text %}
                            {{- raise_exception('The value of tool call parameter ' ~ (name | tojson) ~ ' contains a tool-call tag (</parameter>, <parameter=, </function>, <tool_call> or </tool_call>): written raw it would change the call when read back. Remove or rephrase the tag.') }}
                        {%- endif %}
                        {{- '<parameter=' + name + '>\n' + text + '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message.role == 'tool' %}
        {#- A run of tool results is one user turn. As in the official template, the turn is opened only after a
            non-tool message, so a tool message at index 0 gets no "<|im_start|>user" (a quirk kept on purpose). -#}
        {%- if loop.previtem and loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' ~ content ~ '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}

{#- ---- Generation prompt: the model's reply starts inside a think block, or after an empty, closed one. ---- -#}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if @THINKING_TEST@ %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""".strip()

if _TEMPLATE.count(_MARKER) != 1:  # pragma: no cover - guards edits of the template above
    raise AssertionError("the chat template must contain the thinking test exactly once")


def get_chat_template(thinking_default: bool) -> str:
    """The Qwen3.5 chat template as a Jinja string.

    ``thinking_default=False`` gives the 0.8B/2B template: the generation prompt is
    ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` unless ``enable_thinking=True`` is passed.
    ``thinking_default=True`` gives the 4B/9B template: ``<|im_start|>assistant\\n<think>\\n`` unless
    ``enable_thinking=False`` is passed. Use :func:`thinking_default_for` to pick the value for a model.
    """
    return _TEMPLATE.replace(_MARKER, _THINKING_TEST[bool(thinking_default)])


def thinking_default_for(config_or_size: Any) -> bool:
    """Whether the chat template of this model thinks by default: True for 4B/9B, False for 0.8B/2B.

    ``config_or_size`` is a size string (``"0.8B"``, ``"2B"``, ``"4B"``, ``"9B"``, case-insensitive), a composite
    ``Qwen3_5Config``, a ``Qwen3_5TextConfig``, or a ``config.json`` dict. A config is matched on its text model's
    ``hidden_size`` and ``num_hidden_layers`` (1024/24, 2048/24, 2560/32, 4096/32).

    Any other shape (the package's tiny test and demo configs, pruned or resized derivatives) gives False, the
    0.8B/2B behaviour: such models are not the 4B/9B checkpoints whose template is known to think by default, the
    tiny configs are built from the 0.8B layout, and the non-thinking prompt (an empty, closed think block) is valid
    input for any Qwen3.5 model. Pass ``enable_thinking`` explicitly to choose otherwise. An unrecognised size
    *string* raises ``ValueError``, since that is a typo rather than an unknown model.
    """
    if isinstance(config_or_size, str):
        by_name = {size.upper(): size for size in SIZES}
        size = by_name.get(config_or_size.strip().upper())
        if size is None:
            raise ValueError(f"Unknown Qwen3.5 size {config_or_size!r}; expected one of {', '.join(SIZES)}.")
        return thinking_by_default(size)
    size = size_of(config_or_size)
    return thinking_by_default(size) if size is not None else False
