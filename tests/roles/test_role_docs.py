"""Each role variable is documented once, in meta/argument_specs.yml, and the rest follows.

Fails when the README variables table or a defaults/main.yml comment differs from what
scripts/gen-role-docs writes (run ``make docs``), when a default differs between
defaults/main.yml and argument_specs, or when a variable is in one and not the other.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
_LOADER = importlib.machinery.SourceFileLoader("gen_role_docs", str(REPO / "scripts/gen-role-docs"))
_SPEC = importlib.util.spec_from_loader("gen_role_docs", _LOADER)
assert _SPEC is not None
gen: Any = importlib.util.module_from_spec(_SPEC)
sys.modules["gen_role_docs"] = gen  # dataclasses look their module up there
_LOADER.exec_module(gen)

ROLES_WITH_VARS = sorted(
    p.parent.parent.name for p in (REPO / "roles").glob("*/meta/argument_specs.yml")
)


def options(role: str) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
    opts: dict[str, dict[str, Any]] = data["argument_specs"]["main"].get("options") or {}
    return opts


def defaults(role: str) -> dict[str, Any]:
    path = REPO / "roles" / role / "defaults" / "main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def test_every_role_with_variables_is_in_the_generator() -> None:
    assert sorted(gen.ROLES) == ROLES_WITH_VARS


@pytest.mark.parametrize("path", sorted(gen.outputs()), ids=lambda p: str(p.relative_to(REPO)))
def test_generated_file_is_up_to_date(path: Path) -> None:
    wanted = gen.outputs()[path]
    assert path.read_text() == wanted, f"{path.relative_to(REPO)} is stale: run make docs"


@pytest.mark.parametrize("role", ROLES_WITH_VARS)
def test_defaults_and_argument_specs_name_the_same_variables(role: str) -> None:
    spec, values = options(role), defaults(role)
    only_defaults = sorted(set(values) - set(spec))
    assert only_defaults == [], f"{role}: in defaults/main.yml, not in argument_specs"
    only_spec = sorted(name for name in set(spec) - set(values) if not spec[name].get("required"))
    assert only_spec == [], f"{role}: in argument_specs without a default in defaults/main.yml"


@pytest.mark.parametrize("role", ROLES_WITH_VARS)
def test_defaults_equal_argument_specs_default(role: str) -> None:
    """A templated default ("{{ ... }}") may be left out of the spec, not differ from it."""
    spec, values = options(role), defaults(role)
    for name, value in values.items():
        templated = isinstance(value, str) and "{{" in value
        if templated and "default" not in spec[name]:
            continue
        assert "default" in spec[name], f"{role}: {name}: argument_specs has no default"
        assert spec[name]["default"] == value, f"{role}: {name}: defaults/main.yml says {value!r}"


@pytest.mark.parametrize("role", ROLES_WITH_VARS)
def test_every_variable_has_a_description(role: str) -> None:
    for name, spec in options(role).items():
        assert gen.Variable(name, spec).description, f"{role}: {name} has no description"


def test_check_mode_finds_drift_and_make_docs_fixes_it(tmp_path: Path) -> None:
    """On a copy: a hand-edited defaults comment and README row are reported, then rewritten."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "roles", copy / "roles", ignore=shutil.ignore_patterns("templates"))
    shutil.copy(REPO / "README.md", copy / "README.md")
    path = copy / "roles" / "pyqmail_services" / "defaults" / "main.yml"
    path.write_text(path.read_text().replace("# Port of each listener.", "# Ports."))
    readme = copy / "README.md"
    readme.write_text(readme.read_text().replace("| Port of each listener. |", "| Ports. |", 1))
    stale = {p for p, text in gen.outputs(copy).items() if p.read_text() != text}
    assert stale == {path, readme}
    for p, text in gen.outputs(copy).items():
        p.write_text(text)
    assert "# Port of each listener.\npyqmail_services__ports:" in path.read_text()
    assert all(p.read_text() == text for p, text in gen.outputs(copy).items())


def test_render_defaults_keeps_values_and_other_comments() -> None:
    spec = {"pyqmail_r__a": gen.Variable("pyqmail_r__a", {"description": ["One.", "Two."]})}
    head, tail = "---\n# header\n\n", "pyqmail_r__a: >-\n  {{ x }}\n\n# a note\n\npyqmail_r__b: 1\n"
    assert gen.render_defaults(f"{head}# old text\n{tail}", spec) == f"{head}# One. Two.\n{tail}"
