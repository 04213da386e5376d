# pyqmail — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make run's lean environment: ansible-core and Mitogen (requirements-run.txt); the roles use nothing
# beyond ansible.builtin and this checkout's own collection pyqmail.mail (collections/).
RUN_VENV ?= .venv-run
RUN_STAMP := $(RUN_VENV)/.installed
# ansible-test sanity's controller: ansible-core only (ansible-test makes a venv per test).
SANITY_VENV ?= .venv-sanity
SANITY_STAMP := $(SANITY_VENV)/.installed
SCENARIO ?= default
# pytest-xdist workers for make unit; a test file runs whole on one worker (--dist loadfile)
TEST_WORKERS ?= auto
export CONTAINERS_CONF := $(CURDIR)/molecule/containers.conf

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

system-deps: ## install the Debian packages the tests and peers need (root; a no-op once present)
	scripts/install-system-deps

check-system-deps: ## prove every external tool the tests run works as they use it (names what is missing)
	scripts/check-system-deps

$(STAMP): requirements-dev.txt requirements-run.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e .
	@# Galaxy is unreachable: take containers.podman (molecule's podman driver) from the
	@# `ansible` package into the project's collections/ directory (ansible.cfg points there).
	rm -rf collections/ansible_collections/containers/podman
	mkdir -p collections/ansible_collections/containers
	cp -a "$$($(BIN)/python -c 'import ansible_collections.containers.podman as m; print(m.__path__[0])')" \
		collections/ansible_collections/containers/podman
	touch $@

venv: $(STAMP) ## create the virtualenv with every Python dependency

$(RUN_STAMP): requirements-run.txt
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q -r requirements-run.txt
	touch $@

$(SANITY_STAMP): requirements-run.txt
	$(PYTHON) -m venv $(SANITY_VENV)
	$(SANITY_VENV)/bin/pip install -q -r requirements-run.txt
	touch $@

lint: $(STAMP) ## ruff, mypy, yamllint, ansible-lint (production profile)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/yamllint -s .
	source $(BIN)/activate && ansible-lint --profile production

collection: $(STAMP) ## build the collection pyqmail.mail: dist/pyqmail-mail-<version>.tar.gz (daemon wheel inside)
	BIN=$(BIN) scripts/build-collection

collection-sanity: $(STAMP) $(SANITY_STAMP) ## ansible-test sanity on the built collection (no ignore file)
	BIN=$(SANITY_VENV)/bin scripts/collection-sanity

changelog-lint: $(STAMP) ## the changelog fragments and changelogs/changelog.yaml are valid
	$(BIN)/antsibull-changelog lint

release: $(STAMP) ## dist/: the collection tarball and the daemon wheel, one version (galaxy.yml), changelog released
	$(BIN)/python scripts/version --released
	$(BIN)/antsibull-changelog lint
	BIN=$(BIN) scripts/build-collection

docs: $(STAMP) ## README variables table and defaults comments from each role's meta/argument_specs.yml
	$(BIN)/python scripts/gen-role-docs

unit: $(STAMP) ## daemon, module and end-to-end tests (pytest, one worker per core: TEST_WORKERS=1 for one)
	$(BIN)/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

image: ## build (or reuse) the Debian 12 base image molecule's hosts start from
	scripts/build-base-image

molecule: $(STAMP) image ## run one molecule scenario: make molecule SCENARIO=default
	source $(BIN)/activate && molecule test -s $(SCENARIO)

molecule-all: $(STAMP) image ## run every molecule scenario, side by side (MOLECULE_JOBS=1: one after another)
	source $(BIN)/activate && scripts/molecule-all

test: system-deps check-system-deps ## the whole suite: tool check, lint, collection sanity, unit, end-to-end, molecule (CI runs this)
	$(MAKE) lint changelog-lint collection-sanity unit molecule-all

run: $(RUN_STAMP) ## provision this machine with site.yml and leave the mail server up (ansible-core and Mitogen only)
	source $(RUN_VENV)/bin/activate && ansible-playbook site.yml

bench: $(STAMP) ## receive-side load benchmark against Postfix and aiosmtpd
	$(BIN)/python bench/smtpd_load.py
	$(BIN)/python bench/fixed_rate.py
	$(BIN)/python bench/scan_load.py

bench-e2e: $(STAMP) ## end-to-end throughput vs a private Postfix (root): SMTP in -> Maildir (plain, then STARTTLS), and DKIM-signed outbound vs Postfix + OpenDKIM
	$(BIN)/python bench/e2e_throughput.py
	$(BIN)/python bench/e2e_throughput.py --rows inbound --starttls

STRESS_SECONDS ?= 300
FUZZ_SECONDS ?= 300

fuzz: $(STAMP) ## protocol-core fuzzer at length (FUZZ_SECONDS=300), prints iterations
	$(BIN)/python -m tests.stress.fuzz --seconds $(FUZZ_SECONDS)

stress: $(STAMP) ## slow attack/testssl tests, fuzz, then the SIGKILL soak (STRESS_SECONDS=300)
	$(BIN)/pytest -q -s -m slow tests/attacks tests/reliability
	$(BIN)/python -m tests.stress.fuzz --seconds $(FUZZ_SECONDS)
	$(BIN)/python -m tests.stress.soak --seconds $(STRESS_SECONDS)

.PHONY: help system-deps check-system-deps venv collection collection-sanity changelog-lint release lint docs unit image molecule molecule-all test run bench bench-e2e fuzz stress
