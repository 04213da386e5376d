"""Mitogen's linear strategy for the playbooks run from this checkout (ansible.cfg names it).

Mitogen keeps one Python interpreter per host for the whole run and sends it each module,
where Ansible's own linear strategy starts a process per task; the tasks, their order and
their results are the same. It is installed from PyPI (requirements-run.txt pins it), so its
plugin directory lies inside whichever virtualenv runs ansible-playbook: this file is the
one fixed path ansible.cfg can name. Not part of the collection (galaxy.yml build_ignore):
users of the collection choose their own strategy.
"""

from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule

__all__ = ["StrategyModule"]
