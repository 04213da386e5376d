"""Mitogen's linear strategy for the playbooks run from this checkout (ansible.cfg names it).

Mitogen keeps one Python interpreter per host for the whole run and sends it each module,
where Ansible's own linear strategy starts a process per task; the tasks, their order and
their results are the same. It is installed from PyPI (requirements-run.txt pins it), so its
plugin directory lies inside whichever virtualenv runs ansible-playbook: this file is the
one fixed path ansible.cfg can name. Not part of the collection (galaxy.yml build_ignore):
users of the collection choose their own strategy.

An ansible-playbook without Mitogen (Debian's, or another virtualenv) still runs the
checkout's playbooks: with Ansible's linear strategy and a warning that says how to get
Mitogen, rather than failing on an import.
"""

from __future__ import annotations

from typing import Any

try:
    from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule
except ImportError as missing:
    from ansible.plugins.strategy.linear import StrategyModule as _Linear
    from ansible.utils.display import Display

    _WHY = str(missing)

    class StrategyModule(_Linear):  # type: ignore[no-redef]
        """Ansible's linear strategy, after saying Mitogen is missing."""

        def __init__(self, tqm: Any) -> None:
            Display().warning(
                f"Mitogen is not installed for this ansible-playbook ({_WHY}): running "
                "Ansible's linear strategy, three to four times slower. `make run` installs it "
                "(requirements-run.txt); ANSIBLE_STRATEGY=linear silences this warning."
            )
            super().__init__(tqm)


__all__ = ["StrategyModule"]
