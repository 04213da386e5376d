#!/usr/bin/env bash
# The consumer of the collection pyqmail.mail (molecule scenario "consumer", issue 20):
#   consumer.sh WORKDIR
# builds dist/pyqmail-mail-<version>.tar.gz from this checkout into WORKDIR/dist, then, with an
# environment that has nothing of this checkout or of molecule in it (no ANSIBLE_* variable,
# its own ansible.cfg), installs the tarball offline into WORKDIR/playbook/collections, writes
# an inventory for the container cons-mx and a site.yml that imports pyqmail.mail.site, and runs
# it. The podman connection plugin (containers.podman) comes from the venv's ansible package.
#   CONSUMER_DRY_RUN=1  stop at ansible-playbook --syntax-check and --list-tasks (no host needed:
#                       tests/roles/test_collection.py runs it so; molecule runs it for real)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:?usage: consumer.sh WORKDIR}
bin=$(dirname "$(command -v ansible-playbook)")
mkdir -p "$work"

DIST="$work/dist" BIN="$bin" "$repo/scripts/build-collection" >/dev/null
version=$("$bin/python" "$repo/scripts/version")
tarball=$work/dist/pyqmail-mail-$version.tar.gz

play=$work/playbook
mkdir -p "$play"
case $play in "$repo"/*) echo "consumer.sh: $play is inside the repository" >&2; exit 1 ;; esac
cd "$play"
clean=(env -i "HOME=$HOME" "PATH=$bin:/usr/sbin:/usr/bin:/sbin:/bin" "LANG=C.UTF-8"
       "ANSIBLE_CONFIG=$play/ansible.cfg")
# podman (the connection plugin runs it) keeps the network settings make molecule gives it
[[ -n ${CONTAINERS_CONF:-} ]] && clean+=("CONTAINERS_CONF=$CONTAINERS_CONF")

cat > ansible.cfg <<'CFG'
[defaults]
collections_path = collections
host_key_checking = False
retry_files_enabled = False
interpreter_python = /usr/bin/python3
CFG

# The same version again is "Nothing to do": the second (idempotence) run keeps the first copy.
"${clean[@]}" ansible-galaxy collection install --offline -p collections "$tarball"
test -f collections/ansible_collections/pyqmail/mail/MANIFEST.json

cat > inventory.yml <<INV
---
mailservers:
  hosts:
    cons-mx:
      ansible_connection: containers.podman.podman
      pyqmail__me: mx.consumer.test
      pyqmail_aliases__postmaster: admin@mx.consumer.test
      pyqmail_rules__relay_clients: []
      # the container's DNS forwards outside, which the tests never reach
      pyqmail_control__authchecks: false
      pyqmail_mailboxes__list:
        - name: admin
          password: consumer-admin-secret
      # what the controller keeps (CA copy, DNS zone, autoconfig) stays in this directory
      pyqmail_certificates__fetch_dir: $play/artifacts
      pyqmail_dns__zone_dir: $play/artifacts
      pyqmail_dovecot__artifacts_dir: $play/artifacts
INV

cat > site.yml <<'SITE'
---
- name: Provision the mail servers with the installed collection pyqmail.mail
  ansible.builtin.import_playbook: pyqmail.mail.site
SITE

if [[ ${CONSUMER_DRY_RUN:-} == 1 ]]; then
    "${clean[@]}" ansible-playbook -i inventory.yml site.yml --syntax-check
    exec "${clean[@]}" ansible-playbook -i inventory.yml site.yml --list-tasks
fi
exec "${clean[@]}" ansible-playbook -i inventory.yml site.yml
