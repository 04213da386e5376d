#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# The work is done on the controller by the action plugin of the same name
# (action_plugins/pyqmail_preflight.py); this file holds its documentation, as Ansible's own
# action-only modules (debug, assert) do, so that ansible-doc and ansible-test find it.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_preflight
short_description: Check the inventory of every pyqmail role before anything changes
description:
  - Runs on the controller and changes nothing. For the host at hand it collects the value of
    every variable that the roles in O(roles) declare in their C(meta/argument_specs.yml), as
    those roles would see it (inventory, play and extra variables, else the role's defaults),
    and checks them all at once.
  - What only the host can say is read there, by commands that only read (without asking for
    become, in check mode too). With C(pyqmail_dovecot__enabled), a Dovecot that
    is or would be 2.4 or later is refused (2.4 reads no 2.3 configuration and has no
    checkpassword passdb). Read are the installed C(dovecot-core) (C(dpkg-query)), else the
    candidate of the package lists already there (C(apt-cache policy) in the C locale, no
    update, no cache file written), else the Debian release (C(VERSION_ID) of
    C(/etc/os-release), 13 and later ship 2.4). The role C(pyqmail.mail.pyqmail_dovecot) checks
    again after its apt update.
  - Fails with one line per problem, each naming the variable and the offending element.
  - Unless C(pyqmail__strict_variables=false), a host variable that starts like a pyqmail
    variable but is not declared by any of the roles is reported too (a typo).
  - The role C(pyqmail.mail.pyqmail_preflight) runs it as the first task of every play.
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
    details: It only reads, in check mode or not.
  diff_mode:
    support: none
  platform:
    platforms: posix
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
options:
  roles:
    description:
      - Names of the roles whose variables are checked (their directory names under O(roles_dir)).
    type: list
    elements: str
    required: true
  roles_dir:
    description:
      - Directory holding those roles. Defaults to the directory of the role that runs the
        task; required outside a role.
    type: path
  root:
    description:
      - Directory on the host under which those files are read (dpkg's database, apt's
        configuration and lists, C(etc/os-release)), for tests that write a host's files into
        one. The host's own files by default.
    type: path
    default: /
"""

EXAMPLES = r"""
- name: Check the inventory of every pyqmail role (one line per problem)
  pyqmail.mail.pyqmail_preflight:
    roles: "{{ pyqmail__roles }}"
"""

RETURN = r"""
msg:
  description: How many variables of how many roles were checked, or one line per problem.
  returned: always
  type: str
  sample: 142 variables of 13 roles checked
"""
