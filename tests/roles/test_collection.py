"""The collection pyqmail.mail (issue 20): its documentation, its build and its one version.

- ansible-doc renders every module by its fully qualified name, from this checkout (which is
  the collection through collections/ansible_collections/pyqmail/mail);
- scripts/build-collection makes a tarball of real files (no symlink left: the modules,
  module_utils and filters are links in the checkout) with the daemon wheel of the same
  version inside, which ansible-galaxy installs offline and ansible-doc reads from there;
- scripts/version refuses a galaxy.yml and a daemon that disagree.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.playbook import REPO, ansible_env

BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in (REPO / "library").glob("pyqmail_*.py"))
VERSION = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
_SPEC = importlib.util.spec_from_loader(
    "pyqmail_version_script",
    importlib.machinery.SourceFileLoader("pyqmail_version_script", str(REPO / "scripts/version")),
)
assert _SPEC is not None and _SPEC.loader is not None
version_script: Any = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(version_script)


def test_ansible_doc_renders_every_module_by_its_fqcn() -> None:
    names = [f"pyqmail.mail.{m}" for m in MODULES]
    proc = subprocess.run(
        [str(BIN / "ansible-doc"), "--json", *names],
        capture_output=True, text=True, env=ansible_env(), timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stderr, proc.stderr
    docs = json.loads(proc.stdout)
    assert sorted(docs) == names
    for name, data in docs.items():
        assert data["doc"]["module"] == name.rsplit(".", 1)[1]
        assert data["doc"]["short_description"], name
        assert data["examples"].strip(), name
        assert f"pyqmail.mail.{name.rsplit('.', 1)[1]}:" in data["examples"], name
        assert data["return"] is not None, name


def filter_names() -> list[str]:
    """Every filter the collection's filter plugins define."""
    names: list[str] = []
    for path in sorted((REPO / "filter_plugins").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"filters_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        names += module.FilterModule().filters()
    return sorted(names)


def test_ansible_doc_renders_every_filter_and_role() -> None:
    """Each filter has its documentation beside it (filter_plugins/<name>.yml); each role
    its argument specs."""
    names = [f"pyqmail.mail.{f}" for f in filter_names()]
    proc = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "filter", "--json", *names],
        capture_output=True, text=True, env=ansible_env(), timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout)
    assert sorted(docs) == names
    for name, data in docs.items():
        assert data["doc"]["name"] == name.rsplit(".", 1)[1]
        assert name in data["examples"], name
    yml = sorted(p.stem for p in (REPO / "filter_plugins").glob("*.yml"))
    assert yml == filter_names(), "a filter without documentation, or documentation without it"
    proc = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "role", "-l", "--json", "pyqmail.mail"],
        capture_output=True, text=True, env=ansible_env(), timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    roles = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "meta").is_dir())
    assert sorted(json.loads(proc.stdout)) == [f"pyqmail.mail.{r}" for r in roles]


def test_version_agrees_everywhere() -> None:
    import pyqmail

    assert pyqmail.__version__ == VERSION
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/version")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, VERSION), proc.stderr


