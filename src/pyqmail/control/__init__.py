"""Control files: how each daemon reads ``<root>/control``.

``reader`` (qmail's control_readline/control_readfile, one ``ControlError``), ``parsers``
(text -> value), ``table`` (every file: parser, default, which daemons read it), and the two
readers built on them: ``smtpd`` (pyqmail-smtpd's ``Config``) and ``send`` (pyqmail-send's
``Control``). ``check`` is both daemons' ``--check``.
"""
