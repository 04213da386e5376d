#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_dkim_key
short_description: DKIM signing keys of one domain (RSA and Ed25519) and their rotation
description:
  - Keeps the DKIM keys of one signing domain in O(path) (the pyqmail roles use
    C(<root>/control/dkim/<domain>/)) - an RSA key (RFC 6376, RFC 8301) and an Ed25519 key
    (RFC 8463) per generation, each under its own selector - and a small state file
    C(state.json) there with each selector's dates. Keys are made on the host with
    C(cryptography) and written as unencrypted PKCS#8 PEM, C(<selector>.key).
  - Returns the DNS TXT records to publish (RV(records)) and the keys that sign now
    (RV(signing), the lines of C(control/dkimkeys)). The private keys never leave the host
    and never appear in a result, a diff or a log.
  - B(Selectors) are C(<selector_prefix><yyyymmdd>-rsa) and C(<selector_prefix><yyyymmdd>-ed25519),
    the date being the day the generation was made (with C(b), C(c)... appended to the date
    for a second generation on the same day), for example C(s20261202-rsa). Each is one DNS
    label.
  - B(Rotation) is off by default (O(rotate_days=0)) - the keys sign and stay published
    forever. With O(rotate_days) set, a generation signs O(rotate_days) days; O(prepublish_days)
    before it ends a run makes the next generation, which is published at once and signs only
    from then. The first run after a generation stops signing retires it - out of
    RV(signing) - and it stays in RV(records) O(retire_days) more; the first run after that
    removes its key files. A key never signs before it has been published O(prepublish_days)
    (when no run came in time the old generation signs longer). The first generation of a
    domain signs at once. The schedule only moves when the module runs; run it daily.
  - Turning rotation off keeps the signing generation forever and removes a pre-published
    one that never signed. O(rsa_bits) applies to keys made from then on.
  - Every option and the state and keys on disk are checked before anything changes. A key
    file that is missing, unreadable, of another type, or whose public key differs from the
    one in the state (the published record) fails the task; nothing is replaced silently.
    When a write fails, the run removes the key files it made; those a crashed run left
    (never in the state, so never published) are replaced, with a warning, the same day.
  - Writes go to a temporary file in the same directory that has the final owner, group and
    mode before its first byte (a key file is created 0600), then an atomic rename.
author:
  - pyqmail maintainers (@pyqmail)
requirements:
  - cryptography >= 38 (Debian 12 package C(python3-cryptography)) on the managed host
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Nothing is generated, written or removed; a key that would be made is listed
      with an empty C(txt) in RV(records).
  diff_mode:
    support: full
    details: Before/after list of the selectors with their dates and owner/group/mode
      changes; never key material.
  platform:
    platforms: posix
