"""Prompt templates: each dataset's default is a module constant `PROMPT`; `--prompt_template` overrides it.

A template is a `str.format` string over the fields each dataset keeps in `Example.meta` (e.g. `{dialogue}` for
SAMSum); an unknown field is a `UserError` listing the valid ones. The same template is used for training,
validation loss and evaluation, so prompts seen at evaluation time are the ones the adapter was trained on.
"""

from __future__ import annotations

import dataclasses
import string

from lorasens.data.registry import Example
from lorasens.errors import UserError


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"--prompt_template {template!r} is not a valid format string: {exc}") from None


def apply_prompt_template(examples: list[Example], template: str | None, dataset: str = "dataset") -> list[Example]:
    """Examples with prompts rebuilt from `template`; `template=None` keeps the dataset's default prompts."""
    if template is None or not examples:
        return examples
    # Users write "\n" in a shell flag or YAML string; both reach us as a backslash + n.
    template = template.replace("\\n", "\n")
    valid = sorted(examples[0].meta)
    unknown = [name for name in template_fields(template) if name not in valid]
    if unknown or not template_fields(template):
        problem = f"unknown field(s) {', '.join(unknown)}" if unknown else "no field"
        raise UserError(f"--prompt_template for {dataset} has {problem}; valid fields: {', '.join('{' + v + '}' for v in valid)}")
    return [dataclasses.replace(ex, prompt=template.format(**ex.meta)) for ex in examples]