def test_pyqmail_smtpd_prints_the_version() -> None:
    proc = subprocess.run(
        [str(BIN / "pyqmail-smtpd"), "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, f"pyqmail-smtpd {VERSION}\n"), proc.stderr


@pytest.mark.parametrize(
    ("galaxy", "package", "expected"),
    [
        ("1.2.3", "1.2.4",
         ["src/pyqmail/__init__.py __version__ '1.2.4' differs from galaxy.yml's '1.2.3'"]),
        ("1.2", "1.2", ["galaxy.yml version '1.2' is not a semantic version (1.2.3)"]),
        ("2.0.0-rc.1", "2.0.0-rc.1", []),
    ],
)  # fmt: skip
def test_version_problems_name_what_differs(galaxy: str, package: str, expected: list[str]) -> None:
    assert version_script.problems(galaxy, package) == expected


def test_version_of_galaxy_yml_and_package() -> None:
    assert version_script.galaxy_version("namespace: a\nversion: 1.0.0  # x\n") == "1.0.0"
    assert version_script.package_version('"""doc"""\n\n__version__ = "1.0.0"\n') == "1.0.0"
    with pytest.raises(ValueError, match="expected one top-level version"):
        version_script.galaxy_version("namespace: a\n")


def test_release_needs_the_version_in_the_changelog() -> None:
    released = "ancestor: null\nreleases:\n  1.0.0:\n    changes: {}\n"
    assert version_script.unreleased("1.0.0", released) == []
    assert version_script.unreleased("1.0.1", released) == [
        "changelogs/changelog.yaml has no release 1.0.1: "
        "run antsibull-changelog release --version 1.0.1"
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """make release's build, into a scratch dist directory."""
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [str(REPO / "scripts/build-collection")],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "BIN": str(BIN), "DIST": str(dist)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tarball = dist / f"pyqmail-mail-{VERSION}.tar.gz"
    wheel = dist / f"pyqmail-{VERSION}-py3-none-any.whl"
    assert proc.stdout.split() == [str(tarball), str(wheel)]
    return {"tarball": tarball, "wheel": wheel, "dist": dist}


def test_tarball_holds_real_files_and_the_wheel(built: dict[str, Path]) -> None:
    with tarfile.open(built["tarball"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
    assert not [name for name, m in members.items() if m.issym() or m.islnk()]
    assert manifest["collection_info"]["version"] == VERSION
    for module in MODULES:
        assert members[f"plugins/modules/{module}.py"].isfile()
    for name in (
        "pyqmail_rules", "pyqmail_cdb", "pyqmail_authdb", "pyqmail_inventory", "pyqmail_svstat",
        "pyqmail_dnslistspec",
        # the preflight's rows, by concept (pyqmail_inventory imports them)
        "pyqmail_checkbase", "pyqmail_clientrules", "pyqmail_control", "pyqmail_listeners",
        "pyqmail_mailboxes", "pyqmail_pki", "pyqmail_signing",
        "pyqmail_controlfiles",  # pyqmail_control_files's rules, the preflight's too
    ):  # fmt: skip
        assert members[f"plugins/module_utils/{name}.py"].isfile()
    for part in (
        "plugins/filter/pyqmail.py",
        "plugins/action/pyqmail_preflight.py",
        "meta/runtime.yml",
        "playbooks/site.yml",
        "CHANGELOG.rst",
        "files/fail2ban/jail.d/pyqmail.conf",
        f"roles/pyqmail_install/files/pyqmail-{VERSION}-py3-none-any.whl",
    ):
        assert members[part].isfile(), part  # fmt: skip
    for outside in ("src", "tests", "molecule", "collections", ".venv", "library", "site.yml"):
        assert not [n for n in members if n == outside or n.startswith(outside + "/")], outside
    with zipfile.ZipFile(built["wheel"]) as whl:
        meta = whl.read(f"pyqmail-{VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in meta


def test_installed_offline_ansible_doc_reads_it(built: dict[str, Path], tmp_path: Path) -> None:
    """ansible-galaxy installs the tarball from the file alone; the installed copy documents
    every module by its fully qualified name without this checkout's ansible.cfg."""
    target = tmp_path / "collections"
    # Only the target counts as installed: a copy in ~/.ansible/collections (a developer's
    # machine) would otherwise make ansible-galaxy answer "Nothing to do".
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")} | {
        "ANSIBLE_CONFIG": str(tmp_path / "none.cfg"),
        "ANSIBLE_GALAXY_SERVER_LIST": "",
        "ANSIBLE_COLLECTIONS_PATH": str(target),
    }
    (tmp_path / "none.cfg").write_text("[defaults]\n")
    proc = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "-p", str(target),
         str(built["tarball"])],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = target / "ansible_collections" / "pyqmail" / "mail"
    assert (root / "MANIFEST.json").is_file()
    proc = subprocess.run(
        [str(BIN / "ansible-doc"), "--json", *(f"pyqmail.mail.{m}" for m in MODULES)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)) == [f"pyqmail.mail.{m}" for m in MODULES]


def test_consumer_playbook_resolves_from_the_installed_collection_only(tmp_path: Path) -> None:
    """molecule/consumer/consumer.sh up to the run itself (CONSUMER_DRY_RUN=1): the tarball
    installed offline into a directory outside the repository, a site.yml and an inventory
    that use fully qualified names only, and every task resolved from that copy."""
    proc = subprocess.run(
        [str(REPO / "molecule/consumer/consumer.sh"), str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "CONSUMER_DRY_RUN": "1", "PATH": f"{BIN}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Installing 'pyqmail.mail:{VERSION}'" in proc.stdout
    for role in ("pyqmail_preflight", "pyqmail_install", "pyqmail_services"):
        assert f"pyqmail.mail.{role} : " in proc.stdout, role
    assert str(REPO) not in proc.stdout + proc.stderr
