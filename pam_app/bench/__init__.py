"""``pam bench``: the project's claim, measured (see docs/pam.md)."""
