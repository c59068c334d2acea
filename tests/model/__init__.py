"""Tests of the pure model package (a package, so module names do not clash with tests/tasks)."""
