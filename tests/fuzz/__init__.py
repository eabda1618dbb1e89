"""Fuzzing support: seed corpus, mutations, targets, the atheris harness."""
