"""Prompt templates are files: the built-in ones are package data in `prompts/`, users pass their own.

    rubric = load_template("code", builtin=("edu", "code"), flag="--rubric", placeholders=("{text}",))
    rubric.render(text=document)          # every {name} replaced; rubric.sha256 keys the answer cache

Annotation rubrics and synthesis templates (and the steering YAML) are read, checked and hashed
the same way, with the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
from pathlib import Path
from typing import Sequence

from phi_jax.errors import InputError, MissingFileError


def template_sha256(text: str) -> str:
    """The hex SHA-256 of a template's text: what keys the teacher's answer cache and the manifests."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A prompt: `name` (a built-in name or the file's path) and its text with {placeholders}."""

    name: str
    template: str

    @property
    def sha256(self) -> str:
        return template_sha256(self.template)

    def render(self, **values: str) -> str:
        out = self.template
        for key, value in values.items():
            out = out.replace("{" + key + "}", value)
        return out


def builtin_text(filename: str) -> str:
    """A file of `phi_jax/curation/prompts/`."""
    return (importlib.resources.files("phi_jax.curation") / "prompts" / filename).read_text("utf-8")


def read_text_file(path: str, flag: str, *, hint: str = "") -> str:
    """A user's UTF-8 file, or a one-line error naming the flag (and `hint`, what to pass instead)."""
    if not Path(path).is_file():
        raise MissingFileError(f"{flag}={path}: no such file" + (f"; {hint}" if hint else ""))
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag}={path}: cannot read it as UTF-8 text ({e}); save it as a UTF-8 text "
                         "file") from None


def load_template(spec: str, *, builtin: dict[str, str], flag: str, placeholders: Sequence[str]
                  ) -> PromptTemplate:
    """`builtin[spec]` (a file of prompts/) when `spec` names one, else the prompt file `spec`.

    A user's file must hold every placeholder: one that is missing means part of the input would
    never reach the teacher.
    """
    if spec in builtin:
        return PromptTemplate(spec, builtin_text(builtin[spec]))
    hint = (f"pass {' or '.join(builtin)}, or " if builtin else "pass ") + \
        f"a prompt file with {', '.join(placeholders)} where the input goes"
    text = read_text_file(spec, flag, hint=hint)
    missing = [p for p in placeholders if p not in text]
    if missing:
        raise InputError(f"{flag}={spec}: the prompt has no {', '.join(missing)} placeholder, so that input "
                         "would never reach the teacher; put it where the input should go")
    return PromptTemplate(spec, text)