options:
  domain:
    description:
      - The signing domain (the C(d=) tag), a lower-case DNS name such as C(example.org).
    type: str
    required: true
  path:
    description:
      - Directory of the domain's keys and state file; created with O(dir_mode) when missing
        (its parent must exist).
    type: path
    required: true
  local_domains:
    description:
      - When given, O(domain) must be one of these (the host's C(control/locals) and virtual
        domains; an entry C(.example.org) covers every name below example.org). Mail of a
        domain the host does not serve should not be signed by it.
    type: list
    elements: str
  selector_prefix:
    description:
      - Start of every selector, 1 to 30 characters, a lower-case letter then letters,
        digits or C(-).
      - Keys are made per host, so each host that signs for a domain needs a prefix of its own
        (the role pyqmail_dkim passes the host's short name, C(mx1-)). A changed prefix applies
        to the keys made from then on; those in the state keep their names.
    type: str
    default: s
  rsa_bits:
    description: Size of the RSA keys made from now on (RFC 8301), a multiple of 8.
    type: int
    default: 2048
  rotate_days:
    description:
      - Days each generation signs; V(0) = no rotation. Otherwise from O(prepublish_days) + 1
        to 3650.
    type: int
    default: 0
  prepublish_days:
    description:
      - Days a new generation is published before it signs (the time to put its records in
        DNS and let caches expire), 1 to 365.
    type: int
    default: 7
  retire_days:
    description:
      - Days a generation stays published after it stopped signing (messages still queued or
        verified late), 1 to 365.
    type: int
    default: 10
  now:
    description:
      - The current time (ISO 8601, UTC unless an offset is given). For tests; default the
        host's clock.
    type: str
  owner:
    description: Owner of the directory, the key files and the state file.
    type: str
  group:
    description: Group of the directory, the key files and the state file (the signer's).
    type: str
  mode:
    description: Mode of the key files and the state file.
    type: raw
    default: '0640'
  dir_mode:
    description: Mode of O(path).
    type: raw
    default: '0750'
seealso:
  - name: RFC 8463 (Ed25519 for DKIM)
    description: The Ed25519 key and record format.
    link: https://www.rfc-editor.org/rfc/rfc8463
  - name: RFC 8301 (DKIM crypto update)
    description: RSA keys of 2048 bits at least for signing.
    link: https://www.rfc-editor.org/rfc/rfc8301
"""

EXAMPLES = r"""
- name: DKIM keys of example.org, rotated every 90 days
  pyqmail.mail.pyqmail_dkim_key:
    domain: example.org
    path: /var/qmail/control/dkim/example.org
    local_domains: [example.org, mx1.example.org]
    rotate_days: 90
    owner: root
    group: pyqmails
  register: dkim

- name: Show the records to publish
  ansible.builtin.debug:
    msg: "{{ item.selector }}._domainkey.{{ item.domain }}. TXT {{ item.txt }}"
  loop: "{{ dkim.records }}"
"""

RETURN = r"""
records:
  description:
    - Every selector that must be in DNS now (signing, pre-published or retired but still
      published), as C(<selector>._domainkey.<domain>) TXT records. C(txt) is empty in check
      mode for a key that would be made.
  returned: always
  type: list
  elements: dict
  sample:
    - domain: example.org
      selector: s20261202-rsa
      algorithm: rsa-sha256
      txt: "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA..."
    - domain: example.org
      selector: s20261202-ed25519
      algorithm: ed25519-sha256
      txt: "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
signing:
  description: The keys that sign now, one per algorithm (the lines of C(control/dkimkeys)).
  returned: always
  type: list
  elements: dict
  sample:
    - domain: example.org
      selector: s20261202-rsa
      algorithm: rsa-sha256
      keyfile: /var/qmail/control/dkim/example.org/s20261202-rsa.key
keys:
  description: The state after this run - each selector with its dates (UTC) - without keys.
  returned: always
  type: list
  elements: dict
  sample:
    - selector: s20261202-rsa
      algorithm: rsa-sha256
      created: "2026-12-02T06:00:00Z"
      signs_from: "2026-12-02T06:00:00Z"
      signs_until: "2027-03-02T06:00:00Z"
      published_until: null
generated:
  description: Selectors made by this run.
  returned: always
  type: list
  elements: str
retired:
  description: Selectors that stopped signing in this run (still published).
  returned: always
  type: list
  elements: str
removed:
  description: Selectors whose key files this run removed (no longer published).
  returned: always
  type: list
  elements: str
state_path:
  description: Path of the state file.
  returned: always
  type: str
  sample: /var/qmail/control/dkim/example.org/state.json
"""

import base64
import contextlib
import datetime as dt
import json
import os
import stat
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.pyqmail.mail.plugins.module_utils import pyqmail_dkim as dkim
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import (
        ensure_file,
        file_args,
        fsync_directory,
        read_if_exists,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import set_attributes
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()

STATE_FILE = "state.json"


def public_of(private: Any) -> str:
    """The p= tag: base64 SubjectPublicKeyInfo (RSA) or the raw 32-byte key (Ed25519)."""
    public = private.public_key()
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def make_key(algorithm: str, bits: int) -> tuple[bytes, str]:
    """(PKCS#8 PEM of a new private key, its p= tag)."""
    private: Any
    if algorithm == "ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, public_of(private)


def key_problem(data: bytes, key: dkim.Key) -> str | None:
    """Why the key file ``data`` is not the key of ``key`` (type, size, public key)."""
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "is not an unencrypted PEM private key"
    if key.algorithm == "ed25519-sha256" and not isinstance(private, ed25519.Ed25519PrivateKey):
        return "is not an Ed25519 key"
    if key.algorithm == "rsa-sha256":
        if not isinstance(private, rsa.RSAPrivateKey):
            return "is not an RSA key"
        if private.key_size < dkim.RSA_BITS[0]:
            return f"has {private.key_size} bits, fewer than {dkim.RSA_BITS[0]} (RFC 8301)"
    if public_of(private) != key.public:
        return "does not match the public key in the state file (its published record)"
    return None


class DkimKeyModule:
    """Checks everything, plans the schedule, then writes keys and state, removes old keys."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.domain: str = module.params["domain"]
        self.path: str = module.params["path"]
        self.state_path = os.path.join(self.path, STATE_FILE)
        # owner/group/mode differences per file name, for --diff
        self.attr_diffs: dict[str, dict[str, dict[str, object]]] = {}
        self.created: list[str] = []  # key files this run wrote, taken back if the state fails

    def fail(self, msg: str) -> None:
        self.module.fail_json(msg=msg, domain=self.domain, path=self.path)

    def attr_diff(self, path: str) -> dict[str, dict[str, object]]:
        """The owner/group/mode diff of one file (by its name; the directory as '.')."""
        name = "." if path == self.path else os.path.basename(path)
        return self.attr_diffs.setdefault(name, {"before": {}, "after": {}})

    def keyfile(self, selector: str) -> str:
        return os.path.join(self.path, f"{selector}.key")

    def now(self) -> dt.datetime:
        if self.params["now"] is None:
            return dt.datetime.now(dt.UTC).replace(microsecond=0)
        try:
            return dkim.parse_time(self.params["now"], "now")
        except dkim.DkimError as exc:
            self.fail(str(exc))
            raise

    def check_arguments(self) -> None:
        """Every option, naming it, before anything is read or written."""
        p = self.params
        problems = []
        if dkim.domain_problem(self.domain):
            problems.append(f"domain: {dkim.domain_problem(self.domain)}")
        elif p["local_domains"] is not None:
            local = [d.lower() for d in p["local_domains"]]
            wild = [d for d in local if d.startswith(".")]
            if not dkim.is_local(self.domain, local, wild):
                problems.append(
                    f"domain: {self.domain!r} is not a local domain of this host "
                    f"(local_domains: {', '.join(local) or 'none'})"
                )
        if dkim.prefix_problem(p["selector_prefix"]):
            problems.append(f"selector_prefix: {dkim.prefix_problem(p['selector_prefix'])}")
        if dkim.rsa_bits_problem(p["rsa_bits"]):
            problems.append(f"rsa_bits: {dkim.rsa_bits_problem(p['rsa_bits'])}")
        rotation = dkim.rotation_problem(p["rotate_days"], p["prepublish_days"], p["retire_days"])
        if rotation:
            problems.append(rotation)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            problems.append(f"path: {self.path} exists and is not a directory")
        if problems:
            self.fail("; ".join(problems))

    def read(self, path: str) -> bytes | None:
        try:
            return read_if_exists(path)
        except OSError as exc:
            self.fail(f"cannot read {path}: {exc}")
        return None

    def stray_keys(self, state: dkim.State) -> list[str]:
        """Key files in the directory that the state does not know."""
        if not os.path.isdir(self.path):
            return []
        known = {f"{key.selector}.key" for key in state.keys}
        return sorted(
            name for name in os.listdir(self.path) if name.endswith(".key") and name not in known
        )

    def load_state(self) -> tuple[dkim.State, bytes | None]:
        """The state on disk (an empty one when there is none)."""
        data = self.read(self.state_path)
        if data is None:
            return dkim.State(self.domain), None
        try:
            return dkim.load_state(json.loads(data), self.domain, self.state_path), data
        except (ValueError, dkim.DkimError) as exc:
            self.fail(f"{self.state_path}: {exc}; fix or move the file (nothing was changed)")
            raise

    def check_keys(self, state: dkim.State) -> None:
        """Each key of the state is on disk and is the key of its published record."""
        problems = []
        for key in state.keys:
            path = self.keyfile(key.selector)
            data = self.read(path)
            if data is None:
                problems.append(f"{path} is missing (selector {key.selector} is published)")
                continue
            problem = key_problem(data, key)
            if problem:
                problems.append(f"{path} {problem}")
        if problems:
            self.fail(
                "; ".join(problems) + ". Nothing was changed or replaced: restore the key, or "
                f"remove the selector from {self.state_path} and from DNS"
            )

    def leftovers(self, generated: list[dkim.Key], state_data: bytes | None) -> list[str]:
        """Key files under selectors this run makes, left by a crashed run: replaced. Safe: only
        the state says what was published (RV(records) comes from it), ``dkim.plan`` makes no
        selector it knows (no known key is overwritten), the name carries today's date (no
        earlier run published it). A failed write removes its run's keys; a crash cannot, and
        the next run refused until someone deleted them. The file must be a regular file newer
        than the state (keys are written first: an older one was there when the state was last
        written without it - not ours, refused). Not told apart: a state deleted by hand the
        day its keys were made."""
        found = []
        state_time = os.stat(self.state_path).st_mtime_ns if state_data is not None else 0
        for key in generated:
            path = self.keyfile(key.selector)
            st = os.lstat(path) if os.path.lexists(path) else None
            if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_mtime_ns < state_time):
                self.fail(
                    f"{path} exists but is not in {self.state_path} (and is not a file newer "
                    "than it, left by a failed run): move it away (nothing was changed)"
                )
            found += [f"{key.selector}.key"] if st is not None else []
        return found

    def check_strays(self, state: dkim.State, state_data: bytes | None, left: list[str]) -> None:
        """Key files the state does not know (a leftover this run replaces aside): a failure
        without a state file (they would be neither published nor rotated), else a warning."""
        strays = [name for name in self.stray_keys(state) if name not in left]
        if strays and state_data is None:
            self.fail(
                f"{self.path} holds key files ({', '.join(strays)}) but no {STATE_FILE}: "
                "they would not be published nor rotated; move them away or restore "
                f"{self.state_path}"
            )
        if strays:
            self.module.warn(f"{self.path}: key files not in {STATE_FILE}, left alone: {strays}")
        if left:
            self.module.warn(f"{self.path}: replacing {left}, left by a run that failed before")

    def run(self) -> None:
        self.check_arguments()
        p = self.params
        now = self.now()
        state, state_data = self.load_state()
        self.check_keys(state)
        result = dkim.plan(
            state,
            now,
            prefix=p["selector_prefix"],
            rotate_days=p["rotate_days"],
            prepublish_days=p["prepublish_days"],
            retire_days=p["retire_days"],
        )
        self.check_strays(state, state_data, self.leftovers(result.generated, state_data))
        changed = self.ensure_directory()
        if not self.module.check_mode:
            for key in result.generated:
                pem, key.public = make_key(key.algorithm, p["rsa_bits"])
                self.write(self.keyfile(key.selector), pem, secret=True)
                self.created.append(self.keyfile(key.selector))
        for key in result.state.keys:
            if key not in result.generated:
                args = file_args(self.module, self.keyfile(key.selector), p["mode"])
                diff = self.attr_diff(args["path"])
                changed = set_attributes(self.module, args, diff) or changed
        text = json.dumps(result.state.as_json(), indent=1, sort_keys=True) + "\n"
        changed = self.write(self.state_path, text.encode(), existing=state_data) or changed
        for key in result.removed:
            changed = True
            if not self.module.check_mode:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.keyfile(key.selector))
        self.finish(changed, now, state, result)

    def discard_created(self) -> str:
        """Remove the key files this run wrote (a later write failed): unrecorded, they would
        block the next run. Returns the end of the failure message."""
        left = []
        for path in self.created:
            try:
                os.unlink(path)
            except OSError as exc:
                left += [f"{path} ({exc.strerror})"] if os.path.lexists(path) else []
        with contextlib.suppress(OSError):
            fsync_directory(self.path)
        if left:
            return f"could not remove the new key files {', '.join(left)}: remove them by hand"
        names = ", ".join(os.path.basename(path) for path in self.created) or "none"
        return f"new key files removed: {names}; nothing was published"

    def ensure_directory(self) -> bool:
        """Create O(path) when missing; owner/group/mode as asked."""
        changed = False
        if not os.path.isdir(self.path):
            changed = True
            self.attr_diff(self.path)["before"]["state"] = "absent"
            self.attr_diff(self.path)["after"]["state"] = "directory"
            if self.module.check_mode:
                return True
            try:
                os.mkdir(self.path, 0o700)
            except OSError as exc:
                self.fail(f"cannot create {self.path}: {exc} (its parent must exist)")
        args = file_args(self.module, self.path, self.params["dir_mode"])
        return set_attributes(self.module, args, self.attr_diff(self.path)) or changed

    def write(self, path: str, data: bytes, *, secret: bool = False, existing: Any = None) -> bool:
        if self.module.check_mode and not os.path.isdir(self.path):
            return existing != data
        changed, _backup = ensure_file(
            self.module,
            path,
            data,
            self.params["mode"],
            secret=secret,
            existing=existing,
            diff=self.attr_diff(path),
            undo=self.discard_created,
        )
        return changed

    def finish(
        self, changed: bool, now: dt.datetime, before: dkim.State, result: dkim.Plan
    ) -> None:
        keys = result.state.keys
        out: dict[str, Any] = {
            "changed": changed,
            "records": [
                {
                    "domain": self.domain,
                    "selector": key.selector,
                    "algorithm": key.algorithm,
                    "txt": key.txt() if key.public else "",
                }
                for key in keys
            ],
            "signing": [
                {
                    "domain": self.domain,
                    "selector": key.selector,
                    "algorithm": key.algorithm,
                    "keyfile": self.keyfile(key.selector),
                }
                for key in result.signing(now)
            ],
            "keys": [
                {name: value for name, value in vars(key).items() if name != "public"}
                for key in keys
            ],
            "generated": [key.selector for key in result.generated],
            "retired": result.retired,
            "removed": [key.selector for key in result.removed],
            "state_path": self.state_path,
        }
        if self.module._diff:
            out["diff"] = {
                "before_header": self.state_path,
                "after_header": self.state_path,
                "before": self.summary(before, self.attr_diffs, "before"),
                "after": self.summary(result.state, self.attr_diffs, "after"),
            }
        self.module.exit_json(**out)

    @staticmethod
    def summary(
        state: dkim.State, attrs: dict[str, dict[str, dict[str, object]]], side: str
    ) -> str:
        """One line per selector with its dates, then owner/group/mode lines; no key."""
        lines = [
            f"{key.selector} {key.algorithm} signs_from={key.signs_from} "
            f"signs_until={key.signs_until or '-'} published_until={key.published_until or '-'}"
            for key in state.keys
        ]
        for name, diff in sorted(attrs.items()):
            lines += [f"{name} {attr}: {value}" for attr, value in diff[side].items()]
        return "".join(line + "\n" for line in lines)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "domain": {"type": "str", "required": True},
            "path": {"type": "path", "required": True},
            "local_domains": {"type": "list", "elements": "str"},
            "selector_prefix": {"type": "str", "default": "s"},
            "rsa_bits": {"type": "int", "default": 2048},
            "rotate_days": {"type": "int", "default": 0},
            "prepublish_days": {"type": "int", "default": 7},
            "retire_days": {"type": "int", "default": 10},
            "now": {"type": "str"},
            "owner": {"type": "str"},
            "group": {"type": "str"},
            "mode": {"type": "raw", "default": "0640"},
            "dir_mode": {"type": "raw", "default": "0750"},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib("cryptography (Debian: python3-cryptography)"),
            exception=IMPORT_ERROR,
        )
    DkimKeyModule(module).run()


if __name__ == "__main__":
    main()
