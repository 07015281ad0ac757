"""Native runtime tests (a package, so this folder's conftest.py does not shadow tests/conftest.py,
which tests/trainer imports by the name 'conftest')."""
