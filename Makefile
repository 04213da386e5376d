# pyqmail — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCENARIO ?= default
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/collections:$(CURDIR)/$(VENV)/lib/python3.11/site-packages
export CONTAINERS_CONF := $(CURDIR)/molecule/containers.conf

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

system-deps: ## install the Debian packages the tests and peers need (root)
	scripts/install-system-deps

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e .
	touch $@

venv: $(STAMP) ## create the virtualenv with every Python dependency

lint: $(STAMP) ## ruff, mypy, yamllint, ansible-lint (production profile)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/yamllint -s .
	source $(BIN)/activate && ansible-lint --profile production

unit: $(STAMP) ## daemon, module and end-to-end tests (pytest)
	$(BIN)/pytest -q -m "not slow"

test: lint unit ## the whole suite: lint, unit and end-to-end tests (CI runs this)

run: $(STAMP) ## provision this machine with site.yml and leave the mail server up
	source $(BIN)/activate && ansible-playbook site.yml

bench: $(STAMP) ## receive-side load benchmark against Postfix and aiosmtpd
	$(BIN)/python bench/smtpd_load.py

.PHONY: help system-deps venv lint unit test run bench
